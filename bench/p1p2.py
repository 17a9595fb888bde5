"""P1 (status detection) and P2 (control plane), through real Airflow: tasks run by the scheduler's
LocalExecutor, deferred waits in the real ``airflow triggerer`` process.

A round triggers, at once, ``k`` runs of each chain: ``bench_ours`` (``BatchVmRunJobOperator``)
and the stock chain with its sensor at 10 s (its default) and at 1 s. Once every wait runs in the
triggerer, all of them idle for a window (their pull calls are counted), then the harness
publishes each job's FINISHED at a random moment of the next 10 s (the same draw for every chain,
so that the stock sensor's poll phase is sampled fairly). It then reads:

- P1 detection: publish call → the trigger yields (recorded in the triggerer);
- P1 end to end: publish call → the waiting task's ``end_date`` (ours: ``run_job``, which also
  deletes the VM; stock: ``wait``);
- P2: ``execute`` of the chain's first task starts (ours: ``run_job``; stock: ``publish``; recorded
  in the task process) → the stand-in's insert operation ``insertTime``; and publish call → the stand-in's delete operation ``endTime``
  (ours: in ``run_job``; stock: ``ComputeEngineDeleteInstanceOperator``, which a stock user must add).

The emulator does not apply subscription filters, so each stock job's subscription is on a topic
of its own (what a filter would give on Pub/Sub); ours keep their filtered per-job subscriptions on
``batch_jobs_status`` and drop the other jobs' statuses themselves, as shipped.
"""

from __future__ import annotations

import os
import random
import time

from bench.cloud import epoch
from bench.context import Context
from bench.stats import summary

CHAINS = {
    "ours": {"dag": "bench_ours", "wait_task": "run_job", "first_task": "run_job", "insert_task": "run_job"},
    "stock10": {
        "dag": "bench_stock_10",
        "wait_task": "wait",
        "first_task": "publish",
        "insert_task": "insert",
    },
    "stock1": {"dag": "bench_stock_1", "wait_task": "wait", "first_task": "publish", "insert_task": "insert"},
}
SETTLE_SECONDS = 3.0  # after every wait runs: clear of the Airflow race of a trigger firing at once (#71580)
PHASE_SECONDS = 10.0  # FINISHED lands uniformly in this window after the idle window


def key_of(chain: str, job_id: str) -> str:
    return job_id if chain == "ours" else f"bench-stock-{job_id}"


def subscription_of(chain: str, job_id: str) -> str:
    return f"batchvm-status-{job_id}" if chain == "ours" else f"bench-stock-{job_id}"


def run_round(ctx: Context, index: int, k: int, window: float, seed: int) -> list[dict]:
    tag = os.urandom(2).hex()
    jobs = [(chain, f"{chain[0]}{chain[-1]}{index}-{i}-{tag}") for chain in CHAINS for i in range(k)]
    stock_topics = [key_of(c, j) for c, j in jobs if c != "ours"]
    ctx.cloud.create_topics(stock_topics)
    ctx.cloud.create_subscriptions([(t, t) for t in stock_topics])
    t_trigger = time.time()
    for chain, job_id in jobs:
        ctx.airflow.trigger(CHAINS[chain]["dag"], f"r-{job_id}", {"job_id": job_id})
    keys = {key_of(c, j): (c, j) for c, j in jobs}
    started: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(started) < len(keys) and time.monotonic() < deadline:
        for e in ctx.tail.poll():
            if e["k"] == "trig_start" and e.get("key") in keys:
                started.setdefault(e["key"], e["t"])
        time.sleep(0.5)
    t_ready = max(started.values(), default=time.time())
    ctx.log(
        f"P1 round {index}: {len(started)}/{len(keys)} waits running {t_ready - t_trigger:.0f} s after triggering;"
        f" idle window {window:g} s"
    )
    w0 = max(time.time(), t_ready + SETTLE_SECONDS)
    w1 = w0 + window
    rng = random.Random(seed)
    offsets = [rng.uniform(0, PHASE_SECONDS) for _ in range(k)]
    # the same offsets for every chain: job i of each chain finishes at the same moment
    plan = sorted((w1 + offsets[int(job_id.split("-")[1])], chain, job_id) for chain, job_id in jobs)
    published: dict[str, float] = {}
    futures = []
    for at, chain, job_id in plan:
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)
        topic = "batch_jobs_status" if chain == "ours" else key_of(chain, job_id)
        t, future = ctx.cloud.publish_finished(job_id, topic=topic)
        published[job_id] = t
        futures.append(future)
    for future in futures:
        future.result(timeout=60)
    # every run to its end
    states: dict[str, str] = {}
    deadline = time.monotonic() + 240
    while len(states) < len(jobs) and time.monotonic() < deadline:
        for chain, job_id in jobs:
            if job_id in states:
                continue
            run = ctx.airflow.dag_run(CHAINS[chain]["dag"], f"r-{job_id}")
            if run.get("state") in ("success", "failed"):
                states[job_id] = run["state"]
        time.sleep(1)
    ctx.tail.poll()
    ops = ctx.cloud.vm_ops()
    # the first event a wait yielded after its FINISHED was published (a resumed task may defer again)
    yields: dict[str, float] = {}
    for e in ctx.tail.of("trig_yield"):
        chain_job = keys.get(e.get("key"))
        if chain_job and e["t"] >= published.get(chain_job[1], float("inf")):
            yields.setdefault(e["key"], e["t"])
    task_starts = _task_starts(ctx, {j for _, j in jobs})
    rows = []
    for chain, job_id in jobs:
        spec = CHAINS[chain]
        tis = {ti["task_id"]: ti for ti in ctx.airflow.task_instances(spec["dag"], f"r-{job_id}")}
        key = key_of(chain, job_id)
        sub = subscription_of(chain, job_id)
        vm = f"bvm-{job_id}"
        insert_op, delete_op = ops.get(vm, {}).get("insert", {}), ops.get(vm, {}).get("delete", {})
        t_pub = published.get(job_id)
        wait_ti = tis.get(spec["wait_task"], {})
        rows.append(
            {
                "chain": chain,
                "job_id": job_id,
                "run_state": states.get(job_id, "timeout"),
                "task_states": {t: ti.get("state") for t, ti in tis.items()},
                "published": t_pub,
                "trigger_started": started.get(key),
                "detection": _diff(yields.get(key), t_pub),
                "end_to_end": _diff(epoch(wait_ti.get("end_date")), t_pub)
                if wait_ti.get("state") == "success"
                else None,
                "start_to_insert": _diff(
                    epoch(insert_op.get("insertTime")), task_starts.get(job_id, (None,))[0]
                ),
                "process_start_to_insert": _diff(
                    epoch(insert_op.get("insertTime")), task_starts.get(job_id, (None, None))[1]
                ),
                "insert_done": _diff(epoch(insert_op.get("endTime")), epoch(insert_op.get("insertTime"))),
                "finished_to_deleted": _diff(epoch(delete_op.get("endTime")), t_pub),
                "pulls_in_window": _count(
                    ctx, "rpc", lambda e, s=sub: e.get("m") == "Pull" and e.get("r") == s, w0, w1
                ),
                "compute_gets_in_window": _count(
                    ctx,
                    "http",
                    lambda e, v=vm: e.get("m") == "GET" and e.get("p", "").endswith(f"/instances/{v}"),
                    w0,
                    w1,
                ),
                "pulls_first_2s": _count(
                    ctx,
                    "rpc",
                    lambda e, s=sub: e.get("m") == "Pull" and e.get("r") == s,
                    started.get(key, 0),
                    started.get(key, 0) + 2,
                ),
                "window_seconds": round(w1 - w0, 2),
            }
        )
    ctx.cloud.delete_subscriptions(stock_topics)
    ctx.cloud.delete_topics(stock_topics)
    return rows


def _task_starts(ctx: Context, job_ids: set[str]) -> dict[str, tuple[float, float | None]]:
    """For each job's first task (its first try): when ``execute`` began and when its process started."""
    out: dict[str, tuple[float, float | None]] = {}
    for e in ctx.tail.of("task_start"):
        job = e.get("job") or next((a.get("job_id") for a in e.get("attrs") or [] if a.get("job_id")), None)
        if job in job_ids:
            out.setdefault(job, (e["t"], e.get("proc_start")))
    return out


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 3)


def _count(ctx: Context, kind: str, match, t0: float, t1: float) -> int:
    return sum(1 for e in ctx.tail.events if e["k"] == kind and t0 <= e["t"] <= t1 and match(e))


def summarize(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for chain in CHAINS:
        mine = [r for r in rows if r["chain"] == chain]
        ok = [r for r in mine if r["run_state"] == "success"]
        window = sum(r["window_seconds"] for r in mine) or 1.0
        out[chain] = {
            "runs": len(mine),
            "succeeded": len(ok),
            "failed_runs": [
                {"job_id": r["job_id"], "state": r["run_state"], "tasks": r["task_states"]}
                for r in mine
                if r["run_state"] != "success"
            ],
            "detection_seconds": summary(r["detection"] for r in mine),
            "end_to_end_seconds": summary(r["end_to_end"] for r in ok),
            "start_to_insert_seconds": summary(r["start_to_insert"] for r in mine),
            "process_start_to_insert_seconds": summary(r["process_start_to_insert"] for r in mine),
            "insert_operation_seconds": summary(r["insert_done"] for r in mine),
            "finished_to_deleted_seconds": summary(r["finished_to_deleted"] for r in mine),
            "pull_calls_per_waiting_hour": round(sum(r["pulls_in_window"] for r in mine) / window * 3600, 1),
            "compute_gets_per_waiting_hour": round(
                sum(r["compute_gets_in_window"] for r in mine) / window * 3600, 1
            ),
            "pull_calls_first_2s_after_deferral": summary(r["pulls_first_2s"] for r in mine),
            "idle_window_seconds_total": round(window, 1),
        }
    return out


def run(ctx: Context, rounds: int, k: int, window: float) -> dict:
    rows: list[dict] = []
    for index in range(rounds):
        rows += run_round(ctx, index, k, window, seed=1000 + index)
    return {"rounds": rounds, "jobs_per_chain_per_round": k, "summary": summarize(rows), "rows": rows}
