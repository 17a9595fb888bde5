"""The demo's view of what happened on the wire: a table of the jobs, and a check that nothing is left.

``prepare`` subscribes to both topics before the run; ``report`` drains them after it, prints one
row per job (VM, status, exit code, how long it waited for its VM and how long it ran), and
exits non-zero if a job did not finish or a VM or per-job subscription is left behind.
"""

from __future__ import annotations

import os
import sys

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1, pubsub_v1
from rich.console import Console
from rich.table import Table

from airflow_batchvm.wire import JOB_TOPIC, STATUS_TOPIC, MalformedMessage, StatusMessage, parse_job

PROJECT = os.environ["BATCHVM_PROJECT"]
ZONE = os.environ["BATCHVM_ZONE"]
MONITORS = {JOB_TOPIC: "batchvm-demo-jobs", STATUS_TOPIC: "batchvm-demo-status"}


def prepare() -> None:
    subscriber = pubsub_v1.SubscriberClient()
    for topic, name in MONITORS.items():
        path = subscriber.subscription_path(PROJECT, name)
        try:
            subscriber.delete_subscription(subscription=path)
        except gexc.NotFound:
            pass
        subscriber.create_subscription(name=path, topic=f"projects/{PROJECT}/topics/{topic}")


def drain(subscriber: pubsub_v1.SubscriberClient, name: str) -> list:
    path = subscriber.subscription_path(PROJECT, name)
    messages = []
    while True:
        try:
            response = subscriber.pull(subscription=path, max_messages=1000, timeout=3)
        except gexc.DeadlineExceeded:
            break
        if not response.received_messages:
            break
        messages.extend(response.received_messages)
        subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
    subscriber.delete_subscription(subscription=path)
    return messages


def report() -> int:
    subscriber = pubsub_v1.SubscriberClient()
    published = {}
    for item in drain(subscriber, MONITORS[JOB_TOPIC]):
        try:
            published[parse_job(item.message.data).job_id] = item.message.publish_time
        except MalformedMessage:
            continue
    jobs: dict[str, dict] = {}
    for item in drain(subscriber, MONITORS[STATUS_TOPIC]):
        status = StatusMessage.from_pubsub(item.message.data)
        jobs.setdefault(status.job_id, {})[status.status.value] = status

    table = Table(title="Batch jobs of this run")
    for column in ("job", "VM", "zone", "status", "exit", "waited for VM", "ran"):
        table.add_column(column)
    failures = 0
    for job_id in sorted(jobs, key=lambda j: published.get(j) or jobs[j]["STARTED"].time):
        seen = jobs[job_id]
        final = seen.get("FINISHED") or seen.get("FAILED") or seen.get("PREEMPTED")
        started = seen.get("STARTED")
        failures += final is None or final.status.value != "FINISHED"
        waited = (started.time - published[job_id]).total_seconds() if started and job_id in published else None
        ran = (final.time - started.time).total_seconds() if final and started else None
        table.add_row(
            job_id,
            (final or started).vm_name,
            (final or started).zone,
            final.status.value if final else "no result",
            "" if not final or final.exit_code is None else str(final.exit_code),
            f"{waited:.1f} s" if waited is not None else "",
            f"{ran:.1f} s" if ran is not None else "",
        )
    console = Console(width=max(Console().width, 150))  # job ids and VM names whole, even in a log
    console.print(table)

    left = leftovers()
    if left:
        console.print(f"[red]Left behind: {', '.join(left)}[/red]")
    if not jobs:
        console.print("[red]No job reported any status.[/red]")
    return 1 if failures or left or not jobs else 0


def leftovers() -> list[str]:
    instances = compute_v1.InstancesClient(
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=os.environ["BATCHVM_COMPUTE_API_ENDPOINT"]),
    )
    vms = [i.name for i in instances.list(project=PROJECT, zone=ZONE) if i.name.startswith("bvm-")]
    subs = [
        s.name.rsplit("/", 1)[-1]
        for s in pubsub_v1.SubscriberClient().list_subscriptions(project=f"projects/{PROJECT}")
        if s.name.rsplit("/", 1)[-1].startswith(("batchvm-job-", "batchvm-status-"))
    ]
    return vms + subs


if __name__ == "__main__":
    if sys.argv[1:] == ["prepare"]:
        prepare()
    elif sys.argv[1:] == ["report"]:
        sys.exit(report())
    else:
        sys.exit("usage: demo_report.py prepare|report")
