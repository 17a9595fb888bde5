"""Waiting for a batch job's result: the deferrable sensor, and the finishing steps it shares with the run operator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException

from airflow_batchvm.hooks.batchvm import BatchVmHook, JobNames, vm_attempt_of
from airflow_batchvm.links.batchvm import BatchVmInstanceLink, BatchVmLogsLink
from airflow_batchvm.timeline import log_timeline
from airflow_batchvm.triggers.batchvm import (
    FINAL_LOOK_SECONDS,
    VM_DOWN_STATES,
    VM_LOST,
    BatchVmJobTrigger,
    StatusFilter,
    status_event,
    vm_lost_event,
)
from airflow_batchvm.wire import Status

if TYPE_CHECKING:
    from airflow.sdk import Context


class OnFinishAction(StrEnum):
    """What happens to the job's VM once the job is done (its subscriptions are always deleted)."""

    DELETE_VM = "delete_vm"
    KEEP_VM_ON_FAILURE = "keep_vm_on_failure"  # for debugging a failed job on its VM
    KEEP_VM = "keep_vm"


class BatchVmJobFailed(AirflowException):
    """The job ran and did not succeed: the message says why, the task log shows its output."""


class JobWaitMixin:
    """Waits for a job's terminal status and finishes it: reports, cleans up, returns the result.

    Shared by :class:`BatchVmJobSensor` and ``BatchVmRunJobOperator``; both set the attributes
    used here. Replacing a lost VM needs what created it, so only the run operator does that
    (``replace_vm``); the sensor reports a lost VM as a failure.
    """

    gcp_conn_id: str
    impersonation_chain: str | Sequence[str] | None
    compute_api_endpoint: str | None
    deferrable: bool
    liveness_check_seconds: float
    startup_timeout_seconds: float
    heartbeat_timeout_seconds: float | None
    on_finish_action: str
    max_vm_attempts: int = 1

    @cached_property
    def hook(self) -> BatchVmHook:
        return BatchVmHook(
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            compute_api_endpoint=self.compute_api_endpoint,
        )

    def persist_links(self, context: Context, project_id: str, zone: str, vm_name: str) -> None:
        BatchVmInstanceLink.persist(context, project_id=project_id, zone=zone, vm_name=vm_name)
        BatchVmLogsLink.persist(context, project_id=project_id, vm_name=vm_name)

    def wait_for_job(
        self,
        context: Context,
        names: JobNames,
        *,
        attempt: int,
        zone: str,
        vm_name: str,
        vm_attempt: int = 1,
        submitted_at: float | None = None,
    ) -> Any:
        """Defer to the watcher, or, when not deferrable, run the same watcher in this process."""
        watcher = BatchVmJobTrigger(
            job_id=names.job_id,
            attempt=attempt,
            project_id=names.project_id,
            zone=zone,
            vm_name=vm_name,
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            liveness_check_seconds=self.liveness_check_seconds,
            startup_timeout_seconds=self.startup_timeout_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds,
            submitted_at=submitted_at,
        )
        resume = {"vm_attempt": vm_attempt, "submitted_at": submitted_at}
        if self.deferrable:
            self.defer(  # type: ignore[attr-defined]
                trigger=watcher,
                method_name="execute_complete",
                kwargs=resume,
                timeout=self.execution_timeout,  # type: ignore[attr-defined]
            )
        event = asyncio.run(_first_event(watcher))
        return self.execute_complete(context, event, **resume)

    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any],
        vm_attempt: int | None = None,
        submitted_at: float | None = None,
    ) -> Any:
        names = JobNames(event["project_id"], event["job_id"])
        # `airflow dags test` resumes with the event alone: the VM's name says which VM it was.
        vm_attempt = vm_attempt or vm_attempt_of(event.get("vm_name") or "")
        status = event["status"]
        log = self.log  # type: ignore[attr-defined]
        log_timeline(log, event.get("timeline"))
        if event.get("log_tail"):
            log.info(
                "----- container log tail (job %s, VM %s) -----\n%s\n----- end of container log tail -----",
                names.job_id,
                event.get("vm_name"),
                event["log_tail"].rstrip("\n"),
            )
        if status in (Status.PREEMPTED, VM_LOST) and vm_attempt < self.max_vm_attempts:
            log.warning(
                "%s; its job goes to a replacement VM (VM attempt %d of %d)",
                _failure_message(event), vm_attempt + 1, self.max_vm_attempts,
            )
            self.hook.delete_vm(project_id=names.project_id, zone=event["zone"], vm_name=event["vm_name"], wait=False)
            self.hook.release_job(names)
            zone, vm_name = self.replace_vm(context, names, event, vm_attempt + 1)  # type: ignore[attr-defined]
            return self.wait_for_job(
                context, names, attempt=event["attempt"], zone=zone, vm_name=vm_name,
                vm_attempt=vm_attempt + 1, submitted_at=submitted_at,
            )
        succeeded = status == Status.FINISHED
        self.clean_up(names, event.get("zone") or "", event.get("vm_name") or names.vm_name, succeeded)
        if not succeeded:
            raise BatchVmJobFailed(_failure_message(event))
        return job_result(event)

    def clean_up(self, names: JobNames, zone: str, vm_name: str, succeeded: bool) -> None:
        keep = self.on_finish_action == OnFinishAction.KEEP_VM or (
            self.on_finish_action == OnFinishAction.KEEP_VM_ON_FAILURE and not succeeded
        )
        if keep:
            self.log.info("Keeping VM %s (on_finish_action=%s)", vm_name, self.on_finish_action)  # type: ignore[attr-defined]
        elif zone:
            self.hook.delete_vm(project_id=names.project_id, zone=zone, vm_name=vm_name, wait=False)
        self.hook.delete_job_subscriptions(names)


async def _first_event(trigger: BatchVmJobTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AirflowException("the job watcher ended without an event")


def _exit_suffix(event: dict[str, Any]) -> str:
    return "" if event.get("exit_code") is None else f", exit code {event['exit_code']}"


def _failure_message(event: dict[str, Any]) -> str:
    job, vm = event["job_id"], event.get("vm_name")
    if event["status"] == VM_LOST:
        return f"Batch job {job} was lost: {event.get('reason')}"
    if event["status"] == Status.PREEMPTED:
        return f"Batch job {job} was preempted on VM {vm}"
    detail = f"exit code {event['exit_code']}" if event.get("exit_code") is not None else "no exit code"
    return f"Batch job {job} FAILED on VM {vm}: {detail}: {event.get('reason') or 'no reason given'}"


def job_result(event: dict[str, Any]) -> dict[str, Any]:
    """The small result kept in XCom."""
    started, finished = event.get("started_at"), event.get("time")
    duration = None
    if started and finished:
        duration = round(
            (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds(), 3
        )
    return {
        "job_id": event["job_id"],
        "attempt": event.get("attempt"),
        "status": event["status"],
        "vm_name": event.get("vm_name"),
        "zone": event.get("zone"),
        "exit_code": event.get("exit_code"),
        "started_at": started,
        "finished_at": finished,
        "run_seconds": duration,
    }


class BatchVmJobSensor(JobWaitMixin, BaseSensorOperator):
    """Waits for a job submitted by ``BatchVmSubmitJobOperator``; deletes its VM and subscriptions when done.

    Succeeds on ``FINISHED``; fails on ``FAILED`` with the exit code and reason, and shows the
    container's log tail in the task log; fails with a clear error if the VM dies without a result.

    :param job_id: the job to wait for (``{{ ti.xcom_pull(task_ids='submit', key='job_id') }}``).
    :param zone: the zone of its VM.
    :param attempt: the job attempt to wait for (the submit task's ``attempt`` XCom).
    :param project_id: defaults to the connection's project.
    :param vm_name: the job's VM (the submit task's ``vm_name`` XCom); defaults to its first VM's name.
    :param on_finish_action: ``delete_vm`` (default), ``keep_vm_on_failure`` or ``keep_vm``.
    :param liveness_check_seconds: how often the VM's liveness is checked while waiting.
    :param startup_timeout_seconds: how long the job may take to report STARTED.
    :param heartbeat_timeout_seconds: how long a started job may stay silent.
    """

    template_fields: Sequence[str] = ("job_id", "zone", "attempt", "vm_name", "project_id", "impersonation_chain")
    operator_extra_links = (BatchVmInstanceLink(), BatchVmLogsLink())

    def __init__(
        self,
        *,
        job_id: str,
        zone: str,
        attempt: int | str = 1,
        vm_name: str | None = None,
        project_id: str | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        compute_api_endpoint: str | None = None,
        on_finish_action: str = OnFinishAction.DELETE_VM,
        liveness_check_seconds: float = 60.0,
        startup_timeout_seconds: float = 900.0,
        heartbeat_timeout_seconds: float | None = 300.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job_id = job_id
        self.zone = zone
        self.attempt = attempt
        self.vm_name = vm_name
        self.project_id = project_id
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.compute_api_endpoint = compute_api_endpoint
        self.on_finish_action = on_finish_action
        self.liveness_check_seconds = liveness_check_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.deferrable = deferrable
        self._statuses: StatusFilter | None = None

    @property
    def names(self) -> JobNames:
        return JobNames(self.project_id or self.hook.project_id, self.job_id)

    def execute(self, context: Context) -> Any:
        names = self.names
        vm_name = self.vm_name or names.vm_name
        self.persist_links(context, names.project_id, self.zone, vm_name)
        if self.deferrable:
            return self.wait_for_job(context, names, attempt=int(self.attempt), zone=self.zone, vm_name=vm_name)
        return super().execute(context)

    def poke(self, context: Context) -> PokeReturnValue:
        names = self.names
        vm_name = self.vm_name or names.vm_name
        statuses = self._statuses = self._statuses or StatusFilter(self.job_id, int(self.attempt), vm_name)
        terminal = statuses.take(self.hook.pull_statuses(names, timeout=5.0), self.log)
        self.hook.acknowledge(names, statuses.drain_acks())
        if terminal:
            event = status_event(names.project_id, terminal, statuses.started, statuses.timeline())
        else:
            vm = self.hook.get_vm(project_id=names.project_id, zone=self.zone, vm_name=vm_name)
            if vm is not None and vm.status not in VM_DOWN_STATES:
                return PokeReturnValue(is_done=False)
            # The agent publishes before it powers off: one last look before calling the VM lost.
            terminal = statuses.take(self.hook.pull_statuses(names, timeout=FINAL_LOOK_SECONDS), self.log)
            if terminal:
                event = status_event(names.project_id, terminal, statuses.started, statuses.timeline())
            else:
                reason = f"VM {vm_name} is {vm.status if vm else 'DELETED'} and its job reported no terminal status"
                event = vm_lost_event(names, int(self.attempt), vm_name, self.zone, reason, statuses.started)
        return PokeReturnValue(is_done=True, xcom_value=self.execute_complete(context, event))
