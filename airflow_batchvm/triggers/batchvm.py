"""The watcher: waits in the triggerer for one job's terminal status while its VM is alive.

It only watches. Creating, replacing and deleting VMs happens in the task, where retries,
timeouts and ``on_kill`` apply; the one exception is :meth:`BatchVmJobTrigger.on_kill`, which
Airflow calls when a user kills the deferred task and nothing else would clean up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from airflow.configuration import conf
from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from google.api_core import exceptions as gexc
from google.pubsub_v1.types import ReceivedMessage

from airflow_batchvm.hooks.batchvm import BatchVmAsyncHook, JobNames
from airflow_batchvm.timeline import log_step, log_timeline
from airflow_batchvm.triggers.status_hub import CATCH_UP, HUB_READY_SECONDS, StatusHub, hub_key, status_hub
from airflow_batchvm.wire import Status, StatusMessage, WireError

# Event status for a VM that stopped or vanished without reporting a terminal status.
VM_LOST = "VM_LOST"
# Compute Engine states in which no agent runs any more. STOPPING is not one of them: a preempted
# VM stays STOPPING for up to 30 s while its agent reports PREEMPTED and releases the job message,
# and calling it lost then would delete it before it could.
VM_DOWN_STATES = frozenset({"STOPPED", "SUSPENDED", "TERMINATED"})
# Until the VM is seen running, it is looked at this often (first after one second), so that the
# timeline shows when it came up; a real VM boots in 20-40 s, so that is a handful of calls.
BOOT_CHECK_SECONDS = 5.0
# How long a down VM's last words are waited for before it is called lost: longer than the status
# subscription's ack deadline, after which a status handed to a cut-off pull comes back.
FINAL_LOOK_SECONDS = 15.0
# A restarted watcher waits at least this long for a heartbeat before it calls a job unstarted.
RESTART_GRACE_SECONDS = 90.0
# A long poll returns at once when a status arrives; this only bounds how long one call waits.
MAX_PULL_SECONDS = 30.0
# Shorter pulls are answered at once, empty (seen on the emulator at 1 s and less; the benchmark
# counted thousands of such pulls an hour), so a liveness check may come up to this much late.
MIN_PULL_SECONDS = 2.0
# A wait reads its own subscription in pulls of this size until one comes back empty.
CATCH_UP_BATCH = 1000
CATCH_UP_MAX_PULLS = 20
# An event is held until this long after the watch began: Airflow 3.3 can fail a task whose trigger
# fires within about 2 s of deferring (apache/airflow#71580), and a retried task that reattaches
# to a job that already ended would otherwise hit that on every try.
EARLIEST_EVENT_SECONDS = 5.0


class VmBoard:
    """The job VMs of one zone, from ONE ``instances.list`` per interval, for every wait of the process.

    A wait per job would otherwise make a Compute call per liveness check: at 1,000 waits and a
    60 s interval, 16 calls a second, and most of the triggerer's idle CPU in the benchmark.
    """

    def __init__(self) -> None:
        self.read_at = float("-inf")
        self.vms: dict[str, Any] = {}
        self.lock = asyncio.Lock()

    async def vm(self, hook: BatchVmAsyncHook, project_id: str, zone: str, vm_name: str, max_age: float) -> Any:
        """The VM as last listed (at most ``max_age`` ago); one not on the list is asked for alone."""
        async with self.lock:
            if time.monotonic() - self.read_at > max_age:
                vms = await hook.list_managed_vms(project_id=project_id, zone=zone)
                self.vms, self.read_at = {vm.name: vm for vm in vms}, time.monotonic()
        if vm_name in self.vms:
            return self.vms[vm_name]
        return await hook.get_vm(project_id=project_id, zone=zone, vm_name=vm_name)


# One board per event loop (the triggerer's), connection, project and zone.
_BOARDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, VmBoard]] = weakref.WeakKeyDictionary()


def vm_board(gcp_conn_id: str, project_id: str, zone: str) -> VmBoard:
    boards = _BOARDS.setdefault(asyncio.get_running_loop(), {})
    return boards.setdefault((gcp_conn_id, project_id, zone), VmBoard())


@dataclass
class StatusFilter:
    """Sorts what arrives on a job's status subscription; shared by the trigger and the poking sensor.

    The emulator does not apply subscription filters, and a retried job may leave an older
    attempt's statuses behind, so each message is checked here: another job's or another attempt's
    is acked and ignored, as is one from an earlier VM of this attempt (a preempted VM's last words
    must not end its replacement's wait); a malformed one is logged and dropped; and the first
    terminal status of this VM wins. Duplicates and out-of-order arrivals change nothing.

    The timeline steps it finds wait in ``steps`` until :meth:`log_steps`, so that the watcher can
    first log when the VM came up: a fast job may report STARTED before the VM was looked at.
    """

    job_id: str
    attempt: int
    vm_name: str = ""
    submitted_at: float | None = None
    task_index: int = 0
    started: StatusMessage | None = None
    last_heard: float | None = None  # monotonic time of this VM's latest status
    ack_ids: list[str] = field(default_factory=list)
    steps: list[tuple[str, str, float]] = field(default_factory=list)

    def take(self, received: Sequence[ReceivedMessage], log: Any) -> StatusMessage | None:
        terminal: StatusMessage | None = None
        for item in received:
            attrs = item.message.attributes
            if attrs.get("job_id", self.job_id) != self.job_id:
                self._ack(item)
                continue
            try:
                status = StatusMessage.from_pubsub(item.message.data)
            except WireError as exc:
                log.warning("Dropped a malformed status message for job %s: %s", self.job_id, exc)
                self._ack(item)
                continue
            if (
                status.job_id != self.job_id
                or status.attempt != self.attempt
                or status.task_index != self.task_index
                or (self.vm_name and status.vm_name and status.vm_name != self.vm_name)
            ):
                self._ack(item)
                continue
            self.last_heard = time.monotonic()
            if status.status.terminal:
                # Not acked: the task deletes the subscription once the event is handled, and until
                # then a restarted triggerer must be able to see this status again.
                if terminal is None:
                    terminal = status
                    self.steps.append((status.status.value, _outcome(status, self.started), status.time.timestamp()))
                continue
            self._ack(item)
            if status.status is Status.STARTED and self.started is None:
                self.started = status
                self.steps.append(("STARTED", f"on {status.vm_name} ({status.zone})", status.time.timestamp()))
        return terminal

    def _ack(self, item: ReceivedMessage) -> None:
        if item.ack_id:  # a status handed over by the hub has none: the hub acked it on its own
            self.ack_ids.append(item.ack_id)

    def log_steps(self, log: Any) -> None:
        log_timeline(log, self.timeline())

    def timeline(self) -> dict[str, Any]:
        """The steps not logged yet, for the event: whoever resumes the task logs them.

        A watcher that logs its last steps itself blocks the triggerer's event loop on the write
        (Airflow's trigger log handler is synchronous): when hundreds of jobs end at once, the
        benchmark measured seconds of detection latency from those writes alone.
        """
        steps = [list(step) for step in sorted(self.steps, key=lambda s: s[2])]
        self.steps.clear()
        return {"submitted_at": self.submitted_at, "steps": steps}

    def drain_acks(self) -> list[str]:
        ack_ids, self.ack_ids = self.ack_ids, []
        return ack_ids


async def _hold_until(earliest: float) -> None:
    if earliest > time.monotonic():
        await asyncio.sleep(earliest - time.monotonic())


def _timestamp(rfc3339: str) -> float | None:
    try:
        return datetime.fromisoformat(rfc3339).timestamp() if rfc3339 else None
    except ValueError:
        return None


def _outcome(status: StatusMessage, started: StatusMessage | None) -> str:
    parts = [] if status.exit_code is None else [f"exit code {status.exit_code}"]
    if started:
        parts.append(f"after {(status.time - started.time).total_seconds():.1f} s")
    if status.status is not Status.FINISHED and status.reason:
        parts.append(status.reason)
    return ", ".join(parts)


def status_event(
    project_id: str, status: StatusMessage, started: StatusMessage | None, timeline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The event for a terminal status: the status message, where and since when, and the timeline
    steps still to log (``log_timeline``)."""
    event = status.model_dump(mode="json")
    event["project_id"] = project_id
    event["started_at"] = started.time.isoformat() if started else None
    if timeline and timeline.get("steps"):
        event["timeline"] = timeline
    return event


def vm_lost_event(
    names: JobNames, attempt: int, vm_name: str, zone: str, reason: str, started: StatusMessage | None
) -> dict:
    """The event for a VM that is down, gone or silent although its job reported no terminal status."""
    return {
        "job_id": names.job_id,
        "attempt": attempt,
        "project_id": names.project_id,
        "status": VM_LOST,
        "vm_name": vm_name,
        "zone": zone,
        "reason": reason,
        "started_at": started.time.isoformat() if started else None,
    }


class SharedStatusPull(BaseEventTrigger):
    """Waits whose statuses come from their triggerer process's one shared pull (status_hub.py).

    A ``BaseEventTrigger`` only for Airflow's shared trigger streams, which give that pull its
    lifecycle; nothing here schedules DAGs on assets. ``run()`` (``airflow dags test``, or
    ``[batchvm] shared_status_pull = False``) long-polls the wait's own subscription instead.
    """

    # BaseEventTrigger turns this off for asset watchers; a task's wait may go to a triggerer queue.
    supports_triggerer_queue = True

    gcp_conn_id: str
    project_id: str
    impersonation_chain: str | Sequence[str] | None

    def shared_stream_key(self) -> Hashable | None:
        if not conf.getboolean("batchvm", "shared_status_pull", fallback=True):
            return None
        return hub_key(self.gcp_conn_id, self.project_id, self.impersonation_chain)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """The process's status pull; it yields nothing, since each status goes to its own wait."""
        key = hub_key(kwargs.get("gcp_conn_id", "google_cloud_default"), kwargs["project_id"],
                      kwargs.get("impersonation_chain"))
        hook = BatchVmAsyncHook(gcp_conn_id=key[1], impersonation_chain=kwargs.get("impersonation_chain"))
        await status_hub(key).run(hook, logging.getLogger(__name__))
        return
        yield

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        hub = status_hub(hub_key(self.gcp_conn_id, self.project_id, self.impersonation_chain))
        async for event in self.events(hub):
            yield event

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async for event in self.events(None):
            yield event

    def events(self, hub: StatusHub | None) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError


class BatchVmJobTrigger(SharedStatusPull):
    """Fires once with the job's terminal status, or with ``VM_LOST`` if its VM died or fell silent.

    :param job_id: the job to watch.
    :param attempt: the job attempt whose statuses count; older attempts' statuses are ignored.
    :param project_id: project of the status topic and of the VM.
    :param zone: zone of the job's VM.
    :param vm_name: the VM running the job (a replacement VM has its own name).
    :param liveness_check_seconds: how often to check that the VM still runs.
    :param startup_timeout_seconds: how long after submission the job may take to report STARTED.
    :param heartbeat_timeout_seconds: how long a started job may stay silent (the agent sends
        RUNNING every 30 s by default); ``None`` to rely on VM liveness alone.
    :param submitted_at: when the job was submitted (epoch seconds): the start of the startup
        timeout, which thus survives a triggerer restart, and of the timeline in the task log.
    :param task_index: which task of a multi-task job this VM runs (``None`` for a single-task job).
    """

    # Not a field: only a wait in a real triggerer needs it (see EARLIEST_EVENT_SECONDS).
    earliest_event_seconds = EARLIEST_EVENT_SECONDS

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        project_id: str,
        zone: str,
        vm_name: str,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        liveness_check_seconds: float = 60.0,
        startup_timeout_seconds: float = 900.0,
        heartbeat_timeout_seconds: float | None = 300.0,
        submitted_at: float | None = None,
        task_index: int | None = None,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.attempt = attempt
        self.project_id = project_id
        self.zone = zone
        self.vm_name = vm_name
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.liveness_check_seconds = liveness_check_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.submitted_at = submitted_at
        self.task_index = task_index
        self._vm_state = ""
        self._running_logged = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "attempt": self.attempt,
                "project_id": self.project_id,
                "zone": self.zone,
                "vm_name": self.vm_name,
                "gcp_conn_id": self.gcp_conn_id,
                "impersonation_chain": self.impersonation_chain,
                "liveness_check_seconds": self.liveness_check_seconds,
                "startup_timeout_seconds": self.startup_timeout_seconds,
                "heartbeat_timeout_seconds": self.heartbeat_timeout_seconds,
                "submitted_at": self.submitted_at,
                "task_index": self.task_index,
            },
        )

    @property
    def names(self) -> JobNames:
        return JobNames(self.project_id, self.job_id, self.task_index)

    def _hook(self) -> BatchVmAsyncHook:
        return BatchVmAsyncHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)

    async def events(self, hub: StatusHub | None) -> AsyncIterator[TriggerEvent]:
        event = await self.watch(hub)
        await _hold_until(self._earliest_event)
        yield TriggerEvent(event)

    async def watch(self, hub: StatusHub | None = None) -> dict[str, Any]:
        """The event's payload, once there is one: what the trigger yields, and a task group awaits.

        With a ``hub``, statuses come from the process's shared pull into this wait's mailbox;
        without, from a long poll of the job's own status subscription.
        """
        self._earliest_event = time.monotonic() + self.earliest_event_seconds
        if hub is None:
            return await self._watch(None)
        mailbox = hub.register(self.job_id, self.task_index or 0)
        try:
            if await hub.wait_ready(HUB_READY_SECONDS):
                return await self._watch(mailbox)
        finally:
            hub.unregister(self.job_id, self.task_index or 0, mailbox)
        self.log.warning(
            "The shared status pull is not up after %.0f s; pulling this job's own subscription instead",
            HUB_READY_SECONDS,
        )
        return await self._watch(None)

    async def _receive(self, hook: BatchVmAsyncHook, mailbox: asyncio.Queue | None, wait: float) -> list:
        """Statuses that arrived within ``wait`` seconds, with the ack ids of the job's subscription."""
        if mailbox is None:
            return await hook.pull_statuses(self.names, timeout=max(MIN_PULL_SECONDS, wait))
        try:
            items = [await asyncio.wait_for(mailbox.get(), timeout=wait)]
        except TimeoutError:
            return []
        while not mailbox.empty():
            items.append(mailbox.get_nowait())
        received = [item for item in items if item is not CATCH_UP]
        if len(received) < len(items):
            received += await self._read_own_subscription(hook)
        return received

    async def _read_own_subscription(self, hook: BatchVmAsyncHook) -> list[ReceivedMessage]:
        """All that waits on the job's own subscription: what was published before the hub's began.

        Pulled until empty, unacked meanwhile, so that each pull hands out other messages; a
        long job's heartbeats pile up there while the hub serves its wait.
        """
        received: list[ReceivedMessage] = []
        for _ in range(CATCH_UP_MAX_PULLS):
            batch = await hook.pull_statuses(self.names, timeout=MIN_PULL_SECONDS, max_messages=CATCH_UP_BATCH)
            received += batch
            if not batch:
                break
        return received

    async def _watch(self, mailbox: asyncio.Queue | None) -> dict[str, Any]:
        hook = self._hook()
        statuses = StatusFilter(self.job_id, self.attempt, self.vm_name, self.submitted_at, self.task_index or 0)
        # Measured from submission, so a triggerer restart does not reset it; but a restarted watcher
        # first gives a running job the time to send a heartbeat (its STARTED was acked already).
        since_submission = time.time() - self.submitted_at if self.submitted_at else 0.0
        startup_deadline = time.monotonic() + max(
            self.startup_timeout_seconds - since_submission, min(self.startup_timeout_seconds, RESTART_GRACE_SECONDS)
        )
        next_check = time.monotonic() + min(self.liveness_check_seconds, 1.0)
        backoff = 1.0
        while True:
            wait = min(MAX_PULL_SECONDS, max(0.0, next_check - time.monotonic()))
            try:
                terminal = statuses.take(await self._receive(hook, mailbox, wait), self.log)
                await hook.acknowledge(self.names, statuses.drain_acks())
                backoff = 1.0
            except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.Unknown) as exc:
                self.log.warning("Pub/Sub unavailable (%s); retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if statuses.steps and not self._running_logged:
                await self._observe_vm(hook, running_only=True)
            if terminal:
                return status_event(self.project_id, terminal, statuses.started, statuses.timeline())
            statuses.log_steps(self.log)
            silent = self._silence(statuses, startup_deadline)
            if silent:
                return silent
            if time.monotonic() >= next_check:
                lost = await self._vm_lost(hook, statuses, mailbox)
                interval = self.liveness_check_seconds if self._vm_state == "RUNNING" else BOOT_CHECK_SECONDS
                next_check = time.monotonic() + min(self.liveness_check_seconds, interval)
                if lost:
                    return lost

    def _silence(self, statuses: StatusFilter, startup_deadline: float) -> dict[str, Any] | None:
        """A job that never started, or that stopped talking, ends the wait instead of hanging it."""
        now = time.monotonic()
        if statuses.last_heard is None and now > startup_deadline:
            reason = f"job did not start within {self.startup_timeout_seconds:.0f} s (VM {self._vm_state or 'unseen'})"
        elif (
            statuses.last_heard is not None
            and self.heartbeat_timeout_seconds is not None
            and now - statuses.last_heard > self.heartbeat_timeout_seconds
        ):
            reason = f"no word from the job for {self.heartbeat_timeout_seconds:.0f} s"
        else:
            return None
        self.log.warning("Job %s: %s", self.job_id, reason)
        return vm_lost_event(self.names, self.attempt, self.vm_name, self.zone, reason, statuses.started)

    async def _vm_lost(
        self, hook: BatchVmAsyncHook, statuses: StatusFilter, mailbox: asyncio.Queue | None = None
    ) -> dict[str, Any] | None:
        """A VM that is down or gone gets one last look for its final status before we call it lost."""
        state = await self._observe_vm(hook)
        if state not in VM_DOWN_STATES and state != "DELETED":
            return None
        if mailbox is not None:  # handed over by the hub while the VM was looked at
            handed = []
            while not mailbox.empty():
                item = mailbox.get_nowait()
                if item is not CATCH_UP:
                    handed.append(item)
            terminal = statuses.take(handed, self.log)
            if terminal:
                return status_event(self.project_id, terminal, statuses.started, statuses.timeline())
        # The agent publishes before it powers off: anything it said is on the subscription, though
        # Pub/Sub may take a moment to hand it out (after an outage, say). A long poll returns as
        # soon as it arrives, so this costs time only when the VM really died silent.
        terminal = None
        deadline = time.monotonic() + FINAL_LOOK_SECONDS
        while terminal is None and time.monotonic() < deadline:
            try:
                received = await hook.pull_statuses(
                    self.names, timeout=max(0.5, deadline - time.monotonic()), max_messages=CATCH_UP_BATCH
                )
                terminal = statuses.take(received, self.log)
                await hook.acknowledge(self.names, statuses.drain_acks())
            except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.Unknown):
                await asyncio.sleep(1.0)
                continue
            if terminal is None:
                statuses.log_steps(self.log)
        if terminal:
            return status_event(self.project_id, terminal, statuses.started, statuses.timeline())
        reason = f"VM {self.vm_name} is {state} and its job reported no terminal status"
        return vm_lost_event(self.names, self.attempt, self.vm_name, self.zone, reason, statuses.started)

    async def _observe_vm(self, hook: BatchVmAsyncHook, running_only: bool = False) -> str:
        """The VM's state; the timeline gets when it came up, and (unless ``running_only``) each change.

        Liveness checks read the process's shared board; the one look that dates a STARTED asks
        for the VM itself, so that the timeline shows when it really came up.
        """
        if running_only:
            vm = await hook.get_vm(project_id=self.project_id, zone=self.zone, vm_name=self.vm_name)
        else:
            board = vm_board(self.gcp_conn_id, self.project_id, self.zone)
            vm = await board.vm(hook, self.project_id, self.zone, self.vm_name, self.liveness_check_seconds / 2)
        state = vm.status if vm else "DELETED"
        started_at = _timestamp(vm.last_start_timestamp) if vm else None
        if not self._running_logged and (state == "RUNNING" or started_at):
            self._running_logged = True
            log_step(self.log, "VM running", self.vm_name, self.submitted_at, started_at)
        if not running_only and state != self._vm_state:
            if state != "RUNNING":
                log_step(self.log, f"VM {state.lower()}", self.vm_name, self.submitted_at)
            self._vm_state = state
        return state

    async def on_kill(self) -> None:
        """The user killed the deferred task (mark failed, clear): leave no VM or subscription behind.

        The deletion runs as a task of its own, shielded: Airflow may cancel ``on_kill`` itself (a
        second cancel of the trigger's task does), and the deletion must finish all the same.
        """
        self.log.info("Task killed while waiting: deleting VM %s and the job's subscriptions", self.vm_name)
        cleanup = asyncio.ensure_future(
            asyncio.wait_for(self._hook().delete_job(self.names, self.zone, self.vm_name), timeout=120)
        )
        _CLEANUPS.add(cleanup)
        cleanup.add_done_callback(_CLEANUPS.discard)
        await asyncio.shield(cleanup)
        self.log.info("Deleted VM %s and the job's subscriptions", self.vm_name)


class BatchVmTasksTrigger(SharedStatusPull):
    """Watches the running tasks of a multi-task job, one :class:`BatchVmJobTrigger` per task.

    Fires with every task that ended (``tasks``: index → that task's event) once the task needs
    to act: a task failed or lost its VM, or one finished while others wait for a free slot
    (``wake_on_finish``), or all ended. Tasks that merely finish are otherwise collected, so a job
    of N tasks costs as few task resumes as possible.

    :param tasks: the running tasks: ``{"task_index", "zone", "vm_name"}`` each.
    :param task_count: the job's number of tasks (all of whose subscriptions ``on_kill`` deletes).
    :param wake_on_finish: whether tasks wait for a slot, so that a finished task should wake the task.
    :param progress: the operator's record of the job (tasks done, waiting, retried), handed back
        in the event: ``airflow dags test`` resumes a task with the event alone, without the
        deferral's kwargs.
    """

    earliest_event_seconds = EARLIEST_EVENT_SECONDS

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        project_id: str,
        tasks: list[dict[str, Any]],
        task_count: int,
        wake_on_finish: bool,
        progress: dict[str, Any] | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        liveness_check_seconds: float = 60.0,
        startup_timeout_seconds: float = 900.0,
        heartbeat_timeout_seconds: float | None = 300.0,
        submitted_at: float | None = None,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.attempt = attempt
        self.project_id = project_id
        self.tasks = tasks
        self.task_count = task_count
        self.wake_on_finish = wake_on_finish
        self.progress = progress
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.liveness_check_seconds = liveness_check_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.submitted_at = submitted_at

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "attempt": self.attempt,
                "project_id": self.project_id,
                "tasks": self.tasks,
                "task_count": self.task_count,
                "wake_on_finish": self.wake_on_finish,
                "progress": self.progress,
                "gcp_conn_id": self.gcp_conn_id,
                "impersonation_chain": self.impersonation_chain,
                "liveness_check_seconds": self.liveness_check_seconds,
                "startup_timeout_seconds": self.startup_timeout_seconds,
                "heartbeat_timeout_seconds": self.heartbeat_timeout_seconds,
                "submitted_at": self.submitted_at,
            },
        )

    def watcher(self, task: dict[str, Any]) -> BatchVmJobTrigger:
        watcher = BatchVmJobTrigger(
            job_id=self.job_id,
            attempt=self.attempt,
            project_id=self.project_id,
            zone=task["zone"],
            vm_name=task["vm_name"],
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            liveness_check_seconds=self.liveness_check_seconds,
            startup_timeout_seconds=self.startup_timeout_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds,
            submitted_at=self.submitted_at,
            task_index=task["task_index"],
        )
        watcher._log = self.log  # its lines belong in this task's log
        return watcher

    async def events(self, hub: StatusHub | None) -> AsyncIterator[TriggerEvent]:
        earliest = time.monotonic() + self.earliest_event_seconds
        watches = {
            asyncio.ensure_future(self.watcher(task).watch(hub)): task["task_index"] for task in self.tasks
        }
        ended: dict[str, dict[str, Any]] = {}
        try:
            pending = set(watches)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    ended[str(watches[future])] = future.result()
                needs_task = any(e["status"] != Status.FINISHED for e in ended.values()) or (
                    self.wake_on_finish and ended
                )
                if needs_task:
                    break
        finally:
            for future in watches:
                future.cancel()
        await _hold_until(earliest)
        yield TriggerEvent(
            {"job_id": self.job_id, "attempt": self.attempt, "project_id": self.project_id, "tasks": ended,
             "progress": self.progress}
        )

    async def on_kill(self) -> None:
        """The user killed the deferred task: delete the running tasks' VMs and every task's subscriptions."""
        names = JobNames(self.project_id, self.job_id)
        hook = self._hook()
        self.log.info("Task killed while waiting: deleting %d VMs and the job's subscriptions", len(self.tasks))
        cleanup = asyncio.ensure_future(
            asyncio.wait_for(
                asyncio.gather(
                    *(hook.delete_vm(task["zone"], task["vm_name"], self.project_id) for task in self.tasks),
                    *(hook.delete_subscriptions(names.task(i)) for i in range(self.task_count)),
                ),
                timeout=120,
            )
        )
        _CLEANUPS.add(cleanup)
        cleanup.add_done_callback(_CLEANUPS.discard)
        await asyncio.shield(cleanup)

    def _hook(self) -> BatchVmAsyncHook:
        return BatchVmAsyncHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)


# Cleanups in flight, referenced so that they are not collected before they finish.
_CLEANUPS: set[asyncio.Future] = set()
