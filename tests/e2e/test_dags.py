"""The example DAGs under real Airflow (`airflow dags test`, triggers run in-line) on the local stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, Cloud

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

AIRFLOW = str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="module")
def airflow_env(local_stack, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        **local_stack.env(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True)
    return env


def airflow(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)


def json_output(run: subprocess.CompletedProcess) -> list[dict]:
    """The JSON line of a CLI's output (Airflow may log warnings to stdout before it)."""
    return json.loads(next(line for line in reversed(run.stdout.splitlines()) if line.startswith("[")))


def task_states(env, dag_id: str) -> dict[str, list[str]]:
    runs = json_output(airflow(env, "dags", "list-runs", dag_id, "-o", "json"))
    assert len(runs) == 1, runs
    states: dict[str, list[str]] = {}
    for row in json_output(airflow(env, "tasks", "states-for-dag-run", dag_id, runs[0]["run_id"], "-o", "json")):
        states.setdefault(row["task_id"], []).append(row["state"])
    return states


def test_pipeline_dag_runs_every_step_on_its_own_vm(airflow_env, local_stack):
    run = airflow(airflow_env, "dags", "test", "example_batchvm_pipeline")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    states = task_states(airflow_env, "example_batchvm_pipeline")
    assert states == {"extract": ["success"], "transform": ["success"] * 3, "load": ["success"]}
    Cloud(local_stack).assert_nothing_left()


def test_single_job_dag_takes_its_params_from_conf(airflow_env, local_stack):
    run = airflow(
        airflow_env, "dags", "test", "example_batchvm_single_job", "-c", json.dumps({"sleep_time": 1})
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert task_states(airflow_env, "example_batchvm_single_job") == {"run_job": ["success"]}
    assert '"sleep_time":"1"' in run.stdout + run.stderr  # the form's value reached the container
    Cloud(local_stack).assert_nothing_left()


def test_sharded_dag_runs_one_job_over_four_vms_then_merges(airflow_env, local_stack):
    run = airflow(airflow_env, "dags", "test", "example_batchvm_sharded")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert task_states(airflow_env, "example_batchvm_sharded") == {"shard": ["success"], "merge": ["success"]}
    output = run.stdout + run.stderr
    for index in range(4):  # each shard's container saw its own index (its log tail, in the task log)
        assert f"Task {index} of 4" in output, output[-4000:]
    assert '"shards":"4"' in output  # the merge job got the shard task's result
    Cloud(local_stack).assert_nothing_left()
