"""Operators, one unit: bad job specs are refused before the hook is touched."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_batchvm.operators.batchvm import (
    BatchVmRunJobOperator,
    BatchVmSubmitJobOperator,
    JobSpecError,
    default_job_id,
    task_labels,
)
from airflow_batchvm.sensors.batchvm import BatchVmJobFailed
from airflow_batchvm.wire import JOB_ID_MAX_LEN, MAX_PAYLOAD_BYTES


def context(task_id="step", map_index=-1, try_number=1):
    ti = SimpleNamespace(
        dag_id="my_dag", task_id=task_id, run_id="manual__2026-12-03T16:00:00+00:00",
        map_index=map_index, try_number=try_number, xcom_push=mock.Mock(),
    )
    return {"ti": ti}


def operator(**overrides):
    kwargs = {"task_id": "step", "image": "localhost/sleep_test:latest", "instance_template": "t", "zone": "z"}
    return BatchVmSubmitJobOperator(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image": ""}, "image"),
        ({"image": None}, "image"),
        ({"env": {"COUNT": 3}}, "env.COUNT"),
        ({"payload": "x" * (MAX_PAYLOAD_BYTES + 1)}, "payload"),
        ({"job_id": "Has_Capitals"}, "job_id"),
        ({"job_id": "x" * (JOB_ID_MAX_LEN + 1)}, "job_id"),
        ({"labels": {"Team": "data"}}, "labels"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"zone": ""}, "zone"),
        ({"instance_template": ""}, "instance_template"),
        ({"vm_metadata": {"batchvm-image-allowlist": "anything"}}, "batchvm-image-allowlist"),
        ({"vm_metadata": {"batchvm-job-id": "someone-else"}}, "batchvm-job-id"),
    ],
)
def test_bad_specs_are_refused_naming_the_field_before_anything_is_created(overrides, field):
    op = operator(**overrides)
    with mock.patch.object(BatchVmSubmitJobOperator, "hook") as hook:
        with pytest.raises(JobSpecError, match=field):
            op.execute(context())
    assert hook.mock_calls == []  # no subscription, no message, no VM


def test_default_job_id_is_stable_per_task_instance_and_a_valid_name():
    a = default_job_id("my_dag", "group.transform_shards", "manual__2026", 2)
    assert a == default_job_id("my_dag", "group.transform_shards", "manual__2026", 2)
    assert a != default_job_id("my_dag", "group.transform_shards", "manual__2026", 1)
    assert a != default_job_id("my_dag", "group.transform_shards", "scheduled__2026", 2)
    assert a.startswith("transform-shards-2-")
    long = default_job_id("d" * 200, "T" * 200, "r" * 200, 99999)
    assert len(long) <= JOB_ID_MAX_LEN


def test_task_labels_follow_compute_label_rules():
    labels = task_labels("My.Dag", "tg.Task", "manual__2026-12-03T16:00:00+00:00", -1, 2)
    assert labels == {
        "dag_id": "my_dag",
        "task_id": "tg_task",
        "run_id": "manual__2026-12-03t16_00_00_00_00",
        "map_index": "-1",
        "try_number": "2",
    }


def test_run_operator_is_deferrable_by_default_and_templated():
    op = BatchVmRunJobOperator(task_id="t", image="i", instance_template="t", zone="z")
    assert op.deferrable is True
    assert {"image", "env", "payload", "command", "args", "job_id", "zone"} <= set(op.template_fields)


def tasks_operator(**overrides):
    kwargs = {"task_id": "step", "image": "img", "instance_template": "t", "zone": "z", "task_count": 3,
              "parallelism": 2, "project_id": "p"}
    return BatchVmRunJobOperator(**{**kwargs, **overrides})


def finished(index: int, vm_name: str) -> dict:
    return {"job_id": "j", "attempt": 1, "project_id": "p", "task_index": index, "status": "FINISHED",
            "vm_name": vm_name, "zone": "z", "exit_code": 0, "time": "2026-12-03T16:00:05+00:00",
            "started_at": "2026-12-03T16:00:01+00:00"}


def test_a_multi_task_job_frees_a_slot_before_filling_it():
    """With parallelism 2, the finished task's VM is deleted (and waited for) before the next is created."""
    op = tasks_operator(job_id="j")
    with mock.patch.object(BatchVmRunJobOperator, "hook") as hook:
        hook.find_job_vms.return_value = []
        with pytest.raises(TaskDeferred) as first:
            op.execute(context())
        assert [c.kwargs["vm_name"] for c in hook.insert_vm.call_args_list] == ["bvm-j-t0", "bvm-j-t1"]
        assert [c.args[1].task_index for c in hook.publish_job.call_args_list] == [0, 1, 2]  # all published first
        trigger = first.value.trigger
        assert (trigger.wake_on_finish, [t["task_index"] for t in trigger.tasks]) == (True, [0, 1])

        hook.reset_mock()
        event = {"job_id": "j", "attempt": 1, "project_id": "p", "tasks": {"0": finished(0, "bvm-j-t0")},
                 "progress": trigger.progress}
        with pytest.raises(TaskDeferred) as second:
            op.tasks_complete(context(), event)
        calls = [c[0] for c in hook.mock_calls if c[0] in ("delete_vm", "insert_vm")]
        assert calls == ["delete_vm", "insert_vm"]
        assert hook.delete_vm.call_args.kwargs == {"project_id": "p", "zone": "z", "vm_name": "bvm-j-t0", "wait": True}
        assert hook.insert_vm.call_args.kwargs["vm_name"] == "bvm-j-t2"
        assert hook.insert_vm.call_args.kwargs["metadata"]["batchvm-task-count"] == "3"
        trigger = second.value.trigger
        assert (trigger.wake_on_finish, [t["task_index"] for t in trigger.tasks]) == (False, [1, 2])

        event = {"job_id": "j", "attempt": 1, "project_id": "p", "progress": trigger.progress,
                 "tasks": {"1": finished(1, "bvm-j-t1"), "2": finished(2, "bvm-j-t2")}}
        result = op.tasks_complete(context(), event)
    assert [t["vm_name"] for t in result["tasks"]] == ["bvm-j-t0", "bvm-j-t1", "bvm-j-t2"]
    assert result["task_count"] == 3


def test_a_failed_task_takes_the_others_down_and_names_its_index():
    op = tasks_operator(job_id="j", parallelism=None)
    with mock.patch.object(BatchVmRunJobOperator, "hook") as hook:
        hook.find_job_vms.return_value = []
        with pytest.raises(TaskDeferred) as first:
            op.execute(context())
        hook.reset_mock()
        failed = {**finished(1, "bvm-j-t1"), "status": "FAILED", "exit_code": 3, "reason": "container exited with code 3"}
        event = {"job_id": "j", "attempt": 1, "project_id": "p", "tasks": {"1": failed},
                 "progress": first.value.trigger.progress}
        with pytest.raises(BatchVmJobFailed, match=r"^Task 1 of 3 failed: .*exit code 3"):
            op.tasks_complete(context(), event)
    assert sorted(c.kwargs["vm_name"] for c in hook.delete_vm.call_args_list) == ["bvm-j-t0", "bvm-j-t1", "bvm-j-t2"]
    assert sorted(c.args[0].task_index for c in hook.delete_job_subscriptions.call_args_list) == [0, 1, 2]
