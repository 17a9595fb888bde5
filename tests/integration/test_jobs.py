"""Jobs on single-job VMs, against the real Pub/Sub emulator, the Compute stand-in and real containers."""

from __future__ import annotations

import asyncio

import pytest

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator, BatchVmSubmitJobOperator, JobSpecError
from airflow_batchvm.sensors.batchvm import BatchVmJobFailed, BatchVmJobSensor
from airflow_batchvm.wire import MAX_PAYLOAD_BYTES
from tests.helpers import IMAGE, run_deferred, task_context

pytestmark = pytest.mark.integration


def run_op(cloud, task_id: str, **kwargs) -> BatchVmRunJobOperator:
    return BatchVmRunJobOperator(
        task_id=task_id,
        image=IMAGE,
        instance_template=cloud.template,
        zone=cloud.zone,
        liveness_check_seconds=2,
        **kwargs,
    )


async def test_a_job_succeeds_and_leaves_nothing_behind(cloud, capfd):
    op = run_op(cloud, "succeeds", env={"SLEEP_TIME": "1"}, payload={"hello": "world"})
    context = task_context("succeeds")
    result = await run_deferred(op, context)

    assert result["status"] == "FINISHED"
    assert result["exit_code"] == 0
    assert result["vm_name"] == f"bvm-{result['job_id']}"
    assert result["run_seconds"] >= 1
    assert context["ti"].xcoms["job_id"] == result["job_id"]
    assert context["ti"].xcoms["vm_name"] == result["vm_name"]
    assert context["ti"].xcoms["batchvm_instance"]["vm_name"] == result["vm_name"]  # link persisted
    log = capfd.readouterr().out
    assert 'Starting Job: {"hello":"world"}' in log  # the container's own output, in the task log
    steps = [line.split("|")[3].strip() for line in log.splitlines() if "batchvm |" in line]
    assert steps == ["submitted", "VM created", "VM running", "STARTED", "FINISHED"]  # the timeline, in order
    cloud.assert_nothing_left(result["job_id"])


async def test_a_job_exiting_3_fails_the_task_with_code_and_tail(cloud, capfd):
    op = run_op(cloud, "exits-3", command=["sh", "-c", "echo computing; echo no space left >&2; exit 3"])
    with pytest.raises(BatchVmJobFailed, match="exit code 3") as failure:
        await run_deferred(op, task_context("exits-3"))
    assert "container exited with code 3" in str(failure.value)
    log = capfd.readouterr().out
    assert "container log tail" in log
    assert "computing" in log and "no space left" in log
    cloud.assert_nothing_left(op.submitted.job_id)


async def test_two_concurrent_jobs_never_see_each_others_status(cloud):
    ops = [
        run_op(cloud, "left", command=["sh", "-c", "sleep 1; echo I am left"]),
        run_op(cloud, "right", command=["sh", "-c", "echo I am right; exit 4"]),
    ]
    left, right = await asyncio.gather(
        *(run_deferred(op, task_context(op.task_id)) for op in ops), return_exceptions=True
    )
    assert left["status"] == "FINISHED" and left["job_id"].startswith("left-")
    assert isinstance(right, BatchVmJobFailed)
    assert "right-" in str(right) and "exit code 4" in str(right)
    for op in ops:
        cloud.assert_nothing_left(op.submitted.job_id)


async def test_submit_then_sensor_and_a_malformed_status_is_dropped(cloud, capfd):
    context = task_context("submit")
    submit = BatchVmSubmitJobOperator(
        task_id="submit", image=IMAGE, instance_template=cloud.template, zone=cloud.zone,
        command=["sh", "-c", "sleep 2; echo slept"],
    )
    submitted = await asyncio.to_thread(submit.execute, context)
    assert cloud.vms(submitted["job_id"]) == [submitted["vm_name"]]
    # Garbage for this job on the status topic: logged and dropped, and the wait goes on.
    topic = cloud.publisher.topic_path(cloud.project, "batch_jobs_status")
    cloud.publisher.publish(topic, b"{not json", job_id=submitted["job_id"]).result()

    sensor = BatchVmJobSensor(
        task_id="wait", job_id=submitted["job_id"], zone=submitted["zone"],
        attempt=str(submitted["attempt"]),  # as rendered from an XCom template
        liveness_check_seconds=2,
    )
    result = await run_deferred(sensor, task_context("wait"))
    assert result["status"] == "FINISHED"
    assert "Dropped a malformed status message" in capfd.readouterr().out
    cloud.assert_nothing_left(submitted["job_id"])


def test_the_sensor_also_waits_without_deferring(cloud):
    context = task_context("submit-poke")
    submitted = BatchVmSubmitJobOperator(
        task_id="submit-poke", image=IMAGE, instance_template=cloud.template, zone=cloud.zone,
        command=["sh", "-c", "exit 0"],
    ).execute(context)
    sensor = BatchVmJobSensor(
        task_id="poke", job_id=submitted["job_id"], zone=cloud.zone, deferrable=False, poke_interval=1,
        timeout=120,
    )
    event = None
    while event is None:
        value = sensor.poke(task_context("poke"))
        event = value.xcom_value if value.is_done else None
    assert event["status"] == "FINISHED"
    cloud.assert_nothing_left(submitted["job_id"])


def test_the_run_operator_also_waits_in_the_worker(cloud):
    op = run_op(cloud, "in-worker", deferrable=False, command=["sh", "-c", "echo here"])
    result = op.execute(task_context("in-worker"))
    assert result["status"] == "FINISHED"
    cloud.assert_nothing_left(result["job_id"])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image": ""}, "image"),
        ({"env": {"N": 1}}, "env.N"),
        ({"payload": "x" * MAX_PAYLOAD_BYTES}, "payload"),
        ({"job_id": "Not-A-Valid_Name"}, "job_id"),
    ],
)
def test_bad_input_is_refused_before_anything_is_created(cloud, overrides, field):
    before = (cloud.vms(), cloud.job_subscriptions())
    op = BatchVmSubmitJobOperator(
        **{"task_id": "bad", "image": IMAGE, "instance_template": cloud.template, "zone": cloud.zone, **overrides}
    )
    with pytest.raises(JobSpecError, match=field):
        op.execute(task_context("bad"))
    assert (cloud.vms(), cloud.job_subscriptions()) == before
