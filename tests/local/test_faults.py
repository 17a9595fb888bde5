"""The test-only fault knobs under /_local/, seen through the real client."""

from __future__ import annotations

import time
import urllib.error

import pytest
from google.api_core import exceptions
from google.cloud import compute_v1

from tests.local.conftest import OTHER_ZONE, PROJECT, ZONE, metadata_get, pid_alive, unique, wait_dead

DONE = compute_v1.Operation.Status.DONE


def test_preempt_sets_preempted_then_kills_after_grace(compute):
    name = unique()
    compute.insert(name, metadata={"test-escape": "true"})  # runs 30 s unless stopped
    console = compute.wait_serial(name, "fake agent up")
    escaped = int(console.split("escaped ", 1)[1].split()[0])
    info = compute.vm_info(name)

    started = time.monotonic()
    compute.knob(name, "preempt", {"graceSeconds": 0.6})
    assert metadata_get(info["metadataHost"], "instance/preempted")[2] == "TRUE"
    assert compute.get(name).status == "STOPPING"
    time.sleep(0.3)
    assert pid_alive(info["pid"]), "killed before the grace period was over"
    compute.wait_status(name, "TERMINATED")
    assert time.monotonic() - started >= 0.6
    assert wait_dead([info["pid"], escaped]) == []
    assert compute.vm_info(name)["preempted"] is True
    assert compute.get(name).last_stop_timestamp


def test_preempt_with_sigterm_lets_the_guest_stop_itself(compute):
    name = unique()
    compute.insert(name, metadata={"test-trap-term": "true"})
    compute.wait_serial(name, "fake agent up")
    started = time.monotonic()
    compute.knob(name, "preempt", {"graceSeconds": 20, "sigterm": True})
    compute.wait_status(name, "TERMINATED")
    assert time.monotonic() - started < 5  # it did not wait for the grace period
    console = compute.serial(name)
    assert "fake agent got SIGTERM" in console and "agent exited with code 0" in console


def test_preempt_of_a_spot_vm_with_delete_action_removes_it(compute):
    name = unique()
    compute.insert(
        name,
        scheduling=compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE"),
    )
    compute.wait_status(name, "RUNNING")
    compute.knob(name, "preempt", {"graceSeconds": 0})
    deadline = time.monotonic() + 5
    while True:
        try:
            compute.get(name)
        except exceptions.NotFound:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_hard_kill(compute):
    name = unique()
    compute.insert(name)
    compute.wait_serial(name, "fake agent up")
    pid = compute.vm_info(name)["pid"]
    assert compute.knob(name, "kill")["killed"] is True
    compute.wait_status(name, "TERMINATED", timeout=3)
    assert wait_dead([pid]) == []
    assert "fake agent done" not in compute.serial(name)
    assert compute.knob(name, "kill")["killed"] is False  # already off


def test_knobs_on_a_missing_or_stopped_vm(compute):
    with pytest.raises(urllib.error.HTTPError) as missing:
        compute.knob("never-was", "kill")
    assert missing.value.code == 404
    name = unique()
    compute.insert(name, metadata={"test-sleep": "0"})
    compute.wait_status(name, "TERMINATED")
    with pytest.raises(urllib.error.HTTPError) as stopped:
        compute.knob(name, "preempt", {"graceSeconds": 0})
    assert stopped.value.code == 400


def test_boot_failure(compute):
    compute.fault("boot-failure")
    name = unique()
    assert compute.wait(compute.insert(name)).status == DONE
    compute.wait_status(name, "TERMINATED")
    assert compute.get(name).last_start_timestamp  # it did reach RUNNING
    assert compute.vm_info(name)["pid"] is None
    assert "fake agent up" not in compute.serial(name)
    # the fault was for one insert only
    other = unique()
    compute.insert(other)
    compute.wait_serial(other, "fake agent up")


def test_stuck_in_provisioning(compute):
    compute.fault("stuck-provisioning")
    name = unique()
    op = compute.insert(name)
    time.sleep(0.5)
    assert compute.get(name).status == "PROVISIONING"
    assert compute.zone_ops.get(project=PROJECT, zone=ZONE, operation=op.name).status != DONE
    assert compute.delete(name).status == DONE


def test_boot_delay(compute):
    compute.fault("boot-delay", seconds=0.8)
    name = unique()
    started = time.monotonic()
    op = compute.insert(name)
    time.sleep(0.4)
    assert compute.get(name).status == "PROVISIONING"
    assert compute.wait(op).status == DONE
    assert time.monotonic() - started >= 0.8


@pytest.mark.parametrize(
    "fault, code, http_status",
    [("zone-exhausted", "ZONE_RESOURCE_POOL_EXHAUSTED", 503), ("quota-exceeded", "QUOTA_EXCEEDED", 403)],
)
def test_capacity_errors_fail_the_operation(compute, fault, code, http_status):
    compute.fault(fault, zone=ZONE)
    name = unique()
    op = compute.insert(name)  # accepted: the error comes with the operation, as on GCE
    done = compute.wait(op)
    assert done.status == DONE
    assert [e.code for e in done.error.errors] == [code]
    assert done.error.errors[0].message
    assert done.http_error_status_code == http_status
    with pytest.raises(exceptions.NotFound):
        compute.get(name)
    # the name is free and the fault is spent
    assert not compute.wait(compute.insert(name)).error.errors


def test_zone_exhausted_with_a_custom_code_only_in_its_zone(compute):
    compute.fault("zone-exhausted", zone=OTHER_ZONE, code="ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS")
    assert not compute.wait(compute.insert(unique())).error.errors  # another zone: unaffected
    name = unique()
    done = compute.wait(compute.insert(name, zone=OTHER_ZONE), zone=OTHER_ZONE)
    assert done.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"


def test_permission_denied(compute):
    compute.fault("permission-denied", count=2)
    for _ in range(2):
        with pytest.raises(exceptions.Forbidden) as denied:
            compute.insert(unique())
        assert denied.value.code == 403 and denied.value.errors[0]["reason"] == "forbidden"
    compute.insert(unique())


def test_persistent_fault_until_reset(compute):
    compute.fault("permission-denied", count=None)
    for _ in range(3):
        with pytest.raises(exceptions.Forbidden):
            compute.insert(unique())
    assert compute.local("GET", "/_local/faults")["faults"][0]["kind"] == "permission-denied"
    compute.local("POST", "/_local/reset", {})
    assert compute.local("GET", "/_local/faults")["faults"] == []
    compute.insert(unique())


def test_unknown_fault_is_refused(compute):
    with pytest.raises(urllib.error.HTTPError) as refused:
        compute.fault("meteor-strike")
    assert refused.value.code == 400


def test_stats_count_calls_by_method(compute):
    name = unique()
    op = compute.insert(name)
    compute.wait(op)
    compute.get(name)
    compute.get(name)
    list(compute.instances.list(project=PROJECT, zone=ZONE))
    compute.delete(name)
    stats = compute.local("GET", "/_local/stats")
    assert stats["calls"] == {
        "instances.insert": 1,
        "zoneOperations.wait": 2,
        "instances.get": 2,
        "instances.list": 1,
        "instances.delete": 1,
    } | ({"metadata.get": stats["calls"]["metadata.get"]} if "metadata.get" in stats["calls"] else {})
    assert stats["total"] == 7
    compute.local("POST", "/_local/reset", {})
    assert compute.local("GET", "/_local/stats") == {"calls": {}, "total": 0}
