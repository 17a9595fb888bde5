"""``python -m bench [--quick]``: the benchmark, ours against the stock google-provider chain, in one run.

Writes ``bench/results.json`` and ``docs/BENCHMARKS.md``. Everything it starts (the Pub/Sub
emulator, the Compute stand-in and its VMs, Airflow's four components, the job processes) is
stopped before it returns, whatever happens; what had to be killed is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import conditions, p1p2, p3, p45, report
from bench.context import Context
from bench.env import environment, start_airflow

REPO = Path(__file__).resolve().parents[1]

PLANS = {
    "quick": {
        "p5_durations": (2.0, 10.0),
        "p5_scenarios": ("ours", "stock10"),
        "p4_jobs": 2,
        "p4_parallel": 2,
        "p1_airflow_jobs_per_chain": 0,  # P1 end to end and P2 through Airflow: full run only
        "p1_n": 20,
        "p1_idle_window": 6.0,
        "p3_n": 100,
        "p3_variants": ("ours", "perjob"),
        "p3_idle": {"ours": 6.0, "perjob": 6.0},
        "p3_deadline": 15.0,
        "p3_restart": False,
        "p3_baseline": False,
        "profile_n": 0,  # the profile is the full run's
        "spy_triggerer_seconds": 0,
    },
    "full": {
        # a real 10-minute job (it runs while the other figures are measured) and a short one
        "p5_durations": (10.0, 600.0),
        "p5_scenarios": ("ours", "stock10", "stock1"),
        "p4_jobs": 4,
        "p4_parallel": 2,
        "p1_airflow_jobs_per_chain": 3,
        "p1_n": 40,
        "p1_idle_window": 15.0,
        "p3_n": 1000,
        "p3_variants": ("ours", "perjob", "stock10", "null"),
        # ours, both ways: a window that holds one liveness round (every 60 s per wait)
        "p3_idle": {"ours": 62.0, "perjob": 62.0, "stock10": 15.0, "null": 10.0},
        "p3_deadline": 40.0,
        "p3_restart": True,
        "p3_baseline": True,
        "profile_n": 500,
        "spy_triggerer_seconds": 10,
    },
}


def phase(ctx: Context, name: str, fn, *args, **kwargs):
    ctx.log(f"--- {name}")
    t0 = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        ctx.log(f"{name} failed: {exc}")
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(result, dict):
        result.setdefault("phase_seconds", round(time.monotonic() - t0, 1))
    ctx.results[name] = result
    check_stack(ctx, name)
    return result


def check_stack(ctx: Context, name: str) -> None:
    """A stand-in or emulator that died under us makes the phase's figures worthless: say so."""
    stack = ctx.stack
    dead = []
    if stack is not None:
        if stack.compute is not None and stack.compute.poll() is not None:
            dead.append(f"Compute stand-in (exit {stack.compute.returncode})")
        if stack.pubsub.process is not None and stack.pubsub.process.poll() is not None:
            dead.append(f"Pub/Sub emulator (exit {stack.pubsub.process.returncode})")
    if dead:
        note = f"during {name}: {', '.join(dead)} stopped from outside the benchmark; figures from then on are invalid"
        if note not in ctx.notes:
            ctx.notes.append(note)
            ctx.log(note)


def run_profile(ctx: Context, n: int) -> dict:
    out = ctx.run_dir / "profile"
    out.mkdir(exist_ok=True)
    run = subprocess.run(
        [sys.executable, "-m", "bench.profile", str(n), str(out)],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(ctx.run_dir / "jobs" / "airflow-home"),
        },
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    line = next((x for x in reversed(run.stdout.splitlines()) if x.startswith("{")), None)
    if not line:
        raise RuntimeError(f"bench.profile failed: {run.stderr[-2000:]}")
    return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a light run (< 3 min): fewer, smaller repetitions"
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument(
        "--keep", action="store_true", help="keep the run directory (logs, events) afterwards"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    t_start = time.monotonic()
    results: dict = {
        "conditions": conditions.collect(mode, plan),
        "command": f"python -m bench{' --quick' if args.quick else ''}",
    }
    with environment(args.quick, run_dir, plan["p3_n"], with_airflow=False, p1_n=plan["p1_n"]) as ctx:
        # P5 only counts calls, so it runs while Airflow's components start (in the quick mode P4 too).
        def meanwhile() -> None:
            ctx.log("--- P5 (jobs started; they run while Airflow starts)")
            started["p5"] = p45.start_p5(ctx, plan["p5_durations"], plan["p5_scenarios"])
            started["p4"] = p45.start_p4(ctx, plan["p4_jobs"]) if args.quick else None

        started: dict = {}
        start_airflow(ctx, before_components=meanwhile)
        p5_started, p4_started = started["p5"], started["p4"]
        if args.quick:
            phase(ctx, "P5", p45.finish_p5, ctx, p5_started)
        if p4_started is not None:
            phase(ctx, "P4", p45.finish_p4, ctx, p4_started, parallel=plan["p4_jobs"])
        else:
            phase(ctx, "P4", p45.run_p4, ctx, plan["p4_jobs"], plan["p4_parallel"])
        phase(
            ctx,
            "P1",
            p3.run_detection,
            ctx,
            ("ours", "stock10", "stock1"),
            plan["p1_n"],
            plan["p1_idle_window"],
        )
        if plan["p1_airflow_jobs_per_chain"]:
            phase(ctx, "P1_P2", p1p2.run, ctx, 1, plan["p1_airflow_jobs_per_chain"], 5.0)
        ctx.results["P3"] = {}
        for variant in plan["p3_variants"]:
            spy = plan["spy_triggerer_seconds"] if variant == "ours" else 0
            phase(
                ctx, f"P3 {variant}", p3.run_variant, ctx, variant, plan["p3_n"], plan["p3_idle"][variant],
                plan["p3_deadline"], restart=plan["p3_restart"], spy_seconds=spy, baseline=plan["p3_baseline"],
            )  # fmt: skip
            ctx.results["P3"][variant] = ctx.results.pop(f"P3 {variant}")
        if not args.quick:  # its 10-minute jobs ran meanwhile
            phase(ctx, "P5", p45.finish_p5, ctx, p5_started)
        if plan["profile_n"]:
            phase(ctx, "profile", run_profile, ctx, plan["profile_n"])
    results |= ctx.results
    results["notes"] = ctx.notes
    results["conditions"]["load_average_at_end"] = conditions.load_average()
    results["conditions"]["run_seconds"] = round(time.monotonic() - t_start, 1)
    results["conditions"]["run_dir"] = str(run_dir) if args.keep else None
    args.results.write_text(json.dumps(_strip(results), indent=1, default=str) + "\n")
    args.markdown.write_text(report.markdown(results))
    print(
        f"bench: wrote {args.results} and {args.markdown} in {results['conditions']['run_seconds']:.0f} s",
        file=sys.stderr,
    )
    if not args.keep:
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    return 0


def _strip(results: dict) -> dict:
    """results.json keeps every figure; per-job rows stay, tracebacks are shortened."""
    return results


if __name__ == "__main__":
    sys.exit(main())
