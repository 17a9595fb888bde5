"""Fixtures for the worker agent: a fake metadata server, real podman, the real Pub/Sub emulator.

The agent always runs as a real subprocess (``python -m batchvm_agent``) with ``airflow`` blocked
in ``sys.modules``, so every run also proves that it never imports Airflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_batchvm import wire
from tests.conftest import PROJECT

REPO = Path(__file__).resolve().parents[2]
WORKER_IMAGE = REPO / "worker_image"
SETUP_SH = WORKER_IMAGE / "local" / "setup.sh"
CONTAINERS_CONF = WORKER_IMAGE / "local" / "containers.conf"
PODMAN_CLI = "podman --runtime runc --storage-driver=vfs --cgroup-manager=cgroupfs"
SLEEP_TEST_IMAGE = "localhost/sleep_test:latest"

# Runs the agent's real entry point with Airflow made unimportable.
AGENT_LAUNCHER = (
    "import runpy, sys; sys.modules['airflow'] = None; sys.argv[0] = 'batchvm_agent'; "
    "runpy.run_module('batchvm_agent', run_name='__main__', alter_sys=True)"
)


@pytest.fixture(scope="session")
def sleep_test_image():
    """Runs worker_image/local/setup.sh (installs podman if missing, builds the image if stale)."""
    result = subprocess.run(["bash", str(SETUP_SH)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"setup.sh failed:\n{result.stdout}\n{result.stderr}"
    return SLEEP_TEST_IMAGE


def podman(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    return subprocess.run([*PODMAN_CLI.split(), *args], capture_output=True, text=True, env=env, timeout=60)


class FakeMetadataServer:
    """The subset of the GCE metadata server the agent reads, including the preempted long poll."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._changed = threading.Condition()
        self._closing = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                server.requests.append((url.path, self.headers.get("Metadata-Flavor")))
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header.")
                prefix = "/computeMetadata/v1/"
                if not url.path.startswith(prefix):
                    return self._send(404, "not found")
                key = url.path[len(prefix) :]
                query = parse_qs(url.query)
                if query.get("wait_for_change") == ["true"]:
                    server._wait_for_change(key, float(query.get("timeout_sec", ["60"])[0]))
                value = server.values.get(key)
                if value is None:
                    return self._send(404, "not found")
                return self._send(200, value)

            def _send(self, code: int, body: str):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/text")
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent exited while a long poll was held

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def _wait_for_change(self, key: str, timeout: float) -> None:
        with self._changed:
            before = self.values.get(key)
            self._changed.wait_for(
                lambda: self._closing or self.values.get(key) != before, timeout=min(timeout, 5)
            )

    def set(self, key: str, value: str | None) -> None:
        with self._changed:
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
            self._changed.notify_all()

    def start(self) -> FakeMetadataServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._closing = True  # release held long polls
            self._changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metadata_server():
    server = FakeMetadataServer().start()
    yield server
    server.stop()


@dataclass
class AgentRun:
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float


@dataclass
class Received:
    status: wire.StatusMessage
    attributes: dict[str, str]


@dataclass
class Worker:
    """One job's world: its topics and subscriptions, its VM's metadata, and the agent process."""

    metadata: FakeMetadataServer
    tmp_path: Path
    job_id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:10]}")
    attempt: int = 1
    ack_deadline: int = 2  # short, so that an unacked message is soon seen again
    process: subprocess.Popen | None = None

    def __post_init__(self):
        from google.cloud import pubsub_v1

        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        suffix = self.job_id
        self.job_topic = self.publisher.topic_path(PROJECT, f"batch_jobs-{suffix}")
        self.status_topic_name = f"batch_jobs_status-{suffix}"
        self.status_topic = self.publisher.topic_path(PROJECT, self.status_topic_name)
        self.job_sub_name = f"batchvm-job-{self.job_id}"
        self.job_sub = self.subscriber.subscription_path(PROJECT, self.job_sub_name)
        self.status_sub = self.subscriber.subscription_path(PROJECT, f"batchvm-status-{self.job_id}")
        self.publisher.create_topic(name=self.job_topic)
        self.publisher.create_topic(name=self.status_topic)
        self.subscriber.create_subscription(
            name=self.job_sub, topic=self.job_topic, ack_deadline_seconds=self.ack_deadline
        )
        self.subscriber.create_subscription(name=self.status_sub, topic=self.status_topic)
        self.vm_name = f"bvm-{self.job_id}"
        for key, value in {
            "project/project-id": PROJECT,
            "instance/name": self.vm_name,
            "instance/zone": "projects/123456/zones/local-a",
            "instance/preempted": "FALSE",
            "instance/attributes/batchvm-job-id": self.job_id,
            "instance/attributes/batchvm-attempt": str(self.attempt),
            "instance/attributes/batchvm-job-subscription": self.job_sub_name,
            "instance/attributes/batchvm-status-topic": self.status_topic_name,
            "instance/attributes/batchvm-image-registry": "localhost",
            "instance/attributes/batchvm-container-cli": PODMAN_CLI,
            "instance/attributes/batchvm-container-run-args": "--network=none",
            "instance/attributes/batchvm-heartbeat-seconds": "30",
        }.items():
            self.metadata.set(key, value)
        self.statuses: list[Received] = []

    def attribute(self, name: str, value: str | None) -> None:
        self.metadata.set(f"instance/attributes/{name}", value)

    def spec(self, **fields) -> wire.JobSpec:
        fields.setdefault("image", SLEEP_TEST_IMAGE)
        fields.setdefault("env", {"SLEEP_TIME": "0"})
        return wire.JobSpec(job_id=self.job_id, attempt=self.attempt, **fields)

    def publish(self, data: bytes | wire.JobSpec, **attributes: str) -> None:
        if isinstance(data, wire.JobSpec):
            data, attributes = data.to_pubsub()
        self.publisher.publish(self.job_topic, data, **attributes).result(timeout=30)

    def start_agent(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        child_env = {k: v for k, v in os.environ.items() if k != "BATCHVM_AGENT_TEST_HOOKS"}
        child_env.update(
            GCE_METADATA_HOST=self.metadata.host,
            CONTAINERS_CONF=str(CONTAINERS_CONF),
            PYTHONUNBUFFERED="1",
            **(env or {}),
        )
        # A 3 s lease (renewed every second) lapses soon after the agent stops holding it, so a
        # test sees an unacked message again within seconds instead of a minute.
        argv = [
            sys.executable,
            "-c",
            AGENT_LAUNCHER,
            "--poweroff-command",
            "",
            "--job-wait-seconds",
            "60",
            "--lease-seconds",
            "3",
            *args,
        ]
        self._out = open(self.tmp_path / f"{self.job_id}.stdout", "wb")
        self._err = open(self.tmp_path / f"{self.job_id}.stderr", "wb")
        self._started = time.monotonic()
        self.process = subprocess.Popen(argv, env=child_env, stdout=self._out, stderr=self._err)
        return self.process

    def wait_agent(self, timeout: float = 60) -> AgentRun:
        try:
            self.process.wait(timeout=timeout)
            self.exited_at = time.monotonic()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"agent still running after {timeout} s:\n{self.stderr()}") from None
        self._out.close()
        self._err.close()
        return AgentRun(
            self.process.returncode, self.stdout(), self.stderr(), time.monotonic() - self._started
        )

    def stdout(self) -> bytes:
        return (self.tmp_path / f"{self.job_id}.stdout").read_bytes()

    def stderr(self) -> str:
        return (self.tmp_path / f"{self.job_id}.stderr").read_text(errors="replace")

    def pull_statuses(self, timeout: float = 5) -> list[Received]:
        """Statuses that arrived within ``timeout``; all of them are acked and kept in ``self.statuses``."""
        deadline = time.monotonic() + timeout
        got: list[Received] = []
        while time.monotonic() < deadline:
            response = self.subscriber.pull(
                subscription=self.status_sub, max_messages=100, timeout=max(1.0, deadline - time.monotonic())
            )
            if not response.received_messages:
                continue
            for rm in response.received_messages:
                got.append(
                    Received(wire.StatusMessage.from_pubsub(rm.message.data), dict(rm.message.attributes))
                )
            self.subscriber.acknowledge(
                subscription=self.status_sub, ack_ids=[rm.ack_id for rm in response.received_messages]
            )
            if any(r.status.status.terminal for r in got):
                break
        self.statuses += got
        return got

    def wait_for_status(self, status: wire.Status, timeout: float = 30) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for received in self.statuses:
                if received.status.status == status:
                    return received
            self.pull_statuses(timeout=min(2, max(0.1, deadline - time.monotonic())))
        raise AssertionError(f"no {status} within {timeout} s; got {self.kinds()}\n{self.stderr()}")

    def kinds(self) -> list[str]:
        return [r.status.status.value for r in self.statuses]

    def assert_acked(self) -> None:
        """After the agent is gone, an unacked job message would be redelivered within the 3 s lease."""
        assert self.process is not None and self.process.poll() is not None
        # The last extension was at most 1 s before the agent let go; 3 s later it has lapsed.
        within = max(1.0, self.exited_at + 3.5 - time.monotonic())
        assert self.job_messages(within=within) == [], "the job message was not acked"

    def job_messages(self, within: float) -> list:
        """Messages the job subscription delivers within ``within`` seconds (left unacked)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            response = self.subscriber.pull(
                subscription=self.job_sub, max_messages=10, timeout=max(1.0, deadline - time.monotonic())
            )
            if response.received_messages:
                return list(response.received_messages)
        return []

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for sub in (self.job_sub, self.status_sub):
            try:
                self.subscriber.delete_subscription(subscription=sub)
            except Exception:
                pass
        self.subscriber.close()
        self.publisher.stop()


@pytest.fixture
def worker(pubsub_emulator, sleep_test_image, metadata_server, tmp_path):
    made: list[Worker] = []

    def make(**kwargs) -> Worker:
        w = Worker(metadata_server, tmp_path, **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def leftover_containers(job_id: str) -> list[str]:
    out = podman("ps", "-a", "--filter", f"name=batchvm-{job_id}", "--format", "{{.Names}}").stdout
    return [line for line in out.splitlines() if line.strip()]


def as_json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))
