"""The worker agent's pieces on their own: argv building, log tails, message routing, retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
from google.api_core import exceptions as gexc

from airflow_batchvm import wire
from batchvm_agent import container, jobsource, main, metadata, preemption, status, testhooks

from .conftest import AGENT_LAUNCHER, FakeMetadataServer, as_json

TRICKY_VALUE = "$(touch /tmp/batchvm-pwned) `id` 'single' \"double\" ; | & * \\ %s ${HOME}\nline 2\ttab"


def spec(**fields) -> wire.JobSpec:
    fields.setdefault("job_id", "job-1")
    fields.setdefault("image", "localhost/sleep_test:latest")
    return wire.JobSpec(**fields)


# --- argv building ---------------------------------------------------------------------------


def test_argv_names_env_values_but_never_contains_them():
    job = spec(payload={"text": TRICKY_VALUE}, env={"A": TRICKY_VALUE, "SLEEP_TIME": "3"})
    argv, env = container.build_run(["docker"], [], "c1", job, {"PATH": "/usr/bin"})
    assert argv == [
        "docker",
        "run",
        "--rm",
        "--name",
        "c1",
        "-e",
        "JOB_DATA",
        "-e",
        "BATCHVM_TASK_INDEX",
        "-e",
        "BATCHVM_TASK_COUNT",
        "-e",
        "A",
        "-e",
        "SLEEP_TIME",
        "localhost/sleep_test:latest",
    ]
    assert env["JOB_DATA"] == job.job_data == as_json({"text": TRICKY_VALUE})
    assert (env["BATCHVM_TASK_INDEX"], env["BATCHVM_TASK_COUNT"]) == ("0", "1")  # a single-task job
    assert env["A"] == TRICKY_VALUE and env["SLEEP_TIME"] == "3" and env["PATH"] == "/usr/bin"
    joined = "\0".join(argv)
    assert "touch" not in joined and TRICKY_VALUE not in joined and "3" not in argv


def test_argv_cli_and_run_args_are_split_words_and_command_follows_kubernetes_meaning():
    job = spec(command=["sh", "-c", "echo $0 'x'"], args=["a b", "$(c)"])
    cli = ["podman", "--runtime", "runc"]
    argv, _ = container.build_run(cli, ["--network=none"], "c2", job, {})
    assert argv == [
        "podman",
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--name",
        "c2",
        "--network=none",
        "-e",
        "JOB_DATA",
        "-e",
        "BATCHVM_TASK_INDEX",
        "-e",
        "BATCHVM_TASK_COUNT",
        "--entrypoint",
        "sh",
        "localhost/sleep_test:latest",
        "-c",
        "echo $0 'x'",
        "a b",
        "$(c)",
    ]
    argv, _ = container.build_run(["docker"], [], "c3", spec(args=["x"]), {})
    assert argv[-2:] == ["localhost/sleep_test:latest", "x"] and "--entrypoint" not in argv


def test_task_index_and_count_reach_the_environment_never_the_argv():
    job = spec(task_index=7, task_count=9)
    base = {"BATCHVM_TASK_INDEX": "inherited", "BATCHVM_TASK_COUNT": "inherited"}
    argv, env = container.build_run(["docker"], [], "c", job, base)
    assert (env["BATCHVM_TASK_INDEX"], env["BATCHVM_TASK_COUNT"]) == ("7", "9")
    assert "7" not in argv and "9" not in argv and not any("=" in a for a in argv)
    assert argv.count("BATCHVM_TASK_INDEX") == argv.count("BATCHVM_TASK_COUNT") == 1


@pytest.mark.parametrize("name", sorted(wire.RESERVED_ENV))
def test_env_names_the_agent_sets_are_refused_even_past_the_wire_check(name):
    job = spec().model_copy(update={"env": {name: "x"}})  # model_copy skips JobSpec's own validation
    with pytest.raises(container.JobRefused, match=f"{name} is set by the agent"):
        container.build_run(["docker"], [], "c", job, {})


def test_container_names_differ_per_task_and_run():
    names = {container.container_name("job-1", 2, i) for i in (0, 1, 1)}
    assert len(names) == 3
    assert all(n.startswith("batchvm-job-1-a2-t") for n in names)
    assert sum(n.startswith("batchvm-job-1-a2-t1-") for n in names) == 2


def test_empty_payload_is_an_empty_job_data():
    _, env = container.build_run(["docker"], [], "c", spec(), {"JOB_DATA": "inherited"})
    assert env["JOB_DATA"] == ""


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "LD_PRELOAD", "DOCKER_HOST", "CONTAINERS_CONF", "XDG_RUNTIME_DIR"]
)
def test_env_names_that_steer_the_cli_are_refused(name):
    with pytest.raises(container.JobRefused, match=name):
        container.build_run(["docker"], [], "c", spec(env={name: "x"}), {})


def test_nul_in_an_env_value_is_refused_not_crashed():
    with pytest.raises(container.JobRefused, match="NUL"):
        container.build_run(["docker"], [], "c", spec(env={"A": "a\0b"}), {})


FAKE_CLI = textwrap.dedent(
    """
    import json, os, sys, time
    names = ("JOB_DATA", "A", "BATCHVM_TASK_INDEX", "BATCHVM_TASK_COUNT")
    record = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in names}}
    with open(os.environ["FAKE_CLI_RECORD"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    if sys.argv[1] == "kill":
        sys.exit(0)
    for i in range(int(os.environ.get("FAKE_LINES", "3"))):
        print("line", i, flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    """
)


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_CLI_RECORD", str(record))

    def records():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return [sys.executable, str(script)], records


def test_runner_passes_values_through_the_environment_without_a_shell(fake_cli, tmp_path, monkeypatch):
    cli, records = fake_cli
    marker = tmp_path / "pwned"
    value = f"$(touch {marker}) `touch {marker}` 'q' \"dq\"\nnext line"
    popen_calls = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        popen_calls.append((args, kwargs))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(container.subprocess, "Popen", spy)
    out = _Sink()
    job = spec(payload={"v": value}, env={"A": value}, task_index=1, task_count=2)
    result = container.ContainerRunner(cli, ["--network=none"], out=out).run(job, "name-1")
    assert result.exit_code == 0 and result.reason is None and result.succeeded
    (argv,), kwargs = popen_calls[0]
    assert isinstance(argv, list) and not kwargs.get("shell")
    [rec] = records()
    assert rec["env"]["JOB_DATA"] == job.job_data and rec["env"]["A"] == value  # byte-for-byte
    assert (rec["env"]["BATCHVM_TASK_INDEX"], rec["env"]["BATCHVM_TASK_COUNT"]) == ("1", "2")
    assert rec["argv"][:4] == ["run", "--rm", "--name", "name-1"]
    assert all(value not in a and "pwned" not in a for a in rec["argv"])
    assert not marker.exists()
    assert out.data == b"line 0\nline 1\nline 2\n"  # streamed to the console
    assert result.log_tail == "line 0\nline 1\nline 2"


def test_runner_reports_exit_code_and_timeout(fake_cli, monkeypatch):
    cli, records = fake_cli
    monkeypatch.setenv("FAKE_EXIT", "3")
    result = container.ContainerRunner(cli, out=_Sink()).run(spec(), "n")
    assert (result.exit_code, result.reason) == (3, "container exited with code 3")

    monkeypatch.setenv("FAKE_EXIT", "0")
    monkeypatch.setenv("FAKE_SLEEP", "30")
    started = time.monotonic()
    result = container.ContainerRunner(cli, out=_Sink(), kill_grace_seconds=0.5).run(
        spec(timeout_seconds=1), "n2"
    )
    assert result.reason == "timed out after 1 s"
    assert time.monotonic() - started < 10
    assert ["kill", "n2"] in [r["argv"] for r in records()]  # the container itself is killed


def test_runner_reports_a_missing_cli():
    result = container.ContainerRunner(["/nonexistent/docker"], out=_Sink()).run(spec(), "n")
    assert result.exit_code is None and "not found" in result.reason


class _Sink:
    def __init__(self):
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def flush(self) -> None:
        pass


# --- log tail --------------------------------------------------------------------------------


def test_log_tail_keeps_the_last_lines():
    tail = container.LogTail(max_lines=3)
    tail.feed("a\nb\nc")
    tail.feed("\nd\ne\n")
    assert tail.text() == "c\nd\ne"
    assert tail.last_line() == "e"


def test_log_tail_is_capped_in_bytes_at_a_character_boundary():
    tail = container.LogTail(max_lines=50)
    line = "é" * 300  # 600 bytes a line
    for i in range(50):
        tail.feed(f"{i:02d}{line}\n")
    text = tail.text()
    assert len(text.encode()) <= wire.MAX_LOG_TAIL_BYTES
    assert text.endswith(f"49{line}")
    assert text.startswith(tuple(f"{i:02d}" for i in range(50)))  # starts at a line boundary
    text.encode().decode()  # valid UTF-8


def test_log_tail_survives_a_huge_line_without_newline():
    tail = container.LogTail()
    tail.feed("x" * (10 * wire.MAX_LOG_TAIL_BYTES))
    tail.feed("END")
    assert len(tail.text().encode()) <= wire.MAX_LOG_TAIL_BYTES and tail.text().endswith("END")


# --- routing and legacy messages -------------------------------------------------------------


def test_route_by_job_id_attribute_then_data():
    r = jobsource.route
    assert r({"job_id": "other"}, b"{}", "job-1", 1)[0] is jobsource.Route.OTHER_JOB
    assert r({}, json.dumps({"job_id": "other"}).encode(), "job-1", 1)[0] is jobsource.Route.OTHER_JOB
    assert r({}, b"garbage", "job-1", 1)[0] is jobsource.Route.OTHER_JOB  # unaddressed: not ours
    assert r({"job_id": "job-1", "attempt": "2"}, b"", "job-1", 2) == (jobsource.Route.MINE, 2)
    assert r({"job_id": "job-1", "attempt": "1"}, b"", "job-1", 2) == (jobsource.Route.STALE, 1)
    assert r({"job_id": "job-1", "attempt": "3"}, b"", "job-1", 2) == (jobsource.Route.SUPERSEDED, 3)
    legacy = json.dumps({"job_id": "job-1", "process_type": "sleep_test"}).encode()
    assert r({}, legacy, "job-1", 2) == (jobsource.Route.MINE, 2)  # no attempt: this VM's
    assert r({"job_id": "job-1", "attempt": "x"}, b"", "job-1", 1)[0] is jobsource.Route.MINE


def test_route_by_task_index_attribute_then_data():
    r, R = jobsource.route, jobsource.Route
    mine = {"job_id": "job-1", "attempt": "1"}
    assert r({**mine, "task_index": "1"}, b"", "job-1", 1, task_index=1) == (R.MINE, 1)
    # Another VM's task: acked and ignored here, whatever its attempt (the filter never shows it).
    assert r({**mine, "task_index": "0"}, b"", "job-1", 1, task_index=1)[0] is R.OTHER_TASK
    assert r({**mine, "attempt": "9", "task_index": "0"}, b"", "job-1", 1, task_index=1)[0] is R.OTHER_TASK
    data = json.dumps({"job_id": "job-1", "image": "x", "task_index": 2, "task_count": 3}).encode()
    assert r({}, data, "job-1", 1, task_index=1)[0] is R.OTHER_TASK
    assert r({}, data, "job-1", 1, task_index=2) == (R.MINE, 1)
    # No index anywhere (the earlier designs' formats): this VM's index, as a missing attempt is.
    assert r(mine, b"{}", "job-1", 1, task_index=1) == (R.MINE, 1)
    legacy = json.dumps({"job_id": "job-1", "process_type": "sleep_test", "vm_count": 2}).encode()
    assert r({}, legacy, "job-1", 1, task_index=1) == (R.MINE, 1)
    # An unreadable index on our job is MINE, so that interpret() reports it; on another job, not ours.
    for bad in ({**mine, "task_index": "x"}, {**mine, "task_index": "-1"}):
        assert r(bad, b"", "job-1", 1, task_index=1)[0] is R.MINE
    assert r({"job_id": "job-1"}, b'{"task_index": "1"}', "job-1", 1)[0] is R.MINE
    assert r({"job_id": "job-2", "task_index": "x"}, b"", "job-1", 1)[0] is R.OTHER_JOB


def test_interpret_gives_the_vms_task_index_and_count():
    data, attributes = spec(task_index=1, task_count=3).to_pubsub()
    job = jobsource.interpret(attributes, data, "job-1", 1, "", task_index=1, task_count=3)
    assert (job.task_index, job.task_count) == (1, 3)
    # The VM's metadata count wins; without one, the message's count holds.
    assert jobsource.interpret(attributes, data, "job-1", 1, "", 1, 4).task_count == 4
    assert jobsource.interpret(attributes, data, "job-1", 1, "", 1, None).task_count == 3
    # An index-less message is this VM's task.
    plain = json.dumps({"job_id": "job-1", "image": "x"}).encode()
    job = jobsource.interpret({"job_id": "job-1"}, plain, "job-1", 1, "", task_index=2, task_count=3)
    assert (job.task_index, job.task_count) == (2, 3)
    legacy = json.dumps({"job_id": "job-1", "process_type": "sleep_test", "vm_count": 2}).encode()
    job = jobsource.interpret({}, legacy, "job-1", 1, "localhost", task_index=0, task_count=None)
    assert (job.task_index, job.task_count) == (0, 2)  # vm_count, as the VM's metadata has no count
    job = jobsource.interpret({}, legacy, "job-1", 1, "localhost", task_index=1, task_count=2)
    assert (job.task_index, job.task_count) == (1, 2)


@pytest.mark.parametrize(
    ("attributes", "data", "match"),
    [
        (
            {"task_index": "1"},
            json.dumps({"job_id": "job-1", "image": "x", "task_index": 0, "task_count": 2}).encode(),
            "task_index attribute 1 does not match task_index 0 in the data",
        ),
        ({"task_index": "x"}, json.dumps({"job_id": "job-1", "image": "x"}).encode(), "not an integer"),
        ({"task_index": "-1"}, json.dumps({"job_id": "job-1", "image": "x"}).encode(), "negative"),
        ({}, json.dumps({"job_id": "job-1", "image": "x", "task_index": "1"}).encode(), "not an integer"),
        ({}, json.dumps({"job_id": "job-1", "image": "x", "task_index": True}).encode(), "not an integer"),
        ({"task_index": "0"}, json.dumps({"job_id": "job-1", "image": "x"}).encode(), "not this VM's"),
        (
            {},
            json.dumps({"job_id": "job-1", "image": "x", "task_index": 1, "task_count": 1}).encode(),
            "not below task_count",
        ),
    ],
    ids=[
        "data-mismatch",
        "bad-attr",
        "negative-attr",
        "string-data",
        "bool-data",
        "other-index",
        "index>=count",
    ],
)
def test_unusable_task_index_raises_wire_errors(attributes, data, match):
    with pytest.raises(wire.WireError, match=match):
        jobsource.interpret(attributes, data, "job-1", 1, "", task_index=1, task_count=2)


class QueueSubscriber:
    """Serves queued messages one per pull, and records acks."""

    def __init__(self, messages):
        self.queue = [
            SimpleNamespace(
                ack_id=f"ack-{i}",
                message=SimpleNamespace(message_id=f"m{i}", attributes=attrs, data=data),
            )
            for i, (data, attrs) in enumerate(messages)
        ]
        self.acked: list[str] = []

    def pull(self, subscription, max_messages, timeout, retry):
        if not self.queue:
            raise gexc.DeadlineExceeded("empty")
        return SimpleNamespace(received_messages=[self.queue.pop(0)])

    def acknowledge(self, subscription, ack_ids):
        self.acked += ack_ids


def test_job_source_acks_and_ignores_other_tasks_and_takes_its_own():
    job = spec(task_count=2, payload={"i": 0})
    sub = QueueSubscriber([job.for_task(0).to_pubsub(), job.for_task(1).to_pubsub()])
    source = jobsource.JobSource(sub, "projects/p/subscriptions/s", "job-1", 1, task_index=1, task_count=2)
    taken = source.take(5, threading.Event())
    assert isinstance(taken, jobsource.Taken) and taken.ack_id == "ack-1"
    assert (taken.spec.task_index, taken.spec.task_count) == (1, 2)
    assert sub.acked == ["ack-0"]  # index 0's copy on this subscription; its own keeps it


def test_job_source_reports_a_bad_task_index_as_unusable():
    data, _ = spec().to_pubsub()
    sub = QueueSubscriber([(data, {"job_id": "job-1", "attempt": "1", "task_index": "one"})])
    source = jobsource.JobSource(sub, "projects/p/subscriptions/s", "job-1", 1, task_index=1, task_count=2)
    taken = source.take(5, threading.Event())
    assert isinstance(taken, jobsource.Taken) and taken.spec is None
    assert "task_index attribute 'one' is not an integer" in taken.error
    assert sub.acked == []  # held, to be acked after its FAILED status


def test_legacy_message_maps_to_the_registry_image():
    legacy = {"job_id": "job-1", "process_type": "sleep_test", "sleep_time": 5, "vm_count": 2}
    job = jobsource.interpret({}, json.dumps(legacy).encode(), "job-1", 2, "europe-docker.pkg.dev/p/jobs/")
    assert job.image == "europe-docker.pkg.dev/p/jobs/sleep_test:latest"
    assert job.env == {"SLEEP_TIME": "5"}
    assert json.loads(job.job_data) == legacy
    assert job.attempt == 2 and job.command is None


@pytest.mark.parametrize(
    ("attributes", "data", "match"),
    [
        ({}, b"[1]", "JSON object"),
        ({}, json.dumps({"job_id": "job-2", "image": "x"}).encode(), "does not match"),
        (
            {"attempt": "2"},
            json.dumps({"job_id": "job-1", "image": "x", "attempt": 1}).encode(),
            "does not match",
        ),
        ({"attempt": "x"}, json.dumps({"job_id": "job-1", "image": "x"}).encode(), "not an integer"),
        ({}, json.dumps({"job_id": "job-1", "process_type": "sleep_test"}).encode(), "registry"),
        ({}, json.dumps({"schema_version": 9, "job_id": "job-1", "image": "x"}).encode(), "newer"),
    ],
)
def test_unusable_messages_raise_wire_errors(attributes, data, match):
    with pytest.raises(wire.WireError, match=match):
        jobsource.interpret(attributes, data, "job-1", int(attributes.get("attempt", "2").isdigit() or 1), "")


# --- status publishing -----------------------------------------------------------------------


class FlakyPublisher:
    """Fails the first ``failures`` publishes the way an unreachable Pub/Sub does."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.failures = failures
        self.error = error or gexc.ServiceUnavailable("down")
        self.calls: list[tuple[bytes, dict, object]] = []

    def publish(self, topic, data, retry=None, timeout=None, **attrs):
        from concurrent.futures import Future

        self.calls.append((data, attrs, retry))
        future = Future()
        if len(self.calls) <= self.failures:
            future.set_exception(self.error)
        else:
            future.set_result(str(len(self.calls)))
        return future


def publisher_for(client) -> status.StatusPublisher:
    return status.StatusPublisher(
        client,
        "projects/p/topics/t",
        "job-1",
        2,
        "bvm-job-1",
        "zone-a",
        initial_backoff=0.01,
        max_backoff=0.05,
    )


def test_status_publish_retries_through_an_outage():
    client = FlakyPublisher(failures=5)
    message_id = publisher_for(client).publish(wire.Status.FINISHED, exit_code=0, log_tail="ok")
    assert message_id == "6" and len(client.calls) == 6
    data, attrs, retry = client.calls[-1]
    assert retry is None  # one retry policy: ours
    assert attrs == {"job_id": "job-1", "attempt": "2", "task_index": "0", "status": "FINISHED"}
    msg = wire.StatusMessage.from_pubsub(data)
    assert (msg.vm_name, msg.zone, msg.exit_code, msg.log_tail) == ("bvm-job-1", "zone-a", 0, "ok")


def test_status_carries_the_vms_task_index():
    client = FlakyPublisher(failures=0)
    publisher = status.StatusPublisher(client, "projects/p/topics/t", "job-1", 2, "vm", "z", task_index=3)
    publisher.publish(wire.Status.STARTED)
    data, attrs, _ = client.calls[0]
    assert attrs["task_index"] == "3" and wire.StatusMessage.from_pubsub(data).task_index == 3


def test_status_publish_gives_up_after_its_deadline_and_on_permanent_errors():
    client = FlakyPublisher(failures=10**6)
    with pytest.raises(status.PublishFailed, match=r"within 0\.3 s"):
        publisher_for(client).publish(wire.Status.FAILED, deadline=0.3, reason="x")
    assert len(client.calls) > 2
    client = FlakyPublisher(failures=1, error=gexc.NotFound("no topic"))
    with pytest.raises(status.PublishFailed, match="no topic"):
        publisher_for(client).publish(wire.Status.FAILED, reason="x")
    assert len(client.calls) == 1
    assert publisher_for(FlakyPublisher(10**6)).try_publish(wire.Status.RUNNING, deadline=0.1) is False


# --- lease -----------------------------------------------------------------------------------


class RecordingSubscriber:
    def __init__(self):
        self.extensions: list[tuple[list[str], int]] = []

    def modify_ack_deadline(self, subscription, ack_ids, ack_deadline_seconds, timeout=None):
        self.extensions.append((ack_ids, ack_deadline_seconds))


def test_lease_extends_at_once_and_then_periodically_until_stopped():
    sub = RecordingSubscriber()
    with jobsource.Lease(sub, "projects/p/subscriptions/s", "ack-1", deadline_seconds=60, every_seconds=0.05):
        time.sleep(0.3)
    count = len(sub.extensions)
    assert count >= 4 and sub.extensions[0] == (["ack-1"], 60)
    time.sleep(0.15)
    assert len(sub.extensions) == count  # stopped


# --- metadata --------------------------------------------------------------------------------


@pytest.fixture
def md_server():
    server = FakeMetadataServer().start()
    yield server
    server.stop()


def test_binding_reads_the_contract_keys(md_server):
    for key, value in {
        "project/project-id": "proj",
        "instance/name": "bvm-job-1",
        "instance/zone": "projects/42/zones/europe-west1-b",
        "instance/attributes/batchvm-job-id": "job-1",
        "instance/attributes/batchvm-attempt": "3",
        "instance/attributes/batchvm-job-subscription": "batchvm-job-job-1",
        "instance/attributes/batchvm-status-topic": "batch_jobs_status",
        "instance/attributes/batchvm-container-cli": "podman --runtime runc --root '/var/lib/my dir'",
        "instance/attributes/batchvm-container-run-args": "--network=none --cpus 2",
        "instance/attributes/batchvm-heartbeat-seconds": "7.5",
    }.items():
        md_server.set(key, value)
    b = metadata.read_binding(metadata.MetadataClient(md_server.host), wait_seconds=5)
    assert (b.project, b.vm_name, b.zone, b.job_id, b.attempt) == (
        "proj",
        "bvm-job-1",
        "europe-west1-b",
        "job-1",
        3,
    )
    assert b.subscription_path == "projects/proj/subscriptions/batchvm-job-job-1"
    assert b.status_topic_path == "projects/proj/topics/batch_jobs_status"
    assert b.container_cli == ["podman", "--runtime", "runc", "--root", "/var/lib/my dir"]
    assert b.container_run_args == ["--network=none", "--cpus", "2"]
    assert b.heartbeat_seconds == 7.5 and b.image_registry == ""
    assert all(flavor == "Google" for _, flavor in md_server.requests)


def test_binding_defaults_and_missing_job(md_server):
    for key, value in {
        "project/project-id": "proj",
        "instance/name": "vm",
        "instance/zone": "projects/42/zones/z",
        "instance/attributes/batchvm-job-id": "job-1",
        "instance/attributes/batchvm-job-subscription": "s",
        "instance/attributes/batchvm-status-topic": "t",
    }.items():
        md_server.set(key, value)
    client = metadata.MetadataClient(md_server.host)
    b = metadata.read_binding(client, wait_seconds=5)
    assert (b.attempt, b.container_cli, b.container_run_args, b.heartbeat_seconds) == (
        1,
        ["docker"],
        [],
        60.0,
    )
    md_server.set("instance/attributes/batchvm-job-id", None)
    with pytest.raises(metadata.BindingError, match="batchvm-job-id") as exc:
        metadata.read_binding(client, wait_seconds=5)
    assert exc.value.partial["project"] == "proj"


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [(None, None, (0, None)), ("1", "2", (1, 2)), (" 0 ", "3", (0, 3)), ("0", None, (0, None))],
)
def test_binding_reads_the_task_index_and_count(md_server, index, count, expected):
    for key, value in {
        "project/project-id": "proj",
        "instance/name": "vm",
        "instance/zone": "projects/42/zones/z",
        "instance/attributes/batchvm-job-id": "job-1",
        "instance/attributes/batchvm-job-subscription": "s",
        "instance/attributes/batchvm-status-topic": "t",
        "instance/attributes/batchvm-task-index": index,
        "instance/attributes/batchvm-task-count": count,
    }.items():
        md_server.set(key, value)
    b = metadata.read_binding(metadata.MetadataClient(md_server.host), wait_seconds=5)
    assert (b.task_index, b.task_count) == expected


@pytest.mark.parametrize(
    ("index", "count", "match"),
    [
        ("-1", "2", "batchvm-task-index='-1' is not a non-negative integer"),
        ("one", "2", "batchvm-task-index='one' is not a non-negative integer"),
        ("0", "0", "batchvm-task-count='0' is not a positive integer"),
        ("0", "2.5", "batchvm-task-count='2.5' is not a positive integer"),
        ("2", "2", "batchvm-task-index=2 is not below batchvm-task-count=2"),
        ("1", None, r"batchvm-task-index=1 is not below batchvm-task-count=1 \(absent\)"),
    ],
)
def test_binding_refuses_a_bad_task_index_or_count(md_server, index, count, match):
    for key, value in {
        "project/project-id": "proj",
        "instance/name": "vm",
        "instance/zone": "projects/42/zones/z",
        "instance/attributes/batchvm-job-id": "job-1",
        "instance/attributes/batchvm-attempt": "2",
        "instance/attributes/batchvm-job-subscription": "s",
        "instance/attributes/batchvm-status-topic": "t",
        "instance/attributes/batchvm-task-index": index,
        "instance/attributes/batchvm-task-count": count,
    }.items():
        md_server.set(key, value)
    with pytest.raises(metadata.BindingError, match=match) as exc:
        metadata.read_binding(metadata.MetadataClient(md_server.host), wait_seconds=5)
    assert exc.value.partial["attempt"] == 2 and exc.value.partial["job_id"] == "job-1"


def test_metadata_wait_is_bounded():
    client = metadata.MetadataClient("127.0.0.1:9", request_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(metadata.MetadataUnavailable, match="did not answer within 1 s"):
        client.wait_until_answering(1)
    assert time.monotonic() - started < 5


# --- test hooks ------------------------------------------------------------------------------


def test_hooks_need_both_the_environment_and_the_attribute(md_server, monkeypatch):
    client = metadata.MetadataClient(md_server.host)
    md_server.set(f"instance/attributes/{testhooks.ATTR_CRASH_AFTER_STARTED}", "1")
    monkeypatch.delenv(testhooks.ENV_VAR, raising=False)
    assert testhooks.load(client).crash_after_started is False
    monkeypatch.setenv(testhooks.ENV_VAR, "1")
    assert testhooks.load(client).crash_after_started is True
    md_server.set(f"instance/attributes/{testhooks.ATTR_CRASH_AFTER_STARTED}", None)
    assert testhooks.load(client).crash_after_started is False


# --- the process as a whole -----------------------------------------------------------------


def test_agent_imports_no_airflow():
    code = textwrap.dedent(
        """
        import pkgutil, sys
        sys.modules["airflow"] = None  # any `import airflow...` now fails
        import batchvm_agent
        names = [m.name for m in pkgutil.walk_packages(batchvm_agent.__path__, "batchvm_agent.")]
        for name in names:
            if name != "batchvm_agent.__main__":
                __import__(name)
        loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "airflow" and mod is not None)
        print(len(names), loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, loaded = out.split(" ", 1)
    assert int(count) >= 7 and loaded.strip() == "[]"


def test_poweroff_command_and_cli_options():
    args = main.parse_args([])
    assert args.poweroff_argv == ["systemctl", "poweroff"]
    assert main.parse_args(["--poweroff-command", ""]).poweroff_argv == []
    assert main.parse_args(["--poweroff-command", "echo 'a b'"]).poweroff_argv == ["echo", "a b"]
    with pytest.raises(SystemExit):
        main.parse_args(["--lease-seconds", "601"])


def test_agent_without_metadata_exits_nonzero_and_still_powers_off(tmp_path):
    marker = tmp_path / "off"
    env = dict(os.environ, GCE_METADATA_HOST="127.0.0.1:9")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            AGENT_LAUNCHER,
            "--metadata-wait-seconds",
            "0.5",
            "--poweroff-command",
            f"touch {marker}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == main.EXIT_NO_BINDING, result.stderr
    assert "did not answer" in result.stderr
    assert marker.exists()


def test_preemption_watcher_fires_on_true(md_server):
    md_server.set("instance/preempted", "FALSE")
    fired = threading.Event()
    watcher = preemption.PreemptionWatcher(metadata.MetadataClient(md_server.host), fired.set).start()
    time.sleep(0.3)
    assert not fired.is_set()
    md_server.set("instance/preempted", "TRUE")
    assert fired.wait(5)
    assert watcher.is_preempted_now()
    watcher.stop()
