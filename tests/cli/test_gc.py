"""``batchvm gc`` and ``collect_garbage``: what a crashed task left is found by its marks and deleted."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from airflow_batchvm.gc import collect_garbage
from airflow_batchvm.hooks.batchvm import BatchVmHook, JobNames
from airflow_batchvm.operators.batchvm import MAX_RUN_MARGIN_SECONDS
from tests.cli.conftest import TEMPLATE, ZONE, invoke
from tests.helpers import IMAGE

pytestmark = pytest.mark.integration


def test_gc_deletes_leftovers_after_their_grace_and_dry_run_deletes_nothing(worker_project):
    gcp = worker_project
    tag = uuid.uuid4().hex[:6]
    done, busy = f"gc-done-{tag}", f"gc-busy-{tag}"
    common = ["submit", "--project", gcp.project, "--zone", ZONE, "--template", TEMPLATE, "--image", IMAGE]
    invoke(*common, "--job-id", done, "--sleep-time", "0")  # no --wait: nobody cleans up after it
    invoke(*common, "--job-id", busy, "--sleep-time", "120", "--timeout-seconds", "300")
    gcp.wait_vm(f"bvm-{done}", "TERMINATED")
    gcp.wait_vm(f"bvm-{busy}", "RUNNING")
    # As the operator does: the VM's max run duration is the job's timeout plus a margin.
    busy_vm = gcp.instances.get(project=gcp.project, zone=ZONE, instance=f"bvm-{busy}")
    assert busy_vm.scheduling.max_run_duration.seconds == 300 + MAX_RUN_MARGIN_SECONDS
    assert busy_vm.scheduling.instance_termination_action == "DELETE"

    # Subscriptions whose job has no VM: a pair made by the hook (labelled with its creation time,
    # just now), one labelled two hours old, one labelled just now.
    hook = BatchVmHook()
    hook.create_job_subscriptions(JobNames(gcp.project, f"gc-orphan-{tag}"))
    for name, created in (
        (f"batchvm-status-gc-old-{tag}", time.time() - 7200),
        (f"batchvm-job-gc-new-{tag}", time.time()),
    ):
        gcp.subscriber.create_subscription(
            request={"name": gcp.subscription(name), "topic": gcp.topic("batch_jobs"),
                     "labels": {"batchvm-created": str(int(created))}}
        )  # fmt: skip
    everything = (gcp.vms(), gcp.job_subscriptions())
    assert len(everything[1]) == 2 + 2 + 2 + 1 + 1

    # Dry runs: the callable a DAG task would use, and the command.
    report = collect_garbage(hook, gcp.project, dry_run=True, grace_seconds=0)
    would = {(item.kind, item.name) for item in report.garbage}
    assert would == {
        ("vm", f"bvm-{done}"),
        ("subscription", f"batchvm-job-{done}"),
        ("subscription", f"batchvm-status-{done}"),
        ("subscription", f"batchvm-job-gc-orphan-{tag}"),
        ("subscription", f"batchvm-status-gc-orphan-{tag}"),
        ("subscription", f"batchvm-status-gc-old-{tag}"),
        ("subscription", f"batchvm-job-gc-new-{tag}"),
    }
    assert not any(item.deleted for item in report.garbage)
    assert {item.name for item in report.kept} == {
        f"bvm-{busy}",
        f"batchvm-job-{busy}",
        f"batchvm-status-{busy}",
    }
    json.dumps(report.to_dict())  # fit for XCom
    text = invoke("gc", "--project", gcp.project, "--dry-run", "--grace", "0").stdout
    assert text.count("would delete") == 7 + 1  # the rows and the summary line
    assert "powered off (TERMINATED)" in text
    assert (gcp.vms(), gcp.job_subscriptions()) == everything

    # The default grace (15 min) protects what may still be in use: only the 2 h old orphan goes.
    text = invoke("gc", "--project", gcp.project).stdout
    assert "TERMINATED, within the grace period" in text
    assert f"batchvm-job-gc-orphan-{tag}" in gcp.job_subscriptions()  # the hook's label: just made
    assert f"batchvm-status-gc-old-{tag}" not in gcp.job_subscriptions()
    assert len(gcp.job_subscriptions()) == len(everything[1]) - 1
    assert gcp.vms() == {f"bvm-{done}": "TERMINATED", f"bvm-{busy}": "RUNNING"}

    # No grace: the powered-off VM, its subscriptions and every orphan; the running job stays.
    invoke("gc", "--project", gcp.project, "--grace", "0")
    gcp.wait_no_vm(f"bvm-{done}")
    assert gcp.vms() == {f"bvm-{busy}": "RUNNING"}
    assert gcp.job_subscriptions() == [f"batchvm-job-{busy}", f"batchvm-status-{busy}"]

    # A VM older than --older-than goes whatever its state, and its subscriptions with it.
    text = invoke("gc", "--project", gcp.project, "--grace", "0", "--older-than", "1s", "--json").stdout
    assert {(i["kind"], i["name"], i["deleted"]) for i in json.loads(text)["garbage"]} == {
        ("vm", f"bvm-{busy}", True),
        ("subscription", f"batchvm-job-{busy}", True),
        ("subscription", f"batchvm-status-{busy}", True),
    }
    gcp.wait_no_vm(f"bvm-{busy}")
    assert gcp.job_subscriptions() == []


def test_gc_keeps_a_vm_labelled_keep(worker_project):
    gcp = worker_project
    job = f"gc-keep-{uuid.uuid4().hex[:6]}"
    invoke("submit", "--project", gcp.project, "--zone", ZONE, "--template", TEMPLATE, "--image", IMAGE,
           "--job-id", job, "--sleep-time", "0", "--label", "batchvm-keep=true")  # fmt: skip
    gcp.wait_vm(f"bvm-{job}", "TERMINATED")
    text = invoke("gc", "--project", gcp.project, "--grace", "0").stdout
    assert "labelled batchvm-keep=true" in text
    assert f"bvm-{job}" in gcp.vms()
    # Clean up as a user would: the VM by hand, then gc for the subscriptions.
    BatchVmHook().delete_vm(project_id=gcp.project, zone=ZONE, vm_name=f"bvm-{job}")
    invoke("gc", "--project", gcp.project, "--grace", "0")
    assert gcp.job_subscriptions() == []
