"""The ``batchvm`` command line (typer + rich)."""

import typer

app = typer.Typer(help="airflow-batchvm: batch jobs on single-job Compute Engine VMs.", no_args_is_help=True)
