"""Bringing the whole benchmark environment up and, whatever happens, down again.

Every process the run starts carries ``BENCH_RUN=<id>`` in its environment (children inherit it),
so that at the end anything still running can be found and stopped by its pid, and reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchvm_local import procs
from batchvm_local.stack import LocalStack
from bench.airflow_proc import Airflow
from bench.cloud import Cloud
from bench.context import Context, EventTail

REPO = Path(__file__).resolve().parents[1]
MARKER = "BENCH_RUN"
P3_VM_POOL = 20


def leftovers(marker: str) -> list[procs.Proc]:
    return [p for p in procs.marked(f"{MARKER}={marker}") if p.pid != os.getpid()]


def kill_leftovers(marker: str) -> list[str]:
    found = leftovers(marker)
    for p in found:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    still = procs.wait_gone(found, timeout=5)
    for p in still:
        procs.kill_tree(p, group=False)
    return [f"{p.pid}:{p.comm}" for p in found]


@contextmanager
def environment(
    quick: bool, run_dir: Path, p3_n: int, with_airflow: bool = True, p1_n: int = 50
) -> Iterator[Context]:
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=quick, run_dir=run_dir)
    events = run_dir / "events-airflow.jsonl"
    ctx.tail = EventTail(events)
    ctx.marker = marker
    stack = LocalStack(
        pubsub_port=0,
        compute_port=0,
        state_dir=run_dir / "stack",
        agent_command=f"{sys.executable} -m bench.vm_guest",
        extra_env={"PYTHONPATH": str(REPO)},
    )
    try:
        ctx.log("installing the sample job image if needed (worker_image/local/setup.sh)")
        subprocess.run(["bash", str(REPO / "worker_image/local/setup.sh")], check=True, capture_output=True)
        ctx.log("starting the Pub/Sub emulator and the Compute stand-in")
        stack.start()
        ctx.stack = stack
        os.environ.update(stack.env())  # the harness's own clients
        ctx.cloud = Cloud(stack)
        ctx.events = events
        ctx.p3_n = p3_n
        ctx.p1_n = p1_n
        if with_airflow:
            start_airflow(ctx)
        yield ctx
    finally:
        ctx.log("stopping everything")
        if ctx.airflow is not None:
            left = ctx.airflow.stop()
            if left:
                ctx.notes.append(f"Airflow components that needed SIGKILL: {left}")
        if ctx.cloud is not None:
            try:
                ctx.cloud.close()
            except Exception:
                pass
        stack.stop()
        time.sleep(0.5)
        left = kill_leftovers(marker)
        if left:
            ctx.notes.append(f"processes left running at the end and stopped by pid: {left}")
        ctx.results["leftover_processes"] = left


def start_airflow(ctx: Context, before_components=None) -> None:
    """Airflow's four components on the stack (with the P3 VM pool created meanwhile)."""
    stack = ctx.stack
    airflow = Airflow(
        ctx.run_dir / "airflow",
        stack.env()
        | {
            "BENCH_EVENTS": str(ctx.events),
            "BENCH_P3_N": str(ctx.p3_n),
            "BENCH_P1_N": str(getattr(ctx, "p1_n", 50)),
            "BENCH_P3_VM_POOL": str(P3_VM_POOL),
            "CONTAINERS_CONF": str(REPO / "worker_image/local/containers.conf"),
        },
    )
    ctx.airflow = airflow
    ctx.log("airflow db migrate")
    migrate_seconds = airflow.migrate()
    if before_components is not None:
        before_components()
    ctx.log("starting Airflow: api-server, scheduler, dag-processor, triggerer")
    pool = threading.Thread(target=_vm_pool, args=(ctx,), daemon=True)
    pool.start()
    start_seconds = airflow.start()
    airflow.wait_for_dags(["bench_ours", "bench_stock_10", "bench_stock_1", "bench_p3_ours", "bench_p3_perjob"])
    pool.join(timeout=60)
    ctx.log(f"Airflow up ({migrate_seconds:.0f} s migrate, {start_seconds:.0f} s start)")
    ctx.results["setup"] = {
        "airflow_migrate_seconds": round(migrate_seconds, 1),
        "airflow_start_seconds": round(start_seconds, 1),
        "airflow_settings": airflow.settings | {"AIRFLOW__API_AUTH__JWT_SECRET": "(random)"},
        "components": "api-server, scheduler (LocalExecutor), dag-processor, triggerer; SQLite",
    }


def _vm_pool(ctx: Context) -> None:
    """The idle VMs that P3's waits check the liveness of (RUNNING, as a real job's VM would be)."""
    names = [f"bvm-p3-{i}" for i in range(P3_VM_POOL)]
    for name in names:
        ctx.cloud.insert_vm(name, {"bench-role": "idle"}, {"managed-by": "airflow-batchvm"})
    missing = ctx.cloud.wait_status(names, "RUNNING", timeout=60)
    if missing:
        ctx.notes.append(f"P3 pool VMs not RUNNING: {missing}")
