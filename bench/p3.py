"""P3: N jobs waiting at once in ONE triggerer process.

Each variant runs in a freshly started ``airflow triggerer`` (so that no variant inherits another's
memory), as one DAG run of a mapped task whose N instances start straight in the triggerer
(``start_from_trigger``) and end there (``TaskSuccessEvent``): no worker process is involved, only
the scheduler (which creates the triggers) and the triggerer (which runs them).

For each variant: RSS of the triggerer's process tree, its CPU while the N waits idle, the pull
and Compute calls made in that idle window, then N FINISHED statuses published within 10 s, the
detection latency of each (publish call → trigger yields), and how many were not detected before
the deadline ("lost").
"""

from __future__ import annotations

import random
import time
import uuid

from bench.context import Context, cpu_seconds, describe_tree, rss_mib, tree_pids
from bench.env import P3_VM_POOL
from bench.stats import summary

VARIANTS = {
    "ours": {"v": "p3-ours", "job": "p3o-{i}", "status_sub": "batchvm-status-p3o-{i}"},
    "perjob": {"v": "p3-perjob", "job": "p3p-{i}", "status_sub": "batchvm-status-p3p-{i}"},
    "stock10": {"v": "p3-stock10", "job": "bench-s3-{i}", "topic": "bench-s3-{i}"},
    "stock1": {"v": "p3-stock1", "job": "bench-s1-{i}", "topic": "bench-s1-{i}"},
    "null": {"v": "p3-null", "job": "p3n-{i}"},
}
FINISH_WINDOW_SECONDS = 10.0


def _triggerer_sample(ctx: Context) -> dict:
    pid = ctx.airflow.procs["triggerer"].pid
    pids = tree_pids(pid)
    per = {p: rss_mib(p) for p in pids}
    return {
        "t": time.time(),
        "cpu": cpu_seconds(pids),
        "rss": sum(per.values()),
        "rss_max": max(per.values(), default=0),
    }


def prepare(ctx: Context, variant: str, n: int) -> None:
    spec = VARIANTS[variant]
    if "status_sub" in spec:
        ctx.cloud.create_subscriptions(
            [(spec["status_sub"].format(i=i), "batch_jobs_status") for i in range(n)]
        )
    if "topic" in spec:
        names = [spec["topic"].format(i=i) for i in range(n)]
        ctx.cloud.create_topics(names)
        ctx.cloud.create_subscriptions([(name, name) for name in names])


def clean(ctx: Context, variant: str, n: int) -> None:
    spec = VARIANTS[variant]
    if "status_sub" in spec:
        ctx.cloud.delete_subscriptions([spec["status_sub"].format(i=i) for i in range(n)])
    if "topic" in spec:
        names = [spec["topic"].format(i=i) for i in range(n)]
        ctx.cloud.delete_subscriptions(names)
        ctx.cloud.delete_topics(names)


def run_variant(
    ctx: Context,
    variant: str,
    n: int,
    idle_seconds: float,
    deadline_seconds: float,
    restart: bool = True,
    spy_seconds: float = 0,
    baseline: bool = True,
) -> dict:
    spec = VARIANTS[variant]
    tag = spec["v"]
    t_prep = time.time()
    prepare(ctx, variant, n)
    ctx.log(f"P3 {variant}: {n} subscriptions ready in {time.time() - t_prep:.1f} s")
    if restart:
        ctx.airflow.restart("triggerer")
        time.sleep(3)
    base0 = _triggerer_sample(ctx)
    time.sleep(5 if baseline else 0.5)
    base1 = _triggerer_sample(ctx)
    baseline = {
        "rss_mib": round(base1["rss"], 1),
        "cpu_percent_of_one_core": round(100 * (base1["cpu"] - base0["cpu"]) / (base1["t"] - base0["t"]), 2),
    }
    run_id = f"p3-{variant}-{uuid.uuid4().hex[:6]}"
    t_trigger = time.time()
    ctx.airflow.trigger(f"bench_p3_{variant}", run_id, {})
    keys = {spec["job"].format(i=i) for i in range(n)}
    started: dict[str, float] = {}
    deadline = time.monotonic() + (300 if n > 300 else 150)
    while len(started) < n and time.monotonic() < deadline:
        for e in ctx.tail.poll():
            if e["k"] == "trig_start" and e.get("v") == tag and e["key"] in keys:
                started[e["key"]] = e["t"]
        time.sleep(0.5)
    if len(started) < n:
        ctx.log(f"P3 {variant}: only {len(started)} of {n} waits started")
    t_all = max(started.values(), default=time.time())
    ctx.log(
        f"P3 {variant}: {len(started)} waits running, {t_all - t_trigger:.1f} s after the DAG run; idling {idle_seconds:g} s"
    )
    # Each wait's first liveness check builds its Compute client (the costly part; see the profile):
    # the idle window starts once every wait has made it, or after 60 s.
    t_calm = _wait_first_checks(ctx, variant, n, t_trigger, timeout=60) if baseline else time.time()
    ctx.log(f"P3 {variant}: first liveness checks done {t_calm - t_all:.1f} s after the last wait started")
    time.sleep(3 if baseline else 1)
    spy = _start_spy(ctx, spy_seconds) if spy_seconds else None
    w0 = _triggerer_sample(ctx)
    rss_samples = [w0["rss"]]
    end = time.monotonic() + idle_seconds
    while time.monotonic() < end:
        time.sleep(1)
        rss_samples.append(_triggerer_sample(ctx)["rss"])
    w1 = _triggerer_sample(ctx)
    tree = describe_tree(ctx.airflow.procs["triggerer"].pid)
    profile = _finish_spy(ctx, spy) if spy else None
    ctx.tail.poll()
    calls = _calls_in(ctx, variant, w0["t"], w1["t"])

    detection: dict[str, float] = {}
    wrong: dict[str, str] = {}
    published: dict[str, float] = {}
    probe = _Probe(ctx) if variant in ("ours", "perjob") else None
    if variant != "null":
        order = sorted(keys)
        random.Random(7).shuffle(order)
        t_start = time.time() + 0.2
        futures = []
        for k, key in enumerate(order):
            delay = t_start + FINISH_WINDOW_SECONDS * k / n - time.time()
            if delay > 0:
                time.sleep(delay)
            index = key.rsplit("-", 1)[1]
            if variant == "stock10":
                t, future = ctx.cloud.publish_finished(key, topic=spec["topic"].format(i=index))
            else:
                t, future = ctx.cloud.publish_finished(key, vm_name=f"bvm-p3-{int(index) % P3_VM_POOL}")
            published[key] = t
            futures.append(future)
        for future in futures:
            future.result(timeout=60)
        t_last = max(published.values())
        ctx.log(
            f"P3 {variant}: {n} FINISHED published in {t_last - t_start:.1f} s; waiting up to {deadline_seconds:g} s"
        )
        stop = time.monotonic() + deadline_seconds
        while time.monotonic() < stop:
            for e in ctx.tail.poll():
                if e["k"] == "trig_yield" and e.get("v") == tag and e["key"] in published:
                    if e.get("status") in ("FINISHED", "success"):
                        detection.setdefault(e["key"], e["t"] - published[e["key"]])
                    else:
                        wrong[e["key"]] = str(e.get("status"))
            rss_samples.append(_triggerer_sample(ctx)["rss"])
            if len(detection) + len(wrong) >= n:
                break
            time.sleep(0.5)
    peak = max(rss_samples)
    probe_result = probe.stop(published) if probe else None
    try:
        ctx.airflow.fail_run(f"bench_p3_{variant}", run_id)
    except Exception as exc:
        ctx.log(f"P3 {variant}: could not end the run: {exc}")
    clean(ctx, variant, n)
    result = {
        "n": n,
        "started": len(started),
        "start_all_seconds": round(t_all - t_trigger, 1),
        "baseline_without_waits": baseline,
        "rss_mib_idle": round(w1["rss"], 1),
        "rss_mib_peak": round(peak, 1),
        "rss_mib_per_wait": round((w1["rss"] - baseline["rss_mib"]) / n * 1024, 1) if n else None,
        "idle_window_seconds": round(w1["t"] - w0["t"], 1),
        "cpu_percent_of_one_core_idle": round(100 * (w1["cpu"] - w0["cpu"]) / (w1["t"] - w0["t"]), 2),
        "calls_idle": calls,
        "triggerer_tree": tree,
        "first_checks_seconds": round(t_calm - t_all, 1),
        "triggerer_profile_idle": profile,
    }
    if variant != "null":
        result |= {
            "detection_seconds": summary(detection.values()),
            "detected": len(detection),
            "lost": n - len(detection),
            "wrong_status": len(wrong),
            "deadline_seconds": deadline_seconds,
            "emulator_delivery_seconds": probe_result,
        }
    return result


def run_detection(
    ctx: Context, variants: tuple[str, ...], n: int, idle_seconds: float, first_checks: bool = True
) -> dict:
    """P1's detection batch: n waits of each chain at once in the triggerer, each FINISHED published at
    a random moment of a 10 s window (the same moments for every chain); publish call → trigger yields.
    Also the pull calls each chain's waits make per waiting hour, over an idle window first."""
    for variant in variants:
        prepare(ctx, variant, n)
    t_trigger = time.time()
    run_ids = {}
    for variant in variants:
        run_ids[variant] = f"p1-{variant}-{uuid.uuid4().hex[:6]}"
        ctx.airflow.trigger(f"bench_p1_{variant}", run_ids[variant], {})
    keys = {VARIANTS[v]["job"].format(i=i): v for v in variants for i in range(n)}
    tags = {VARIANTS[v]["v"] for v in variants}
    started: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while len(started) < len(keys) and time.monotonic() < deadline:
        for e in ctx.tail.poll():
            if e["k"] == "trig_start" and e.get("v") in tags and e["key"] in keys:
                started.setdefault(e["key"], e["t"])
        time.sleep(0.5)
    t_all = max(started.values(), default=time.time())
    ctx.log(f"P1 batch: {len(started)}/{len(keys)} waits running {t_all - t_trigger:.0f} s after triggering")
    if first_checks and ("ours" in variants or "perjob" in variants):
        _wait_first_checks(ctx, "ours", n, t_trigger, timeout=60)
    time.sleep(2)
    w0 = time.time()
    time.sleep(idle_seconds)
    w1 = time.time()
    rng = random.Random(11)
    offsets = [rng.uniform(0, FINISH_WINDOW_SECONDS) for _ in range(n)]
    plan = sorted((w1 + offsets[int(k.rsplit("-", 1)[1])], k) for k in keys)
    published: dict[str, float] = {}
    futures = []
    for at, key in plan:
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)
        variant, index = keys[key], int(key.rsplit("-", 1)[1])
        if VARIANTS[variant].get("topic"):
            t, future = ctx.cloud.publish_finished(key, topic=VARIANTS[variant]["topic"].format(i=index))
        else:
            t, future = ctx.cloud.publish_finished(key, vm_name=f"bvm-p3-{index % P3_VM_POOL}")
        published[key] = t
        futures.append(future)
    for future in futures:
        future.result(timeout=60)
    detected: dict[str, float] = {}
    stop = time.monotonic() + 30
    while len(detected) < len(keys) and time.monotonic() < stop:
        for e in ctx.tail.poll():
            if e["k"] == "trig_yield" and e.get("key") in published:
                detected.setdefault(e["key"], e["t"] - published[e["key"]])
        time.sleep(0.5)
    out: dict[str, dict] = {}
    ctx.tail.poll()
    for variant in variants:
        mine = [k for k, v in keys.items() if v == variant]
        calls = _calls_in(ctx, variant, w0, w1)
        out[variant] = {
            "n": n,
            "started": sum(k in started for k in mine),
            "detection_seconds": summary(detected[k] for k in mine if k in detected),
            "lost": sum(k not in detected for k in mine),
            "idle_window_seconds": round(w1 - w0, 1),
            "pull_calls_per_waiting_hour": round(calls["per_job_pulls"] / (w1 - w0) * 3600 / n, 1),
            "pull_calls_per_waiting_hour_without_instant_repulls": round(
                calls["per_job_pulls_collapsed"] / (w1 - w0) * 3600 / n, 1
            ),
            "compute_gets_per_waiting_hour": round(calls["compute_gets"] / (w1 - w0) * 3600 / n, 1),
            "pull_calls_first_2s_after_start": summary(
                _first_pulls(ctx, variant, k, started[k]) for k in mine if k in started
            ),
        }
        try:
            ctx.airflow.fail_run(f"bench_p1_{variant}", run_ids[variant])
        except Exception as exc:
            ctx.log(f"P1 batch {variant}: could not end the run: {exc}")
        clean(ctx, variant, n)
    return out


class _Probe:
    """The emulator's own delivery latency at this fan-out: publish call → a plain pull of one more
    subscription on ``batch_jobs_status`` gets the message (in the harness, not in Airflow)."""

    def __init__(self, ctx: Context) -> None:
        import threading

        self.ctx = ctx
        self.name = f"bench-probe-{uuid.uuid4().hex[:6]}"
        ctx.cloud.create_subscriptions([(self.name, "batch_jobs_status")])
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from google.api_core import exceptions as gexc

        sub = self.ctx.cloud.subscriber
        path = self.ctx.cloud.subscription(self.name)
        while not self.stopping.is_set():
            try:
                response = sub.pull(subscription=path, max_messages=1000, timeout=5, retry=None)
            except gexc.DeadlineExceeded:
                continue
            except Exception:
                time.sleep(0.5)
                continue
            now = time.time()
            for item in response.received_messages:
                self.seen.setdefault(item.message.attributes.get("job_id", ""), now)
            if response.received_messages:
                try:
                    sub.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
                except Exception:
                    pass

    def stop(self, published: dict[str, float]) -> dict:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.ctx.cloud.delete_subscriptions([self.name])
        return summary(self.seen[k] - t for k, t in published.items() if k in self.seen)


def _first_pulls(ctx: Context, variant: str, key: str, t_start: float, seconds: float = 2.0) -> int:
    """Pulls a wait made on its own subscription in the first seconds after it started."""
    spec = VARIANTS[variant]
    sub = (spec.get("status_sub") or spec.get("topic") or "").format(i=key.rsplit("-", 1)[1])
    return sum(
        1
        for e in ctx.tail.events
        if e["k"] == "rpc"
        and e.get("m") == "Pull"
        and e.get("r") == sub
        and t_start <= e["t"] <= t_start + seconds
    )


def _wait_first_checks(ctx: Context, variant: str, n: int, since: float, timeout: float) -> float:
    """Until the waits have made their first liveness check: one ``instances.list`` per zone answers all
    of them (the shipped trigger's ``VmBoard``)."""
    if variant in ("null", "stock10", "stock1"):
        return time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ctx.tail.poll()
        # the board may still hold a list made up to half a liveness interval before these waits began
        done = any(
            e["k"] == "http" and e["t"] >= since - 30 and e.get("p", "").endswith("/instances")
            for e in ctx.tail.events
        )
        if done:
            return time.time()
        time.sleep(1)
    return time.time()


def _runner_pid(ctx: Context) -> int | None:
    """The triggerer's child that runs the triggers (not the log server)."""
    root = ctx.airflow.procs["triggerer"].pid
    for entry in describe_tree(root):
        if entry["pid"] != root and "serve-logs" not in entry["cmd"]:
            return entry["pid"]
    return None


def _start_spy(ctx: Context, seconds: float):
    import subprocess
    import sys
    from pathlib import Path

    pid = _runner_pid(ctx)
    if pid is None:
        return None
    out = ctx.run_dir / "profile" / "triggerer-idle.txt"
    out.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", str(int(seconds)),
         "-r", "100", "--format", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, out, seconds


def _finish_spy(ctx: Context, spy) -> dict | None:
    from bench.profile import top_frames

    proc, out, seconds = spy
    try:
        proc.wait(timeout=seconds + 30)
    except Exception:
        proc.kill()
        return None
    if not out.exists():
        return None
    samples = sum(
        int(line.rpartition(" ")[2])
        for line in out.read_text().splitlines()
        if line.rpartition(" ")[2].isdigit()
    )
    return {"seconds": seconds, "rate_hz": 100, "samples": samples, "top_frames": top_frames(out)}


def _calls_in(ctx: Context, variant: str, t0: float, t1: float) -> dict:
    """Pub/Sub and Compute calls made by the triggerer in [t0, t1], per waiting job and hour."""
    spec = VARIANTS[variant]
    n_window = t1 - t0
    pulls = acks = gets = shared = collapsed = lists = 0
    prefix = (spec.get("status_sub") or spec.get("topic") or "").split("{", 1)[0]
    last_pull: dict[str, float] = {}
    for e in ctx.tail.events:
        if not t0 <= e["t"] <= t1:
            continue
        if e["k"] == "rpc":
            resource = e.get("r", "")
            if prefix and resource.startswith(prefix):
                if e["m"] == "Pull":
                    pulls += 1
                    # a re-pull within 0.2 s of the previous one: the emulator answered a short-deadline
                    # pull at once, empty (Pub/Sub would have held it until its deadline)
                    if e["t"] - last_pull.get(resource, -1e9) > 0.2:
                        collapsed += 1
                    last_pull[resource] = e["t"]
                acks += e["m"] in ("Acknowledge", "ModifyAckDeadline")
            elif resource.startswith("batchvm-hub-"):
                shared += 1
        elif e["k"] == "http" and e.get("m") == "GET" and "/instances/bvm-p3-" in e.get("p", ""):
            gets += 1
        elif e["k"] == "http" and e.get("m") == "GET" and e.get("p", "").endswith("/instances"):
            lists += 1
    return {
        "window_seconds": round(n_window, 1),
        "per_job_pulls": pulls,
        "per_job_pulls_collapsed": collapsed,
        "per_job_acks": acks,
        "shared_calls": shared,
        "compute_gets": gets,
        "compute_lists": lists,
    }
