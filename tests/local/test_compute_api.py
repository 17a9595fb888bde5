"""The Compute stand-in through the real google-cloud-compute client (REST transport)."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from google.api_core import exceptions
from google.cloud import compute_v1

from tests.local.conftest import (
    OTHER_ZONE,
    PROJECT,
    TEMPLATE,
    ZONE,
    StandIn,
    pid_alive,
    start_standin,
    stop_standin,
    unique,
    wait_dead,
)

DONE = compute_v1.Operation.Status.DONE


def test_template_insert_get_list_delete(compute):
    name = unique("t")
    op = compute.templates.insert_unary(
        project=PROJECT,
        instance_template_resource=compute_v1.InstanceTemplate(
            name=name,
            properties=compute_v1.InstanceProperties(
                machine_type="n2-standard-4",
                labels={"a": "1"},
                metadata=compute_v1.Metadata(items=[compute_v1.Items(key="k", value="v")]),
            ),
        ),
    )
    assert op.operation_type == "insert"
    assert compute.global_ops.wait(project=PROJECT, operation=op.name).status == DONE

    template = compute.templates.get(project=PROJECT, instance_template=name)
    assert template.name == name
    assert template.properties.machine_type == "n2-standard-4"
    assert template.properties.labels == {"a": "1"}
    assert [(i.key, i.value) for i in template.properties.metadata.items] == [("k", "v")]
    assert template.self_link.endswith(f"/projects/{PROJECT}/global/instanceTemplates/{name}")
    assert name in [t.name for t in compute.templates.list(project=PROJECT)]

    with pytest.raises(exceptions.Conflict):
        compute.templates.insert_unary(
            project=PROJECT, instance_template_resource=compute_v1.InstanceTemplate(name=name)
        )
    compute.global_ops.wait(
        project=PROJECT,
        operation=compute.templates.delete_unary(project=PROJECT, instance_template=name).name,
    )
    with pytest.raises(exceptions.NotFound):
        compute.templates.get(project=PROJECT, instance_template=name)
    with pytest.raises(exceptions.NotFound):
        compute.templates.delete_unary(project=PROJECT, instance_template=name)


@pytest.mark.parametrize(
    "ref",
    [
        f"global/instanceTemplates/{TEMPLATE}",
        f"projects/{PROJECT}/global/instanceTemplates/{TEMPLATE}",
        f"https://compute.example/compute/v1/projects/{PROJECT}/global/instanceTemplates/{TEMPLATE}",
    ],
)
def test_insert_from_template_merges_metadata_labels_and_scheduling(compute, ref):
    name = unique()
    request = compute_v1.InsertInstanceRequest(
        project=PROJECT,
        zone=ZONE,
        source_instance_template=ref,
        instance_resource=compute_v1.Instance(
            name=name,
            labels={"batchvm-job-id": "j1", "team": "request"},
            metadata=compute_v1.Metadata(
                items=[
                    compute_v1.Items(key="batchvm-job-id", value="j1"),
                    compute_v1.Items(key="test-sleep", value="0.2"),  # overrides the template's 30
                ]
            ),
            scheduling=compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="STOP"),
        ),
    )
    op = compute.instances.insert_unary(request=request)
    assert op.operation_type == "insert" and op.target_link.endswith(f"/zones/{ZONE}/instances/{name}")

    instance = compute.get(name)
    assert instance.labels == {"managed-by": "airflow-batchvm", "team": "request", "batchvm-job-id": "j1"}
    assert {i.key: i.value for i in instance.metadata.items} == {
        "batchvm-container-cli": "podman",
        "test-sleep": "0.2",
        "batchvm-job-id": "j1",
    }
    assert [i.key for i in instance.metadata.items].count("test-sleep") == 1
    assert instance.machine_type.endswith(f"/projects/{PROJECT}/zones/{ZONE}/machineTypes/e2-small")
    assert instance.zone.endswith(f"/projects/{PROJECT}/zones/{ZONE}")
    assert instance.self_link.endswith(f"/projects/{PROJECT}/zones/{ZONE}/instances/{name}")
    assert instance.scheduling.on_host_maintenance == "TERMINATE"  # from the template
    assert instance.scheduling.automatic_restart is False
    assert instance.scheduling.provisioning_model == "SPOT"  # from the request
    assert instance.id > 0 and instance.creation_timestamp


def test_insert_without_template_needs_a_machine_type(compute):
    with pytest.raises(exceptions.BadRequest, match="machineType"):
        compute.insert(unique(), template=None)
    op = compute.insert(
        unique(),
        template=None,
        machine_type=f"zones/{ZONE}/machineTypes/e2-micro",
        metadata={"test-sleep": "0"},
    )
    assert compute.wait(op).status == DONE


def test_lifecycle_runs_the_agent_then_terminates(compute):
    name = unique()
    started = time.monotonic()
    op = compute.insert(name, metadata={"test-sleep": "0.4"})
    assert op.status == compute_v1.Operation.Status.RUNNING
    done = compute.wait(op)
    assert done.status == DONE and not done.error.errors
    assert compute.get(name).status in ("STAGING", "RUNNING")  # the insert is DONE at STAGING, as on GCE

    compute.wait_status(name, "RUNNING")
    info = compute.vm_info(name)
    assert info["pid"] and pid_alive(info["pid"])
    compute.wait_status(name, "TERMINATED")
    assert time.monotonic() - started >= 0.4

    instance = compute.get(name)
    assert instance.last_start_timestamp and instance.last_stop_timestamp
    assert instance.last_stop_timestamp > instance.last_start_timestamp
    assert not pid_alive(info["pid"])
    console = compute.serial(name)
    assert "fake agent up" in console and "fake agent done" in console
    assert "agent exited with code 0" in console


def test_every_status_is_visible_in_order(tmp_path):
    """With slow boot steps, a poller sees each state of the lifecycle, in GCE's order."""
    process, url = start_standin(tmp_path, "--boot-seconds", "0.3")
    try:
        slow = StandIn(url, process, tmp_path)
        name = unique()
        request = compute_v1.InsertInstanceRequest(
            project=PROJECT,
            zone=ZONE,
            instance_resource=compute_v1.Instance(
                name=name,
                machine_type="e2-small",
                metadata=compute_v1.Metadata(items=[compute_v1.Items(key="test-sleep", value="0.3")]),
            ),
        )
        op = slow.instances.insert_unary(request=request)
        seen = slow.wait_status(name, "TERMINATED")
        assert seen == ["PROVISIONING", "STAGING", "RUNNING", "STOPPING", "TERMINATED"]
        assert slow.zone_ops.get(project=PROJECT, zone=ZONE, operation=op.name).status == DONE
    finally:
        stop_standin(process)


def test_agent_exit_code_reaches_the_console(compute):
    name = unique()
    compute.insert(name, metadata={"test-sleep": "0", "test-exit-code": "3"})
    compute.wait_status(name, "TERMINATED")
    assert "agent exited with code 3" in compute.serial(name)


def test_serial_port_output_pages_with_start(compute):
    name = unique()
    compute.insert(name, metadata={"test-sleep": "0"})
    compute.wait_status(name, "TERMINATED")
    whole = compute.instances.get_serial_port_output(project=PROJECT, zone=ZONE, instance=name)
    assert whole.start == 0 and whole.next_ == len(whole.contents.encode())
    rest = compute.instances.get_serial_port_output(
        request=compute_v1.GetSerialPortOutputInstanceRequest(
            project=PROJECT, zone=ZONE, instance=name, start=10
        )
    )
    assert rest.start == 10 and rest.next_ == whole.next_
    assert rest.contents == whole.contents.encode()[10:].decode()


def test_delete_kills_the_whole_process_tree(compute):
    name = unique()
    compute.insert(name, metadata={"test-escape": "true"})
    console = compute.wait_serial(name, "fake agent up")
    escaped = int(console.split("escaped ", 1)[1].split()[0])
    vm_pid = compute.vm_info(name)["pid"]
    assert pid_alive(vm_pid) and pid_alive(escaped)
    assert os.getpgid(escaped) != vm_pid  # it left the VM's process group, as conmon does

    op = compute.delete(name)
    assert op.status == DONE and op.operation_type == "delete"
    assert wait_dead([vm_pid, escaped]) == []
    with pytest.raises(exceptions.NotFound):
        compute.get(name)
    with pytest.raises(exceptions.NotFound):
        compute.instances.delete_unary(project=PROJECT, zone=ZONE, instance=name)
    # the name is free again
    assert compute.wait(compute.insert(name, metadata={"test-sleep": "0"})).status == DONE


def test_delete_while_provisioning(compute):
    compute.fault("boot-delay", seconds=5)
    name = unique()
    compute.insert(name)
    assert compute.get(name).status == "PROVISIONING"
    assert compute.delete(name).status == DONE
    with pytest.raises(exceptions.NotFound):
        compute.get(name)


def test_errors_map_to_api_core_exceptions(compute):
    name = unique()
    compute.insert(name)
    with pytest.raises(exceptions.Conflict) as conflict:
        compute.insert(name)
    assert conflict.value.code == 409
    assert conflict.value.errors[0]["reason"] == "alreadyExists"
    assert f"projects/{PROJECT}/zones/{ZONE}/instances/{name}" in conflict.value.message

    with pytest.raises(exceptions.NotFound) as missing:
        compute.insert(unique(), template="no-such-template")
    assert missing.value.errors[0]["reason"] == "notFound"

    for bad in ["Upper", "1starts-with-digit", "ends-with-", "a" * 64, "under_score"]:
        with pytest.raises(exceptions.BadRequest) as invalid:
            compute.insert(bad)
        assert invalid.value.errors[0]["reason"] == "invalid"

    with pytest.raises(exceptions.BadRequest, match="label"):
        compute.insert(unique(), labels={"Bad": "x"})
    with pytest.raises(exceptions.NotFound):
        compute.get("never-was")
    with pytest.raises(exceptions.NotFound):
        compute.zone_ops.get(project=PROJECT, zone=ZONE, operation="operation-0-none")


def test_same_request_id_runs_once(compute):
    name, request_id = unique(), str(uuid.uuid4())
    first = compute.insert(name, request_id=request_id)
    second = compute.insert(name, request_id=request_id)  # a retry: no 409, the same operation
    assert first.name == second.name
    assert first.client_operation_id == request_id
    assert [i.name for i in compute.instances.list(project=PROJECT, zone=ZONE) if i.name == name] == [name]
    with pytest.raises(exceptions.BadRequest, match="requestId"):
        compute.insert(unique(), request_id="not-a-uuid")

    delete_id = str(uuid.uuid4())
    d1 = compute.instances.delete_unary(
        request=compute_v1.DeleteInstanceRequest(
            project=PROJECT, zone=ZONE, instance=name, request_id=delete_id
        )
    )
    d2 = compute.instances.delete_unary(
        request=compute_v1.DeleteInstanceRequest(
            project=PROJECT, zone=ZONE, instance=name, request_id=delete_id
        )
    )
    assert d1.name == d2.name


def test_list_filters(compute):
    a, b, c = unique("a"), unique("b"), unique("c")
    job = uuid.uuid4().hex[:8]
    compute.insert(a, labels={"batchvm-job-id": job, "try_number": "1"}, metadata={"test-sleep": "0"})
    compute.insert(b, labels={"batchvm-job-id": job, "try_number": "2"})
    compute.insert(c, labels={"batchvm-job-id": "other"})
    compute.wait_status(a, "TERMINATED")
    compute.wait_status(b, "RUNNING")

    def names(flt: str, zone: str = ZONE) -> list[str]:
        request = compute_v1.ListInstancesRequest(project=PROJECT, zone=zone, filter=flt)
        return sorted(i.name for i in compute.instances.list(request=request))

    assert names(f'labels.batchvm-job-id = "{job}"') == [a, b]
    assert names(f"labels.batchvm-job-id={job}") == [a, b]
    assert names(f'labels.batchvm-job-id = "{job}" AND labels.try_number = "2"') == [b]
    assert names(f'(labels.batchvm-job-id = "{job}") (labels.try_number = "1")') == [a]
    assert names(f'labels.batchvm-job-id = "{job}" status = RUNNING') == [b]
    assert names(f'labels.batchvm-job-id = "{job}" AND status = "TERMINATED"') == [a]
    assert names(f'labels.batchvm-job-id != "{job}" labels.managed-by = airflow-batchvm') == [c]
    assert names("labels.managed-by:*") == sorted([a, b, c])
    assert names(f"name eq '{a[:2]}.*'") == [a]
    assert names("", zone=OTHER_ZONE) == []
    with pytest.raises(exceptions.BadRequest):
        names("status = RUNNING OR status = STAGING")

    aggregated = compute.instances.aggregated_list(
        request=compute_v1.AggregatedListInstancesRequest(
            project=PROJECT, filter=f'labels.batchvm-job-id = "{job}"'
        )
    )
    found = {
        zone: sorted(i.name for i in scoped.instances) for zone, scoped in aggregated if scoped.instances
    }
    assert found == {f"zones/{ZONE}": [a, b]}


def test_list_pages(compute):
    names = [unique("p") for _ in range(5)]
    for name in names:
        compute.insert(name, labels={"page": "yes"})
    request = compute_v1.ListInstancesRequest(
        project=PROJECT, zone=ZONE, filter="labels.page=yes", max_results=2
    )
    pager = compute.instances.list(request=request)
    assert sorted(i.name for i in pager) == sorted(names)  # the pager followed nextPageToken
    assert compute.local("GET", "/_local/stats")["calls"]["instances.list"] == 3


def test_operations_get_and_wait(compute):
    name = unique()
    op = compute.insert(name)
    fetched = compute.zone_ops.get(project=PROJECT, zone=ZONE, operation=op.name)
    assert fetched.name == op.name and fetched.target_id == compute.get(name).id
    assert fetched.zone.endswith(f"/zones/{ZONE}")
    done = compute.wait(op)
    assert done.status == DONE and done.progress == 100 and done.end_time
    assert op.name in [o.name for o in compute.zone_ops.list(project=PROJECT, zone=ZONE)]


def test_power_off_takes_everything_the_guest_left_running(compute):
    name = unique()
    compute.insert(name, metadata={"test-escape": "true", "test-sleep": "0.2"})
    console = compute.wait_serial(name, "fake agent up")
    escaped = int(console.split("escaped ", 1)[1].split()[0])
    compute.wait_status(name, "TERMINATED")
    assert wait_dead([escaped]) == []
