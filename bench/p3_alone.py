"""``python -m bench.p3_alone [N] [--spy]``: one P3 variant (ours, shipped) alone, N waits in one real
``airflow triggerer``, all finishing within 10 s; prints the detection latency.

With ``--spy``, py-spy records the trigger runner (idle frames included) and the supervisor while
the waits finish, into ``bench/profile-finish-*.txt``, and the processes' CPU each second. This is how
the log write on the triggerer's path was found (docs/BENCHMARKS.md, finding 5).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import p3
from bench.env import environment, start_airflow
from bench.p3 import _runner_pid

OUT = Path(__file__).resolve().parent


def _spy(pid: int, out: Path, idle: bool) -> None:
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", "22", "-r", "50",
           "--format", "raw", "-o", str(out), "--nonblocking", *(["--idle"] if idle else [])]  # fmt: skip
    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu(root: int, out: Path) -> None:
    import psutil

    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    prev = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    with out.open("w") as f:
        for _ in range(22):
            time.sleep(1)
            cur = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
            f.write(" ".join(f"{p.pid}:{cur[p.pid] - prev[p.pid]:.2f}" for p in procs) + "\n")
            prev = cur


def main(argv: list[str]) -> int:
    n = int(next((a for a in argv if a.isdigit()), "1000"))
    spy = "--spy" in argv
    with environment(False, Path(tempfile.mkdtemp(prefix="bench-p3-")), n, with_airflow=False, p1_n=10) as ctx:
        start_airflow(ctx)
        log = ctx.log

        def on_log(msg: str) -> None:
            log(msg)
            if spy and "idling" in msg:  # the waits are up: the finish window follows
                supervisor = ctx.airflow.procs["triggerer"].pid
                _spy(_runner_pid(ctx), OUT / "profile-finish-runner.txt", idle=True)
                _spy(supervisor, OUT / "profile-finish-supervisor.txt", idle=False)
                threading.Thread(target=_cpu, args=(supervisor, OUT / "profile-finish-cpu.txt"), daemon=True).start()

        ctx.log = on_log
        result = p3.run_variant(ctx, "ours", n, 3.0, 40.0, restart=False, baseline=False)
        print(f"detection {result['detection_seconds']}, lost {result.get('lost')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
