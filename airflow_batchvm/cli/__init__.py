"""The ``batchvm`` command line (typer + rich).

Every command works against real GCP and against the local emulators alike: only the endpoints
differ (``PUBSUB_EMULATOR_HOST``, ``BATCHVM_COMPUTE_API_ENDPOINT``). None needs an Airflow metadata
database: the Google connection comes from the environment, else Application Default Credentials.
"""

import typer

from airflow_batchvm.cli.common import cloud_errors
from airflow_batchvm.cli.gc import gc
from airflow_batchvm.cli.local import local_app
from airflow_batchvm.cli.monitor import monitor
from airflow_batchvm.cli.setup import setup
from airflow_batchvm.cli.submit import submit

app = typer.Typer(
    help="airflow-batchvm: batch jobs on single-job Compute Engine VMs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
for command in (setup, submit, monitor, gc):
    app.command()(cloud_errors(command))
app.add_typer(local_app, name="local")
