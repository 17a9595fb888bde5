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
        "config": {
            "batchvm": {
                "description": "Settings of the airflow-batchvm provider.",
                "options": {
                    "shared_status_pull": {
                        "description": (
                            "Whether the waits of one triggerer process share one status pull (a "
                            "subscription of its own on batch_jobs_status), instead of a long poll each "
                            "of their job's status subscription. Turn off only to compare the two."
                        ),
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": None,
                        "default": "True",
                    }
                },
            }
        },
        "integrations": [{"integration-name": "Batch VM", "external-doc-url": "https://cloud.google.com/compute"}],
    }
