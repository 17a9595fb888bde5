"""Real Airflow for the benchmark: its four components started one by one, and a small REST client.

``airflow standalone`` is avoided on purpose: SIGTERM to it orphans its children (see the shared
notes), while four components started by us, each in its own session, can each be stopped and
checked. The metadata database is SQLite in a fresh ``AIRFLOW_HOME`` under the run's directory,
the executor is LocalExecutor, and the simple auth manager runs in all-admins mode so that the
REST API needs no login. All of this is recorded in the run's conditions.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from batchvm_local import procs

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AIRFLOW = str(VENV_BIN / "airflow")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


class AirflowError(RuntimeError):
    pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Airflow:
    """Airflow's api-server, scheduler, dag-processor and triggerer, started and stopped by us."""

    def __init__(self, home: Path, extra_env: dict[str, str], settings: dict[str, str] | None = None):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.settings = {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "bench" / "dags"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__PARALLELISM": "16",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
            "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": "64",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__TRIGGERER__CAPACITY": "3000",
            "AIRFLOW__TRIGGERER__MAX_TRIGGER_TO_SELECT_PER_LOOP": "500",
            # parse the benchmark's DAG files once, not every 30 s (a parse costs seconds of CPU)
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3600",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            # a worker parses its DAG file before each task; on a loaded 2-core machine that can
            # take longer than the default 30 s
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # other Airflows on this machine may hold the default log-server ports
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            **(settings or {}),
        }
        self.env = {
            **os.environ,
            **extra_env,
            **self.settings,
            "AIRFLOW_HOME": str(home),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }

    # --- lifecycle ------------------------------------------------------------------------

    def migrate(self) -> float:
        self.home.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        run = subprocess.run(
            [AIRFLOW, "db", "migrate"], env=self.env, capture_output=True, text=True, timeout=300
        )
        if run.returncode != 0:
            raise AirflowError(f"airflow db migrate failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return time.monotonic() - t0

    def start_component(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "ab")
        args = [AIRFLOW, name]
        if name == "api-server":
            args += ["--port", str(self.port), "--host", "127.0.0.1", "--workers", "1"]
        self.procs[name] = subprocess.Popen(
            args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
            start_new_session=True,
        )
        log.close()

    def stop_component(self, name: str, timeout: float = 30) -> list[str]:
        """SIGTERM the component's session, wait, then SIGKILL whatever of its tree is left."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return []
        tree = procs.tree(proc.pid) if proc.poll() is None else []
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        leftovers = []
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            leftovers.append(name)
        for p in procs.wait_gone(tree, timeout=5):
            leftovers.append(f"{name}:{p.pid}:{p.comm}")
            procs.kill_tree(p)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return leftovers

    def restart(self, name: str, settle: float = 60) -> None:
        """Stop and start one component; returns once its process tree is up (for the triggerer: its runner)."""
        self.stop_component(name)
        self.start_component(name)
        deadline = time.monotonic() + settle
        want = 2 if name == "triggerer" else 1  # the triggerer runs its triggers in a child process
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AirflowError(f"airflow {name} exited ({proc.returncode}) after a restart")
            if len(procs.tree(proc.pid)) >= want:
                return
            time.sleep(0.5)

    def start(self, timeout: float = 180) -> float:
        t0 = time.monotonic()
        for name in COMPONENTS:
            self.start_component(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AirflowError(
                        f"airflow {name} exited ({proc.returncode}); see {self.home / (name + '.log')}"
                    )
            health = self._get_json("/api/v2/monitor/health")
            if health and _healthy(health):
                return time.monotonic() - t0
            time.sleep(1)
        raise AirflowError(
            f"Airflow did not become healthy in {timeout} s: {self._get_json('/api/v2/monitor/health')}"
        )

    def stop(self) -> list[str]:
        """Stop every component (triggerer first, api-server last)."""
        leftovers: list[str] = []
        for name in reversed(COMPONENTS):
            leftovers += self.stop_component(name)
        return leftovers

    # --- what we measure about it --------------------------------------------------------

    def triggerer_tree(self) -> list[procs.Proc]:
        proc = self.procs.get("triggerer")
        return procs.tree(proc.pid) if proc is not None else []

    # --- REST -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _get_json(self, path: str) -> Any:
        try:
            return self._request("GET", path, timeout=5)
        except (OSError, ValueError):
            return None

    def api(self, method: str, path: str, body: Any = None, retries: int = 5) -> Any:
        for attempt in range(retries):
            try:
                return self._request(method, path, body)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500]
                if (exc.code < 500 and exc.code != 404) or attempt == retries - 1:
                    raise AirflowError(f"{method} {path}: {exc.code} {detail!r}") from None
            except OSError:
                if attempt == retries - 1:
                    raise
            time.sleep(1 + attempt)
        return None

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        missing = set(dag_ids)
        while time.monotonic() < deadline:
            for dag_id in list(missing):
                if self._get_json(f"/api/v2/dags/{dag_id}") is not None:
                    missing.discard(dag_id)
            if not missing:
                return
            time.sleep(1)
        errors = self._get_json("/api/v2/importErrors")
        raise AirflowError(f"DAGs not parsed within {timeout} s: {sorted(missing)}; import errors: {errors}")

    def trigger(self, dag_id: str, run_id: str, conf: dict) -> dict:
        return self.api(
            "POST",
            f"/api/v2/dags/{dag_id}/dagRuns",
            {"dag_run_id": run_id, "logical_date": None, "conf": conf},
        )

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out: list[dict] = []
        offset = 0
        while True:
            page = self.api(
                "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100&offset={offset}"
            )
            items = page.get("task_instances", [])
            out += items
            if len(items) < 100:
                return out
            offset += 100

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def fail_run(self, dag_id: str, run_id: str) -> None:
        self.api("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", {"state": "failed"})


def _healthy(health: dict) -> bool:
    return all(
        (health.get(part) or {}).get("status") == "healthy"
        for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
    )
