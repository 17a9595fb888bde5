"""Test-only fault knobs and call counters of the Compute stand-in.

Nothing here exists on Compute Engine: tests reach it under ``/_local/`` on the stand-in's port,
and a VM never reads it. Insert faults are armed for the next N inserts (optionally in one zone)
and spent by inserts that would otherwise have succeeded.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass


class FaultError(ValueError):
    """A fault request that makes no sense."""


# kind -> what the next matching insert does
INSERT_FAULTS = {
    "boot-failure": "the VM reaches RUNNING, then TERMINATED without ever starting the agent",
    "stuck-provisioning": "the VM never leaves PROVISIONING (the insert operation never finishes)",
    "boot-delay": "the VM stays `seconds` longer in PROVISIONING",
    "zone-exhausted": "the insert operation fails with ZONE_RESOURCE_POOL_EXHAUSTED; no VM is created",
    "quota-exceeded": "the insert operation fails with QUOTA_EXCEEDED; no VM is created",
    "permission-denied": "the insert call itself fails with HTTP 403",
}


@dataclass
class Fault:
    kind: str
    zone: str | None = None  # None: any zone
    count: int | None = 1  # inserts left to hit; None: every insert until reset
    seconds: float = 0.0  # boot-delay only
    code: str | None = None  # zone-exhausted / quota-exceeded: the operation error code to report

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BootPlan:
    """What the insert faults make of one VM's boot."""

    extra_delay: float = 0.0
    stuck: bool = False
    fail: bool = False


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []

    def arm(self, body: dict) -> Fault:
        kind = body.get("fault") or body.get("kind")
        if kind not in INSERT_FAULTS:
            raise FaultError(f"unknown fault {kind!r}; known: {', '.join(INSERT_FAULTS)}")
        count = body.get("count", 1)
        if count is not None and (not isinstance(count, int) or count < 1):
            raise FaultError("count must be a positive integer, or null for every insert")
        fault = Fault(
            kind=kind,
            zone=body.get("zone"),
            count=count,
            seconds=float(body.get("seconds", 0)),
            code=body.get("code"),
        )
        if kind == "boot-delay" and fault.seconds <= 0:
            raise FaultError("boot-delay needs seconds > 0")
        with self._lock:
            self._pending.append(fault)
        return fault

    def take(self, zone: str) -> list[Fault]:
        """Spend one use of every armed fault that applies to an insert in ``zone``."""
        taken = []
        with self._lock:
            for fault in list(self._pending):
                if fault.zone not in (None, zone):
                    continue
                taken.append(fault)
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count == 0:
                        self._pending.remove(fault)
        return taken

    def pending(self) -> list[dict]:
        with self._lock:
            return [f.to_json() for f in self._pending]

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()


def boot_plan(faults: list[Fault]) -> BootPlan:
    return BootPlan(
        extra_delay=sum(f.seconds for f in faults if f.kind == "boot-delay"),
        stuck=any(f.kind == "stuck-provisioning" for f in faults),
        fail=any(f.kind == "boot-failure" for f in faults),
    )


class Stats:
    """API calls by method (``instances.insert``, ``zoneOperations.wait``, ...), for benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()

    def count(self, method: str) -> None:
        with self._lock:
            self._calls[method] += 1

    def snapshot(self) -> dict:
        with self._lock:
            calls = dict(sorted(self._calls.items()))
        api = sum(n for m, n in calls.items() if not m.startswith("metadata."))
        return {"calls": calls, "total": api}

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
