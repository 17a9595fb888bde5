"""The whole local stack: Google's Pub/Sub emulator and the Compute stand-in, ready for the provider.

    with LocalStack(pubsub_port=0, compute_port=0) as stack:
        os.environ.update(stack.env())
        ...

``start()`` returns once both answer, the topics exist and the instance template
``batchvm-local`` is in place. Each service runs in its own process group, started with
``BATCHVM_LOCAL_STACK=<id>`` in its environment so that whatever it leaves behind can be found.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from batchvm_local import procs
from batchvm_local.pubsub_emulator import PubSubEmulator, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO_ROOT / "worker_image" / "local" / "containers.conf"

DEFAULT_PROJECT = "batchvm-local"
DEFAULT_ZONE = "us-central1-a"
TEMPLATE = "batchvm-local"
# The wire format's topic names (airflow_batchvm.wire); local/ does not import the provider.
TOPICS = ("batch_jobs", "batch_jobs_status")
# How a VM of this machine runs containers (see the shared notes on podman here).
TEMPLATE_METADATA = {
    "batchvm-container-cli": "podman --runtime runc --storage-driver=vfs --cgroup-manager=cgroupfs",
    "batchvm-container-run-args": "--network=none",
    "batchvm-image-registry": "localhost",
}
STACK_MARKER = "BATCHVM_LOCAL_STACK"


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalStack:
    """The Pub/Sub emulator plus the Compute stand-in; a context manager (``start`` / ``stop``)."""

    def __init__(
        self,
        *,
        project: str = DEFAULT_PROJECT,
        zone: str = DEFAULT_ZONE,
        pubsub_port: int = 8085,
        compute_port: int = 8086,
        state_dir: Path | None = None,
        boot_seconds: float = 0.2,
        agent_command: str | list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.project = project
        self.zone = zone
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="batchvm-local-"))
        self.boot_seconds = boot_seconds
        self.agent_command = shlex.join(agent_command) if isinstance(agent_command, list) else agent_command
        self.extra_env = dict(extra_env or {})
        self.stack_id = uuid.uuid4().hex
        self.pubsub = PubSubEmulator(
            pubsub_port or free_port(), project, self.state_dir / "pubsub.log", env=self._env_for_services()
        )
        self._compute_port = compute_port
        self.compute: subprocess.Popen | None = None

    # --- what clients need ----------------------------------------------------------------

    @property
    def compute_port(self) -> int:
        return self._compute_port

    @property
    def compute_url(self) -> str:
        return f"http://127.0.0.1:{self._compute_port}"

    def env(self) -> dict[str, str]:
        """The environment the provider, Airflow and tests need to use this stack."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,
            "BATCHVM_COMPUTE_API_ENDPOINT": self.compute_url,
            "BATCHVM_PROJECT": self.project,
            "BATCHVM_ZONE": self.zone,
            "BATCHVM_INSTANCE_TEMPLATE": TEMPLATE,
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                {
                    "conn_type": "google_cloud_platform",
                    "extra": {"is_anonymous": True, "project": self.project},
                }
            ),
        }

    def state(self) -> dict:
        """What ``python -m batchvm_local up`` records so that another process can stop the stack."""
        return {
            "stack_id": self.stack_id,
            "project": self.project,
            "zone": self.zone,
            "state_dir": str(self.state_dir),
            "pubsub": _describe(self.pubsub.process, self.pubsub.port),
            "compute": _describe(self.compute, self._compute_port),
            "env": self.env(),
        }

    # --- starting and stopping ------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.pubsub.start(timeout=timeout)
            self._start_compute(timeout)
            self._create_topics()
            self._create_template()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the stand-in first (it kills its VMs on SIGTERM), then the emulator."""
        if self.compute is not None:
            stop_process_group(self.compute.pid, grace=15)
            try:
                self.compute.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.compute = None
        if self.pubsub.process is not None:
            self.pubsub.stop()

    def leftovers(self) -> list[procs.Proc]:
        """Processes this stack started that still run (none once ``stop`` returned)."""
        return procs.marked(f"{STACK_MARKER}={self.stack_id}")

    def _env_for_services(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, STACK_MARKER: self.stack_id}
        env.pop("GCE_METADATA_HOST", None)  # each VM gets its own
        return env

    def _start_compute(self, timeout: float) -> None:
        port_file = self.state_dir / "compute.port"
        port_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "batchvm_local.compute",
            "--host", "127.0.0.1",
            "--port", str(self._compute_port),
            "--port-file", str(port_file),
            "--state-dir", str(self.state_dir / "compute"),
            "--boot-seconds", str(self.boot_seconds),
        ]  # fmt: skip
        if self.agent_command is not None:
            command += ["--agent-command", self.agent_command]
        env = self._env_for_services() | {
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,  # the VMs' agents inherit it
            "CONTAINERS_CONF": str(CONTAINERS_CONF),
        }
        log_path = self.state_dir / "compute.log"
        with open(log_path, "ab") as log:
            self.compute = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.state_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.compute.poll() is not None:
                raise StackError(
                    f"the Compute stand-in exited with {self.compute.returncode}:\n{_tail(log_path)}"
                )
            if port_file.exists():
                self._compute_port = int(port_file.read_text())
                if _answers(f"{self.compute_url}/_local/stats"):
                    return
            time.sleep(0.05)
        raise StackError(f"the Compute stand-in did not answer within {timeout} s:\n{_tail(log_path)}")

    def _create_topics(self) -> None:
        import grpc
        from google.api_core.exceptions import AlreadyExists
        from google.pubsub_v1 import PublisherClient
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        channel = grpc.insecure_channel(self.pubsub.host)  # what PUBSUB_EMULATOR_HOST makes clients do
        try:
            publisher = PublisherClient(transport=PublisherGrpcTransport(channel=channel))
            for topic in TOPICS:
                try:
                    publisher.create_topic(name=f"projects/{self.project}/topics/{topic}", timeout=30)
                except AlreadyExists:
                    pass
        finally:
            channel.close()

    def _create_template(self) -> None:
        body = {
            "name": TEMPLATE,
            "description": "airflow-batchvm worker VMs on this machine (local stack)",
            "properties": {
                "machineType": "e2-standard-2",
                "metadata": {"items": [{"key": k, "value": v} for k, v in TEMPLATE_METADATA.items()]},
            },
        }
        url = f"{self.compute_url}/compute/v1/projects/{self.project}/global/instanceTemplates"
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise StackError(
                    f"creating the instance template failed: {exc.code} {exc.read()!r}"
                ) from None


def _describe(process: subprocess.Popen | None, port: int) -> dict | None:
    if process is None:
        return None
    proc = procs.read_proc(process.pid)
    return {"pid": process.pid, "start_time": proc.start_time if proc else None, "port": port}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
