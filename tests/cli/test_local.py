"""``batchvm local``: the dev-only local stack, through the installed ``batchvm`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import invoke

BATCHVM = str(Path(sys.executable).with_name("batchvm"))


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BATCHVM, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_local_up_status_down(tmp_path):
    env = {**os.environ, "BATCHVM_LOCAL_DIR": str(tmp_path)}
    up = run("local", "up", "--pubsub-port", "0", "--compute-port", "0", env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert "export PUBSUB_EMULATOR_HOST=127.0.0.1:" in up.stdout
        assert "export BATCHVM_COMPUTE_API_ENDPOINT=http://127.0.0.1:" in up.stdout
        status = run("local", "status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "pubsub:  running" in status.stdout and "compute: running" in status.stdout
    finally:
        down = run("local", "down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "nothing of it is left running" in down.stdout
    after = run("local", "status", env=env)
    assert after.returncode == 1
    assert "no local stack" in after.stdout


def test_local_says_so_when_the_dev_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "batchvm_local.__main__", None)  # as if not installed
    text = invoke("local", "status", code=2).output
    assert "needs the development package batchvm-local, which is not installed" in text
