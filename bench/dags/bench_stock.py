"""``bench_stock_10`` / ``bench_stock_1``: the stock chain.

``PubSubPublishMessageOperator`` → ``ComputeEngineInsertInstanceFromTemplateOperator`` → deferrable
``PubSubPullSensor`` (``poke_interval`` 10 s, its default, and 1 s) → ``ComputeEngineDeleteInstanceOperator``,
which a user of the stock chain has to add to get the VM deleted.
"""

from __future__ import annotations

from airflow.sdk import DAG

from airflow_batchvm.wire import JobSpec
from bench.dag_config import COMMON, IDLE_VM, IMAGE, PROJECT, TEMPLATE, ZONE
from bench.stock_operators import (
    StockDeleteInstance,
    StockInsertFromTemplate,
    StockPublish,
    TimedPubSubPullSensor,
)


def job_messages(job_id: str) -> list[dict]:
    """The job as the stock chain publishes it: the same JobSpec our operator publishes."""
    data, attributes = JobSpec(job_id=job_id, image=IMAGE, command=["sh", "-c", "sleep 1"]).to_pubsub()
    return [{"data": data, "attributes": attributes}]


for poke in (10, 1):
    with DAG(
        dag_id=f"bench_stock_{poke}",
        params={"job_id": "x"},
        render_template_as_native_obj=True,
        user_defined_filters={"job_messages": job_messages},
        **COMMON,
    ):
        publish = StockPublish(
            task_id="publish",
            project_id=PROJECT,
            topic="batch_jobs",
            messages="{{ params.job_id | job_messages }}",
            retries=0,
        )
        insert = StockInsertFromTemplate(
            task_id="insert",
            project_id=PROJECT,
            zone=ZONE,
            source_instance_template=f"projects/{PROJECT}/global/instanceTemplates/{TEMPLATE}",
            body={
                "name": "bvm-{{ params.job_id }}",
                "metadata": {"items": [{"key": k, "value": v} for k, v in IDLE_VM.items()]},
            },
            retries=0,
        )
        wait = TimedPubSubPullSensor(
            task_id="wait",
            project_id=PROJECT,
            subscription="bench-stock-{{ params.job_id }}",
            deferrable=True,
            poke_interval=poke,
            retries=0,
        )
        delete = StockDeleteInstance(
            task_id="delete", project_id=PROJECT, zone=ZONE, resource_id="bvm-{{ params.job_id }}", retries=0
        )
        publish >> insert >> wait >> delete
