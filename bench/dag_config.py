"""What the benchmark DAG files share (no heavy imports: each task process parses only its own file)."""

from __future__ import annotations

import os

PROJECT = os.environ.get("BATCHVM_PROJECT", "batchvm-local")
ZONE = os.environ.get("BATCHVM_ZONE", "us-central1-a")
TEMPLATE = os.environ.get("BATCHVM_INSTANCE_TEMPLATE", "batchvm-local")
IMAGE = "localhost/sleep_test:latest"
# What the P1/P2 VMs run: an idle guest (bench/vm_guest.py); the status is the harness's to publish,
# so that ours and the stock chain see the very same FINISHED at a known moment.
IDLE_VM = {"bench-role": "idle"}
COMMON = {"schedule": None, "catchup": False, "max_active_runs": 64, "tags": ["bench"]}
