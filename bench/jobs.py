"""One job, driven end to end in a process of its own so that every cloud call it makes is counted
(``$BENCH_EVENTS``, see ``bench.instrument``): ``python -m bench.jobs SCENARIO JOB_ID SECONDS``.

- ``ours``: ``BatchVmRunJobOperator`` as a task runs it (execute, its trigger in an event loop,
  ``execute_complete``) on a stand-in VM running the real agent, whose container sleeps SECONDS.
  ``--keep-vm`` leaves the VM to power itself off (P4 reads when it did).
- ``stock10`` / ``stock1``: the stock chain the same way: ``PubSubCreateSubscriptionOperator`` (a
  stock chain needs its subscription), ``PubSubPublishMessageOperator``,
  ``ComputeEngineInsertInstanceFromTemplateOperator``, deferrable ``PubSubPullSensor``
  (poke_interval 10 s / 1 s), ``ComputeEngineDeleteInstanceOperator``,
  ``PubSubDeleteSubscriptionOperator``. What runs on its VM is not the stock chain's (it defines
  none), so its VM is an idle guest and the FINISHED it waits for is published SECONDS after the
  VM was created, by a publisher whose calls are not counted.

Prints one JSON line: the result, and the moments the harness needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from functools import partial
from types import SimpleNamespace
from typing import Any

from airflow.sdk.exceptions import TaskDeferred

import bench.instrument
from bench.instrument import emit

IMAGE = "localhost/sleep_test:latest"


def task_context(task_id: str) -> dict[str, Any]:
    xcoms: dict[str, Any] = {}
    ti = SimpleNamespace(
        dag_id="bench",
        task_id=task_id,
        run_id=f"bench__{time.time_ns()}",
        map_index=-1,
        try_number=1,
        xcoms=xcoms,
        xcom_push=lambda key, value: xcoms.__setitem__(key, value),
    )
    return {"ti": ti, "task_instance": ti}


async def run_task(operator, context, on_defer=None) -> Any:
    """As Airflow runs a deferrable task: execute; then, while it defers, the trigger and the method."""
    step = partial(operator.execute, context)
    while True:
        try:
            return await asyncio.to_thread(step)
        except TaskDeferred as deferred:
            if on_defer is not None:
                on_defer()
            event = await _first_event(deferred.trigger)
            step = partial(
                getattr(operator, deferred.method_name), context, event.payload, **(deferred.kwargs or {})
            )


async def _first_event(trigger) -> Any:
    """The trigger's first event, as the triggerer gets it: through Airflow's shared trigger stream
    when the trigger has one (ours: the process's one status pull), else from ``run()``."""
    from airflow.triggers.base import BaseEventTrigger
    from airflow.triggers.shared_stream import SharedStreamManager

    key = trigger.shared_stream_key() if isinstance(trigger, BaseEventTrigger) else None
    if key is None:
        return await trigger.run().asend(None)
    manager = SharedStreamManager()
    stream = manager.subscribe(trigger_id=1, trigger=trigger, key=key)
    try:
        return await trigger.filter_shared_stream(stream).__anext__()
    finally:
        await manager.unsubscribe(1, key)


def ours(job_id: str, seconds: float, keep_vm: bool) -> dict:
    from google.cloud import compute_v1  # noqa: F401 - warm, as the stock chain's imports are (P2)

    from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator

    op = BatchVmRunJobOperator(
        task_id="run_job",
        job_id=job_id,
        image=IMAGE,
        command=["sh", "-c", f"echo Starting Job; sleep {seconds:g}; echo Job finished."],
        instance_template=os.environ["BATCHVM_INSTANCE_TEMPLATE"],
        zone=os.environ["BATCHVM_ZONE"],
        on_finish_action="keep_vm" if keep_vm else "delete_vm",
    )
    emit("job_begin", job=job_id, proc_start=bench.instrument.process_start_time())
    result = asyncio.run(run_task(op, task_context("run_job")))
    emit("job_end", job=job_id)
    return {"status": result.get("status") if isinstance(result, dict) else None}


def stock(job_id: str, seconds: float, poke: float) -> dict:
    from airflow.providers.google.cloud.operators.pubsub import (
        PubSubCreateSubscriptionOperator,
        PubSubDeleteSubscriptionOperator,
        PubSubPublishMessageOperator,
    )
    from airflow.providers.google.cloud.sensors.pubsub import PubSubPullSensor

    from airflow_batchvm.wire import JobSpec, Status, StatusMessage
    from bench.stock_operators import StockDeleteInstance, StockInsertFromTemplate

    project, zone = os.environ["BATCHVM_PROJECT"], os.environ["BATCHVM_ZONE"]
    template = os.environ["BATCHVM_INSTANCE_TEMPLATE"]
    topic = f"bench-p5-{job_id}"  # the job's statuses (a filter on batch_jobs_status, on Pub/Sub)
    vm = f"bvm-{job_id}"
    ctx = task_context("stock")
    data, attributes = JobSpec(
        job_id=job_id, image=IMAGE, command=["sh", "-c", f"sleep {seconds:g}"]
    ).to_pubsub()
    emit("job_begin", job=job_id, proc_start=bench.instrument.process_start_time())
    PubSubCreateSubscriptionOperator(
        task_id="subscribe", project_id=project, topic=topic, subscription=topic
    ).execute(ctx)
    PubSubPublishMessageOperator(
        task_id="publish",
        project_id=project,
        topic="batch_jobs",
        messages=[{"data": data, "attributes": attributes}],
    ).execute(ctx)
    StockInsertFromTemplate(
        task_id="insert",
        project_id=project,
        zone=zone,
        source_instance_template=f"projects/{project}/global/instanceTemplates/{template}",
        body={"name": vm, "metadata": {"items": [{"key": "bench-role", "value": "idle"}]}},
    ).execute(ctx)
    finished_at = time.time() + seconds
    status = StatusMessage(
        job_id=job_id, attempt=1, status=Status.FINISHED, vm_name=vm, zone=zone, exit_code=0
    )

    async def the_job_finishes() -> None:  # what the VM would say, not counted
        await asyncio.sleep(max(0.0, finished_at - time.time()))
        payload, attrs = status.to_pubsub()
        await asyncio.to_thread(
            bench.instrument.uncounted_publish, f"projects/{project}/topics/{topic}", payload, attrs
        )
        emit("finished_published", job=job_id)

    async def wait() -> Any:
        sensor = PubSubPullSensor(
            task_id="wait", project_id=project, subscription=topic, deferrable=True, poke_interval=poke
        )
        finisher = asyncio.create_task(the_job_finishes())
        result = await run_task(sensor, ctx)
        await finisher
        return result

    messages = asyncio.run(wait())
    StockDeleteInstance(task_id="delete", project_id=project, zone=zone, resource_id=vm).execute(ctx)
    PubSubDeleteSubscriptionOperator(task_id="unsubscribe", project_id=project, subscription=topic).execute(
        ctx
    )
    emit("job_end", job=job_id)
    return {"status": "FINISHED" if messages else None}


def main(argv: list[str]) -> int:
    scenario, job_id, seconds = argv[0], argv[1], float(argv[2])
    keep_vm = "--keep-vm" in argv
    if scenario == "ours":
        result = ours(job_id, seconds, keep_vm)
    elif scenario.startswith("stock"):
        result = stock(job_id, seconds, float(scenario.removeprefix("stock")))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps({"scenario": scenario, "job_id": job_id, "seconds": seconds, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
