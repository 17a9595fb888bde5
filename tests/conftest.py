"""Shared fixtures: the real Pub/Sub emulator on a free loopback port, one per test session."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.helpers import REPO, Cloud

PROJECT = "batchvm-local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    """Google's Pub/Sub emulator; sets PUBSUB_EMULATOR_HOST for the session."""
    from batchvm_local.pubsub_emulator import PubSubEmulator

    emulator = PubSubEmulator(free_port(), PROJECT, tmp_path_factory.mktemp("pubsub") / "emulator.log")
    emulator.start()
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    yield emulator
    emulator.stop()
    if previous is None:
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    else:
        os.environ["PUBSUB_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """The real Pub/Sub emulator and the Compute stand-in whose VMs run the real agent with real
    podman containers; sets the clients' environment for the session."""
    from batchvm_local.stack import LocalStack

    subprocess.run(["bash", str(REPO / "worker_image/local/setup.sh")], check=True)
    stack = LocalStack(
        pubsub_port=0,
        compute_port=0,
        state_dir=tmp_path_factory.mktemp("stack"),
        # Lets a test make the agent crash after STARTED (fault F5); production units never set it.
        extra_env={"BATCHVM_AGENT_TEST_HOOKS": "1"},
    )
    stack.start()
    saved = {key: os.environ.get(key) for key in stack.env()}
    os.environ.update(stack.env())
    yield stack
    stack.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def cloud(local_stack):
    cloud = Cloud(local_stack)
    cloud.reset_faults()
    yield cloud
    cloud.reset_faults()
    cloud.assert_nothing_left()
