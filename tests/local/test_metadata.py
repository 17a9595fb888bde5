"""Each VM's metadata server, as the worker agent and google-auth read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from batchvm_local.resources import project_number
from tests.local.conftest import PROJECT, ZONE, metadata_get, unique


def running_vm(compute, **metadata: str) -> tuple[str, str]:
    name = unique()
    compute.insert(name, metadata=metadata or None)
    compute.wait_status(name, "RUNNING")
    return name, compute.vm_info(name)["metadataHost"]


def test_header_is_required_and_echoed(compute):
    _, host = running_vm(compute)
    status, headers, _ = metadata_get(host, "instance/name", header=False)
    assert status == 403
    assert headers["Metadata-Flavor"] == "Google"
    status, headers, _body = metadata_get(host, "instance/name")
    assert status == 200 and headers["Metadata-Flavor"] == "Google" and headers["ETag"]


def test_instance_and_project_values(compute):
    name, host = running_vm(compute, **{"batchvm-job-id": "job-1", "batchvm-attempt": "2"})
    number = project_number(PROJECT)
    instance = compute.get(name)

    def value(path: str) -> str:
        status, _, body = metadata_get(host, path)
        assert status == 200, (path, status, body)
        return body

    assert value("project/project-id") == PROJECT
    assert value("project/numeric-project-id") == number and number.isdigit() and len(number) == 12
    assert value("instance/name") == name
    assert value("instance/id") == str(instance.id)
    assert value("instance/zone") == f"projects/{number}/zones/{ZONE}"
    assert value("instance/hostname") == f"{name}.{ZONE}.c.{PROJECT}.internal"
    assert value("instance/preempted") == "FALSE"
    assert value("instance/attributes/batchvm-job-id") == "job-1"
    assert value("instance/attributes/batchvm-container-cli") == "podman"  # from the template
    keys = value("instance/attributes/").splitlines()
    assert sorted(keys) == ["batchvm-attempt", "batchvm-container-cli", "batchvm-job-id", "test-sleep"]
    assert "attributes/" in value("instance/").splitlines()

    assert metadata_get(host, "instance/attributes/no-such-key")[0] == 404
    assert metadata_get(host, "instance/no-such-thing")[0] == 404

    _status, headers, body = metadata_get(host, "instance/attributes/", recursive="true")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["batchvm-attempt"] == "2"


def test_each_vm_has_its_own_server(compute):
    a, host_a = running_vm(compute)
    b, host_b = running_vm(compute)
    assert host_a != host_b
    assert metadata_get(host_a, "instance/name")[2] == a
    assert metadata_get(host_b, "instance/name")[2] == b
    # the VM's process was started with GCE_METADATA_HOST pointing at its own server
    assert f"env GCE_METADATA_HOST={host_a}\n" in compute.wait_serial(a, "fake agent up")


def test_token_works_for_google_auth_compute_credentials(compute):
    _, host = running_vm(compute)
    status, headers, body = metadata_get(host, "instance/service-accounts/default/token")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["token_type"] == "Bearer"
    script = (
        "import google.auth.compute_engine as ce, google.auth.transport.requests as r\n"
        "c = ce.Credentials(); c.refresh(r.Request()); print(c.token, c.service_account_email)\n"
    )
    env = {**os.environ, "GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token, email = out.stdout.split()
    assert token == "local-fake-token" and email.endswith("-compute@developer.gserviceaccount.com")


def test_wait_for_change_on_preempted(compute):
    name, host = running_vm(compute)
    result: dict = {}

    def watch() -> None:
        result["response"] = metadata_get(
            host, "instance/preempted", wait_for_change="true", timeout_sec="20"
        )
        result["at"] = time.monotonic()

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)
    assert watcher.is_alive(), "wait_for_change returned before anything changed"
    preempted_at = time.monotonic()
    compute.knob(name, "preempt", {"graceSeconds": 5})
    watcher.join(timeout=5)
    assert not watcher.is_alive()
    status, _, body = result["response"]
    assert (status, body) == (200, "TRUE")
    assert result["at"] - preempted_at < 1


def test_wait_for_change_times_out_and_honours_last_etag(compute):
    _, host = running_vm(compute)
    started = time.monotonic()
    status, _headers, body = metadata_get(
        host, "instance/preempted", wait_for_change="true", timeout_sec="0.5"
    )
    assert (status, body) == (200, "FALSE")
    assert 0.4 <= time.monotonic() - started < 3
    # an ETag other than the current value's answers at once, as GCE does
    started = time.monotonic()
    status, _, body = metadata_get(
        host, "instance/preempted", wait_for_change="true", last_etag="0", timeout_sec="10"
    )
    assert (status, body) == (200, "FALSE") and time.monotonic() - started < 1
