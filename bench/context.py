"""What every phase of a run shares: the stack, the cloud view, Airflow, the event log, the clock."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvm_local import procs

CLK_TCK = os.sysconf("SC_CLK_TCK")


class EventTail:
    """Reads the JSON lines the measured processes append to one file, incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict] = []
        self._partial = b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            if line.strip():
                try:
                    new.append(json.loads(line))
                except ValueError:
                    pass
        self.events += new
        return new

    def of(self, kind: str, variant: str | None = None) -> list[dict]:
        return [e for e in self.events if e["k"] == kind and (variant is None or e.get("v") == variant)]


@dataclass
class Context:
    quick: bool
    run_dir: Path
    stack: Any = None
    cloud: Any = None
    airflow: Any = None
    tail: EventTail | None = None
    results: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"bench [{time.monotonic() - self.t0:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- processes: CPU and memory -------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_pids(root: int) -> list[int]:
    return [p.pid for p in procs.tree(root)]


def describe_tree(root: int) -> list[dict]:
    out = []
    for p in procs.tree(root):
        try:
            cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            cmd = p.comm
        out.append({"pid": p.pid, "rss_mib": round(rss_mib(p.pid), 1), "cmd": cmd})
    return out
