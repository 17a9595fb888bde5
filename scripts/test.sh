#!/usr/bin/env bash
# The whole suite: installs what it needs, then unit, integration (real Pub/Sub emulator, Compute
# stand-in, podman containers) and end-to-end (real Airflow) tests. Each test session starts and
# stops its own services on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --with-browser
.venv/bin/ruff check .
exec .venv/bin/pytest -p no:cacheprovider "$@"
