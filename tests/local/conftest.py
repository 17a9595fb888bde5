"""Fixtures for the local stand-ins: one Compute stand-in per session, driven with the real client."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

PROJECT = "batchvm-local"
ZONE = "us-central1-a"
OTHER_ZONE = "europe-west1-b"
TEMPLATE = "tmpl"
FAKE_AGENT = Path(__file__).with_name("fake_agent.py")
BOOT_SECONDS = 0.05


def agent_command() -> str:
    return shlex.join([sys.executable, str(FAKE_AGENT)])


def start_standin(state_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``python -m batchvm_local.compute`` on a free port; returns the process and its URL."""
    port_file = state_dir / "port"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "batchvm_local.compute", "--port", "0", "--port-file", str(port_file),
            "--state-dir", str(state_dir), "--boot-seconds", str(BOOT_SECONDS),
            "--agent-command", agent_command(), "--wait-seconds", "5", *extra,
        ],
        stdout=open(state_dir / "compute.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not port_file.exists():
        assert process.poll() is None, (state_dir / "compute.log").read_text()
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.02)
    return process, f"http://127.0.0.1:{port_file.read_text()}"


def stop_standin(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)


class StandIn:
    """The stand-in's URL, real Compute clients pointed at it, and helpers for its /_local/ knobs."""

    def __init__(self, url: str, process: subprocess.Popen, state_dir: Path):
        self.url = url
        self.process = process
        self.state_dir = state_dir
        options = {"client_options": {"api_endpoint": url}, "credentials": AnonymousCredentials()}
        self.instances = compute_v1.InstancesClient(**options)
        self.templates = compute_v1.InstanceTemplatesClient(**options)
        self.zone_ops = compute_v1.ZoneOperationsClient(**options)
        self.global_ops = compute_v1.GlobalOperationsClient(**options)

    # --- the /_local/ knobs ---

    def local(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def fault(self, fault: str, **fields: object) -> dict:
        return self.local("POST", "/_local/faults", {"fault": fault, **fields})

    def vm_info(self, name: str, zone: str = ZONE) -> dict:
        for vm in self.local("GET", "/_local/vms")["vms"]:
            if vm["name"] == name and vm["zone"] == zone:
                return vm
        raise KeyError(name)

    def knob(self, name: str, action: str, body: dict | None = None, zone: str = ZONE) -> dict:
        return self.local(
            "POST", f"/_local/projects/{PROJECT}/zones/{zone}/instances/{name}/{action}", body or {}
        )

    # --- the API through the real client ---

    def insert(
        self,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        template: str | None = TEMPLATE,
        zone: str = ZONE,
        request_id: str | None = None,
        **instance: object,
    ) -> compute_v1.Operation:
        resource = compute_v1.Instance(name=name, labels=labels or {}, **instance)
        if metadata:
            resource.metadata = compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in metadata.items()]
            )
        request = compute_v1.InsertInstanceRequest(project=PROJECT, zone=zone, instance_resource=resource)
        if template:
            request.source_instance_template = f"global/instanceTemplates/{template}"
        if request_id:
            request.request_id = request_id
        return self.instances.insert_unary(request=request)

    def wait(self, op: compute_v1.Operation, zone: str = ZONE) -> compute_v1.Operation:
        return self.zone_ops.wait(project=PROJECT, zone=zone, operation=op.name)

    def get(self, name: str, zone: str = ZONE) -> compute_v1.Instance:
        return self.instances.get(project=PROJECT, zone=zone, instance=name)

    def delete(self, name: str, zone: str = ZONE) -> compute_v1.Operation:
        return self.wait(self.instances.delete_unary(project=PROJECT, zone=zone, instance=name), zone)

    def wait_status(self, name: str, status: str, timeout: float = 10, zone: str = ZONE) -> list[str]:
        """Poll until the instance has ``status``; returns every status seen on the way."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(name, zone).status
            if not seen or seen[-1] != current:
                seen.append(current)
            if current == status:
                return seen
            assert time.monotonic() < deadline, f"{name} never reached {status}; saw {seen}"
            time.sleep(0.01)

    def serial(self, name: str, zone: str = ZONE) -> str:
        return self.instances.get_serial_port_output(project=PROJECT, zone=zone, instance=name).contents

    def wait_serial(self, name: str, text: str, timeout: float = 10, zone: str = ZONE) -> str:
        deadline = time.monotonic() + timeout
        while text not in (contents := self.serial(name, zone)):
            assert time.monotonic() < deadline, f"{text!r} never appeared on the console:\n{contents}"
            time.sleep(0.02)
        return contents


def metadata_get(host: str, path: str, header: bool = True, **params: str) -> tuple[int, dict, str]:
    """GET a metadata path; returns (status, headers, body) without raising on HTTP errors."""
    query = ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/{path}{query}",
        headers={"Metadata-Flavor": "Google"} if header else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def unique(prefix: str = "vm") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_dead(pids: list[int], timeout: float = 5) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


@pytest.fixture(scope="session")
def standin(tmp_path_factory) -> Iterator[StandIn]:
    state_dir = tmp_path_factory.mktemp("compute")
    process, url = start_standin(state_dir)
    s = StandIn(url, process, state_dir)
    op = s.templates.insert_unary(
        project=PROJECT,
        instance_template_resource=compute_v1.InstanceTemplate(
            name=TEMPLATE,
            properties=compute_v1.InstanceProperties(
                machine_type="e2-small",
                labels={"managed-by": "airflow-batchvm", "team": "template"},
                metadata=compute_v1.Metadata(
                    items=[
                        compute_v1.Items(key="batchvm-container-cli", value="podman"),
                        compute_v1.Items(key="test-sleep", value="30"),
                    ]
                ),
                scheduling=compute_v1.Scheduling(on_host_maintenance="TERMINATE", automatic_restart=False),
            ),
        ),
    )
    s.global_ops.wait(project=PROJECT, operation=op.name)
    yield s
    stop_standin(process)


@pytest.fixture
def compute(standin: StandIn) -> Iterator[StandIn]:
    """The session's stand-in with no faults armed, zeroed counters, and no VM left after the test."""
    standin.local("POST", "/_local/reset", {})
    yield standin
    standin.local("POST", "/_local/reset", {"deleteInstances": True})
