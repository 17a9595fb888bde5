"""The in-memory Compute Engine behind the stand-in's REST API: templates, instances, operations.

It is what ``compute.py`` serves over HTTP, kept free of HTTP so that its rules (naming, template
merging, idempotent ``requestId``, operation errors, test faults) read in one place.
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from typing import Any

from batchvm_local.faults import FaultError, Faults, Stats, boot_plan
from batchvm_local.filters import FilterError, compile_filter
from batchvm_local.resources import (
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_LABELS,
    MAX_METADATA_TOTAL_BYTES,
    MAX_METADATA_VALUE_BYTES,
    METADATA_KEY_PATTERN,
    NAME_PATTERN,
    Operation,
    already_exists,
    fingerprint,
    forbidden,
    invalid,
    new_id,
    not_found,
    now_rfc3339,
)
from batchvm_local.vm import Vm, VmConfig

MAX_RESULTS = 500
# Instance fields built from the template and the request field by field rather than replaced whole.
_MERGED_FIELDS = {"labels", "metadata", "scheduling", "machineType"}
# Output-only fields a client may echo back; the stand-in sets them itself.
_OUTPUT_ONLY = {
    "kind", "id", "status", "statusMessage", "selfLink", "creationTimestamp", "zone", "fingerprint",
    "labelFingerprint", "lastStartTimestamp", "lastStopTimestamp", "cpuPlatform", "startRestricted",
}  # fmt: skip
_TEMPLATE_REF = re.compile(
    r"^(?:.*/)?(?:projects/(?P<project>[^/]+)/)?global/instanceTemplates/(?P<name>[^/?]+)$"
)
_DEFAULT_SCHEDULING = {"automaticRestart": True, "onHostMaintenance": "MIGRATE", "preemptible": False}


class ComputeEngine:
    def __init__(self, base_url: str, config: VmConfig, wait_seconds: float = 60.0):
        self.base_url = base_url  # ends with /compute/v1/
        self.config = config
        self.wait_seconds = wait_seconds
        self.lock = threading.RLock()
        self.faults = Faults()
        self.stats = Stats()
        config.count = self.stats.count
        self._templates: dict[tuple[str, str], dict] = {}
        self._instances: dict[tuple[str, str, str], Vm] = {}
        self._operations: dict[tuple[str, str | None, str], Operation] = {}
        self._request_ids: dict[tuple[str, str], Operation] = {}

    # --- links ----------------------------------------------------------------------------

    def link(self, path: str) -> str:
        return f"{self.base_url}{path}"

    # --- instances ------------------------------------------------------------------------

    def insert_instance(
        self,
        project: str,
        zone: str,
        body: dict,
        source_template: str | None = None,
        request_id: str | None = None,
    ) -> dict:
        """``instances.insert``: a zonal operation, DONE once the VM is STAGING (or failed)."""
        if (op := self._replay(project, request_id)) is not None:
            return op.to_json()
        name = body.get("name") or ""
        _check_name(name, "resource.name")
        template = self._template_for(project, source_template) if source_template else None
        resource = self._new_instance(project, zone, body, template)
        path = f"projects/{project}/zones/{zone}/instances/{name}"
        with self.lock:
            if (op := self._replay(project, request_id)) is not None:
                return op.to_json()
            if (project, zone, name) in self._instances:
                raise already_exists(path)
            faults = self.faults.take(zone)
            if any(f.kind == "permission-denied" for f in faults):
                raise forbidden("compute.instances.create", path)
            op = self._new_operation(project, zone, "insert", path, resource["id"], request_id)
            capacity = next((f for f in faults if f.kind in ("zone-exhausted", "quota-exceeded")), None)
            if capacity is not None:
                self._fail_later(op, project, zone, capacity.kind, capacity.code)
                return op.to_json()
            vm = Vm(
                project=project,
                zone=zone,
                resource=resource,
                lock=self.lock,
                config=self.config,
                plan=boot_plan(faults),
                insert_op=op,
                remove=self._remove,
            )
            self._instances[(project, zone, name)] = vm
            vm.start()
            return op.to_json()

    def get_instance(self, project: str, zone: str, name: str) -> dict:
        return self._vm(project, zone, name).to_json()

    def list_instances(
        self, project: str, zone: str, filter: str | None, max_results: int | None, page_token: str | None
    ) -> dict:
        with self.lock:
            vms = [vm for (p, z, _), vm in self._instances.items() if (p, z) == (project, zone)]
        items = self._filtered(vms, filter)
        scope = f"projects/{project}/zones/{zone}/instances"
        return _page(items, max_results, page_token) | {
            "kind": "compute#instanceList",
            "id": scope,
            "selfLink": self.link(scope),
        }

    def aggregated_instances(self, project: str, filter: str | None) -> dict:
        with self.lock:
            vms = [vm for (p, _, _), vm in self._instances.items() if p == project]
        by_zone: dict[str, dict] = {}
        for item in self._filtered(vms, filter):
            zone = item["zone"].rsplit("/", 1)[-1]
            by_zone.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(item)
        scope = f"projects/{project}/aggregated/instances"
        return {
            "kind": "compute#instanceAggregatedList",
            "id": scope,
            "items": by_zone,
            "selfLink": self.link(scope),
        }

    def delete_instance(self, project: str, zone: str, name: str, request_id: str | None = None) -> dict:
        """``instances.delete``: the VM's processes are killed; the operation is DONE once it is gone."""
        if (op := self._replay(project, request_id)) is not None:
            return op.to_json()
        vm = self._vm(project, zone, name)
        op = Operation(
            base_url=self.base_url,
            project=project,
            zone=zone,
            operation_type="delete",
            target_link=self.link(f"projects/{project}/zones/{zone}/instances/{name}"),
            target_id=vm.to_json()["id"],
            request_id=request_id,
        )
        result = vm.delete(op)  # the operation of an earlier delete, if one is under way
        self._register(result, request_id)
        return result.to_json()

    def serial_port_output(self, project: str, zone: str, name: str, port: int, start: int) -> dict:
        vm = self._vm(project, zone, name)
        if not 1 <= port <= 4:
            raise invalid(f"Invalid value for field 'port': '{port}'. Must be between 1 and 4.")
        output = vm.serial_output(start) if port == 1 else {"contents": "", "start": "0", "next": "0"}
        return output | {
            "kind": "compute#serialPortOutput",
            "selfLink": self.link(f"projects/{project}/zones/{zone}/instances/{name}/serialPort"),
        }

    # --- operations -----------------------------------------------------------------------

    def get_operation(self, project: str, zone: str | None, name: str) -> dict:
        return self._operation(project, zone, name).to_json()

    def wait_operation(self, project: str, zone: str | None, name: str) -> dict:
        """``operations.wait``: returns when the operation is DONE, or after ``wait_seconds`` as it stands."""
        op = self._operation(project, zone, name)
        op.done.wait(self.wait_seconds)
        return op.to_json()

    def list_operations(
        self, project: str, zone: str | None, max_results: int | None, page_token: str | None
    ) -> dict:
        with self.lock:
            ops = [op.to_json() for (p, z, _), op in self._operations.items() if (p, z) == (project, zone)]
        scope = (
            f"projects/{project}/zones/{zone}/operations" if zone else f"projects/{project}/global/operations"
        )
        return _page(ops, max_results, page_token) | {
            "kind": "compute#operationList",
            "id": scope,
            "selfLink": self.link(scope),
        }

    # --- instance templates ---------------------------------------------------------------

    def insert_template(self, project: str, body: dict, request_id: str | None = None) -> dict:
        if (op := self._replay(project, request_id)) is not None:
            return op.to_json()
        name = body.get("name") or ""
        _check_name(name, "resource.name")
        properties = copy.deepcopy(body.get("properties") or {})
        _check_labels(properties.get("labels") or {}, "resource.properties.labels")
        _check_metadata((properties.get("metadata") or {}).get("items") or [], "resource.properties.metadata")
        path = f"projects/{project}/global/instanceTemplates/{name}"
        template = {
            "kind": "compute#instanceTemplate",
            "id": new_id(),
            "creationTimestamp": now_rfc3339(),
            "name": name,
            "description": body.get("description", ""),
            "properties": properties,
            "selfLink": self.link(path),
        }
        with self.lock:
            if (op := self._replay(project, request_id)) is not None:
                return op.to_json()
            if (project, name) in self._templates:
                raise already_exists(path)
            self._templates[(project, name)] = template
            op = self._new_operation(project, None, "insert", path, template["id"], request_id)
        op.finish()
        return op.to_json()

    def get_template(self, project: str, name: str) -> dict:
        with self.lock:
            template = self._templates.get((project, name))
            if template is None:
                raise not_found(f"projects/{project}/global/instanceTemplates/{name}")
            return copy.deepcopy(template)

    def list_templates(self, project: str, max_results: int | None, page_token: str | None) -> dict:
        with self.lock:
            items = [copy.deepcopy(t) for (p, _), t in sorted(self._templates.items()) if p == project]
        scope = f"projects/{project}/global/instanceTemplates"
        return _page(items, max_results, page_token) | {
            "kind": "compute#instanceTemplateList",
            "id": scope,
            "selfLink": self.link(scope),
        }

    def delete_template(self, project: str, name: str, request_id: str | None = None) -> dict:
        if (op := self._replay(project, request_id)) is not None:
            return op.to_json()
        path = f"projects/{project}/global/instanceTemplates/{name}"
        with self.lock:
            template = self._templates.pop((project, name), None)
            if template is None:
                raise not_found(path)
            op = self._new_operation(project, None, "delete", path, template["id"], request_id)
        op.finish()
        return op.to_json()

    # --- test-only knobs (served under /_local/) ------------------------------------------

    def preempt(self, project: str, zone: str, name: str, grace_seconds: float, sigterm: bool) -> dict:
        vm = self._vm(project, zone, name)
        vm.preempt(grace_seconds, sigterm)
        return vm.local_info()

    def kill(self, project: str, zone: str, name: str) -> dict:
        vm = self._vm(project, zone, name)
        return vm.local_info() | {"killed": vm.kill()}

    def arm_fault(self, body: dict) -> dict:
        try:
            return self.faults.arm(body).to_json()
        except FaultError as exc:
            raise invalid(str(exc)) from None

    def vms(self) -> list[dict]:
        with self.lock:
            vms = list(self._instances.values())
        return [vm.local_info() for vm in vms]

    def reset(self, delete_instances: bool = False) -> dict:
        """Clear faults and counters; with ``delete_instances`` also delete every VM (and wait for it)."""
        self.faults.clear()
        self.stats.clear()
        deleted = 0
        if delete_instances:
            with self.lock:
                vms = list(self._instances.values())
            ops = []
            for vm in vms:
                op = Operation(
                    base_url=self.base_url,
                    project=vm.project,
                    zone=vm.zone,
                    operation_type="delete",
                    target_link=self.link(f"projects/{vm.project}/zones/{vm.zone}/instances/{vm.name}"),
                    target_id=vm.to_json()["id"],
                )
                ops.append(vm.delete(op))
            for op in ops:
                op.done.wait(30)
            deleted = len(vms)
        return {"faults": [], "deletedInstances": deleted}

    def shutdown(self) -> None:
        """Kill every VM (process trees included) and stop their metadata servers."""
        with self.lock:
            vms = list(self._instances.values())
            self._instances.clear()
        for vm in vms:
            vm.kill()
        threads = [threading.Thread(target=vm.shutdown) for vm in vms]
        threads += [threading.Thread(target=vm.metadata.stop) for vm in vms]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=15)

    # --- internals ------------------------------------------------------------------------

    def _vm(self, project: str, zone: str, name: str) -> Vm:
        with self.lock:
            vm = self._instances.get((project, zone, name))
        if vm is None:
            raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return vm

    def _remove(self, vm: Vm) -> None:
        with self.lock:
            if self._instances.get((vm.project, vm.zone, vm.name)) is vm:
                del self._instances[(vm.project, vm.zone, vm.name)]

    def _operation(self, project: str, zone: str | None, name: str) -> Operation:
        with self.lock:
            op = self._operations.get((project, zone, name))
        if op is None:
            scope = f"zones/{zone}" if zone else "global"
            raise not_found(f"projects/{project}/{scope}/operations/{name}")
        return op

    def _new_operation(
        self, project: str, zone: str | None, kind: str, path: str, target_id: str, request_id: str | None
    ) -> Operation:
        op = Operation(
            base_url=self.base_url,
            project=project,
            zone=zone,
            operation_type=kind,
            target_link=self.link(path),
            target_id=target_id,
            request_id=request_id,
        )
        self._register(op, request_id)
        return op

    def _register(self, op: Operation, request_id: str | None) -> None:
        with self.lock:
            self._operations[(op.project, op.zone, op.name)] = op
            if request_id:
                self._request_ids[(op.project, request_id)] = op

    def _replay(self, project: str, request_id: str | None) -> Operation | None:
        """The operation an earlier request with this ``requestId`` started: GCE runs a request once."""
        if not request_id:
            return None
        try:
            if uuid.UUID(request_id).int == 0:
                raise ValueError
        except ValueError:
            raise invalid(
                f"Invalid value for field 'requestId': '{request_id}'. "
                "The request ID must be a valid UUID with the exception that zero UUID is not supported."
            ) from None
        with self.lock:
            return self._request_ids.get((project, request_id))

    def _fail_later(self, op: Operation, project: str, zone: str, kind: str, code: str | None) -> None:
        """An insert that the zone refuses: the operation fails after a boot step, and no VM appears."""
        if kind == "zone-exhausted":
            error = {
                "code": code or "ZONE_RESOURCE_POOL_EXHAUSTED",
                "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources "
                "available to fulfill the request.  Try a different zone, or try again later.",
            }
            status, text = 503, "SERVICE UNAVAILABLE"
        else:
            region = zone.rsplit("-", 1)[0]
            error = {
                "code": code or "QUOTA_EXCEEDED",
                "message": f"Quota 'CPUS' exceeded.  Limit: 8.0 in region {region}.",
            }
            status, text = 403, "FORBIDDEN"
        timer = threading.Timer(
            self.config.boot_seconds,
            op.finish,
            kwargs={"errors": [error], "http_status": status, "http_message": text},
        )
        timer.daemon = True
        timer.start()

    def _template_for(self, project: str, ref: str) -> dict:
        match = _TEMPLATE_REF.match(ref)
        if not match:
            raise invalid(f"Invalid value for field 'sourceInstanceTemplate': '{ref}'. The URL is malformed.")
        return self.get_template(match.group("project") or project, match.group("name"))

    def _new_instance(self, project: str, zone: str, body: dict, template: dict | None) -> dict[str, Any]:
        """The Instance resource: template properties, overridden by the request (labels, metadata
        items and scheduling merged key by key, the request winning)."""
        props = copy.deepcopy(template["properties"]) if template else {}
        body = copy.deepcopy(body)
        resource: dict[str, Any] = {k: v for k, v in props.items() if k not in _MERGED_FIELDS}
        resource.update({k: v for k, v in body.items() if k not in _MERGED_FIELDS | _OUTPUT_ONLY})

        _check_labels(body.get("labels") or {}, "resource.labels")
        labels = {**(props.get("labels") or {}), **(body.get("labels") or {})}
        _check_labels(labels, "resource.labels")

        request_items = (body.get("metadata") or {}).get("items") or []
        _check_metadata(request_items, "resource.metadata")
        items = {i["key"]: i.get("value", "") for i in (props.get("metadata") or {}).get("items") or []}
        items.update({i["key"]: i.get("value", "") for i in request_items})
        metadata_items = [{"key": k, "value": v} for k, v in items.items()]
        _check_metadata(metadata_items, "resource.metadata")

        machine_type = body.get("machineType") or props.get("machineType")
        if not machine_type:
            raise invalid(
                "Invalid value for field 'resource.machineType': ''. Machine type must be specified."
            )
        machine_type = machine_type.rsplit("/", 1)[-1]

        name = body["name"]
        path = f"projects/{project}/zones/{zone}/instances/{name}"
        resource.update(
            kind="compute#instance",
            id=new_id(),
            creationTimestamp=now_rfc3339(),
            name=name,
            zone=self.link(f"projects/{project}/zones/{zone}"),
            machineType=self.link(f"projects/{project}/zones/{zone}/machineTypes/{machine_type}"),
            status="PROVISIONING",
            labels=labels,
            labelFingerprint=fingerprint(labels),
            metadata={
                "kind": "compute#metadata",
                "fingerprint": fingerprint(metadata_items),
                "items": metadata_items,
            },
            scheduling=_DEFAULT_SCHEDULING | (props.get("scheduling") or {}) | (body.get("scheduling") or {}),
            cpuPlatform="Unknown CPU Platform",
            startRestricted=False,
            deletionProtection=bool(resource.get("deletionProtection", False)),
            selfLink=self.link(path),
        )
        resource["fingerprint"] = fingerprint(resource)
        return resource

    def _filtered(self, vms: list[Vm], filter: str | None) -> list[dict]:
        try:
            predicate = compile_filter(filter)
        except FilterError as exc:
            raise invalid(f"Invalid value for field 'filter': '{filter}'. {exc}") from None
        return sorted((r for r in (vm.to_json() for vm in vms) if predicate(r)), key=lambda r: r["name"])


def _check_name(name: str, field: str) -> None:
    if not re.match(NAME_PATTERN, name):
        raise invalid(
            f"Invalid value for field '{field}': '{name}'. "
            "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?|[1-9][0-9]{0,19})'"
        )


def _check_labels(labels: dict, field: str) -> None:
    if len(labels) > MAX_LABELS:
        raise invalid(f"Invalid value for field '{field}': too many labels ({len(labels)} > {MAX_LABELS}).")
    for key, value in labels.items():
        if (
            not re.match(LABEL_KEY_PATTERN, key)
            or not isinstance(value, str)
            or not re.match(LABEL_VALUE_PATTERN, value)
        ):
            raise invalid(f"Invalid value for field '{field}': '{key}={value}'. Invalid label.")


def _check_metadata(items: list[dict], field: str) -> None:
    seen: set[str] = set()
    total = 0
    for item in items:
        key, value = item.get("key", ""), item.get("value", "") or ""
        if not re.match(METADATA_KEY_PATTERN, key):
            raise invalid(f"Invalid value for field '{field}.items[].key': '{key}'. Invalid metadata key.")
        if key in seen:
            raise invalid(f"Invalid value for field '{field}': duplicate metadata key '{key}'.")
        seen.add(key)
        size = len(value.encode())
        if size > MAX_METADATA_VALUE_BYTES:
            raise invalid(
                f"Invalid value for field '{field}': the value of '{key}' exceeds {MAX_METADATA_VALUE_BYTES} bytes."
            )
        total += size + len(key)
    if total > MAX_METADATA_TOTAL_BYTES:
        raise invalid(
            f"Invalid value for field '{field}': metadata exceeds {MAX_METADATA_TOTAL_BYTES} bytes."
        )


def _page(items: list[dict], max_results: int | None, page_token: str | None) -> dict:
    """One page of a list; the token is the offset of the next page."""
    size = min(max_results or MAX_RESULTS, MAX_RESULTS)
    try:
        offset = int(page_token or 0)
    except ValueError:
        raise invalid(f"Invalid value for field 'pageToken': '{page_token}'.") from None
    page: dict[str, Any] = {"items": items[offset : offset + size]}
    if offset + size < len(items):
        page["nextPageToken"] = str(offset + size)
    return page
