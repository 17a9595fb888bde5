"""PROTOTYPE (benchmark only): one shared status pull per triggerer process, demultiplexed by job id.

This is the design change the P3 figures argue for; it lives here, not in ``airflow_batchvm/``, so
that it can be measured side by side with the shipped trigger. It uses Airflow 3.3's shared
trigger streams (``BaseEventTrigger.shared_stream_key``): the triggerer runs ONE
``open_shared_stream`` per key and fans its raw events out to every trigger's
``filter_shared_stream``.

- The shared pull: a subscription of its own on ``batch_jobs_status`` (one per triggerer process
  and connection/project), long-polled; each pull is acked at once and each status handed straight
  to the queue of the wait for its job id (a dict lookup). Airflow's shared stream gives the pull its
  lifecycle; its fan-out is not used (it would wake every wait for every status: N x N work).
- Each trigger keeps its per-job status subscription as the durable mailbox: once the hub's
  subscription exists, it pulls its own subscription once (anything published before the hub
  existed, or while another triggerer held the wait, is there: terminal statuses are never acked
  on it), and again when its VM is found down. It never holds a pending pull of its own.
- The rules of which status counts are the shipped ones: ``StatusFilter`` from the shipped trigger.

- Liveness: one ``instances.list`` per zone and half liveness interval, shared by every wait of the
  process (``Board``), instead of one ``instances.get`` per wait; one ``BatchVmHook`` per process.

Per waiting job that leaves no Pub/Sub call and no Compute call of its own while it waits; per
triggerer process, one long poll every ``HUB_PULL_SECONDS`` (or as statuses arrive) and one list
per zone and interval.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from types import SimpleNamespace
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TaskSuccessEvent, TriggerEvent
from google.api_core import exceptions as gexc

from airflow_batchvm.hooks.batchvm import BatchVmAsyncHook, BatchVmHook, JobNames
from airflow_batchvm.triggers.batchvm import (
    VM_DOWN_STATES,
    StatusFilter,
    status_event,
    vm_lost_event,
)
from airflow_batchvm.wire import STATUS_TOPIC
from bench.instrument import emit
from bench.triggers import map_index_of

HUB_PULL_SECONDS = 30.0  # a long poll: it returns as soon as statuses arrive
HUB_MAX_MESSAGES = 1000
CATCH_UP_PULL_SECONDS = 2.0
FIRST_CHECK_SECONDS = 5.0
MANAGED_BY_FILTER = 'labels.managed-by = "airflow-batchvm"'
_READY: dict[Hashable, asyncio.Event] = {}
# the waits of this process, by stream key and job id: the shared pull hands each status to its own
_WAITERS: dict[Hashable, dict[str, asyncio.Queue]] = {}
_SYNC_HOOKS: dict[str, BatchVmHook] = {}
_BOARDS: dict[tuple, Board] = {}


def _ready(key: Hashable) -> asyncio.Event:
    return _READY.setdefault(key, asyncio.Event())


def _sync_hook(gcp_conn_id: str) -> BatchVmHook:
    """One hook (credentials, Compute client) per connection and process, shared by every wait."""
    if gcp_conn_id not in _SYNC_HOOKS:
        _SYNC_HOOKS[gcp_conn_id] = BatchVmHook(gcp_conn_id=gcp_conn_id)
    return _SYNC_HOOKS[gcp_conn_id]


async def _subscriber(gcp_conn_id: str):
    from google.pubsub_v1.services.subscriber.async_client import SubscriberAsyncClient

    credentials = await asyncio.to_thread(_sync_hook(gcp_conn_id).get_credentials)
    return SubscriberAsyncClient(credentials=credentials)


class Board:
    """The state of every job VM of one zone: ONE ``instances.list`` per interval answers every wait."""

    def __init__(self) -> None:
        self.at = -1e9
        self.states: dict[str, str] = {}
        self.lock = asyncio.Lock()

    async def state(
        self, gcp_conn_id: str, project: str, zone: str, vm_name: str, max_age: float
    ) -> str | None:
        async with self.lock:
            if time.monotonic() - self.at > max_age:
                hook = _sync_hook(gcp_conn_id)
                vms = await asyncio.to_thread(_list_job_vms, hook, project, zone)
                self.states = {vm.name: vm.status for vm in vms}
                self.at = time.monotonic()
        return self.states.get(vm_name)


def _list_job_vms(hook: BatchVmHook, project: str, zone: str) -> list:
    from google.cloud import compute_v1

    request = compute_v1.ListInstancesRequest(project=project, zone=zone, filter=MANAGED_BY_FILTER)
    return list(hook.instances.list(request=request))


class SharedPullBatchVmJobTrigger(BaseEventTrigger):
    """Same constructor, events and rules as ``BatchVmJobTrigger``; waits on the shared pull."""

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        project_id: str,
        zone: str,
        vm_name: str = "",
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: Any = None,
        liveness_check_seconds: float = 60.0,
        startup_timeout_seconds: float = 900.0,
        heartbeat_timeout_seconds: float | None = 300.0,
        submitted_at: float | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.attempt = attempt
        self.project_id = project_id
        self.zone = zone
        self.vm_name = vm_name or f"bvm-{job_id}"
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
                "zone": self.zone,
                "vm_name": self.vm_name,
                "gcp_conn_id": self.gcp_conn_id,
                "impersonation_chain": self.impersonation_chain,
                "liveness_check_seconds": self.liveness_check_seconds,
                "startup_timeout_seconds": self.startup_timeout_seconds,
                "heartbeat_timeout_seconds": self.heartbeat_timeout_seconds,
                "submitted_at": self.submitted_at,
            },
        )

    @property
    def names(self) -> JobNames:
        return JobNames(self.project_id, self.job_id)

    # --- the shared pull: one per triggerer process and (connection, project) ----------------

    def shared_stream_key(self) -> Hashable:
        return ("batchvm-status-hub", self.gcp_conn_id, self.project_id)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Pulls the process's own subscription and hands each status straight to its wait.

        Airflow's shared stream is used for its lifecycle (one poll per key and process, started by
        the first wait and cancelled after the last); nothing goes through its fan-out, which would
        wake every wait for every status (N x N work for N waits).
        """
        key = ("batchvm-status-hub", kwargs.get("gcp_conn_id", "google_cloud_default"), kwargs["project_id"])
        client = await _subscriber(key[1])
        project = key[2]
        name = f"projects/{project}/subscriptions/batchvm-hub-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        from google.protobuf.duration_pb2 import Duration
        from google.pubsub_v1.types import ExpirationPolicy

        await client.create_subscription(
            request={
                "name": name,
                "topic": f"projects/{project}/topics/{STATUS_TOPIC}",
                "ack_deadline_seconds": 20,
                "expiration_policy": ExpirationPolicy(ttl=Duration(seconds=24 * 3600)),
            }
        )
        ready = _ready(key)
        ready.set()
        waiters = _WAITERS.setdefault(key, {})
        try:
            while True:
                try:
                    response = await client.pull(
                        request={"subscription": name, "max_messages": HUB_MAX_MESSAGES},
                        timeout=HUB_PULL_SECONDS,
                        retry=None,
                    )
                    received = list(response.received_messages)
                except gexc.DeadlineExceeded:
                    received = []
                except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.Unknown):
                    await asyncio.sleep(1.0)
                    continue
                if not received:
                    continue
                # bench only: when the statuses reached the triggerer (delivery vs dispatch)
                emit("hub_recv", jobs=[item.message.attributes.get("job_id", "") for item in received])
                await client.acknowledge(
                    request={"subscription": name, "ack_ids": [m.ack_id for m in received]}
                )
                for item in received:
                    attrs = dict(item.message.attributes)
                    queue = waiters.get(attrs.get("job_id", ""))
                    if queue is not None:  # another process's job: its own subscription keeps it
                        queue.put_nowait((attrs, item.message.data))
                if False:  # pragma: no cover - nothing is fanned out; see the docstring
                    yield None
        finally:
            ready.clear()
            _READY.pop(key, None)
            try:
                await asyncio.shield(client.delete_subscription(request={"subscription": name}, timeout=10))
            except Exception:
                pass

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        async for event in self.watch():
            yield event

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without shared streams (Airflow before 3.3): the same wait, with a pull of its own."""
        _, kwargs = self.serialize()
        pull = asyncio.ensure_future(_drain(self.open_shared_stream(kwargs)))
        try:
            async for event in self.watch():
                yield event
        finally:
            pull.cancel()

    # --- one job's wait ------------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        key = self.shared_stream_key()
        mailbox: asyncio.Queue = asyncio.Queue()
        _WAITERS.setdefault(key, {})[self.job_id] = mailbox
        try:
            hook = BatchVmAsyncHook(
                gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain
            )
            statuses = StatusFilter(self.job_id, self.attempt, self.vm_name, self.submitted_at)
            try:
                await asyncio.wait_for(_ready(key).wait(), timeout=60)
            except TimeoutError:
                self.log.warning(
                    "The shared status pull is not up after 60 s; relying on the job's subscription"
                )
            # Anything published before the shared subscription existed is on the job's own one.
            terminal = statuses.take(
                await hook.pull_statuses(self.names, timeout=CATCH_UP_PULL_SECONDS), self.log
            )
            await hook.acknowledge(self.names, statuses.drain_acks())
            if terminal:
                yield TriggerEvent(status_event(self.project_id, terminal, statuses.started))
                return
            started_wait = time.monotonic()
            next_check = time.monotonic() + min(self.liveness_check_seconds, FIRST_CHECK_SECONDS)
            while True:
                try:
                    got = [
                        await asyncio.wait_for(mailbox.get(), timeout=max(0.0, next_check - time.monotonic()))
                    ]
                    while not mailbox.empty():
                        got.append(mailbox.get_nowait())
                except TimeoutError:
                    got = []
                if got:
                    received = [
                        SimpleNamespace(ack_id="", message=SimpleNamespace(attributes=attrs, data=data))
                        for attrs, data in got
                    ]
                    terminal = statuses.take(received, self.log)
                    statuses.drain_acks()  # the shared pull acked them already
                    if terminal:
                        yield TriggerEvent(status_event(self.project_id, terminal, statuses.started))
                        return
                silent = self._silence(statuses, started_wait)
                if silent:
                    yield TriggerEvent(silent)
                    return
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.liveness_check_seconds
                    lost = await self._vm_lost(hook, statuses)
                    if lost:
                        yield TriggerEvent(lost)
                        return
        finally:
            waiters = _WAITERS.get(key, {})
            if waiters.get(self.job_id) is mailbox:
                del waiters[self.job_id]

    def _silence(self, statuses: StatusFilter, started_wait: float) -> dict[str, Any] | None:
        now = time.monotonic()
        since_submission = time.time() - self.submitted_at if self.submitted_at else 0.0
        if (
            statuses.last_heard is None
            and now - started_wait > self.startup_timeout_seconds - since_submission
        ):
            reason = f"job did not start within {self.startup_timeout_seconds:.0f} s"
        elif (
            statuses.last_heard is not None
            and self.heartbeat_timeout_seconds is not None
            and now - statuses.last_heard > self.heartbeat_timeout_seconds
        ):
            reason = f"no word from the job for {self.heartbeat_timeout_seconds:.0f} s"
        else:
            return None
        return vm_lost_event(self.names, self.attempt, self.vm_name, self.zone, reason, statuses.started)

    async def _vm_lost(self, hook: BatchVmAsyncHook, statuses: StatusFilter) -> dict[str, Any] | None:
        board = _BOARDS.setdefault((self.gcp_conn_id, self.project_id, self.zone), Board())
        state = await board.state(
            self.gcp_conn_id, self.project_id, self.zone, self.vm_name, self.liveness_check_seconds / 2
        )
        if state is None:  # not on the board (created since it was read): ask for this VM alone
            vm = await asyncio.to_thread(
                _sync_hook(self.gcp_conn_id).get_vm,
                project_id=self.project_id,
                zone=self.zone,
                vm_name=self.vm_name,
            )
            state = vm.status if vm else "DELETED"
        if state not in VM_DOWN_STATES and state != "DELETED":
            return None
        terminal = statuses.take(await hook.pull_statuses(self.names, timeout=2.0), self.log)
        if terminal:
            return status_event(self.project_id, terminal, statuses.started)
        reason = f"VM {self.vm_name} is {state} and its job reported no terminal status"
        return vm_lost_event(self.names, self.attempt, self.vm_name, self.zone, reason, statuses.started)


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


class P3HubTrigger(SharedPullBatchVmJobTrigger):
    """P3's waits on the prototype: job ``{i}`` from the map index; ends the task from the triggerer."""

    def __init__(self, *, vm_pool: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vm_pool = vm_pool
        self._template = {"job_id": self.job_id, "vm_name": self.vm_name}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        classpath, kwargs = super().serialize()
        return classpath, {**kwargs, **self._template, "vm_pool": self.vm_pool}

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        index = map_index_of(self)
        vm = index % self.vm_pool if self.vm_pool else index
        self.job_id = self._template["job_id"].format(i=index, vm=vm)
        self.vm_name = self._template["vm_name"].format(i=index, vm=vm)
        emit("trig_start", v="p3-hub", key=self.job_id)
        async for event in self.watch():
            emit("trig_yield", v="p3-hub", key=self.job_id, status=event.payload.get("status"))
            yield TaskSuccessEvent()
            return

    async def on_kill(self) -> None:
        return None
