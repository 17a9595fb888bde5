"""``python -m bench.shards [--repeat N]``: one job sharded over 4 VMs against 4 single jobs in a row.

Issue 6 asks for the wall time of the 4-task DAG next to that of 4 sequential single jobs. This
times, alternating, N ``airflow dags test`` runs of each of:

- ``sharded``: one ``BatchVmRunJobOperator(task_count=4)``, the 4 VMs at once;
- ``sequential``: 4 chained single-job tasks, one VM after another;
- ``example``: the real ``example_batchvm_sharded`` (shard over 4, then merge).

There is no "4 single jobs in parallel" variant: ``airflow dags test`` runs every deferral's
trigger inline, one task at a time, so 4 independent tasks would run one after another too.

Everything runs for real on a local stack of its own (Pub/Sub emulator, Compute stand-in, podman)
with a fresh AIRFLOW_HOME, both under a temp dir, stopped at the end whatever happens. Each run
must exit 0 and leave no VM and no per-job subscription. Writes ``bench/shards.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from bench import conditions

REPO = Path(__file__).resolve().parents[1]
PY = REPO / ".venv" / "bin" / "python"
AIRFLOW = REPO / ".venv" / "bin" / "airflow"
RUN_TIMEOUT = 900

# The comparison DAGs: the same job settings as dags/example_batchvm_sharded.py, no retries (a
# retry would hide in the time; a failure must show).
COMMON = '''
from airflow.sdk import DAG
from batchvm_settings import INSTANCE_TEMPLATE, SLEEP_TEST_IMAGE, ZONE

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator

common = {
    "image": SLEEP_TEST_IMAGE,
    "instance_template": INSTANCE_TEMPLATE,
    "zone": ZONE,
    "env": {"SLEEP_TIME": "2"},
    "timeout_seconds": 3600,
}
'''
DAGS = {
    "bench_shards_sharded.py": COMMON + '''
with DAG(dag_id="bench_shards_sharded", schedule=None, catchup=False):
    BatchVmRunJobOperator(task_id="shard", task_count=4, parallelism=4, **common)
''',
    "bench_shards_sequential.py": COMMON + '''
with DAG(dag_id="bench_shards_sequential", schedule=None, catchup=False):
    jobs = [BatchVmRunJobOperator(task_id=f"job_{i}", **common) for i in range(4)]
    jobs[0] >> jobs[1] >> jobs[2] >> jobs[3]
''',
}
VARIANTS = {
    "sharded": "bench_shards_sharded",
    "sequential": "bench_shards_sequential",
    "example": "example_batchvm_sharded",
}

TIMELINE = re.compile(r"batchvm \| (\d\d:\d\d:\d\d\.\d+) \| [^|]*\| (\S+(?: \S+)*)\s*\|")
SUCCEEDED = re.compile(r"Marking run <DagRun .*> successful")
RUN_DURATION = re.compile(r"DagRun Finished: .*run_duration=([\d.]+)")
METRICS = ("wall_seconds", "run_seconds", "timeline_seconds")


def log(message: str) -> None:
    print(f"bench.shards {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def stack_up(env: dict[str, str]) -> dict[str, str]:
    """Start the local stack as scripts/demo.sh does (on free ports: other runs may hold the defaults)."""
    out = subprocess.run(
        [str(PY), "-m", "batchvm_local", "up", "--pubsub-port", "0", "--compute-port", "0"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True, timeout=180,
    ).stdout
    exported = {}
    for line in out.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            key, _, value = words[1].partition("=")
            exported[key] = value
    return exported


def stack_down(env: dict[str, str]) -> str | None:
    """Stop the stack; says what was still running if anything was."""
    down = subprocess.run(
        [str(PY), "-m", "batchvm_local", "down"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    return None if down.returncode == 0 else (down.stderr or down.stdout).strip()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def leftovers(env: dict[str, str], wait: float = 15.0) -> dict:
    """VMs (the stand-in's list) and per-job subscriptions (the emulator's) still there, after up to ``wait`` s.

    The task deletes its VMs without waiting, so a VM may take a moment to go.
    """
    deadline = time.monotonic() + wait
    while True:
        vms = [vm["name"] for vm in _get(f"{env['BATCHVM_COMPUTE_API_ENDPOINT']}/_local/vms")["vms"]]
        subs = _get(f"http://{env['PUBSUB_EMULATOR_HOST']}/v1/projects/{env['BATCHVM_PROJECT']}/subscriptions")
        subs = [
            name for s in subs.get("subscriptions", [])
            if (name := s["name"].rsplit("/", 1)[-1]).startswith(("batchvm-job-", "batchvm-status-"))
        ]
        if (not vms and not subs) or time.monotonic() > deadline:
            return {"vms": vms, "subscriptions": subs}
        time.sleep(0.5)


def timeline_span(output: str) -> float | None:
    """Seconds from the first ``submitted`` timeline line to the last ``FINISHED`` one."""
    steps = [(m.group(2), datetime.strptime(m.group(1), "%H:%M:%S.%f")) for m in TIMELINE.finditer(output)]
    submitted = [at for step, at in steps if step == "submitted"]
    finished = [at for step, at in steps if step == "FINISHED"]
    if not submitted or not finished:
        return None
    span = (max(finished) - min(submitted)).total_seconds()
    return round(span + 86400 if span < 0 else span, 2)  # a run across midnight


def run_once(variant: str, env: dict[str, str], logs: Path, index: int) -> dict:
    dag_id = VARIANTS[variant]
    log_file = logs / f"{variant}-{index}.log"
    t0 = time.monotonic()
    with open(log_file, "w") as out:
        try:
            rc = subprocess.run(
                [str(AIRFLOW), "dags", "test", dag_id], env=env, cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = round(time.monotonic() - t0, 2)
    output = log_file.read_text(errors="replace")
    # `dags test` can exit 0 with a failed task: the run must also be marked successful.
    failed = rc != 0 or not SUCCEEDED.search(output)
    duration = RUN_DURATION.search(output)
    row = {
        "run": index,
        "exit_code": rc,
        "ok": not failed,
        "wall_seconds": wall,
        "run_seconds": round(float(duration.group(1)), 2) if duration else None,
        "timeline_seconds": timeline_span(output),
        "retries": output.count("up_for_retry"),
        "left": leftovers(env),
    }
    if failed:
        row["log_tail"] = output[-3000:]
    return row


def code_state() -> dict:
    """Which provider code was measured: the tree is edited while benchmarks run, so record it."""
    def git(*args: str) -> list[str]:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.splitlines()

    return {
        "head": git("rev-parse", "--short", "HEAD")[0],
        "uncommitted": git("diff", "--name-only", "HEAD", "--", "airflow_batchvm", "worker_image", "local"),
    }


def summary(rows: list[dict], key: str) -> dict | None:
    values = [r[key] for r in rows if r["ok"] and r[key] is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shards", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "shards.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stack state) afterwards")
    args = parser.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    dags, logs = run_dir / "dags", run_dir / "logs"
    dags.mkdir()
    logs.mkdir()
    for name, source in DAGS.items():
        (dags / name).write_text(source)
    for name in ("batchvm_settings.py", "example_batchvm_sharded.py"):
        shutil.copy(REPO / "dags" / name, dags / name)

    t_start = time.monotonic()
    results: dict = {
        "command": f"python -m bench.shards --repeat {args.repeat}",
        "conditions": conditions.collect("shards", {"repeat": args.repeat, "sleep_time": 2, "task_count": 4}),
        "variants": {
            "sharded": "one BatchVmRunJobOperator(task_count=4, parallelism=4)",
            "sequential": "4 chained single-job BatchVmRunJobOperator tasks",
            "example": "dags/example_batchvm_sharded.py: shard (task_count 4) then merge (a single job)",
        },
        "code_at_start": code_state(),
        "runs": {variant: [] for variant in VARIANTS},
        "notes": [
            "wall_seconds: the whole `airflow dags test` process, Airflow's start included; "
            "run_seconds: the DagRun's run_duration as `dags test` logs it; "
            "timeline_seconds: first 'submitted' to last 'FINISHED' timeline line of its output",
            "no parallel variant: `airflow dags test` runs each deferral's trigger inline, one task at a time",
        ],
    }
    base_env = {**os.environ, "BATCHVM_LOCAL_DIR": str(run_dir / "stack")}
    env = dict(base_env)
    try:
        log(f"starting the local stack in {run_dir / 'stack'}")
        env |= stack_up(base_env)
        env |= {
            "AIRFLOW_HOME": str(run_dir / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
        }
        subprocess.run(
            [str(AIRFLOW), "db", "migrate"], env=env, cwd=REPO, check=True, timeout=600,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for i in range(1, args.repeat + 1):
            for variant in VARIANTS:
                row = run_once(variant, env, logs, i)
                results["runs"][variant].append(row)
                left = row["left"]["vms"] + row["left"]["subscriptions"]
                log(
                    f"{variant:<10} run {i}: {'ok' if row['ok'] else 'FAILED'} (exit {row['exit_code']}), "
                    f"wall {row['wall_seconds']:.1f} s, timeline {row['timeline_seconds']} s"
                    + (f", LEFT: {left}" if left else "")
                )
    except Exception as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
        log(f"stopped early: {results['error']}")
    finally:
        problem = stack_down(env)
        if problem:
            results["notes"].append(f"local stack down found processes still running: {problem}")
            log(problem)

    c = results["conditions"]
    c["machine"]["load_average_at_end"] = conditions.load_average()
    c["run_seconds"] = round(time.monotonic() - t_start, 1)
    results["code_at_end"] = code_state()
    results["summary"] = {
        variant: {key: summary(rows, key) for key in METRICS}
        for variant, rows in results["runs"].items()
    }
    s = results["summary"]
    results["ratio_sequential_over_sharded"] = {
        key: round(s["sequential"][key]["median"] / s["sharded"][key]["median"], 2)
        if s["sequential"][key] and s["sharded"][key] else None
        for key in METRICS
    }
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    print(f"cores {c['machine']['cores']}, load average {c['machine']['load_average_at_start']} at start, "
          f"{c['machine']['load_average_at_end']} at end; {args.repeat} runs each, alternating")
    print("seconds, median (min-max):")
    print(f"{'variant':<11} {'ok':>5}  {'wall (dags test)':<20} {'DagRun':<20} {'submitted..FINISHED'}")
    for variant, rows in results["runs"].items():
        cells = []
        for key in METRICS:
            m = s[variant][key]
            cells.append(f"{m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f})" if m else "-")
        ok = sum(r["ok"] for r in rows)
        print(f"{variant:<11} {ok:>2}/{len(rows):<2}  {cells[0]:<20} {cells[1]:<20} {cells[2]}")
    ratio = results["ratio_sequential_over_sharded"]
    print(f"sequential / sharded: wall {ratio['wall_seconds']}, DagRun {ratio['run_seconds']}, "
          f"timeline {ratio['timeline_seconds']}")
    print(f"wrote {args.out} in {c['run_seconds']:.0f} s")
    if args.keep:
        print(f"logs and stack state kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)

    all_ok = all(r["ok"] and not (r["left"]["vms"] or r["left"]["subscriptions"])
                 for rows in results["runs"].values() for r in rows)
    return 0 if all_ok and "error" not in results and not problem else 1


if __name__ == "__main__":
    sys.exit(main())
