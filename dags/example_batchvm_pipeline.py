"""A pipeline of batch steps, each on its own fresh VM: extract, then transform fanned out over 3 shards, then load."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG
from batchvm_settings import INSTANCE_TEMPLATE, SLEEP_TEST_IMAGE, ZONE

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator

# [START howto_batchvm_pipeline]
with DAG(
    dag_id="example_batchvm_pipeline",
    schedule=None,
    catchup=False,
    tags=["batchvm", "example"],
    default_args={
        "retries": 1,
        "retry_delay": timedelta(seconds=10),
        "execution_timeout": timedelta(hours=2),
    },
) as dag:
    common = {
        "image": SLEEP_TEST_IMAGE,
        "instance_template": INSTANCE_TEMPLATE,
        "zone": ZONE,
        "env": {"SLEEP_TIME": "2"},
        "timeout_seconds": 3600,
    }

    extract = BatchVmRunJobOperator(
        task_id="extract",
        payload={"step": "extract", "run_id": "{{ run_id }}"},
        **common,
    )

    transform = BatchVmRunJobOperator.partial(task_id="transform", **common).expand(
        payload=[
            {"step": "transform", "shard": shard, "of": 3, "input": "{{ ti.xcom_pull('extract')['job_id'] }}"}
            for shard in range(3)
        ]
    )

    load = BatchVmRunJobOperator(
        task_id="load",
        payload={"step": "load", "shards": "{{ ti.xcom_pull('transform') | map(attribute='job_id') | list }}"},
        **common,
    )

    extract >> transform >> load
# [END howto_batchvm_pipeline]
