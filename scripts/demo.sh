#!/usr/bin/env bash
# The demo: install, start the local stack (Pub/Sub emulator + Compute stand-in), run the pipeline
# DAG with real Airflow (`airflow dags test`), print the jobs, and stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

export BATCHVM_LOCAL_DIR="$PWD/.local/demo"
PY=.venv/bin/python
stop() { $PY -m batchvm_local down >/dev/null || echo "demo: could not stop the local stack cleanly" >&2; }
trap stop EXIT
$PY -m batchvm_local down >/dev/null 2>&1 || true
eval "$($PY -m batchvm_local up)"

export AIRFLOW_HOME="$BATCHVM_LOCAL_DIR/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export PATH="$PWD/.venv/bin:$PATH"
airflow db migrate >"$BATCHVM_LOCAL_DIR/airflow-db.log" 2>&1

$PY scripts/demo_report.py prepare
echo "demo: running example_batchvm_pipeline with airflow dags test (each step on its own VM)..."
if ! airflow dags test example_batchvm_pipeline >"$BATCHVM_LOCAL_DIR/dags-test.log" 2>&1; then
  tail -n 60 "$BATCHVM_LOCAL_DIR/dags-test.log"
  echo "demo: the DAG run failed; full log in $BATCHVM_LOCAL_DIR/dags-test.log" >&2
  exit 1
fi
grep -E "Marking run|DagRun Finished|state=" "$BATCHVM_LOCAL_DIR/dags-test.log" | tail -n 3 || true
$PY scripts/demo_report.py report
