"""Submitting a batch job: validate it, subscribe, publish it, and create the one VM that runs it."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pydantic import ValidationError

from airflow_batchvm.hooks.batchvm import BatchVmHook, JobNames, VmInsertError, short_name
from airflow_batchvm.links.batchvm import BatchVmInstanceLink, BatchVmLogsLink
from airflow_batchvm.sensors.batchvm import JobWaitMixin, OnFinishAction
from airflow_batchvm.timeline import log_step
from airflow_batchvm.wire import VM_NAME_PATTERN, JobSpec

if TYPE_CHECKING:
    from airflow.sdk import Context

MANAGED_BY = {"managed-by": "airflow-batchvm"}


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
        "project_id",
        "impersonation_chain",
    )
    template_fields_renderers = {"payload": "json", "env": "json"}
    operator_extra_links = (BatchVmInstanceLink(), BatchVmLogsLink())
    ui_color = "#c6e2ff"

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
        project_id: str | None = None,
        vm_metadata: dict[str, str] | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        compute_api_endpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.submitted: JobNames | None = None
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

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.build_spec(context)
        names = self.submitted = JobNames(self.project_id or self.hook.project_id, spec.job_id)
        submitted_at = time.time()
        self.submit(context, spec, names, submitted_at)
        result = {
            "submitted_at": submitted_at,
            "job_id": spec.job_id,
            "attempt": spec.attempt,
            "vm_name": names.vm_name,
            "zone": self.zone,
            "project_id": names.project_id,
        }
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
        }
        try:
            spec = JobSpec.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise JobSpecError(f"Invalid batch job spec: {problems}") from None
        vm_name = JobNames("-", spec.job_id).vm_name
        if not re.match(VM_NAME_PATTERN, vm_name):
            raise JobSpecError(f"Invalid batch job spec: job_id: gives VM name {vm_name!r}, which Compute Engine refuses")
        for name, value in (("instance_template", self.instance_template), ("zone", self.zone)):
            if not value or not isinstance(value, str):
                raise JobSpecError(f"Invalid batch job spec: {name}: must be a non-empty string")
        return spec

    def submit(self, context: Context, spec: JobSpec, names: JobNames, submitted_at: float) -> None:
        """Subscriptions first (so nothing published is missed), then the job, then its VM."""
        hook = self.hook
        ti = context["ti"]
        hook.create_job_subscriptions(names)
        try:
            # A VM left by an earlier try of this task must not run next to the new one.
            if hook.delete_vm(project_id=names.project_id, zone=self.zone, vm_name=names.vm_name):
                self.log.info("Deleted VM %s left by an earlier try", names.vm_name)
            message_id = hook.publish_job(names, spec)
            log_step(self.log, "submitted", f"job {spec.job_id} attempt {spec.attempt} (message {message_id})",
                     submitted_at)
            hook.insert_vm(
                project_id=names.project_id,
                zone=self.zone,
                vm_name=names.vm_name,
                instance_template=self.instance_template,
                machine_type=self.machine_type,
                metadata={
                    **(self.vm_metadata or {}),
                    "batchvm-job-id": spec.job_id,
                    "batchvm-attempt": str(spec.attempt),
                    "batchvm-job-subscription": short_name(names.job_subscription),
                    "batchvm-status-topic": short_name(names.status_topic),
                },
                labels={
                    **spec.labels,
                    **task_labels(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number),
                    "batchvm-job-id": spec.job_id,
                    **MANAGED_BY,
                },
                request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"batchvm/{spec.job_id}/{spec.attempt}")),
            )
        except VmInsertError as exc:
            hook.delete_job_subscriptions(names)
            raise AirflowException(f"Could not create the VM for job {spec.job_id}: {exc} [{exc.reason}]") from exc
        except BaseException:
            hook.delete_job_subscriptions(names)
            raise
        log_step(self.log, "VM created", f"{names.vm_name} in {self.zone} from {self.instance_template}",
                 submitted_at)
        BatchVmInstanceLink.persist(context, project_id=names.project_id, zone=self.zone, vm_name=names.vm_name)
        BatchVmLogsLink.persist(context, project_id=names.project_id, vm_name=names.vm_name)


class BatchVmRunJobOperator(JobWaitMixin, BatchVmSubmitJobOperator):
    """Runs a job on its own VM and waits for it: the common case, in one task.

    Deferrable by default, so no worker slot is held while the job runs. Succeeds when the job
    finishes with exit code 0 and returns a small result (job id, VM, zone, exit code, timings);
    fails with the exit code, the reason and the container's log tail in the task log. The VM and
    the job's subscriptions are deleted when it is done (see ``on_finish_action``).

    :param on_finish_action: ``delete_vm`` (default), ``keep_vm_on_failure`` or ``keep_vm``.
    :param liveness_check_seconds: how often the VM's liveness is checked while waiting.
    :param deferrable: wait in the triggerer (default) or in the worker.
    """

    def __init__(
        self,
        *,
        on_finish_action: str = OnFinishAction.DELETE_VM,
        liveness_check_seconds: float = 60.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.on_finish_action = on_finish_action
        self.liveness_check_seconds = liveness_check_seconds
        self.deferrable = deferrable

    def execute(self, context: Context) -> Any:
        submitted = super().execute(context)
        names = JobNames(submitted["project_id"], submitted["job_id"])
        return self.wait_for_job(context, names, self.zone, submitted["attempt"], submitted["submitted_at"])

    def on_kill(self) -> None:
        """Killed while running in the worker (not deferred): take the VM and subscriptions down."""
        if names := self.submitted:
            self.hook.delete_vm(project_id=names.project_id, zone=self.zone, vm_name=names.vm_name, wait=False)
            self.hook.delete_job_subscriptions(names)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_job_id(dag_id: str, task_id: str, run_id: str, map_index: int) -> str:
    """Stable for one task instance across its tries, so a retry finds what an earlier try left."""
    digest = hashlib.sha256(f"{dag_id}\n{task_id}\n{run_id}\n{map_index}".encode()).hexdigest()[:10]
    stem = _slug(task_id.rsplit(".", 1)[-1])[:30].strip("-") or "job"
    suffix = f"-{map_index}" if map_index is not None and map_index >= 0 else ""
    return f"{stem}{suffix}-{digest}"


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
