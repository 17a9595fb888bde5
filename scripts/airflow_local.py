"""Real Airflow with its UI on the local stack: api-server, scheduler, dag-processor and triggerer.

    python scripts/airflow_local.py run     # start everything, print the URL and login, stop on Ctrl-C/SIGTERM
    python scripts/airflow_local.py up      # start everything in the background and return
    python scripts/airflow_local.py down    # stop what `up` started; non-zero if anything had to be killed
    python scripts/airflow_local.py status  # what runs

`make airflow` runs `run`; the end-to-end tests (tests/e2e/test_rest.py) use :class:`LocalAirflow`.
Everything lives under one directory (``--dir``, default ``<repo>/.local/airflow-ui``):

    stack/     the local stack (`python -m batchvm_local up`: Pub/Sub emulator, Compute stand-in, VMs)
    airflow/   AIRFLOW_HOME: airflow.cfg, the SQLite database, task logs, the generated admin password
    logs/      one log per Airflow component
    state.json what runs (pids and their start times), so that `down` or a later `up` can stop it

The four Airflow components are started one by one, not with `airflow standalone`, so that each
runs in its own session and can be stopped on its own (SIGTERM to standalone alone orphans its
children). Each leads a session of its own, which the processes it starts (executor workers, task
processes, the trigger runner, DAG parsers) stay in, so stopping can check that nothing of this Airflow is
left, and kill what is (see ``airflow_processes``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from batchvm_local import procs

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MARKER = "BATCHVM_AIRFLOW_UI"
STACK_MARKER = "BATCHVM_LOCAL_STACK"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
EXAMPLE_DAGS = ("example_batchvm_pipeline", "example_batchvm_single_job")
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
# The scheduler's LocalExecutor forks its workers, and each worker forks every task process, which
# parses its DAG file; the triggerer forks its trigger runner. Importing the provider (and so the
# google clients: 5-10 s, a minute on a busy machine) once in those two parents, before Airflow's
# own CLI takes over, lets every task and trigger start with it already imported. Nothing else
# changes: the same CLI command runs, with the same configuration.
PRELOAD = {
    "scheduler": ["airflow_batchvm.operators.batchvm"],
    "triggerer": ["airflow_batchvm.triggers.batchvm"],
}
# Everything reads and writes the task logs in one local folder, so the api-server reads them
# there, running tasks' and triggers' included: no log server is needed (and none then fights
# another local Airflow for ports 8793/8794).
ARGS = {"scheduler": ["--skip-serve-logs"], "triggerer": ["--skip-serve-logs"]}
LAUNCHER = """\
import importlib, sys, traceback
name = sys.argv[1]
split = sys.argv.index("--")
modules, args = sys.argv[2:split], sys.argv[split + 1 :]
for module in modules:
    try:
        importlib.import_module(module)
    except Exception:
        print(f"airflow_local: could not preload {module}; tasks will import it themselves", file=sys.stderr)
        traceback.print_exc()
try:
    from setproctitle import setproctitle
    setproctitle(f"airflow {name}")
except ImportError:
    pass
from airflow.__main__ import main
sys.argv = ["airflow", name, *args]
sys.exit(main())
"""


class AirflowLocalError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether something listens on the loopback ``port`` (connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def parse_exports(text: str) -> dict[str, str]:
    """The ``export NAME=value`` lines that `python -m batchvm_local up|env` prints."""
    env = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


class LocalAirflow:
    """The local stack plus the four Airflow components, started and stopped as one."""

    def __init__(self, root: Path, port: int = 8080, parallelism: int = 4):
        self.root = Path(root).resolve()
        self.port = port
        self.parallelism = parallelism
        self.home = self.root / "airflow"
        self.stack_dir = self.root / "stack"
        self.logs = self.root / "logs"
        self.state_file = self.root / "state.json"
        self.run_id = uuid.uuid4().hex
        self.stack_env: dict[str, str] = {}
        self.components: dict[str, dict] = {}
        self.timings: dict[str, float] = {}  # seconds each step of start() and stop() took
        self._migrate_error: BaseException | None = None
        self.stack_id: str | None = None
        self.stack_services: dict[str, dict] = {}
        self._popen: dict[str, subprocess.Popen] = {}

    # --- what a user or a test needs ------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def password(self) -> str:
        return json.loads(self.password_file.read_text())["admin"]

    def token(self) -> str:
        body = json.dumps({"username": "admin", "password": self.password()}).encode()
        request = urllib.request.Request(
            f"{self.url}/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())["access_token"]

    def log_path(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def airflow_env(self) -> dict[str, str]:
        """The environment every component (and so every task) runs with."""
        env = {
            **os.environ,
            **self.stack_env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            # Low parallelism to save memory: each running task is a process of its own.
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            # Parsing a DAG that imports the google clients takes 5-10 s, and several times that on a
            # busy 2-core machine; Airflow's 30 s default then reschedules the task ("Dag not found
            # during start up") for a minute. Give the parse room.
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "180",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "240",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            MARKER: self.run_id,
        }
        env.pop("AIRFLOW__CORE__SQL_ALCHEMY_CONN", None)
        env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
        return env

    # --- starting -------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> LocalAirflow:
        """Start the stack and Airflow; returns once the API answers, every component heartbeats
        and the example DAGs are parsed. Stops whatever it started if anything fails."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        running = recorded_components_alive(self.root)
        if running:
            raise AirflowLocalError(
                f"an Airflow started from {self.root} still runs ({', '.join(running)}); "
                f"stop it first (Ctrl-C where it runs, or: python scripts/airflow_local.py down --dir {self.root})"
            )
        if port_taken(self.port):
            raise AirflowLocalError(
                f"port {self.port} is taken: is another Airflow running? Pick another with BATCHVM_AIRFLOW_PORT=..."
            )
        stop_recorded(self.root)  # whatever an earlier run that was killed left behind
        try:
            with self._timed("stack and db migrate"):  # side by side: neither needs the other
                migrate = threading.Thread(target=self._migrate_in_thread, daemon=True)
                migrate.start()
                try:
                    self._start_stack()
                    self._write_state()
                finally:
                    migrate.join()
                if self._migrate_error:
                    raise self._migrate_error
            with self._timed("components"):
                for name in COMPONENTS:
                    self._start_component(name)
                self._write_state()
                self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @contextlib.contextmanager
    def _timed(self, step: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = round(time.monotonic() - started, 1)

    def _start_stack(self) -> None:
        run = subprocess.run(
            [sys.executable, "-m", "batchvm_local", "up", "--pubsub-port", "0", "--compute-port", "0"],
            env={**os.environ, "BATCHVM_LOCAL_DIR": str(self.stack_dir)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if run.returncode != 0:
            raise AirflowLocalError(f"the local stack did not start:\n{run.stderr[-3000:]}")
        self.stack_env = parse_exports(run.stdout)
        if "PUBSUB_EMULATOR_HOST" not in self.stack_env:
            raise AirflowLocalError(f"`batchvm_local up` printed no environment:\n{run.stdout}\n{run.stderr}")
        recorded = json.loads((self.stack_dir / "stack.json").read_text())
        self.stack_id = recorded["stack_id"]
        self.stack_services = {name: recorded[name] for name in ("pubsub", "compute") if recorded.get(name)}

    def _migrate_in_thread(self) -> None:
        try:
            self._migrate()
        except BaseException as exc:
            self._migrate_error = exc

    def _migrate(self) -> None:
        with open(self.log_path("db-migrate"), "wb") as log:
            run = subprocess.run(
                [str(VENV_BIN / "airflow"), "db", "migrate"],
                env=self.airflow_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300,
            )  # fmt: skip
        if run.returncode != 0:
            raise AirflowLocalError(f"airflow db migrate failed:\n{tail(self.log_path('db-migrate'))}")

    def _start_component(self, name: str) -> None:
        with open(self.log_path(name), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, name, *PRELOAD.get(name, []), "--", *ARGS.get(name, [])],
                env=self.airflow_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # its own session: Ctrl-C on the terminal reaches only us
            )
        proc = procs.read_proc(process.pid)
        self.components[name] = {"pid": process.pid, "start_time": proc.start_time if proc else None}
        self._popen[name] = process

    def _write_state(self) -> None:
        state = {
            "run_id": self.run_id,
            "port": self.port,
            "url": self.url,
            "stack_dir": str(self.stack_dir),
            "components": self.components,
            "env": self.stack_env,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def dead_components(self) -> list[str]:
        return [name for name, c in self.components.items() if _identity(c) is None]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            dead = self.dead_components()
            if dead:
                raise AirflowLocalError(
                    "Airflow component(s) exited while starting: "
                    + "; ".join(f"{n} (log {self.log_path(n)}):\n{tail(self.log_path(n))}" for n in dead)
                )
            health = self._health()
            if health and all(
                health.get(part, {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
            ) and self.password_file.exists():
                if set(EXAMPLE_DAGS) <= set(self.dag_ids()):
                    return
            time.sleep(0.5)
        raise AirflowLocalError(f"Airflow was not ready within {timeout} s (health: {health})")

    def _health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return {}

    def dag_ids(self) -> list[str]:
        try:
            request = urllib.request.Request(
                f"{self.url}/api/v2/dags?limit=100", headers={"Authorization": f"Bearer {self.token()}"}
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                return [d["dag_id"] for d in json.loads(resp.read())["dags"]]
        except (OSError, ValueError, KeyError):
            return []

    # --- stopping -------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop Airflow, then the stack; returns what had to be killed (empty when all stopped cleanly)."""
        with self._timed("stop"):
            killed = stop_recorded(self.root, timings=self.timings, run_id=self.run_id)
        for process in self._popen.values():
            try:
                process.wait(timeout=1)  # reap our children, so they leave no zombies
            except subprocess.TimeoutExpired:
                pass
        return killed

    def leftovers(self) -> list[procs.Proc]:
        """Any process of this Airflow or of its stack (the emulator, the stand-in, its VMs) that
        still runs; none once ``stop`` returned."""
        left = {p.pid: p for p in airflow_processes(self.run_id, {**self.components, **self.stack_services})}
        if self.stack_id:
            left.update({p.pid: p for p in procs.marked(f"{STACK_MARKER}={self.stack_id}")})
        return list(left.values())


def _identity(component: dict | None) -> procs.Proc | None:
    """The recorded process, if that very process still runs."""
    if not component or component.get("start_time") is None:
        return None
    proc = procs.read_proc(component["pid"])
    if proc is None or proc.start_time != component["start_time"] or not procs.is_alive(proc):
        return None
    return proc


def recorded_components_alive(root: Path) -> list[str]:
    """The components that ``root/state.json`` records and that still run."""
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return []
    return [name for name, c in state.get("components", {}).items() if _identity(c) is not None]


def _session(pid: int) -> int | None:
    """The session id of ``pid`` (from ``/proc/PID/stat``), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[3])


def airflow_processes(run_id: str, components: dict[str, dict]) -> list[procs.Proc]:
    """Every live process of this Airflow: its components and whatever they started.

    Three nets, because no single one holds: each component leads its own session, which its
    children stay in (executor workers, task processes, parsers, log servers); the process tree
    catches a child that made a session of its own; and the marker in the environment catches a
    re-parented orphan that was exec'd. (The marker alone is not enough: Airflow's setproctitle
    overwrites the memory that /proc/PID/environ shows, in the process and in all it forks.)
    """
    everything = procs.all_procs()
    found: dict[int, procs.Proc] = {}
    for component in components.values():
        leader, born = component["pid"], component.get("start_time") or 0
        for proc in everything:
            if proc.start_time >= born and _session(proc.pid) == leader:
                found[proc.pid] = proc
        if _identity(component) is not None:
            found.update({p.pid: p for p in procs.tree(leader, everything)})
    found.update({p.pid: p for p in procs.marked(f"{MARKER}={run_id}", everything)})
    found.pop(os.getpid(), None)
    return [p for p in found.values() if p.state not in ("Z", "X")]


def stop_recorded(
    root: Path, grace: float = 30, timings: dict[str, float] | None = None, run_id: str | None = None
) -> list[str]:
    """Stop what ``root/state.json`` records (only if it is run ``run_id``, when given): each Airflow
    component with SIGTERM (so that it stops its own children), then SIGKILL to whatever of it is
    still there, then the local stack."""
    state_file = root / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return []
    if run_id is not None and state.get("run_id") != run_id:
        return []  # another run's: not ours to stop
    killed: list[str] = []
    components = state.get("components", {})
    leaders = {n: p for n, c in components.items() if (p := _identity(c)) is not None}
    everything = {p.pid: p for p in airflow_processes(state["run_id"], components)}
    for proc in leaders.values():
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    started = time.monotonic()
    left = procs.wait_gone(list(leaders.values()), timeout=grace)
    # The components are gone (or did not stop in time): give their children a moment, then kill
    # whatever is still there.
    everything.update({p.pid: p for p in airflow_processes(state["run_id"], components)})
    procs.wait_gone(list(everything.values()), timeout=0 if left else 5)
    if timings is not None:
        timings["stop airflow"] = round(time.monotonic() - started, 1)
    for _ in range(3):
        stragglers = airflow_processes(state["run_id"], components)
        if not stragglers:
            break
        for proc in stragglers:
            killed.append(f"pid {proc.pid} {proc.comm}")
            procs.kill_tree(proc, group=False)
        procs.wait_gone(stragglers, timeout=5)
    stack_dir = Path(state.get("stack_dir") or root / "stack")
    if (stack_dir / "stack.json").exists():
        started = time.monotonic()
        down = subprocess.run(
            [sys.executable, "-m", "batchvm_local", "down"],
            env={**os.environ, "BATCHVM_LOCAL_DIR": str(stack_dir)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if down.returncode != 0:
            killed.append(f"local stack: {down.stderr.strip()}")
        if timings is not None:
            timings["stop stack"] = round(time.monotonic() - started, 1)
    state_file.unlink(missing_ok=True)
    return killed


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the command line -------------------------------------------------------------------------


def _banner(airflow: LocalAirflow, started: float) -> str:
    return "\n".join(
        [
            "",
            f"Airflow is ready ({time.monotonic() - started:.0f} s): {airflow.url}",
            f"  login:     admin / {airflow.password()}",
            f"  DAGs:      {', '.join(EXAMPLE_DAGS)} (paused until you unpause or trigger them)",
            f"  try:       {airflow.url}/dags/{EXAMPLE_DAGS[1]} -> Trigger: the form asks for process type and sleep time",
            f"  logs:      {airflow.logs}/<component>.log, task logs under {airflow.home}/logs",
            f"  local env: BATCHVM_LOCAL_DIR={airflow.stack_dir} python -m batchvm_local status",
            "",
        ]
    )


def cmd_run(args: argparse.Namespace) -> int:
    airflow = LocalAirflow(args.dir, port=args.port, parallelism=args.parallelism)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if signum == signal.SIGHUP:  # the terminal is gone: printing to it would fail the stop
            sys.stdout = sys.stderr = open(os.devnull, "w")
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, kill, a closed terminal
        signal.signal(signum, on_signal)
    started = time.monotonic()
    print(f"airflow: starting the local stack and Airflow {airflow.url} (state in {airflow.root}) ...")
    code = 0
    try:
        airflow.start()
        print(_banner(airflow, started))
        print("Press Ctrl-C to stop everything.", flush=True)
        while True:
            dead = airflow.dead_components()
            if dead:
                print(f"airflow: {', '.join(dead)} exited unexpectedly; stopping everything", file=sys.stderr)
                for name in dead:
                    print(f"--- {airflow.log_path(name)} ---\n{tail(airflow.log_path(name))}", file=sys.stderr)
                code = 1
                break
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except AirflowLocalError as exc:
        print(f"airflow: {exc}", file=sys.stderr)
        code = 1
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the stop short
        signal.signal(signum, signal.SIG_IGN)
    if not airflow.components and airflow.stack_id is None:
        return code  # nothing was started
    print("\nairflow: stopping the Airflow components, then the local stack ...", flush=True)
    killed = airflow.stop()
    left = airflow.leftovers()
    if killed:
        print("airflow: these did not stop in time and were killed: " + "; ".join(killed), file=sys.stderr)
    if left:
        print(f"airflow: STILL RUNNING: {[(p.pid, p.comm) for p in left]}", file=sys.stderr)
        return 1
    print("airflow: stopped; nothing is left running")
    return code


def cmd_up(args: argparse.Namespace) -> int:
    airflow = LocalAirflow(args.dir, port=args.port, parallelism=args.parallelism)
    started = time.monotonic()
    try:
        airflow.start()
    except AirflowLocalError as exc:
        print(f"airflow: {exc}", file=sys.stderr)
        return 1
    print(_banner(airflow, started))
    print(f"Stop it with: .venv/bin/python scripts/airflow_local.py down --dir {airflow.root}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    killed = stop_recorded(Path(args.dir).resolve())
    if killed:
        print("airflow: these did not stop in time and were killed: " + "; ".join(killed), file=sys.stderr)
        return 1
    print("airflow: stopped; nothing is left running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        print(f"not running (no {root / 'state.json'})")
        return 1
    ok = True
    for name, component in state["components"].items():
        running = _identity(component) is not None
        ok &= running
        print(f"{name:14} {'running' if running else 'DOWN'} (pid {component['pid']})")
    print(f"url            {state['url']}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airflow_local.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=os.environ.get("BATCHVM_AIRFLOW_DIR", str(REPO / ".local" / "airflow-ui")))
    parser.add_argument("--port", type=int, default=int(os.environ.get("BATCHVM_AIRFLOW_PORT", "8080")))
    parser.add_argument("--parallelism", type=int, default=int(os.environ.get("BATCHVM_AIRFLOW_PARALLELISM", "4")))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start, wait for Ctrl-C/SIGTERM, stop").set_defaults(run=cmd_run)
    commands.add_parser("up", help="start in the background").set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop what `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="tell what runs").set_defaults(run=cmd_status)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
