"""Nothing is left running: the stand-in on SIGTERM, LocalStack on exit, and the up/down CLI."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import compute_v1

from batchvm_local.stack import CONTAINERS_CONF, TEMPLATE, TEMPLATE_METADATA, TOPICS, LocalStack
from tests.local.conftest import (
    PROJECT,
    ZONE,
    StandIn,
    agent_command,
    pid_alive,
    start_standin,
    stop_standin,
    unique,
    wait_dead,
)


def ps() -> list[tuple[int, int, str]]:
    """(pid, pgid, command) of every process, from ps itself."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        pid, pgid, stat, args = line.split(None, 3) if len(line.split(None, 3)) == 4 else (*line.split(), "")
        if not stat.startswith("Z"):
            rows.append((int(pid), int(pgid), args))
    return rows


def assert_nothing_left(pids: list[int]) -> None:
    assert wait_dead(pids) == [], f"still running: {[r for r in ps() if r[0] in pids]}"
    groups = [r for r in ps() if r[1] in pids]
    assert groups == [], f"processes left in the stack's process groups: {groups}"


def start_vm(s: StandIn, template: str, **metadata: str) -> tuple[str, list[int]]:
    """A VM whose agent leaves its process group; returns its name and the pids it runs."""
    name = unique()
    request = compute_v1.InsertInstanceRequest(
        project=PROJECT,
        zone=ZONE,
        source_instance_template=f"global/instanceTemplates/{template}",
        instance_resource=compute_v1.Instance(
            name=name,
            metadata=compute_v1.Metadata(
                items=[
                    compute_v1.Items(key=k, value=v) for k, v in {"test-escape": "true", **metadata}.items()
                ]
            ),
        ),
    )
    s.instances.insert_unary(request=request)
    console = s.wait_serial(name, "fake agent up")
    escaped = int(console.split("escaped ", 1)[1].split()[0])
    return name, [s.vm_info(name)["pid"], escaped]


def test_sigterm_stops_the_standin_and_every_vm(tmp_path):
    process, url = start_standin(tmp_path)
    try:
        s = StandIn(url, process, tmp_path)
        template = compute_v1.InstanceTemplate(
            name="t", properties=compute_v1.InstanceProperties(machine_type="e2-small")
        )
        op = s.templates.insert_unary(project=PROJECT, instance_template_resource=template)
        s.global_ops.wait(project=PROJECT, operation=op.name)
        pids = [process.pid]
        for _ in range(3):
            pids += start_vm(s, "t")[1]
        assert all(pid_alive(p) for p in pids)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert_nothing_left(pids)
    finally:
        if process.poll() is None:
            stop_standin(process)


@pytest.fixture
def no_emulator_env(monkeypatch):
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)


def test_local_stack(tmp_path, no_emulator_env):
    with LocalStack(
        pubsub_port=0, compute_port=0, state_dir=tmp_path, boot_seconds=0.05, agent_command=agent_command()
    ) as stack:
        env = stack.env()
        assert env["PUBSUB_EMULATOR_HOST"] == stack.pubsub.host
        assert env["BATCHVM_COMPUTE_API_ENDPOINT"] == stack.compute_url
        assert env["BATCHVM_PROJECT"] == "batchvm-local" and env["BATCHVM_ZONE"] == "us-central1-a"
        assert env["BATCHVM_INSTANCE_TEMPLATE"] == TEMPLATE == "batchvm-local"
        assert json.loads(env["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]) == {
            "conn_type": "google_cloud_platform",
            "extra": {"is_anonymous": True, "project": "batchvm-local"},
        }

        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = stack.pubsub.host
        publisher = pubsub_v1.PublisherClient()
        topics = {t.name.rsplit("/", 1)[1] for t in publisher.list_topics(project="projects/batchvm-local")}
        assert set(TOPICS) <= topics

        s = StandIn(stack.compute_url, stack.compute, tmp_path)
        template = s.templates.get(project=PROJECT, instance_template=TEMPLATE)
        assert {i.key: i.value for i in template.properties.metadata.items} == TEMPLATE_METADATA
        assert TEMPLATE_METADATA["batchvm-container-cli"] == (
            "podman --runtime runc --storage-driver=vfs --cgroup-manager=cgroupfs"
        )

        name, vm_pids = start_vm(s, TEMPLATE)
        console = s.serial(name)
        assert f"env PUBSUB_EMULATOR_HOST={stack.pubsub.host}\n" in console
        assert f"env CONTAINERS_CONF={CONTAINERS_CONF}\n" in console
        assert CONTAINERS_CONF == Path(__file__).resolve().parents[2] / "worker_image/local/containers.conf"

        stack.pubsub.pause()
        assert not stack.pubsub.ready()
        stack.pubsub.resume()
        assert stack.pubsub.ready()
        pids = [stack.compute.pid, stack.pubsub.process.pid, *vm_pids]
    assert stack.leftovers() == []
    assert_nothing_left(pids)


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "batchvm_local", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


@pytest.fixture
def cli_env(tmp_path, no_emulator_env) -> Iterator[dict[str, str]]:
    env = {**os.environ, "BATCHVM_LOCAL_DIR": str(tmp_path / "stack")}
    yield env
    cli("down", env=env, check=False)  # whatever a failed test left running


def test_cli_up_status_env_down(cli_env, tmp_path):
    up = cli(
        "up",
        "--pubsub-port",
        "0",
        "--compute-port",
        "0",
        "--boot-seconds",
        "0.05",
        "--agent-command",
        agent_command(),
        env=cli_env,
    )
    exported = parse_exports(up.stdout)
    assert set(exported) == {
        "PUBSUB_EMULATOR_HOST", "BATCHVM_COMPUTE_API_ENDPOINT", "BATCHVM_PROJECT", "BATCHVM_ZONE",
        "BATCHVM_INSTANCE_TEMPLATE", "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT",
    }  # fmt: skip
    assert cli("env", env=cli_env).stdout == up.stdout
    again = cli("up", env=cli_env)  # already running: same stack, no second one
    assert again.stdout == up.stdout and "already runs" in again.stderr

    state = json.loads((tmp_path / "stack" / "stack.json").read_text())
    s = StandIn(exported["BATCHVM_COMPUTE_API_ENDPOINT"], None, tmp_path)
    name, vm_pids = start_vm(s, exported["BATCHVM_INSTANCE_TEMPLATE"])

    status = cli("status", env=cli_env)
    assert status.stdout.count("running") == 2 and f"{ZONE}/{name}: RUNNING" in status.stdout

    pids = [state["compute"]["pid"], state["pubsub"]["pid"], *vm_pids]
    java = [pid for pid, pgid, args in ps() if pgid == state["pubsub"]["pid"] and "java" in args]
    assert java, "the emulator's Java process should be in its process group"
    down = cli("down", env=cli_env)
    assert "nothing of it is left running" in down.stdout
    assert_nothing_left(pids + java)
    assert cli("status", env=cli_env, check=False).returncode == 1
    assert cli("down", env=cli_env).stdout.startswith("no local stack")


def test_cli_down_fails_if_something_was_left(cli_env):
    cli("up", "--pubsub-port", "0", "--compute-port", "0", env=cli_env)
    state = json.loads((Path(cli_env["BATCHVM_LOCAL_DIR"]) / "stack.json").read_text())
    # a process of the stack that escaped both the process groups and the stand-in's VM trees
    stray = subprocess.Popen(
        ["sleep", "300"], env={**cli_env, "BATCHVM_LOCAL_STACK": state["stack_id"]}, start_new_session=True
    )
    try:
        down = cli("down", env=cli_env, check=False)
        assert down.returncode == 1
        assert f"pid {stray.pid}" in down.stderr
        assert stray.wait(timeout=5) == -signal.SIGKILL  # and it was killed
    finally:
        if stray.poll() is None:
            stray.kill()
    assert_nothing_left([state["compute"]["pid"], state["pubsub"]["pid"]])
