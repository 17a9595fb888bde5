"""Multi-task jobs: one job over N single-job VMs, each task knowing its index, against the real
Pub/Sub emulator, the Compute stand-in (whose VMs run the real agent) and real containers.
"""

from __future__ import annotations

import asyncio
import collections
import re

import pytest

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator, JobSpecError
from airflow_batchvm.sensors.batchvm import BatchVmJobFailed
from tests.helpers import IMAGE, run_deferred, task_context

pytestmark = pytest.mark.integration

# What each task's container prints: its own index and the job's count, from its environment.
SAY_INDEX = 'echo "task $BATCHVM_TASK_INDEX of $BATCHVM_TASK_COUNT"'


def tasks_op(cloud, task_id: str, script: str, **kwargs) -> BatchVmRunJobOperator:
    defaults = {"image": IMAGE, "instance_template": cloud.template, "zone": cloud.zone,
                "liveness_check_seconds": 1, "task_count": 4}
    return BatchVmRunJobOperator(task_id=task_id, command=["sh", "-c", script], **{**defaults, **kwargs})


def runs_by_index(statuses: list[dict]) -> dict[int, list[str]]:
    """The VMs each task index STARTED on, in order."""
    runs = collections.defaultdict(list)
    for s in statuses:
        if s["status"] == "STARTED":
            runs[s.get("task_index", 0)].append(s["vm_name"])
    return dict(runs)


async def test_four_tasks_succeed_and_each_saw_its_own_index(cloud, capfd, status_log):
    op = tasks_op(cloud, "shards", f"{SAY_INDEX}; sleep 1")
    context = task_context("shards")
    result = await run_deferred(op, context)

    job_id = result["job_id"]
    assert result["task_count"] == 4
    assert [t["status"] for t in result["tasks"]] == ["FINISHED"] * 4
    assert [t["vm_name"] for t in result["tasks"]] == [f"bvm-{job_id}-t{i}" for i in range(4)]
    assert context["ti"].xcoms["task_count"] == 4
    log = capfd.readouterr().out
    for i in range(4):  # each container's own output, under its task's heading in the task log
        assert re.search(rf"container log tail \(task {i} of job {job_id}, VM bvm-{job_id}-t{i}\) -+\ntask {i} of 4\n", log), log
    assert runs_by_index(status_log(job_id)) == {i: [f"bvm-{job_id}-t{i}"] for i in range(4)}
    cloud.assert_nothing_left(job_id)


async def test_a_failing_index_fails_the_task_naming_it_and_stops_the_others(cloud, capfd, status_log):
    script = f'{SAY_INDEX}; if [ "$BATCHVM_TASK_INDEX" = 2 ]; then echo "shard 2 is corrupt" >&2; exit 3; fi; sleep 30'
    op = tasks_op(cloud, "bad-shard", script, task_retries=1)
    with pytest.raises(BatchVmJobFailed) as failure:
        await run_deferred(op, task_context("bad-shard"))

    job_id = op.submitted.job_id
    message = str(failure.value)
    assert message.startswith("Task 2 of 4 failed: "), message
    assert "exit code 3" in message and f"bvm-{job_id}-t2-r2" in message
    assert "shard 2 is corrupt" in capfd.readouterr().out  # its log tail, in the task log
    runs = runs_by_index(status_log(job_id))
    assert runs[2] == [f"bvm-{job_id}-t2", f"bvm-{job_id}-t2-r2"]  # its one retry, on a new VM
    assert all(len(runs.get(i, [])) <= 1 for i in (0, 1, 3))  # the others ran once, and were stopped
    cloud.assert_nothing_left(job_id)  # the sleeping tasks' VMs too


async def test_parallelism_2_never_has_more_than_2_vms(cloud, status_log):
    op = tasks_op(cloud, "two-at-once", f"{SAY_INDEX}; sleep 2", parallelism=2)
    context = task_context("two-at-once")
    job_id = op.build_spec(context).job_id
    seen: list[list[str]] = []
    done = asyncio.Event()

    async def watch_vms():
        while not done.is_set():
            seen.append(await asyncio.to_thread(cloud.vms, job_id))
            await asyncio.sleep(0.05)

    async def run():
        try:
            return await run_deferred(op, context)
        finally:
            done.set()

    result, _ = await asyncio.gather(run(), watch_vms())
    assert [t["status"] for t in result["tasks"]] == ["FINISHED"] * 4
    assert max(len(vms) for vms in seen) == 2, seen
    assert {vm for vms in seen for vm in vms} == {f"bvm-{job_id}-t{i}" for i in range(4)}
    assert runs_by_index(status_log(job_id)) == {i: [f"bvm-{job_id}-t{i}"] for i in range(4)}
    cloud.assert_nothing_left(job_id)


async def test_killing_index_1s_vm_re_runs_only_index_1(cloud, status_log):
    op = tasks_op(cloud, "kill-one", f"{SAY_INDEX}; sleep 8", max_vm_attempts=2)
    context = task_context("kill-one")
    job_id = op.build_spec(context).job_id

    async def kill_index_1():
        await cloud.wait_for_output(f"bvm-{job_id}-t1", "task 1 of 4")  # its container runs
        await asyncio.to_thread(cloud.kill, f"bvm-{job_id}-t1")

    result, _ = await asyncio.gather(run_deferred(op, context), kill_index_1())
    assert [t["status"] for t in result["tasks"]] == ["FINISHED"] * 4
    assert result["tasks"][1]["vm_name"] == f"bvm-{job_id}-t1-r2"
    runs = runs_by_index(status_log(job_id))
    # Its message was redelivered to a new VM (the first one ran its container, but may have died
    # before its STARTED went out); no other task ran twice.
    assert runs[1][-1] == f"bvm-{job_id}-t1-r2" and set(runs[1]) <= {f"bvm-{job_id}-t1", f"bvm-{job_id}-t1-r2"}
    assert {i: runs[i] for i in (0, 2, 3)} == {i: [f"bvm-{job_id}-t{i}"] for i in (0, 2, 3)}
    cloud.assert_nothing_left(job_id)


async def test_a_bad_parallelism_or_count_is_refused_before_anything_is_created(cloud):
    for kwargs, problem in (
        ({"parallelism": 0}, "parallelism: must be a positive integer"),
        ({"task_count": 101}, "task_count: Input should be less than or equal to 100"),
    ):
        op = tasks_op(cloud, "refused", "true", **kwargs)
        with pytest.raises(JobSpecError, match=problem):
            await run_deferred(op, task_context("refused"))
    assert cloud.vms("refused") == [] and cloud.job_subscriptions("refused") == []
