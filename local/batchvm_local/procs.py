"""Process-tree helpers: find and kill everything a local "VM" or service started.

A process group is not enough to contain a VM: podman's ``conmon`` and the container it watches
call ``setsid()`` and leave the agent's group, and once their parent exits they are re-parented.
Each VM therefore runs under :mod:`batchvm_local.vminit`, a child subreaper, so that everything it
starts stays in its process tree; killing a VM means killing that tree. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    start_time: int  # clock ticks after boot: tells a process from a later one that reuses its pid
    state: str
    comm: str


def read_proc(pid: int) -> Proc | None:
    """The process ``pid`` from ``/proc``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return Proc(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        start_time=int(fields[19]),
        state=fields[0],
        comm=comm,
    )


def all_procs() -> list[Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := read_proc(int(entry))) is not None:
            procs.append(proc)
    return procs


def is_alive(proc: Proc) -> bool:
    """Whether ``proc`` (the same process, not a successor with its pid) still runs; zombies count as gone."""
    now = read_proc(proc.pid)
    return now is not None and now.start_time == proc.start_time and now.state not in ("Z", "X")


def tree(root: int, procs: list[Proc] | None = None) -> list[Proc]:
    """``root`` and all its descendants, parents before children."""
    procs = all_procs() if procs is None else procs
    children: dict[int, list[Proc]] = {}
    found: list[Proc] = []
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
        if proc.pid == root:
            found.append(proc)
    if not found:
        return []
    index = 0
    while index < len(found):
        found.extend(children.get(found[index].pid, []))
        index += 1
    return found


def environ_has(pid: int, entry: str) -> bool:
    """Whether ``NAME=value`` is in the environment ``pid`` was started with."""
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def marked(entry: str, procs: list[Proc] | None = None) -> list[Proc]:
    """Every process started with ``NAME=value`` in its environment, and their descendants."""
    procs = all_procs() if procs is None else procs
    found: dict[int, Proc] = {}
    for proc in procs:
        if proc.pid != os.getpid() and proc.pid not in found and environ_has(proc.pid, entry):
            for member in tree(proc.pid, procs):
                found[member.pid] = member
    return list(found.values())


def kill_tree(root: Proc, group: bool = True) -> list[Proc]:
    """SIGKILL ``root`` (if it is still that process), all its descendants and (``group``) its process group.

    Everything is stopped (SIGSTOP) first, so that nothing forks or is re-parented away while the
    tree is read, then killed at once: what a power cut does to a machine. Returns what was killed.
    """
    if not is_alive(root):
        return []
    stopped: dict[int, Proc] = {}
    for _ in range(20):
        fresh = [p for p in tree(root.pid) if p.pid not in stopped and p.pid != os.getpid()]
        if not fresh:
            break
        for proc in fresh:
            _signal(proc.pid, signal.SIGSTOP)
            stopped[proc.pid] = proc
    for proc in stopped.values():
        _signal(proc.pid, signal.SIGKILL)
    if group:
        try:
            os.killpg(root.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return list(stopped.values())


def signal_tree(root: int, signum: int) -> None:
    """Send ``signum`` to ``root`` and its descendants (an orderly shutdown, where SIGTERM reaches every service)."""
    for proc in tree(root):
        if proc.pid != os.getpid():
            _signal(proc.pid, signum)


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Wait until none of ``procs`` runs; returns those still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if is_alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
