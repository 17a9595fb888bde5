"""The CLI needs no Airflow metadata database: it runs with one that cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_commands_run_without_an_airflow_database(local_stack, tmp_path):
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        # A database in a folder that does not exist: any use of it would fail.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/no/such/folder/airflow.db",
        "COLUMNS": "200",
    }
    batchvm = str(Path(sys.executable).with_name("batchvm"))
    result = subprocess.run(
        [batchvm, "gc", "--dry-run", "--project", "cli-no-db", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"project_id": "cli-no-db"' in result.stdout
    assert '"dry_run": true' in result.stdout
    assert not (tmp_path / "no").exists()
