import json

import pytest

from airflow_batchvm.wire import (
    MAX_LOG_TAIL_BYTES,
    MAX_PAYLOAD_BYTES,
    JobSpec,
    MalformedMessage,
    Status,
    StatusMessage,
    UnsupportedSchemaVersion,
    parse_job,
)


def test_job_round_trips_with_routing_attributes():
    spec = JobSpec(
        job_id="extract-1a2b",
        attempt=2,
        image="localhost/sleep_test:latest",
        command=["sh", "-c"],
        args=["echo hi"],
        env={"SLEEP_TIME": "3"},
        timeout_seconds=60,
        payload={"shard": 1, "text": "$(rm -rf /) 'quoted'\nnewline"},
        labels={"team": "data"},
    )
    data, attributes = spec.to_pubsub()
    assert attributes == {"job_id": "extract-1a2b", "attempt": "2", "task_index": "0"}
    assert parse_job(data) == spec
    assert JobSpec.from_pubsub(data) == spec


def test_status_round_trips_and_keeps_the_earlier_fields():
    status = StatusMessage(
        job_id="j1", attempt=1, status=Status.FAILED, vm_name="bvm-j1", zone="z", exit_code=3,
        reason="container exited with code 3", log_tail="a\nb\n",
    )
    data, attributes = status.to_pubsub()
    assert attributes == {"job_id": "j1", "attempt": "1", "task_index": "0", "status": "FAILED"}
    obj = json.loads(data)
    assert {"job_id", "status", "vm_name"} <= obj.keys()  # what the earlier status logger reads
    assert StatusMessage.from_pubsub(data) == status


def test_legacy_job_message_maps_onto_a_job_spec():
    legacy = b'{"job_id": "0f3c9a", "process_type": "sleep_test", "sleep_time": 7, "vm_count": 1}'
    spec = parse_job(legacy, registry="europe-docker.pkg.dev/p/jobs/")
    assert spec.image == "europe-docker.pkg.dev/p/jobs/sleep_test:latest"
    assert spec.env == {"SLEEP_TIME": "7"}
    assert json.loads(spec.job_data) == {"job_id": "0f3c9a", "process_type": "sleep_test", "sleep_time": 7, "vm_count": 1}


def test_legacy_job_needs_a_registry():
    with pytest.raises(MalformedMessage, match="registry"):
        parse_job(b'{"job_id": "a", "process_type": "sleep_test"}')


def test_unknown_fields_are_ignored():
    data = b'{"job_id": "a", "image": "x", "future_field": {"nested": true}}'
    assert parse_job(data).image == "x"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"job_id": "a"}', "image"),
        (b'{"job_id": "a", "image": "x", "env": {"A": 1}}', "env.A"),
        (b'{"job_id": "Bad_ID", "image": "x"}', "job_id"),
        (b'{"schema_version": "1", "job_id": "a", "image": "x"}', "schema_version"),
    ],
)
def test_malformed_job_messages_are_refused_with_the_field(data, match):
    with pytest.raises(MalformedMessage, match=match):
        parse_job(data)


def test_newer_schema_version_is_refused_clearly():
    with pytest.raises(UnsupportedSchemaVersion, match="schema_version 2 is newer"):
        StatusMessage.from_pubsub(b'{"schema_version": 2, "job_id": "a", "status": "FINISHED"}')


def test_payload_over_the_limit_is_refused():
    with pytest.raises(ValueError, match="payload"):
        JobSpec(job_id="a", image="x", payload="x" * MAX_PAYLOAD_BYTES)
    JobSpec(job_id="a", image="x", payload="x" * (MAX_PAYLOAD_BYTES - 2))  # exactly at the limit


def test_job_data_is_reserved_and_env_names_checked():
    with pytest.raises(ValueError, match="JOB_DATA is set by the agent"):
        JobSpec(job_id="a", image="x", env={"JOB_DATA": "1"})
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        JobSpec(job_id="a", image="x", env={"A B": "1"})


def test_log_tail_is_capped_to_its_end():
    tail = "x" * MAX_LOG_TAIL_BYTES + "THE END"
    status = StatusMessage(job_id="a", status=Status.FAILED, log_tail=tail)
    assert len(status.log_tail.encode()) == MAX_LOG_TAIL_BYTES
    assert status.log_tail.endswith("THE END")


def test_terminal_statuses():
    assert {s for s in Status if s.terminal} == {Status.FINISHED, Status.FAILED, Status.PREEMPTED}


def test_a_multi_task_job_is_one_message_per_index():
    spec = JobSpec(job_id="shard-1", image="img", task_count=4)
    third = spec.for_task(2)
    data, attributes = third.to_pubsub()
    assert attributes == {"job_id": "shard-1", "attempt": "1", "task_index": "2"}
    assert JobSpec.from_pubsub(data) == third
    with pytest.raises(ValueError, match="task_index 4 is not below task_count 4"):
        spec.for_task(4)
    with pytest.raises(ValueError, match="less than or equal to 100"):
        JobSpec(job_id="shard-1", image="img", task_count=101)
    with pytest.raises(ValueError, match="BATCHVM_TASK_INDEX is set by the agent"):
        JobSpec(job_id="shard-1", image="img", env={"BATCHVM_TASK_INDEX": "3"})


def test_the_earlier_vm_count_becomes_the_task_count():
    legacy = b'{"job_id": "0f3c9a", "process_type": "sleep_test", "vm_count": 3}'
    spec = parse_job(legacy, registry="localhost")
    assert (spec.task_index, spec.task_count) == (0, 3)


def test_a_status_carries_its_task_index():
    status = StatusMessage(job_id="j1", task_index=3, status=Status.FINISHED, exit_code=0)
    data, attributes = status.to_pubsub()
    assert attributes["task_index"] == "3"
    assert StatusMessage.from_pubsub(data).task_index == 3
    assert StatusMessage.from_pubsub(b'{"job_id": "j1", "status": "FINISHED"}').task_index == 0  # earlier agents
