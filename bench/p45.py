"""P4 (VM idle time) and P5 (cloud API calls per job): real jobs, the real agent, real containers.

Each job runs in a process of its own (``bench.jobs``) that records every Pub/Sub RPC and Compute
call it makes; the agent on the job's VM records its own (``bench.vm_guest``).

P4: ``container exit → VM powered off``. The container's exit is podman's ``died`` event; the
agent side ends when the agent issues its power-off (its own ``done`` log line, the last thing it
does); the stand-in side ends when the instance is TERMINATED (``lastStopTimestamp``). Jobs run
with ``keep_vm`` so that the VM powers itself off rather than being deleted first.

P5: calls per job. A job of T1 and one of T2 seconds give ``calls = fixed + per_minute * T``,
extrapolated to a 10-minute job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.cloud import epoch
from bench.context import Context
from bench.instrument import read_events
from bench.stats import summary

REPO = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc", "--storage-driver=vfs", "--cgroup-manager=cgroupfs"]


def start_job(
    ctx: Context, scenario: str, job_id: str, seconds: float, keep_vm: bool = False
) -> subprocess.Popen:
    jobs_dir = ctx.run_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "BENCH_EVENTS": str(jobs_dir / f"{job_id}.jsonl"),
        "AIRFLOW_HOME": str(jobs_dir / "airflow-home"),
        "PYTHONPATH": str(REPO),
    }
    args = [sys.executable, "-m", "bench.jobs", scenario, job_id, str(seconds)] + (
        ["--keep-vm"] if keep_vm else []
    )
    out = open(jobs_dir / f"{job_id}.log", "wb")
    proc = subprocess.Popen(
        args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO
    )
    out.close()
    return proc


def wait_jobs(ctx: Context, procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    results: dict[str, dict] = {}
    for job_id, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log = (ctx.run_dir / "jobs" / f"{job_id}.log").read_text(errors="replace")
        line = next((x for x in reversed(log.splitlines()) if x.startswith("{")), None)
        results[job_id] = json.loads(line) if line else {"error": log[-1500:]}
        results[job_id]["returncode"] = proc.returncode
    return results


def vm_dir(ctx: Context, vm_name: str) -> Path | None:
    root = ctx.run_dir / "stack" / "compute" / "vms" / ctx.cloud.project / ctx.cloud.zone
    found = sorted(root.glob(f"{vm_name}-*"))
    return found[-1] if found else None


# --- P4 -----------------------------------------------------------------------------------------

_AGENT_LINE = re.compile(r"^batchvm-agent (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")
_CONSOLE_LINE = re.compile(r"^\[([^\]]+)\] batchvm-local: (.*)$")


def _agent_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the agent logs local time


def read_serial(path: Path) -> dict[str, float]:
    """Moments from a VM's console: the agent's own log lines and the stand-in's."""
    moments: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if m := _AGENT_LINE.match(line):
            t, text = _agent_time(m.group(1)), m.group(2)
            if text.startswith("published FINISHED"):
                moments.setdefault("agent_published_finished", t)
            elif text.startswith("acked job message"):
                moments.setdefault("agent_acked", t)
            elif text.startswith("done (exit"):
                moments.setdefault("agent_done", t)
        elif m := _CONSOLE_LINE.match(line):
            t, text = epoch(m.group(1)), m.group(2)
            if text.startswith("guest exited"):
                moments.setdefault("guest_exited", t)
            elif text == "powered off":
                moments.setdefault("powered_off_console", t)
    return moments


def container_deaths(since: float) -> dict[str, float]:
    """podman's ``died`` events since ``since``: container name → time."""
    env = {**os.environ}
    run = subprocess.run(
        [*PODMAN, "events", "--since", str(int(since) - 1), "--until", str(int(time.time()) + 1),
         "--filter", "event=died", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    out: dict[str, float] = {}
    for line in run.stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        stamp = event.get("Time", "")
        # nanoseconds: keep microseconds for fromisoformat
        stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
        try:
            out[event.get("Name", "")] = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            continue
    return out


def start_p4(ctx: Context, jobs: int) -> tuple[float, dict[str, subprocess.Popen]]:
    """All P4 jobs at once (the quick mode runs them while Airflow starts)."""
    ids = [f"p4-{i}-{os.urandom(2).hex()}" for i in range(jobs)]
    return time.time(), {job_id: start_job(ctx, "ours", job_id, 1, keep_vm=True) for job_id in ids}


def finish_p4(ctx: Context, started: tuple[float, dict[str, subprocess.Popen]], parallel: int) -> dict:
    t_begin, running = started
    return _p4_report(ctx, t_begin, list(running), wait_jobs(ctx, running, timeout=240), parallel)


def run_p4(ctx: Context, jobs: int, parallel: int) -> dict:
    t_begin = time.time()
    ids = [f"p4-{i}-{os.urandom(2).hex()}" for i in range(jobs)]
    results: dict[str, dict] = {}
    for start in range(0, jobs, parallel):
        batch = ids[start : start + parallel]
        running = {job_id: start_job(ctx, "ours", job_id, 1, keep_vm=True) for job_id in batch}
        results |= wait_jobs(ctx, running, timeout=180)
    return _p4_report(ctx, t_begin, ids, results, parallel)


def _p4_report(ctx: Context, t_begin: float, ids: list[str], results: dict[str, dict], parallel: int) -> dict:
    jobs = len(ids)
    deaths = container_deaths(t_begin)
    rows = []
    for job_id in ids:
        vm = f"bvm-{job_id}"
        ctx.cloud.wait_status([vm], "TERMINATED", timeout=30)
        instance = ctx.cloud.instance(vm) or {}
        directory = vm_dir(ctx, vm)
        moments = read_serial(directory / "serial.log") if directory else {}
        died = next((t for name, t in deaths.items() if name.startswith(f"batchvm-{job_id}-")), None)
        stopped = epoch(instance.get("lastStopTimestamp"))
        rows.append(
            {
                "job_id": job_id,
                "status": results.get(job_id, {}).get("status"),
                "container_died": died,
                **moments,
                "terminated": stopped,
                "agent_side_seconds": _diff(moments.get("agent_done"), died),
                "standin_side_seconds": _diff(stopped, died),
                "exit_to_finished_published": _diff(moments.get("agent_published_finished"), died),
                "exit_to_guest_exited": _diff(moments.get("guest_exited"), died),
            }
        )
    for job_id in ids:
        try:
            ctx.cloud.delete_vm(f"bvm-{job_id}")
        except Exception:
            pass
    ok = [r for r in rows if r["status"] == "FINISHED"]
    return {
        "jobs": jobs,
        "parallel": parallel,
        "succeeded": len(ok),
        "agent_side_seconds": summary(r["agent_side_seconds"] for r in ok),
        "standin_side_seconds": summary(r["standin_side_seconds"] for r in ok),
        "exit_to_finished_published_seconds": summary(r["exit_to_finished_published"] for r in ok),
        "exit_to_guest_exited_seconds": summary(r["exit_to_guest_exited"] for r in ok),
        "container_exit_source": "podman events (died)" if deaths else "unavailable",
        "rows": rows,
    }


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 3)


# --- P5 -----------------------------------------------------------------------------------------

ADMIN = {"CreateSubscription", "DeleteSubscription", "CreateTopic", "DeleteTopic", "GetSubscription"}


def classify(events: list[dict]) -> dict[str, int]:
    counts = {
        "pubsub_admin": 0,
        "pubsub_publish": 0,
        "pubsub_pull": 0,
        "pubsub_ack": 0,
        "pubsub_modack": 0,
        "compute": 0,
    }
    detail: dict[str, int] = {}
    instant = 0
    last_pull: dict[str, float] = {}
    shared: dict[str, int] = {}
    for e in events:
        if e["k"] == "rpc" and e.get("r", "").startswith("batchvm-hub-"):
            # the triggerer process's one status pull, shared by all its waits: not a per-job cost
            shared[e["m"]] = shared.get(e["m"], 0) + 1
            continue
        if e["k"] == "rpc":
            m = e["m"]
            if m == "Pull":
                # a re-pull within 0.2 s of the previous one on the same subscription: the emulator
                # answered a short-deadline pull at once, empty (Pub/Sub holds it to its deadline)
                if e["t"] - last_pull.get(e.get("r", ""), -1e9) <= 0.2:
                    instant += 1
                last_pull[e.get("r", "")] = e["t"]
            key = (
                "pubsub_admin" if m in ADMIN
                else "pubsub_publish" if m == "Publish"
                else "pubsub_pull" if m in ("Pull", "StreamingPull")
                else "pubsub_modack" if m == "ModifyAckDeadline"
                else "pubsub_ack"
            )  # fmt: skip
            counts[key] += 1
            detail[f"pubsub.{m}"] = detail.get(f"pubsub.{m}", 0) + 1
        elif e["k"] == "http":
            counts["compute"] += 1
            kind = _compute_kind(e["m"], e["p"])
            detail[kind] = detail.get(kind, 0) + 1
    counts["total"] = sum(counts.values())
    counts["instant_repulls"] = instant
    return counts | {"by_method": dict(sorted(detail.items())), "shared_pull_by_method": shared}


def _compute_kind(method: str, path: str) -> str:
    if "/operations/" in path:
        return "compute.zoneOperations." + ("wait" if path.endswith("/wait") else "get")
    if path.endswith("/instances"):
        return "compute.instances." + ("insert" if method == "POST" else "list")
    if "/instances/" in path:
        return "compute.instances." + {"GET": "get", "DELETE": "delete"}.get(method, method.lower())
    return f"compute.{method} {path}"


def run_p5(ctx: Context, durations: tuple[float, float], scenarios: tuple[str, ...]) -> dict:
    return finish_p5(ctx, start_p5(ctx, durations, scenarios))


def start_p5(ctx: Context, durations: tuple[float, float], scenarios: tuple[str, ...]) -> dict:
    procs: dict[str, subprocess.Popen] = {}
    plan: dict[str, tuple[str, float]] = {}
    for scenario in scenarios:
        for seconds in durations:
            job_id = f"p5{scenario.replace('stock', 's')}-{int(seconds)}-{os.urandom(2).hex()}"
            plan[job_id] = (scenario, seconds)
    # The stock chain's statuses: a topic per job stands in for a subscription filter, which the
    # emulator does not apply (created here, not counted: it is not a per-job call on Pub/Sub).
    ctx.cloud.create_topics([f"bench-p5-{j}" for j, (s, _) in plan.items() if s.startswith("stock")])
    for job_id, (scenario, seconds) in plan.items():
        procs[job_id] = start_job(ctx, scenario, job_id, seconds)
    return {"durations": durations, "plan": plan, "procs": procs}


def finish_p5(ctx: Context, started: dict) -> dict:
    durations, plan, procs = started["durations"], started["plan"], started["procs"]
    results = wait_jobs(ctx, procs, timeout=max(durations) + 300)
    out: dict[str, dict] = {}
    for job_id, (scenario, seconds) in plan.items():
        airflow_side = classify(read_events(ctx.run_dir / "jobs" / f"{job_id}.jsonl"))
        vm_side = None
        if scenario == "ours":
            directory = vm_dir(ctx, f"bvm-{job_id}")
            vm_side = classify(read_events(directory / "bench-events.jsonl")) if directory else None
        out.setdefault(scenario, {})[str(int(seconds))] = {
            "job_id": job_id,
            "status": results[job_id].get("status"),
            "airflow_side": airflow_side,
            "vm_side": vm_side,
        }
    return {
        "durations_seconds": list(durations),
        "jobs": out,
        "model": _model(out, durations),
        "model_without_instant_repulls": _model(out, durations, drop_instant=True),
        "p2_in_process": _p2(ctx, plan),
    }


def _p2(ctx: Context, plan: dict[str, tuple[str, float]]) -> dict:
    """P2 from the same jobs, driven in a process of their own: ``execute`` of the chain's first task
    starts → the stand-in accepts the insert; FINISHED published → the stand-in's delete is done."""
    ops = ctx.cloud.vm_ops()
    rows: dict[str, dict[str, list]] = {}
    for job_id, (scenario, _) in plan.items():
        events = read_events(ctx.run_dir / "jobs" / f"{job_id}.jsonl")
        begin_event = next((e for e in events if e["k"] == "job_begin"), {})
        begin, proc_start = begin_event.get("t"), begin_event.get("proc_start")
        finished = next((e["t"] for e in events if e["k"] == "finished_published"), None)
        if scenario == "ours":
            directory = vm_dir(ctx, f"bvm-{job_id}")
            finished = (
                read_serial(directory / "serial.log").get("agent_published_finished") if directory else None
            )
        vm = ops.get(f"bvm-{job_id}", {})
        row = rows.setdefault(
            scenario, {"start_to_insert": [], "process_start_to_insert": [], "finished_to_deleted": []}
        )
        row["start_to_insert"].append(_diff(epoch(vm.get("insert", {}).get("insertTime")), begin))
        row["process_start_to_insert"].append(
            _diff(epoch(vm.get("insert", {}).get("insertTime")), proc_start)
        )
        row["finished_to_deleted"].append(_diff(epoch(vm.get("delete", {}).get("endTime")), finished))
    return {scenario: {k: summary(v) for k, v in row.items()} for scenario, row in rows.items()}


def _model(out: dict, durations: tuple[float, float], drop_instant: bool = False) -> dict:
    """calls = fixed + per_minute * minutes, from the two durations; extrapolated to 10 minutes."""
    t1, t2 = durations
    model: dict[str, dict] = {}
    for scenario, by_duration in out.items():
        a, b = by_duration.get(str(int(t1))), by_duration.get(str(int(t2)))
        if not a or not b:
            continue
        for side in ("airflow_side", "vm_side"):
            if not a.get(side) or not b.get(side):
                continue
            entry: dict[str, dict] = {}
            for key in (
                "pubsub_admin",
                "pubsub_publish",
                "pubsub_pull",
                "pubsub_ack",
                "pubsub_modack",
                "compute",
            ):
                c1, c2 = a[side].get(key, 0), b[side].get(key, 0)
                if drop_instant and key == "pubsub_pull":
                    c1, c2 = c1 - a[side].get("instant_repulls", 0), c2 - b[side].get("instant_repulls", 0)
                # a count that falls with a longer job is noise: no per-minute part, the mean as fixed
                per_minute = max(0.0, (c2 - c1) / ((t2 - t1) / 60))
                fixed = (c1 + c2) / 2 if per_minute == 0 else max(0.0, c1 - per_minute * t1 / 60)
                entry[key] = {
                    "fixed": round(fixed, 1),
                    "per_minute": round(per_minute, 2),
                    "ten_minute_job": round(fixed + per_minute * 10, 1),
                }
            entry["total"] = {
                k: round(sum(v[k] for v in entry.values()), 2 if k == "per_minute" else 1)
                for k in ("fixed", "per_minute", "ten_minute_job")
            }
            model.setdefault(scenario, {})[side] = entry
    return model
