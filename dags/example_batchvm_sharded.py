"""One job sharded over 4 tasks, each on its own VM and knowing its index, then a merge of the shards.

Each task's container reads ``BATCHVM_TASK_INDEX`` (0-3) and ``BATCHVM_TASK_COUNT`` (4) to pick its
part of the input, as with Cloud Batch's task index. ``parallelism`` caps how many of the VMs
exist at once; the task result lists every shard's outcome, in index order.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param
from batchvm_settings import INSTANCE_TEMPLATE, SLEEP_TEST_IMAGE, ZONE

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator

# [START howto_batchvm_sharded]
with DAG(
    dag_id="example_batchvm_sharded",
    schedule=None,
    catchup=False,
    tags=["batchvm", "example"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=10), "execution_timeout": timedelta(hours=2)},
    params={
        "shards": Param(4, type="integer", minimum=1, maximum=100, title="Shards (one VM each)"),
        "parallelism": Param(4, type="integer", minimum=1, maximum=100, title="VMs at once, at most"),
    },
) as dag:
    common = {
        "image": SLEEP_TEST_IMAGE,
        "instance_template": INSTANCE_TEMPLATE,
        "zone": ZONE,
        "env": {"SLEEP_TIME": "2"},
        "timeout_seconds": 3600,
    }

    shard = BatchVmRunJobOperator(
        task_id="shard",
        task_count="{{ params.shards }}",
        parallelism="{{ params.parallelism }}",
        max_vm_attempts=2,  # a lost VM re-runs its own shard only
        payload={"step": "shard", "input": "gs://example-bucket/input/", "run_id": "{{ run_id }}"},
        **common,
    )

    merge = BatchVmRunJobOperator(
        task_id="merge",
        payload={
            "step": "merge",
            "sharded_job": "{{ ti.xcom_pull('shard')['job_id'] }}",
            "shards": "{{ ti.xcom_pull('shard')['task_count'] }}",
        },
        **common,
    )

    shard >> merge
# [END howto_batchvm_sharded]
