"""Submitting a batch job: validate it, subscribe, publish it, and create the one VM that runs it."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pydantic import ValidationError

from airflow_batchvm.hooks.batchvm import (
    INSERT_TIMEOUT_SECONDS,
    STOCKOUT_REASONS,
    VM_ALIVE_STATES,
    BatchVmHook,
    JobNames,
    VmInsertError,
    vm_attempt_of,
)
from airflow_batchvm.links.batchvm import BatchVmInstanceLink, BatchVmLogsLink
from airflow_batchvm.sensors.batchvm import (
    BatchVmJobFailed,
    JobWaitMixin,
    OnFinishAction,
    _failure_message,
    _first_event,
    job_result,
)
from airflow_batchvm.timeline import log_step, log_timeline
from airflow_batchvm.triggers.batchvm import VM_LOST, BatchVmTasksTrigger
from airflow_batchvm.wire import VM_NAME_PATTERN, JobSpec, Status

if TYPE_CHECKING:
    from airflow.sdk import Context

MANAGED_BY = {"managed-by": "airflow-batchvm"}
# VM metadata a DAG may not set: the job binding, and the template's image allowlist (so that a
# job cannot widen what its own VM may run).
RESERVED_METADATA = frozenset(
    {"batchvm-job-id", "batchvm-attempt", "batchvm-job-subscription", "batchvm-status-topic", "batchvm-image-allowlist"}
)
# A VM's max run duration is the job's timeout plus this: time to boot, pull the image and report.
MAX_RUN_MARGIN_SECONDS = 1800


class JobSpecError(AirflowFailException):
    """A job spec that can never run: refused before anything is created, and not retried."""


class BatchVmSubmitJobOperator(BaseOperator):
    """Publishes a job to ``batch_jobs`` and creates the single VM that runs it; returns at once.

    Pair it with ``BatchVmJobSensor``, or use ``BatchVmRunJobOperator`` to submit and wait in one
    task. Pushes ``job_id``, ``vm_name``, ``zone`` and ``attempt`` to XCom.

    :param image: the container image to run.
    :param instance_template: the instance template the VM is created from (name or path).
    :param zone: the zone to create the VM in.
    :param command: overrides the image's entrypoint.
    :param args: arguments to the command.
    :param env: environment variables for the container (strings only).
    :param payload: JSON handed to the container as ``JOB_DATA`` (at most 64 KiB serialized).
    :param timeout_seconds: the agent kills the container after this long.
    :param job_id: defaults to one derived from the task, the run and the map index.
    :param labels: Compute Engine labels added to the job and its VM.
    :param machine_type: overrides the template's machine type.
    :param fallback_zones: zones to try in turn when ``zone`` has no capacity (a stockout).
    :param spot: run on a Spot VM (cheaper, may be preempted; pair with ``max_vm_attempts``).
    :param startup_timeout_seconds: how long the job may take to report STARTED after submission
        (and Compute Engine to accept its VM).
    :param project_id: defaults to the connection's project.
    :param vm_metadata: extra VM metadata (configuration only, never job data).
    """

    template_fields: Sequence[str] = (
        "image",
        "command",
        "args",
        "env",
        "payload",
        "timeout_seconds",
        "job_id",
        "labels",
        "instance_template",
        "zone",
        "machine_type",
        "fallback_zones",
        "project_id",
        "impersonation_chain",
    )
    template_fields_renderers = {"payload": "json", "env": "json"}
    operator_extra_links = (BatchVmInstanceLink(), BatchVmLogsLink())
    ui_color = "#c6e2ff"
    # Submitting alone is for single-task jobs: the later VMs of a multi-task job are created as
    # earlier ones finish, which only BatchVmRunJobOperator (which also waits) can do.
    task_count: int | str = 1

    def __init__(
        self,
        *,
        image: str,
        instance_template: str,
        zone: str,
        command: list[str] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        payload: Any = None,
        timeout_seconds: int | None = None,
        job_id: str | None = None,
        labels: dict[str, str] | None = None,
        machine_type: str | None = None,
        fallback_zones: list[str] | None = None,
        spot: bool = False,
        startup_timeout_seconds: float = 900.0,
        project_id: str | None = None,
        vm_metadata: dict[str, str] | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        compute_api_endpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.submitted: JobNames | None = None
        self.submitted_vm: tuple[str, str] | None = None
        self.image = image
        self.instance_template = instance_template
        self.zone = zone
        self.command = command
        self.args = args
        self.env = env
        self.payload = payload
        self.timeout_seconds = timeout_seconds
        self.job_id = job_id
        self.labels = labels
        self.machine_type = machine_type
        self.fallback_zones = fallback_zones
        self.spot = spot
        self.startup_timeout_seconds = startup_timeout_seconds
        self.project_id = project_id
        self.vm_metadata = vm_metadata
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.compute_api_endpoint = compute_api_endpoint

    @cached_property
    def hook(self) -> BatchVmHook:
        return BatchVmHook(
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            compute_api_endpoint=self.compute_api_endpoint,
        )

    @property
    def zones(self) -> list[str]:
        return [self.zone, *(z for z in self.fallback_zones or () if z != self.zone)]

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.build_spec(context)
        names = self.submitted = JobNames(self.project_id or self.hook.project_id, spec.job_id)
        result = self.reattach(names, spec.attempt) or self.submit(context, spec, names)
        self.submitted_vm = (result["zone"], result["vm_name"])
        BatchVmInstanceLink.persist(context, project_id=names.project_id, zone=result["zone"], vm_name=result["vm_name"])
        BatchVmLogsLink.persist(context, project_id=names.project_id, vm_name=result["vm_name"])
        for key in ("job_id", "vm_name", "zone", "attempt"):
            context["ti"].xcom_push(key=key, value=result[key])
        return result

    def build_spec(self, context: Context) -> JobSpec:
        """The validated job: anything wrong is refused here, before anything is created."""
        ti = context["ti"]
        job_id = self.job_id or default_job_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
        fields = {
            "job_id": job_id,
            "attempt": ti.try_number,
            "image": self.image,
            "command": self.command,
            "args": self.args or [],
            "env": self.env or {},
            "payload": self.payload,
            "timeout_seconds": self.timeout_seconds,
            "labels": self.labels or {},
            "task_count": self.task_count,
        }
        try:
            spec = JobSpec.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise JobSpecError(f"Invalid batch job spec: {problems}") from None
        last_task = spec.task_count - 1 if spec.task_count > 1 else None
        longest_vm_name = JobNames("-", spec.job_id, last_task).vm_name_for(99)
        if not re.match(VM_NAME_PATTERN, longest_vm_name):
            raise JobSpecError(
                f"Invalid batch job spec: job_id: gives VM names like {longest_vm_name!r}, which Compute Engine refuses"
            )
        reserved = sorted(set(self.vm_metadata or ()) & RESERVED_METADATA)
        if reserved:
            raise JobSpecError(
                f"Invalid batch job spec: vm_metadata: {', '.join(reserved)} are set by the operator or the template"
            )
        for name, value in (("instance_template", self.instance_template), ("zone", self.zone)):
            if not value or not isinstance(value, str):
                raise JobSpecError(f"Invalid batch job spec: {name}: must be a non-empty string")
        return spec

    def reattach(self, names: JobNames, attempt: int) -> dict[str, Any] | None:
        """A retried or re-run task finds its job's VM by label and watches it again, never doubling it.

        It takes a live VM of any attempt (the job still runs), or any VM of this very attempt (the
        task was re-run after its job ended: the job's status waits, unacked, on its subscription).
        The job's other VMs are deleted, so that a new attempt runs alone.
        """
        vms = []
        for zone in self.zones:
            vms += [(zone, vm) for vm in self.hook.find_job_vms(project_id=names.project_id, zone=zone, job_id=names.job_id)]
        # Live VMs first, then the newest.
        vms.sort(key=lambda zv: (zv[1].status not in VM_ALIVE_STATES, -(_epoch(zv[1].creation_timestamp) or 0)))
        found = None
        for zone, vm in vms:
            vm_attempt = _metadata(vm, "batchvm-attempt") or ""
            usable = vm_attempt.isdigit() and (vm.status in VM_ALIVE_STATES or int(vm_attempt) == attempt)
            if found is None and usable:
                found = {
                    "job_id": names.job_id,
                    "attempt": int(vm_attempt),
                    "vm_name": vm.name,
                    "vm_attempt": vm_attempt_of(vm.name),
                    "zone": zone,
                    "project_id": names.project_id,
                    "submitted_at": _epoch(vm.creation_timestamp),
                    "reattached": True,
                }
                self.log.info("Reattached to job %s attempt %s on VM %s (%s), which is %s",
                              names.job_id, vm_attempt, vm.name, zone, vm.status)
            else:
                self.log.info("Deleting VM %s (%s) left by an earlier try", vm.name, vm.status)
                self.hook.delete_vm(project_id=names.project_id, zone=zone, vm_name=vm.name)
        return found

    def submit(self, context: Context, spec: JobSpec, names: JobNames) -> dict[str, Any]:
        """Subscriptions first (so nothing published is missed), then the job, then its VM."""
        submitted_at = time.time()
        self.hook.create_job_subscriptions(names)
        try:
            message_id = self.hook.publish_job(names, spec)
            log_step(self.log, "submitted", f"job {spec.job_id} attempt {spec.attempt} (message {message_id})",
                     submitted_at)
            zone, vm_name = self.create_vm(context, names, spec.attempt, vm_attempt=1, zones=self.zones)
        except BaseException:
            self.hook.delete_job_subscriptions(names)
            raise
        log_step(self.log, "VM created", f"{vm_name} in {zone} from {self.instance_template}", submitted_at)
        return {
            "job_id": spec.job_id,
            "attempt": spec.attempt,
            "vm_name": vm_name,
            "zone": zone,
            "project_id": names.project_id,
            "submitted_at": submitted_at,
        }

    def create_vm(
        self, context: Context, names: JobNames, attempt: int, vm_attempt: int, zones: Sequence[str],
        task_count: int = 1,
    ) -> tuple[str, str]:
        """Create one VM for the job, in the first of ``zones`` with capacity; returns (zone, name)."""
        ti = context["ti"]
        vm_name = names.vm_name_for(vm_attempt)
        stockouts = []
        for zone in zones:
            try:
                self.hook.insert_vm(
                    project_id=names.project_id,
                    zone=zone,
                    vm_name=vm_name,
                    instance_template=self.instance_template,
                    machine_type=self.machine_type,
                    spot=self.spot,
                    max_run_seconds=self.max_run_seconds,
                    metadata={**(self.vm_metadata or {}), **names.binding_metadata(attempt, task_count)},
                    labels={
                        **(self.labels or {}),
                        **task_labels(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number),
                        "batchvm-job-id": names.job_id,
                        **({} if names.task_index is None else {"batchvm-task-index": str(names.task_index)}),
                        **MANAGED_BY,
                        # `batchvm gc` leaves a VM alone that its task means to keep.
                        **({"batchvm-keep": "true"} if getattr(self, "on_finish_action", None) == OnFinishAction.KEEP_VM else {}),
                    },
                    request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"batchvm/{vm_name}/{attempt}/{zone}")),
                    timeout=min(INSERT_TIMEOUT_SECONDS, self.startup_timeout_seconds),
                )
                return zone, vm_name
            except VmInsertError as exc:
                if exc.reason == "TIMEOUT":  # the VM may exist, stuck: it must not outlive the task
                    self.hook.delete_vm(project_id=names.project_id, zone=zone, vm_name=vm_name, wait=False)
                if exc.reason not in STOCKOUT_REASONS:
                    raise AirflowException(f"Could not create the VM for job {names.job_id}: {exc} [{exc.reason}]") from exc
                stockouts.append(zone)
                self.log.warning("No capacity for VM %s in %s (%s)%s", vm_name, zone, exc.reason,
                                 "; trying the next zone" if zone != zones[-1] else "")
        raise AirflowException(
            f"Could not create the VM for job {names.job_id}: no capacity in any of the zones "
            f"{', '.join(stockouts)} (ZONE_RESOURCE_POOL_EXHAUSTED); add zones to fallback_zones or retry later"
        )

    @property
    def max_run_seconds(self) -> int | None:
        """Compute Engine deletes the VM after this long, even if Airflow is gone."""
        if not self.timeout_seconds:
            return None
        return int(self.timeout_seconds) + MAX_RUN_MARGIN_SECONDS


class BatchVmRunJobOperator(JobWaitMixin, BatchVmSubmitJobOperator):
    """Runs a job on its own VM and waits for it: the common case, in one task.

    Deferrable by default, so no worker slot is held while the job runs. Succeeds when the job
    finishes with exit code 0 and returns a small result (job id, VM, zone, exit code, timings);
    fails with the exit code, the reason and the container's log tail in the task log. A VM that
    is preempted or lost mid-job is replaced, up to ``max_vm_attempts`` VMs: the job message was
    never acked, so the replacement takes the same job. A retried task reattaches to a VM that
    still runs its job. The VM and the job's subscriptions are deleted when it is done (see
    ``on_finish_action``).

    With ``task_count`` N > 1 the job runs as N tasks, each on a VM of its own, whose container
    sees ``BATCHVM_TASK_INDEX`` (0 to N-1) and ``BATCHVM_TASK_COUNT``. At most ``parallelism``
    VMs exist at once; the next one is created when an earlier one finishes, each time from a
    short resume of the deferred task. The task succeeds when all N finished and returns their
    results in index order; it fails as soon as one task failed ``task_retries`` + 1 times, naming
    its index, and takes the others' VMs down. A lost VM re-runs only its own task.

    :param on_finish_action: ``delete_vm`` (default), ``keep_vm_on_failure`` or ``keep_vm``.
    :param max_vm_attempts: how many VMs the job (each task) may use in all when VMs are preempted or lost.
    :param task_count: how many tasks the job runs, each on its own VM (at most 100).
    :param parallelism: at most this many of the tasks' VMs at once (default: all of them).
    :param task_retries: how many times a task whose container failed is run again, on a new VM.
    :param liveness_check_seconds: how often the VM's liveness is checked while waiting.
    :param heartbeat_timeout_seconds: how long a started job may stay silent before its VM is
        considered lost (the agent sends a heartbeat every 30 s); ``None`` disables it.
    :param deferrable: wait in the triggerer (default) or in the worker.
    """

    template_fields: Sequence[str] = (*BatchVmSubmitJobOperator.template_fields, "task_count", "parallelism")

    def __init__(
        self,
        *,
        on_finish_action: str = OnFinishAction.DELETE_VM,
        max_vm_attempts: int = 3,
        task_count: int | str = 1,
        parallelism: int | str | None = None,
        task_retries: int = 0,
        liveness_check_seconds: float = 60.0,
        heartbeat_timeout_seconds: float | None = 300.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.on_finish_action = on_finish_action
        self.max_vm_attempts = max_vm_attempts
        self.task_count = task_count
        self.parallelism = parallelism
        self.task_retries = task_retries
        self.liveness_check_seconds = liveness_check_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.deferrable = deferrable
        self._tasks: dict[str, Any] | None = None

    def execute(self, context: Context) -> Any:
        if str(self.task_count) not in ("1", ""):
            return self.execute_tasks(context)
        job = super().execute(context)
        return self.wait_for_job(
            context,
            JobNames(job["project_id"], job["job_id"]),
            attempt=job["attempt"],
            zone=job["zone"],
            vm_name=job["vm_name"],
            vm_attempt=job.get("vm_attempt", 1),
            submitted_at=job["submitted_at"],
        )

    def replace_vm(self, context: Context, names: JobNames, event: dict[str, Any], vm_attempt: int) -> tuple[str, str]:
        zones = [event["zone"], *(z for z in self.zones if z != event["zone"])]
        zone, vm_name = self.create_vm(context, names, event["attempt"], vm_attempt, zones)
        log_step(self.log, "VM created", f"{vm_name} in {zone} (replacement {vm_attempt} of {self.max_vm_attempts})", None)
        self.persist_links(context, names.project_id, zone, vm_name)
        return zone, vm_name

    # -- multi-task jobs ---------------------------------------------------------------------------

    def execute_tasks(self, context: Context) -> Any:
        """Publish one message per task up front (the durable record of each), then start the first VMs."""
        spec = self.build_spec(context)
        parallelism = self._parallelism(spec.task_count)
        names = self.submitted = JobNames(self.project_id or self.hook.project_id, spec.job_id)
        self._clear_earlier_tries(names)
        submitted_at = time.time()
        tasks = [names.task(i) for i in range(spec.task_count)]
        try:
            for task_names in tasks:
                self.hook.create_job_subscriptions(task_names)
            for task_names in tasks:
                self.hook.publish_job(task_names, spec.for_task(task_names.task_index))
        except BaseException:
            self._delete_subscriptions(names, spec.task_count)
            raise
        log_step(self.log, "submitted",
                 f"job {spec.job_id} attempt {spec.attempt}: {spec.task_count} tasks, at most {parallelism} VMs at once",
                 submitted_at)
        for key, value in (("job_id", spec.job_id), ("attempt", spec.attempt), ("task_count", spec.task_count)):
            context["ti"].xcom_push(key=key, value=value)
        state = {
            "project_id": names.project_id,
            "job_id": spec.job_id,
            "attempt": spec.attempt,
            "task_count": spec.task_count,
            "parallelism": parallelism,
            "submitted_at": submitted_at,
            "pending": list(range(spec.task_count)),
            "running": {},
            "done": {},
            "failures": {},
        }
        return self._launch_and_wait(context, state)

    def tasks_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Some tasks ended: record the finished, re-run the lost (and failed, within ``task_retries``), fill free slots."""
        state = self._tasks = event["progress"]
        names = JobNames(state["project_id"], state["job_id"])
        count = state["task_count"]
        try:
            for key, ended in sorted(event["tasks"].items(), key=lambda item: int(item[0])):
                index, task = int(key), state["running"].pop(key)
                task_names = names.task(index)
                log_timeline(self.log, ended.get("timeline"))
                if ended.get("log_tail"):
                    self.log.info("----- container log tail (task %d of job %s, VM %s) -----\n%s\n----- end -----",
                                  index, names.job_id, ended.get("vm_name"), ended["log_tail"].rstrip("\n"))
                status = ended["status"]
                if status == Status.FINISHED:
                    state["done"][key] = job_result(ended)
                    # A VM that gives its slot to a waiting task is gone before the next one is created.
                    self._drop_vm(task_names, task, succeeded=True, wait=bool(state["pending"]))
                    self.hook.delete_job_subscriptions(task_names)
                    continue
                lost = status in (Status.PREEMPTED, VM_LOST)
                failures = state["failures"].get(key, 0) + (0 if lost else 1)
                if (lost and task["vm_attempt"] < self.max_vm_attempts) or (not lost and failures <= self.task_retries):
                    self.log.warning("Task %d: %s; it runs again on a new VM", index, _failure_message(ended))
                    self._drop_vm(task_names, task, succeeded=False, wait=False)
                    if lost:  # its message is still leased to the lost VM: free it for the next
                        self.hook.release_job(task_names)
                    else:  # its message was acked with the failure: the retry needs its own
                        state["failures"][key] = failures
                        self.hook.publish_job(task_names, self.build_spec(context).for_task(index))
                    self._launch(context, state, index, task["vm_attempt"] + 1, first_zone=task["zone"])
                    continue
                self._drop_vm(task_names, task, succeeded=False, wait=False)
                raise BatchVmJobFailed(f"Task {index} of {count} failed: {_failure_message(ended)}")
        except BaseException:
            self._take_down(state)
            raise
        if state["running"] or state["pending"]:
            return self._launch_and_wait(context, state)
        self._delete_subscriptions(names, count)
        results = [state["done"][str(i)] for i in range(count)]
        log_step(self.log, "FINISHED", f"all {count} tasks", state["submitted_at"])
        return {"job_id": names.job_id, "attempt": state["attempt"], "task_count": count, "tasks": results}

    def _launch_and_wait(self, context: Context, state: dict[str, Any]) -> Any:
        self._tasks = state
        try:
            while state["pending"] and len(state["running"]) < state["parallelism"]:
                self._launch(context, state, state["pending"].pop(0), vm_attempt=1)
        except BaseException:
            self._take_down(state)
            raise
        watcher = BatchVmTasksTrigger(
            job_id=state["job_id"],
            attempt=state["attempt"],
            project_id=state["project_id"],
            tasks=[{"task_index": int(key), "zone": t["zone"], "vm_name": t["vm_name"]} for key, t in state["running"].items()],
            task_count=state["task_count"],
            wake_on_finish=bool(state["pending"]),
            progress=state,
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            liveness_check_seconds=self.liveness_check_seconds,
            startup_timeout_seconds=self.startup_timeout_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds,
            submitted_at=state["submitted_at"],
        )
        if self.deferrable:
            self.defer(trigger=watcher, method_name="tasks_complete", timeout=self.execution_timeout)
        watcher.earliest_event_seconds = 0.0  # in this process, no scheduler race to hold off
        return self.tasks_complete(context, asyncio.run(_first_event(watcher)))

    def _launch(self, context: Context, state: dict[str, Any], index: int, vm_attempt: int, first_zone: str = "") -> None:
        names = JobNames(state["project_id"], state["job_id"], index)
        zones = [first_zone, *(z for z in self.zones if z != first_zone)] if first_zone else self.zones
        zone, vm_name = self.create_vm(context, names, state["attempt"], vm_attempt, zones, state["task_count"])
        state["running"][str(index)] = {"zone": zone, "vm_name": vm_name, "vm_attempt": vm_attempt}
        log_step(self.log, "VM created", f"{vm_name} in {zone} (task {index}"
                 + (f", VM {vm_attempt} of {self.max_vm_attempts})" if vm_attempt > 1 else ")"), state["submitted_at"])
        if index == 0 and vm_attempt == 1:
            self.persist_links(context, state["project_id"], zone, vm_name)

    def _drop_vm(self, names: JobNames, task: dict[str, Any], succeeded: bool, wait: bool) -> None:
        keep = self.on_finish_action == OnFinishAction.KEEP_VM or (
            self.on_finish_action == OnFinishAction.KEEP_VM_ON_FAILURE and not succeeded
        )
        if keep:
            self.log.info("Keeping VM %s (on_finish_action=%s)", task["vm_name"], self.on_finish_action)
        else:
            self.hook.delete_vm(project_id=names.project_id, zone=task["zone"], vm_name=task["vm_name"], wait=wait)

    def _take_down(self, state: dict[str, Any]) -> None:
        """A failed (or killed) multi-task job stops all its VMs: none of them can make it succeed now."""
        names = JobNames(state["project_id"], state["job_id"])
        for key, task in list(state["running"].items()):
            self.log.info("Deleting VM %s of task %s", task["vm_name"], key)
            self.hook.delete_vm(project_id=names.project_id, zone=task["zone"], vm_name=task["vm_name"], wait=False)
        state["running"].clear()
        self._delete_subscriptions(names, state["task_count"])

    def _delete_subscriptions(self, names: JobNames, task_count: int) -> None:
        for index in range(task_count):
            self.hook.delete_job_subscriptions(names.task(index))

    def _parallelism(self, task_count: int) -> int:
        if self.parallelism in (None, ""):
            return task_count
        try:
            parallelism = int(self.parallelism)
        except (TypeError, ValueError):
            parallelism = 0
        if parallelism < 1:
            raise JobSpecError(f"Invalid batch job spec: parallelism: must be a positive integer, got {self.parallelism!r}")
        return min(parallelism, task_count)

    def _clear_earlier_tries(self, names: JobNames) -> None:
        """A retried multi-task job starts over: an earlier try's VMs are deleted, never doubled."""
        for zone in self.zones:
            for vm in self.hook.find_job_vms(project_id=names.project_id, zone=zone, job_id=names.job_id):
                self.log.info("Deleting VM %s (%s) left by an earlier try", vm.name, vm.status)
                self.hook.delete_vm(project_id=names.project_id, zone=zone, vm_name=vm.name)

    def on_kill(self) -> None:
        """Killed while running in the worker (not deferred): take the VMs and subscriptions down."""
        if self._tasks:
            self._take_down(self._tasks)
        elif self.submitted and self.submitted_vm:
            zone, vm_name = self.submitted_vm
            self.hook.delete_vm(project_id=self.submitted.project_id, zone=zone, vm_name=vm_name, wait=False)
            self.hook.delete_job_subscriptions(self.submitted)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_job_id(dag_id: str, task_id: str, run_id: str, map_index: int) -> str:
    """Stable for one task instance across its tries, so a retry finds what an earlier try left."""
    digest = hashlib.sha256(f"{dag_id}\n{task_id}\n{run_id}\n{map_index}".encode()).hexdigest()[:10]
    stem = _slug(task_id.rsplit(".", 1)[-1])[:30].strip("-") or "job"
    suffix = f"-{map_index}" if map_index is not None and map_index >= 0 else ""
    return f"{stem}{suffix}-{digest}"


def _metadata(vm: Any, key: str) -> str | None:
    return next((item.value for item in vm.metadata.items if item.key == key), None)


def _epoch(rfc3339: str) -> float | None:
    try:
        return datetime.fromisoformat(rfc3339).timestamp() if rfc3339 else None
    except ValueError:
        return None


def _label_value(value: Any) -> str:
    return re.sub(r"[^-_a-z0-9]", "_", str(value).lower())[:63]


def task_labels(dag_id: str, task_id: str, run_id: str, map_index: int, try_number: int) -> dict[str, str]:
    """The labels that find a task's VM again (reattach, gc), as the KubernetesPodOperator labels pods."""
    return {
        "dag_id": _label_value(dag_id),
        "task_id": _label_value(task_id),
        "run_id": _label_value(run_id),
        "map_index": _label_value(map_index),
        "try_number": _label_value(try_number),
    }
