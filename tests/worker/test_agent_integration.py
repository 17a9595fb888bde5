"""The worker agent as a real process: real Pub/Sub emulator, real podman containers.

Each test checks what the waiting Airflow task and Pub/Sub would observe: the statuses on the
status topic, in order, and whether the job message was acked (never delivered again) or left
for a replacement VM.
"""

from __future__ import annotations

import json
import time

import pytest

from airflow_batchvm import wire
from batchvm_agent import testhooks
from tests.conftest import PROJECT

from .conftest import leftover_containers

pytestmark = pytest.mark.integration

S = wire.Status
TRICKY = {"text": "$(touch /tmp/batchvm-pwned) `id` 'single' \"double\" ; | & * \\ %s\nnew line", "n": 1}


def terminal(worker) -> wire.StatusMessage:
    worker.pull_statuses(timeout=15)
    terminals = [r.status for r in worker.statuses if r.status.status.terminal]
    assert len(terminals) == 1, worker.kinds()
    return terminals[0]


def test_job_succeeds_reports_started_then_finished_and_acks(worker, tmp_path):
    w = worker()
    # The crash hook's attribute alone does nothing: the agent's environment does not arm it.
    w.attribute(testhooks.ATTR_CRASH_AFTER_STARTED, "1")
    spec = w.spec(payload=TRICKY, labels={"team": "data"})
    w.publish(spec)
    powered_off = tmp_path / "powered-off"
    w.start_agent("--poweroff-command", f"touch {powered_off}")
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr

    done = terminal(w)
    assert w.kinds() == ["STARTED", "FINISHED"]
    started = w.statuses[0]
    for received in w.statuses:
        assert received.attributes == {
            "job_id": w.job_id,
            "attempt": "1",
            "task_index": "0",
            "status": received.status.status.value,
        }
        assert (received.status.vm_name, received.status.zone) == (w.vm_name, "local-a")
    assert started.status.job_id == w.job_id
    assert done.exit_code == 0 and done.reason is None
    # JOB_DATA reached the container byte-for-byte: no shell on the way interpreted anything.
    expected = f"Starting Job: {spec.job_data}\n".encode()
    assert expected in run.stdout  # streamed to the agent's stdout (the VM's serial console)
    assert expected + b"Task 0 of 1\n" in run.stdout  # a single-task job is task 0 of 1
    assert f"Starting Job: {spec.job_data}" in done.log_tail
    assert done.log_tail.rstrip().endswith("Job finished.")
    assert powered_off.exists()
    assert leftover_containers(w.job_id) == []
    w.assert_acked()


def test_job_exit_code_is_reported_as_failed_with_tail(worker):
    w = worker()
    w.publish(w.spec(env={"SLEEP_TIME": "0", "EXIT_CODE": "3"}, payload={"x": 1}))
    w.start_agent()
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert w.kinds() == ["STARTED", "FAILED"]
    assert done.exit_code == 3
    assert done.reason == "container exited with code 3"
    assert 'Starting Job: {"x":1}' in done.log_tail and "Job finished." in done.log_tail
    w.assert_acked()


def test_command_and_env_values_pass_byte_for_byte(worker):
    w = worker()
    weird = "a b\nline2 $(touch /tmp/x) `id` 'q' \"dq\" \\ * ~"
    spec = w.spec(
        command=["awk", 'BEGIN { printf "<%s|%s>\\n", ENVIRON["WEIRD"], ARGV[1] }'],
        args=["$(arg) 'x'"],
        env={"WEIRD": weird},
    )
    w.publish(spec)
    w.start_agent()
    assert w.wait_agent().returncode == 0
    done = terminal(w)
    assert done.status == S.FINISHED, done
    assert f"<{weird}|$(arg) 'x'>" in done.log_tail


def test_messages_for_other_jobs_and_older_attempts_are_acked_and_ignored(worker):
    w = worker(attempt=2)
    # The emulator does not apply subscription filters: the agent must drop these itself.
    other = wire.JobSpec(
        job_id="some-other-job", image="localhost/sleep_test:latest", payload={"who": "other"}
    )
    w.publish(other)
    stale = w.spec(payload={"who": "stale"})
    w.publish(stale.model_copy(update={"attempt": 1}))
    w.publish(w.spec(payload={"who": "me"}))
    w.start_agent()
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert w.kinds() == ["STARTED", "FINISHED"]
    assert {r.status.job_id for r in w.statuses} == {w.job_id}
    assert {r.status.attempt for r in w.statuses} == {2}
    assert 'Starting Job: {"who":"me"}' in done.log_tail
    assert b'"who":"other"' not in run.stdout and b'"who":"stale"' not in run.stdout
    w.assert_acked()  # all three acked


def test_agent_runs_only_its_own_task_of_a_multi_task_job(worker):
    w = worker()
    w.attribute("batchvm-task-index", "1")
    w.attribute("batchvm-task-count", "2")
    # Index 0's VM has a subscription of its own on the same topic; the emulator gives it every
    # message too (no filters), so it shows what index 0's VM would still find there.
    other_sub = w.subscriber.subscription_path(PROJECT, f"{w.job_sub_name}-t0")
    w.subscriber.create_subscription(name=other_sub, topic=w.job_topic, ack_deadline_seconds=10)
    try:
        job = w.spec(task_count=2, payload={"who": "task"})
        w.publish(job.for_task(0))
        w.publish(job.for_task(1))
        w.start_agent()
        run = w.wait_agent()
        assert run.returncode == 0, run.stderr
        done = terminal(w)
        assert w.kinds() == ["STARTED", "FINISHED"]
        for received in w.statuses:
            assert received.status.task_index == 1 and received.attributes["task_index"] == "1"
        assert b"Task 1 of 2\n" in run.stdout and "Task 1 of 2" in done.log_tail
        assert run.stdout.count(b"Starting Job:") == 1  # index 0's message ran nowhere here
        assert "it is for task 0 of job" in run.stderr
        assert leftover_containers(w.job_id) == []
        w.assert_acked()  # our message, and index 0's copy on our subscription (ignored)

        left = w.subscriber.pull(subscription=other_sub, max_messages=10, timeout=10).received_messages
        indexes = sorted(wire.parse_job(m.message.data).task_index for m in left)
        assert 0 in indexes, indexes  # still there for index 0's VM
    finally:
        w.subscriber.delete_subscription(subscription=other_sub)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not JSON"),
        (
            json.dumps({"schema_version": 2, "job_id": "JOB", "image": "x"}).encode(),
            "schema_version 2 is newer",
        ),
    ],
    ids=["malformed", "newer-schema"],
)
def test_unusable_job_message_is_failed_with_reason(worker, data, reason):
    w = worker()
    w.publish(data.replace(b"JOB", w.job_id.encode()), job_id=w.job_id, attempt="1")
    w.start_agent()
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert w.kinds() == ["FAILED"]
    assert reason in done.reason
    w.assert_acked()


def test_lease_outlives_the_ack_deadline_and_heartbeats_flow(worker):
    w = worker(ack_deadline=2)
    w.attribute("batchvm-heartbeat-seconds", "1")
    w.publish(w.spec(env={"SLEEP_TIME": "6"}))
    w.start_agent()
    w.wait_for_status(S.STARTED, timeout=20)
    # Without the lease the message would be redelivered 2 s after the agent pulled it (the
    # subscription's deadline), and 3 s after any one extension: it takes repeated extensions.
    redelivered = w.job_messages(within=5)
    assert redelivered == [], "the job message was redelivered while its job was running"
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert done.status == S.FINISHED
    assert w.kinds()[0] == "STARTED" and w.kinds()[-1] == "FINISHED"
    assert w.kinds().count("RUNNING") >= 3
    w.assert_acked()


def test_legacy_message_runs_the_sleep_test_image(worker):
    w = worker()
    legacy = {"job_id": w.job_id, "process_type": "sleep_test", "sleep_time": 1, "vm_count": 1}
    w.publish(json.dumps(legacy).encode())  # the earlier design published no attributes
    w.start_agent()
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert w.kinds() == ["STARTED", "FINISHED"]
    assert done.attempt == 1
    assert f"Starting Job: {json.dumps(legacy, separators=(',', ':'))}" in done.log_tail
    assert "Job finished." in done.log_tail
    w.assert_acked()


def test_timeout_kills_the_container(worker):
    w = worker()
    w.publish(w.spec(env={"SLEEP_TIME": "60"}, timeout_seconds=2))
    w.start_agent()
    run = w.wait_agent(timeout=40)
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert done.status == S.FAILED
    assert done.reason == "timed out after 2 s"
    assert "Starting Job:" in done.log_tail and "Job finished." not in done.log_tail
    assert run.seconds < 20
    assert leftover_containers(w.job_id) == []
    w.assert_acked()


def test_missing_image_reports_the_runtime_error(worker):
    w = worker()
    # --pull=never: podman would otherwise spend 3 s retrying a registry that is not there.
    w.attribute("batchvm-container-run-args", "--network=none --pull=never")
    w.publish(w.spec(image="localhost/no-such-image:latest"))
    w.start_agent()
    run = w.wait_agent()
    assert run.returncode == 0, run.stderr
    done = terminal(w)
    assert done.status == S.FAILED
    assert done.exit_code == 125
    assert done.reason.startswith("the container runtime failed (exit 125): ")
    assert "no-such-image" in done.reason
    w.assert_acked()


def test_preemption_stops_the_job_and_leaves_the_message(worker):
    w = worker()
    w.publish(w.spec(env={"SLEEP_TIME": "60"}, payload={"p": 1}))
    w.start_agent()
    w.wait_for_status(S.STARTED, timeout=20)
    time.sleep(1)  # let the container start
    w.metadata.set("instance/preempted", "TRUE")
    run = w.wait_agent(timeout=40)
    assert run.returncode == 5, run.stderr
    done = terminal(w)
    assert done.status == S.PREEMPTED
    assert leftover_containers(w.job_id) == []
    # Not acked, and released at once: a replacement VM gets the same job.
    again = w.job_messages(within=5)
    assert len(again) == 1
    assert wire.parse_job(again[0].message.data).payload == {"p": 1}


def test_crash_hook_dies_after_started_without_acking(worker):
    w = worker()
    w.attribute(testhooks.ATTR_CRASH_AFTER_STARTED, "1")
    w.publish(w.spec(payload={"c": 1}))
    w.start_agent(env={testhooks.ENV_VAR: "1"})
    run = w.wait_agent()
    assert run.returncode == testhooks.CRASH_EXIT_CODE, run.stderr
    w.pull_statuses(timeout=2)
    assert w.kinds() == ["STARTED"]
    assert b"Starting Job" not in run.stdout  # no container ran
    # Nobody extends the 3 s lease now: the message comes back for a replacement VM.
    again = w.job_messages(within=8)
    assert len(again) == 1 and wire.parse_job(again[0].message.data).payload == {"c": 1}


def test_sigterm_kills_the_container_and_leaves_the_message(worker):
    w = worker()
    w.publish(w.spec(env={"SLEEP_TIME": "60"}, payload={"t": 1}))
    w.start_agent()
    w.wait_for_status(S.STARTED, timeout=20)
    time.sleep(1)
    w.process.terminate()  # the VM shuts down (or the local stand-in stops the "VM")
    run = w.wait_agent(timeout=30)
    assert run.returncode == 5, run.stderr
    w.pull_statuses(timeout=1)
    assert not any(r.status.status.terminal for r in w.statuses), w.kinds()  # not the job's outcome
    assert leftover_containers(w.job_id) == []
    again = w.job_messages(within=5)
    assert len(again) == 1 and wire.parse_job(again[0].message.data).payload == {"t": 1}
