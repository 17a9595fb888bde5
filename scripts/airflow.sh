#!/usr/bin/env bash
# `make airflow`: real Airflow with its UI on the local stack, in the foreground until Ctrl-C.
#
# Installs what is needed, starts the local stack (Pub/Sub emulator + Compute stand-in, state in
# .local/airflow-ui/stack) and the four Airflow components (api-server with the UI, scheduler,
# dag-processor, triggerer; AIRFLOW_HOME=.local/airflow-ui/airflow), loads the example DAGs, and
# prints the URL and the login. Ctrl-C or SIGTERM stops every component and the stack, and checks
# that nothing is left running. The work is done by scripts/airflow_local.py, which the end-to-end
# tests use too (it also has `up`, `down` and `status` for running in the background).
#
# Settings: BATCHVM_AIRFLOW_PORT (default 8080), BATCHVM_AIRFLOW_DIR (default .local/airflow-ui),
# BATCHVM_AIRFLOW_PARALLELISM (default 4 task processes at once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python scripts/airflow_local.py "${@:-run}"
