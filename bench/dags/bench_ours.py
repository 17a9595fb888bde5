"""``bench_ours``: one ``BatchVmRunJobOperator`` (submit, wait in the triggerer, delete the VM)."""

from __future__ import annotations

from airflow.sdk import DAG

from bench.dag_config import COMMON, IDLE_VM, IMAGE, TEMPLATE, ZONE
from bench.operators import TimedRunJobOperator

with DAG(dag_id="bench_ours", params={"job_id": "x"}, **COMMON):
    TimedRunJobOperator(
        task_id="run_job",
        job_id="{{ params.job_id }}",
        image=IMAGE,
        command=["sh", "-c", "sleep 1"],
        instance_template=TEMPLATE,
        zone=ZONE,
        vm_metadata=IDLE_VM,
        liveness_check_seconds=60,
        retries=0,
    )
