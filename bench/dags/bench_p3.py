"""``bench_p3_{ours,perjob,stock10,stock1,null}``: ``BENCH_P3_N`` waits (``bench_p1_*``: ``BENCH_P1_N``) started straight in the triggerer
(mapped, ``start_from_trigger``), each ending its task from the triggerer. No worker parses this file.
"""

from __future__ import annotations

import os

from airflow.sdk import DAG

from bench.dag_config import COMMON, PROJECT, ZONE
from bench.operators import p3_operator_class

P3_N = int(os.environ.get("BENCH_P3_N", "1000"))
P1_N = int(os.environ.get("BENCH_P1_N", "50"))  # P1's detection batch: each chain's waits, all at once
P3_LIVENESS = float(os.environ.get("BENCH_P3_LIVENESS", "60"))
# P3: the same wait kwargs for each variant; "{i}" is the map index, "{vm}" one VM of a small
# pool of idle stand-in VMs (every wait checks the liveness of a RUNNING VM, as a real one would).
P3_VM_POOL = int(os.environ.get("BENCH_P3_VM_POOL", "20"))
P3_WAIT = {
    "attempt": 1,
    "project_id": PROJECT,
    "zone": ZONE,
    "vm_name": "bvm-p3-{vm}",
    "liveness_check_seconds": P3_LIVENESS,
}
P3_VARIANTS = {
    # ours as shipped: one shared status pull per triggerer process (Airflow's shared trigger stream)
    "ours": (
        "bench.triggers.P3Trigger",
        {
            "inner": "airflow_batchvm.triggers.batchvm.BatchVmJobTrigger",
            "inner_kwargs": {**P3_WAIT, "job_id": "p3o-{i}"},
            "variant": "p3-ours",
            "vm_pool": P3_VM_POOL,
        },
    ),
    # the same trigger with a long poll of its own job's status subscription per wait (the design
    # before the shared pull; what ``[batchvm] shared_status_pull = False`` runs)
    "perjob": (
        "bench.triggers.P3Trigger",
        {
            "inner": "airflow_batchvm.triggers.batchvm.BatchVmJobTrigger",
            "inner_kwargs": {**P3_WAIT, "job_id": "p3p-{i}"},
            "variant": "p3-perjob",
            "vm_pool": P3_VM_POOL,
            "shared_pull": False,
        },
    ),
    # the stock trigger at its default poke_interval (10 s), each on its own subscription and topic
    "stock10": (
        "bench.triggers.P3Trigger",
        {
            "inner": "airflow.providers.google.cloud.triggers.pubsub.PubsubPullTrigger",
            "inner_kwargs": {
                "project_id": PROJECT,
                "subscription": "bench-s3-{i}",
                "max_messages": 5,
                "ack_messages": False,
                "gcp_conn_id": "google_cloud_default",
                "poke_interval": 10.0,
                "impersonation_chain": None,
                "return_immediately": None,
            },
            "variant": "p3-stock10",
        },
    ),
    # the same at poke_interval 1 s (P1's detection batch)
    "stock1": (
        "bench.triggers.P3Trigger",
        {
            "inner": "airflow.providers.google.cloud.triggers.pubsub.PubsubPullTrigger",
            "inner_kwargs": {
                "project_id": PROJECT,
                "subscription": "bench-s1-{i}",
                "max_messages": 5,
                "ack_messages": False,
                "gcp_conn_id": "google_cloud_default",
                "poke_interval": 1.0,
                "impersonation_chain": None,
                "return_immediately": None,
            },
            "variant": "p3-stock1",
        },
    ),
    # the floor: waits that only sleep
    "null": (
        "bench.triggers.P3Trigger",
        {
            "inner": "bench.triggers.SleepTrigger",
            "inner_kwargs": {"job_id": "p3n-{i}"},
            "variant": "p3-null",
        },
    ),
}
for variant, (trigger_cls, trigger_kwargs) in P3_VARIANTS.items():
    operator = p3_operator_class(f"P3Wait_{variant}", trigger_cls, trigger_kwargs)
    with DAG(dag_id=f"bench_p3_{variant}", **COMMON):
        operator.partial(task_id="wait", retries=0).expand(index=list(range(P3_N)))
    with DAG(dag_id=f"bench_p1_{variant}", **COMMON):
        operator.partial(task_id="wait", retries=0).expand(index=list(range(P1_N)))
