"""Airflow provider that runs each batch step on its own fresh Compute Engine VM.

This module must stay importable without Airflow: the worker agent installs the package with
``--no-deps`` to use :mod:`airflow_batchvm.wire`.
"""

__version__ = "0.1.0"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-batchvm",
        "name": "Batch VM",
        "description": "Run each batch step of a DAG on its own fresh Compute Engine VM.",
        "versions": [__version__],
        "hooks": [{"integration-name": "Batch VM", "python-modules": ["airflow_batchvm.hooks.batchvm"]}],
        "operators": [
            {"integration-name": "Batch VM", "python-modules": ["airflow_batchvm.operators.batchvm"]}
        ],
        "sensors": [{"integration-name": "Batch VM", "python-modules": ["airflow_batchvm.sensors.batchvm"]}],
        "triggers": [
            {"integration-name": "Batch VM", "python-modules": ["airflow_batchvm.triggers.batchvm"]}
        ],
        "extra-links": [
            "airflow_batchvm.links.batchvm.BatchVmInstanceLink",
            "airflow_batchvm.links.batchvm.BatchVmLogsLink",
        ],
        "integrations": [{"integration-name": "Batch VM", "external-doc-url": "https://cloud.google.com/compute"}],
    }
