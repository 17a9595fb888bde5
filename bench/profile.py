"""The hot path the P3 profile points at: each wait's liveness check (``BatchVmAsyncHook.get_vm``).

Run in a process of its own (``python -m bench.profile N OUT``) against the running stand-in:

- before: N waits, each with its own ``BatchVmAsyncHook`` as the shipped trigger builds it, so each
  builds its own ``BatchVmHook`` (connection, credentials) and its own ``InstancesClient`` on its
  first check; then a second round (the steady state);
- after: the same N checks through ONE ``BatchVmHook`` per process (what ``_ASYNC_SUBSCRIBERS``
  already does for Pub/Sub), and, as the other option, ONE ``instances.list`` per zone for all N.

py-spy samples the "before" first round; the top frames are written with the timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

VM = "bvm-p3-0"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# Frames every sample of an event loop or a worker thread goes through: they say nothing.
GENERIC = (
    "Thread.", "_bootstrap", "_worker (", "run (asyncio", "Runner.", "_WorkItem", "BaseEventLoop", "Handle._run",
    "<module>", "main (", "triggerer_command", "execute_job", "_fork_main", "session.py", "cli.py",
    "supervisor.py", "TriggerRunner.run", "run_in_process", "memray", "runners.py", "run_until_complete",
    "TriggerRunner.arun", "_run_once", "run_command_with_daemon_option", "TriggerRunnerSupervisor.start",
    "providers_configuration_loaded", "run_job (", "lazy_load_command",
)  # fmt: skip


def top_frames(raw: Path, limit: int = 12) -> list[dict]:
    """Frames by their inclusive share of the samples (generic loop and thread frames left out)."""
    inclusive: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for frame in set(stack.split(";")[1:]):
            if not any(g in frame for g in GENERIC):
                inclusive[frame] += n
    return (
        [{"frame": f, "share": round(n / total, 3)} for f, n in inclusive.most_common(limit)] if total else []
    )


async def measure(n: int, out_dir: Path) -> dict:
    from google.cloud import compute_v1  # noqa: F401 - a one-time import per process: not part of a check

    from airflow_batchvm.hooks.batchvm import BatchVmAsyncHook, BatchVmHook

    project, zone = os.environ["BATCHVM_PROJECT"], os.environ["BATCHVM_ZONE"]
    result: dict = {"n": n}

    # before: one hook per wait, as the shipped trigger does
    hooks = [BatchVmAsyncHook() for _ in range(n)]
    raw = out_dir / "profile-liveness-before.txt"
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(os.getpid()), "-r", "200",
         "--format", "raw", "-o", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)
    for label in ("first", "steady"):
        m0, c0, t0 = rss_mib(), cpu(), time.monotonic()
        await asyncio.gather(*(h.get_vm(project_id=project, zone=zone, vm_name=VM) for h in hooks))
        result[f"before_{label}"] = {
            "cpu_ms_per_check": round(1000 * (cpu() - c0) / n, 2),
            "wall_seconds": round(time.monotonic() - t0, 2),
            "rss_mib_added": round(rss_mib() - m0, 1),
        }
        if label == "first":
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
    result["profile_before_first_round"] = top_frames(raw) if raw.exists() else []
    del hooks

    # after (a): one sync hook, one client, shared by every wait of the process
    shared = BatchVmHook()
    for label in ("first", "steady"):
        m0, c0, t0 = rss_mib(), cpu(), time.monotonic()
        await asyncio.gather(
            *(asyncio.to_thread(shared.get_vm, project_id=project, zone=zone, vm_name=VM) for _ in range(n))
        )
        result[f"after_shared_client_{label}"] = {
            "cpu_ms_per_check": round(1000 * (cpu() - c0) / n, 2),
            "wall_seconds": round(time.monotonic() - t0, 2),
            "rss_mib_added": round(rss_mib() - m0, 1),
        }
    # after (b): one list per zone answers every wait's check
    c0, t0 = cpu(), time.monotonic()
    vms = await asyncio.to_thread(lambda: list(shared.instances.list(project=project, zone=zone)))
    result["after_one_list_per_zone"] = {
        "cpu_ms_per_check": round(1000 * (cpu() - c0) / n, 3),
        "wall_seconds": round(time.monotonic() - t0, 3),
        "instances_listed": len(vms),
    }
    return result


def main(argv: list[str]) -> int:
    n, out_dir = int(argv[0]), Path(argv[1])
    result = asyncio.run(measure(n, out_dir))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
