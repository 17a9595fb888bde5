"""Running the job's container through a docker-compatible CLI, with no shell anywhere.

The CLI is a setting (``docker`` on a Compute Engine VM, a podman command line locally), so the
runner only ever builds an argv list for ``CLI run``. Job data never appears in that argv: the
payload (``JOB_DATA``), the task's index and count (``BATCHVM_TASK_INDEX``, ``BATCHVM_TASK_COUNT``)
and the job's ``env`` are put in the CLI's own environment and named with ``-e NAME``, which
docker and podman both read from their environment. So no value is parsed by a shell, shown by
``ps``, or split on spaces; quotes, ``$(...)`` and newlines arrive byte-for-byte.

``command``/``args`` follow the Kubernetes meaning that the names come from: ``command``
replaces the image's ENTRYPOINT (``--entrypoint`` takes its first word, the rest follows the
image), ``args`` replaces its CMD.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

from airflow_batchvm import wire

log = logging.getLogger(__name__)

TAIL_LINES = 50
READ_CHUNK = 8192

# Variables that steer the container CLI itself (where it finds its daemon, config, storage,
# helpers, libraries). A job value for one of these would have to be set in the CLI's own
# environment to reach the container, and would reconfigure the CLI: such jobs are refused.
RESERVED_ENV_NAMES = frozenset(
    {"PATH", "HOME", "TMPDIR", "REGISTRY_AUTH_FILE", "STORAGE_DRIVER", "STORAGE_OPTS"}
)
RESERVED_ENV_PREFIXES = ("LD_", "DOCKER_", "CONTAINERS_", "CONTAINER_", "PODMAN_", "BUILDAH_", "XDG_")

# docker and podman use 125 for "the run command itself failed" (bad image, no daemon, bad flag).
RUNTIME_ERROR_EXIT = 125


class JobRefused(ValueError):
    """The job cannot be run as specified; the message says why."""


def container_name(job_id: str, attempt: int, task_index: int = 0) -> str:
    """Unique per run, so neither a leftover of an earlier try nor another task of the job collides."""
    return f"batchvm-{job_id}-a{attempt}-t{task_index}-{secrets.token_hex(4)}"


def check_env_names(names) -> None:
    for name in names:
        if name in wire.RESERVED_ENV:
            raise JobRefused(f"env {name} is set by the agent")
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise JobRefused(
                f"env {name} cannot be passed to the container: it would reconfigure the container CLI itself"
            )


def build_run(
    cli: list[str], run_args: list[str], name: str, spec: wire.JobSpec, base_env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The argv for ``CLI run`` and the environment to start it with.

    Values go only into the environment; the argv names them. Raises :class:`JobRefused`.
    """
    check_env_names(spec.env)
    env = dict(base_env)
    env["JOB_DATA"] = spec.job_data
    env[wire.TASK_INDEX_ENV] = str(spec.task_index)
    env[wire.TASK_COUNT_ENV] = str(spec.task_count)
    env.update(spec.env)
    argv = [*cli, "run", "--rm", "--name", name, *run_args, "-e", "JOB_DATA"]
    argv += ["-e", wire.TASK_INDEX_ENV, "-e", wire.TASK_COUNT_ENV]
    for env_name in spec.env:
        argv += ["-e", env_name]
    command = list(spec.command or [])
    if command:
        argv += ["--entrypoint", command[0]]
    argv.append(spec.image)
    argv += command[1:]
    argv += spec.args
    for key, value in env.items():
        if "\0" in key or "\0" in value:
            raise JobRefused(f"env {key} contains a NUL character, which no process environment can hold")
    return argv, env


class LogTail:
    """The last ``max_lines`` lines of output, at most ``max_bytes`` of UTF-8 (for status messages)."""

    def __init__(self, max_lines: int = TAIL_LINES, max_bytes: int = wire.MAX_LOG_TAIL_BYTES):
        self.max_bytes = max_bytes
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = ""
        self._lock = threading.Lock()

    def feed(self, chunk: str) -> None:
        with self._lock:
            text = self._partial + chunk
            *complete, self._partial = text.split("\n")
            self._lines.extend(complete)
            if len(self._partial) > self.max_bytes:  # a huge line with no newline: keep its end
                self._partial = self._partial[-self.max_bytes :]

    def text(self) -> str:
        with self._lock:
            lines = list(self._lines) + ([self._partial] if self._partial else [])
        tail = "\n".join(lines)
        encoded = tail.encode()
        if len(encoded) <= self.max_bytes:
            return tail
        cut = encoded[-self.max_bytes :].decode(errors="ignore")
        # Start at a line boundary when one is near, so the tail does not open mid-line.
        newline = cut.find("\n")
        return cut[newline + 1 :] if 0 <= newline < len(cut) // 2 else cut

    def last_line(self) -> str:
        for line in reversed(self.text().splitlines()):
            if line.strip():
                return line.strip()
        return ""


@dataclass
class RunResult:
    exit_code: int | None
    reason: str | None  # None when the job succeeded
    log_tail: str
    stopped: bool = False  # interrupted by `stop` (preemption, shutdown): not the job's outcome

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.reason is None


class ContainerRunner:
    """Runs one container to completion, streaming its output to ``out`` (the serial console)."""

    def __init__(
        self,
        cli: list[str],
        run_args: list[str] | None = None,
        out: BinaryIO | None = None,
        kill_grace_seconds: float = 10.0,
        poll_seconds: float = 0.2,
    ):
        self.cli = list(cli)
        self.run_args = list(run_args or [])
        self.out = out if out is not None else sys.stdout.buffer
        self.kill_grace_seconds = kill_grace_seconds
        self.poll_seconds = poll_seconds

    def run(self, spec: wire.JobSpec, name: str, stop: threading.Event | None = None) -> RunResult:
        stop = stop or threading.Event()
        tail = LogTail()
        try:
            argv, env = build_run(self.cli, self.run_args, name, spec, dict(os.environ))
        except JobRefused as exc:
            return RunResult(None, str(exc), "")
        log.info("running %s", argv)  # names only: values are in the environment
        try:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except FileNotFoundError:
            return RunResult(None, f"the container CLI {self.cli[0]!r} was not found", "")
        except (OSError, ValueError) as exc:
            return RunResult(None, f"the container CLI could not be started: {exc}", "")

        reader = threading.Thread(
            target=self._pump, args=(proc.stdout, tail), name="container-output", daemon=True
        )
        reader.start()
        started = time.monotonic()
        timeout = spec.timeout_seconds
        timed_out = interrupted = False
        while proc.poll() is None:
            if timeout is not None and time.monotonic() - started >= timeout:
                timed_out = True
                log.warning("job timed out after %s s: killing container %s", timeout, name)
                self._kill(proc, name)
                break
            if stop.wait(self.poll_seconds):
                interrupted = True
                log.warning("stopping: killing container %s", name)
                self._kill(proc, name)
                break
        code = proc.wait()
        reader.join(timeout=10)

        if interrupted:
            return RunResult(code, "interrupted", tail.text(), stopped=True)
        if timed_out:
            return RunResult(code, f"timed out after {timeout} s", tail.text())
        return RunResult(code, describe_exit(code, tail), tail.text())

    def _pump(self, stream: BinaryIO, tail: LogTail) -> None:
        """Copy output to the console as it comes, keeping the tail; never let a write error stop it."""
        while True:
            chunk = stream.read1(READ_CHUNK) if hasattr(stream, "read1") else stream.read(READ_CHUNK)
            if not chunk:
                break
            tail.feed(chunk.decode(errors="replace"))
            try:
                self.out.write(chunk)
                self.out.flush()
            except (OSError, ValueError):
                pass
        stream.close()

    def _kill(self, proc: subprocess.Popen, name: str) -> None:
        """``CLI kill NAME`` stops the container itself (killing only the CLI could orphan it)."""
        try:
            subprocess.run(
                [*self.cli, "kill", name],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s kill %s failed: %s", self.cli[0], name, exc)
        try:
            proc.wait(timeout=self.kill_grace_seconds)
        except subprocess.TimeoutExpired:
            log.warning("the container CLI did not exit after kill; killing it")
            proc.kill()


def describe_exit(code: int, tail: LogTail) -> str | None:
    if code == 0:
        return None
    if code < 0:
        return f"the container CLI was killed by signal {-code}"
    if code == RUNTIME_ERROR_EXIT:
        detail = tail.last_line()
        return f"the container runtime failed (exit {code})" + (f": {detail}" if detail else "")
    return f"container exited with code {code}"
