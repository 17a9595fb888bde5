"""Garbage collection: VMs and per-job subscriptions that a crashed task left behind.

Tasks delete their VM and subscriptions themselves; this finds what a crash, a killed worker or a
lost triggerer left, by the provider's own marks, and deletes it:

- a VM labelled ``managed-by=airflow-batchvm`` that is powered off (``TERMINATED``, ``STOPPED``,
  ``SUSPENDED``) for at least ``grace_seconds``: its agent has finished and nobody deleted it;
- such a VM older than ``max_age_seconds`` (when given), whatever its state: a job that should have
  ended long ago;
- such a VM whose task is no longer running, when ``is_task_active`` (given its labels ``dag_id``,
  ``task_id``, ``run_id``, ``map_index``, ``try_number``) says so;
- a per-job subscription (``batchvm-job-JOB``, ``batchvm-status-JOB``) whose job has no VM left
  (VMs are found by their ``batchvm-job-id`` label, so replacement VMs count) and that is older
  than ``grace_seconds`` (by its ``batchvm-created`` label, epoch seconds). Pub/Sub keeps no
  creation time; a subscription without that label is of unknown age and is deleted only with
  ``grace_seconds=0`` (it also expires by itself after a day without readers).

A VM labelled ``batchvm-keep=true`` is never deleted. ``dry_run`` only reports.

    from airflow_batchvm.gc import collect_garbage
    report = collect_garbage(BatchVmHook(), "my-project", zones=None, dry_run=True)
    print(report.to_dict())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.cloud import compute_v1

    from airflow_batchvm.hooks.batchvm import BatchVmHook

MANAGED_BY_FILTER = 'labels.managed-by = "airflow-batchvm"'
JOB_ID_LABEL = "batchvm-job-id"
CREATED_LABEL = "batchvm-created"
KEEP_LABEL = "batchvm-keep"
SUBSCRIPTION_PREFIXES = ("batchvm-job-", "batchvm-status-")
POWERED_OFF = frozenset({"TERMINATED", "STOPPED", "SUSPENDED"})
DEFAULT_GRACE_SECONDS = 15 * 60
TASK_LABELS = ("dag_id", "task_id", "run_id", "map_index", "try_number")


@dataclass
class GcItem:
    kind: str  # "vm" or "subscription"
    name: str
    reason: str
    zone: str = ""
    job_id: str = ""
    deleted: bool = False
    error: str = ""


@dataclass
class GcReport:
    project_id: str
    dry_run: bool
    vms_seen: int = 0
    subscriptions_seen: int = 0
    garbage: list[GcItem] = field(default_factory=list)  # deleted, or would be on a dry run
    kept: list[GcItem] = field(default_factory=list)  # looked at and left alone, with why

    @property
    def deleted(self) -> list[GcItem]:
        return [item for item in self.garbage if item.deleted]

    @property
    def failed(self) -> list[GcItem]:
        return [item for item in self.garbage if item.error]

    def to_dict(self) -> dict[str, Any]:
        """Small and JSON-ready, for XCom."""
        return {
            "project_id": self.project_id,
            "dry_run": self.dry_run,
            "vms_seen": self.vms_seen,
            "subscriptions_seen": self.subscriptions_seen,
            "garbage": [asdict(item) for item in self.garbage],
            "kept": [asdict(item) for item in self.kept],
        }


def collect_garbage(
    hook: BatchVmHook,
    project_id: str,
    zones: Sequence[str] | None = None,
    dry_run: bool = False,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    max_age_seconds: float | None = None,
    is_task_active: Callable[[dict[str, str]], bool | None] | None = None,
    now: float | None = None,
    on_item: Callable[[GcItem], None] | None = None,
) -> GcReport:
    """Find and (unless ``dry_run``) delete what no running task owns any more; see the module doc.

    :param zones: only VMs in these zones are candidates (default: every zone). A subscription's
        job counts as having a VM wherever that VM is.
    :param grace_seconds: how long a VM must have been off, and a subscription must exist, first.
    :param max_age_seconds: VMs older than this are deleted in any state (default: never on age).
    :param is_task_active: given a VM's labels, False if its task no longer runs (None: unknown).
    :param on_item: called with each piece of garbage after it is handled (for progress displays).
    """
    from airflow_batchvm.hooks.batchvm import API_RETRY

    now = time.time() if now is None else now
    report = GcReport(project_id=project_id, dry_run=dry_run)
    vms = list(_managed_vms(hook, project_id))
    report.vms_seen = len(vms)
    jobs_with_vm: set[str] = set()

    for zone, vm in vms:
        job_id = vm.labels.get(JOB_ID_LABEL, "") or _job_from_vm_name(vm.name)
        item = GcItem("vm", vm.name, "", zone=zone, job_id=job_id)
        if zones and zone not in zones:
            jobs_with_vm.add(job_id)
            continue
        item.reason = _vm_garbage_reason(vm, now, grace_seconds, max_age_seconds, is_task_active)
        if not item.reason:
            item.reason = _vm_keep_reason(vm)
            report.kept.append(item)
            jobs_with_vm.add(job_id)
            continue
        if not dry_run:
            try:
                hook.delete_vm(project_id=project_id, zone=zone, vm_name=vm.name, wait=False)
                item.deleted = True
            except Exception as exc:
                item.error = str(exc)
                jobs_with_vm.add(job_id)  # still there: keep its subscriptions
        report.garbage.append(item)
        if on_item:
            on_item(item)

    subscriptions = [
        s
        for s in hook.subscriber.list_subscriptions(
            request={"project": f"projects/{project_id}"}, retry=API_RETRY
        )
        if _short(s.name).startswith(SUBSCRIPTION_PREFIXES)
    ]
    report.subscriptions_seen = len(subscriptions)
    for subscription in subscriptions:
        name = _short(subscription.name)
        # The label, since a task's subscriptions (``batchvm-job-JOB-tI``) carry more than the job id.
        job_id = subscription.labels.get(JOB_ID_LABEL) or name.removeprefix("batchvm-job-").removeprefix("batchvm-status-")
        item = GcItem("subscription", name, "", job_id=job_id)
        if job_id in jobs_with_vm:
            item.reason = "its job's VM still exists"
            report.kept.append(item)
            continue
        created = _created(subscription.labels)
        if created is None and grace_seconds > 0:
            item.reason = (
                f"no VM, but its age is unknown (no {CREATED_LABEL} label): it expires after a day "
                "without readers, or a grace of 0 deletes it now"
            )
            report.kept.append(item)
            continue
        if created is not None and now - created < grace_seconds:
            item.reason = f"no VM, but created {_ago(now - created)} ago (grace {_ago(grace_seconds)})"
            report.kept.append(item)
            continue
        item.reason = "its job has no VM" + (f" (created {_ago(now - created)} ago)" if created else "")
        if not dry_run:
            try:
                hook.subscriber.delete_subscription(
                    request={"subscription": subscription.name}, retry=API_RETRY
                )
                item.deleted = True
            except Exception as exc:
                from google.api_core import exceptions as gexc

                if isinstance(exc, gexc.NotFound):
                    item.deleted = True  # gone meanwhile: its task cleaned up
                else:
                    item.error = str(exc)
        report.garbage.append(item)
        if on_item:
            on_item(item)
    return report


def _managed_vms(hook: BatchVmHook, project_id: str) -> Iterable[tuple[str, compute_v1.Instance]]:
    from airflow_batchvm.hooks.batchvm import API_RETRY

    pages = hook.instances.aggregated_list(
        request={"project": project_id, "filter": MANAGED_BY_FILTER}, retry=API_RETRY
    )
    for scope, scoped in pages:
        for vm in scoped.instances:
            yield scope.rsplit("/", 1)[-1], vm


def _vm_garbage_reason(
    vm: compute_v1.Instance,
    now: float,
    grace_seconds: float,
    max_age_seconds: float | None,
    is_task_active: Callable[[dict[str, str]], bool | None] | None,
) -> str:
    if vm.labels.get(KEEP_LABEL) == "true":
        return ""
    age = now - (_timestamp(vm.creation_timestamp) or now)
    if vm.status in POWERED_OFF:
        off_since = _timestamp(vm.last_stop_timestamp) or _timestamp(vm.creation_timestamp) or now
        if now - off_since >= grace_seconds:
            return f"powered off ({vm.status}) for {_ago(now - off_since)}"
    if max_age_seconds is not None and age > max_age_seconds:
        return f"{vm.status} for {_ago(age)}, older than {_ago(max_age_seconds)}"
    if is_task_active is not None:
        labels = {key: vm.labels[key] for key in TASK_LABELS if key in vm.labels}
        if labels and is_task_active(labels) is False:
            return "its task is no longer running"
    return ""


def _vm_keep_reason(vm: compute_v1.Instance) -> str:
    if vm.labels.get(KEEP_LABEL) == "true":
        return f"labelled {KEEP_LABEL}=true"
    if vm.status in POWERED_OFF:
        return f"{vm.status}, within the grace period"
    return vm.status


def _job_from_vm_name(name: str) -> str:
    job = name.removeprefix("bvm-")
    stem, sep, number = job.rpartition("-r")
    return stem if sep and number.isdigit() else job


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _created(labels: Any) -> float | None:
    value = dict(labels).get(CREATED_LABEL, "")
    return float(value) if value.isdigit() else None


def _timestamp(text: str) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{'' if seconds % size == 0 else ' ' + _ago(seconds % size)}"
    return f"{seconds}s"
