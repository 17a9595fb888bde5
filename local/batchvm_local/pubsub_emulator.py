"""Google's Pub/Sub emulator (``gcloud beta emulators pubsub start``), started and stopped as one process group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from batchvm_local import procs


class EmulatorError(RuntimeError):
    pass


def find_gcloud() -> str:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise EmulatorError(
            "gcloud is not on PATH: the Pub/Sub emulator needs the Google Cloud SDK with its "
            "pubsub-emulator component and Java"
        )
    return gcloud


class PubSubEmulator:
    """One emulator on ``127.0.0.1:port``. Its state lives in memory: a restart starts empty."""

    def __init__(
        self, port: int, project: str, log_path: Path | None = None, env: dict[str, str] | None = None
    ):
        self.port = port
        self.project = project
        self.log_path = log_path
        self.env = env  # None: this process's environment
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                find_gcloud(),
                "beta",
                "emulators",
                "pubsub",
                "start",
                f"--host-port={self.host}",
                f"--project={self.project}",
                "--quiet",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # gcloud spawns Java: stop them together by process group
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorError(f"the Pub/Sub emulator exited with {self.process.returncode}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise EmulatorError(f"the Pub/Sub emulator did not answer on {self.host} within {timeout} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process_group(self.process.pid)
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """Freeze the emulator (SIGSTOP): clients see an unreachable service, and nothing is lost."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)


def stop_process_group(pid: int, grace: float = 5) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGCONT)
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_runs(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_runs(pgid: int) -> bool:
    """Whether a live process remains in the group; a zombie (say, our own unreaped child) does not count."""
    return any(p.pgid == pgid and p.state not in ("Z", "X") for p in procs.all_procs())
