"""Operators, one unit: bad job specs are refused before the hook is touched."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest

from airflow_batchvm.operators.batchvm import (
    BatchVmRunJobOperator,
    BatchVmSubmitJobOperator,
    JobSpecError,
    default_job_id,
    task_labels,
)
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
