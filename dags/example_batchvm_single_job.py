"""One batch job, triggered from the UI: the form asks for the process type and how long to sleep.

It is the Airflow form of the earlier design's publish script (process_type, sleep_time).
"""

from __future__ import annotations

from airflow.sdk import DAG, Param
from batchvm_settings import IMAGE_REGISTRY, INSTANCE_TEMPLATE, ZONE

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator

# [START howto_batchvm_single_job]
with DAG(
    dag_id="example_batchvm_single_job",
    schedule=None,
    catchup=False,
    tags=["batchvm", "example"],
    params={
        "process_type": Param(
            "sleep_test",
            type="string",
            pattern="^[a-z0-9][a-z0-9._-]*$",
            title="Process type",
            description=f"The job image, in {IMAGE_REGISTRY}.",
        ),
        "sleep_time": Param(5, type="integer", minimum=0, maximum=86400, title="Sleep time (s)"),
    },
) as dag:
    BatchVmRunJobOperator(
        task_id="run_job",
        image=IMAGE_REGISTRY + "/{{ params.process_type }}:latest",
        env={"SLEEP_TIME": "{{ params.sleep_time }}"},
        payload={"process_type": "{{ params.process_type }}", "sleep_time": "{{ params.sleep_time }}"},
        instance_template=INSTANCE_TEMPLATE,
        zone=ZONE,
    )
# [END howto_batchvm_single_job]
