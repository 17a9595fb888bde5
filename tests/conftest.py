"""Shared fixtures: the real Pub/Sub emulator on a free loopback port, one per test session."""

from __future__ import annotations

import os
import socket

import pytest

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
