"""PROTOTYPE (benchmark only): one shared status pull per triggerer process, demultiplexed by job id.

This is the design change the P3 figures argue for; it lives here, not in ``airflow_batchvm/``, so
that it can be measured side by side with the shipped trigger. It uses Airflow 3.3's shared
trigger streams (``BaseEventTrigger.shared_stream_key``): the triggerer runs ONE
``open_shared_stream`` per key and fans its raw events out to every trigger's
``filter_shared_stream``.

- The shared stream: a subscription of its own on ``batch_jobs_status`` (one per triggerer process
  and connection/project), pulled in a long-poll loop; each pull is acked at once and yielded as
  ``{job_id: [(attributes, data), ...]}``, or as an empty dict (a tick) when nothing arrived, so
  that each trigger also gets to run its liveness check.
- Each trigger keeps its per-job status subscription as the durable mailbox: once the hub's
  subscription exists, it pulls its own subscription once (anything published before the hub
  existed, or while another triggerer held the wait, is there: terminal statuses are never acked
  on it), and again when its VM is found down. It never holds a pending pull of its own.
- The rules of which status counts are the shipped ones: ``StatusFilter`` from the shipped trigger.

Per waiting job that leaves one Compute ``get`` per liveness interval and no Pub/Sub call at all;
per triggerer process, one pull every ``HUB_PULL_SECONDS`` (or as statuses arrive).
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

HUB_PULL_SECONDS = 10.0  # also the longest gap between two liveness opportunities
HUB_MAX_MESSAGES = 1000
CATCH_UP_PULL_SECONDS = 1.0
_READY: dict[Hashable, asyncio.Event] = {}


def _ready(key: Hashable) -> asyncio.Event:
    return _READY.setdefault(key, asyncio.Event())


async def _subscriber(gcp_conn_id: str):
    from google.pubsub_v1.services.subscriber.async_client import SubscriberAsyncClient

    sync_hook = BatchVmHook(gcp_conn_id=gcp_conn_id)
    credentials = await asyncio.to_thread(sync_hook.get_credentials)
    return SubscriberAsyncClient(credentials=credentials)


class SharedPullBatchVmJobTrigger(BaseEventTrigger):
    """Same constructor, events and rules as ``BatchVmJobTrigger``; waits on the shared stream."""

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

    # --- the shared stream: one per triggerer process and (connection, project) ----------------

    def shared_stream_key(self) -> Hashable:
        return ("batchvm-status-hub", self.gcp_conn_id, self.project_id)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
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
                    received = []
                by_job: dict[str, list[tuple[dict, bytes]]] = {}
                for item in received:
                    attrs = dict(item.message.attributes)
                    by_job.setdefault(attrs.get("job_id", ""), []).append((attrs, item.message.data))
                if received:
                    await client.acknowledge(
                        request={"subscription": name, "ack_ids": [m.ack_id for m in received]}
                    )
                yield {"t": time.time(), "by_job": by_job}
        finally:
            ready.clear()
            _READY.pop(key, None)
            try:
                await asyncio.shield(client.delete_subscription(request={"subscription": name}, timeout=10))
            except Exception:
                pass

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        async for event in self.watch(shared_stream):
            yield event

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without shared streams (Airflow before 3.3): the same wait on a stream of its own."""
        _, kwargs = self.serialize()
        async for event in self.watch(self.open_shared_stream(kwargs)):
            yield event

    # --- one job's wait ------------------------------------------------------------------------

    async def watch(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        hook = BatchVmAsyncHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        statuses = StatusFilter(self.job_id, self.attempt, self.vm_name, self.submitted_at)
        try:
            await asyncio.wait_for(_ready(self.shared_stream_key()).wait(), timeout=60)
        except TimeoutError:
            self.log.warning(
                "The shared status pull is not up after 60 s; catching up on our own subscription"
            )
        # Anything published before the hub's subscription existed is on the job's own subscription.
        terminal = statuses.take(
            await hook.pull_statuses(self.names, timeout=CATCH_UP_PULL_SECONDS), self.log
        )
        await hook.acknowledge(self.names, statuses.drain_acks())
        if terminal:
            yield TriggerEvent(status_event(self.project_id, terminal, statuses.started))
            return
        started_wait = time.monotonic()
        next_check = time.monotonic() + min(self.liveness_check_seconds, 1.0)
        async for raw in shared_stream:
            mine = raw["by_job"].get(self.job_id)
            if mine:
                received = [
                    SimpleNamespace(ack_id="", message=SimpleNamespace(attributes=attrs, data=data))
                    for attrs, data in mine
                ]
                terminal = statuses.take(received, self.log)
                statuses.drain_acks()  # the hub acked them already
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
        vm = await hook.get_vm(project_id=self.project_id, zone=self.zone, vm_name=self.vm_name)
        state = vm.status if vm else "DELETED"
        if state not in VM_DOWN_STATES and state != "DELETED":
            return None
        terminal = statuses.take(await hook.pull_statuses(self.names, timeout=2.0), self.log)
        if terminal:
            return status_event(self.project_id, terminal, statuses.started)
        reason = f"VM {self.vm_name} is {state} and its job reported no terminal status"
        return vm_lost_event(self.names, self.attempt, self.vm_name, self.zone, reason, statuses.started)


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
        async for event in self.watch(shared_stream):
            emit("trig_yield", v="p3-hub", key=self.job_id, status=event.payload.get("status"))
            yield TaskSuccessEvent()
            return

    async def on_kill(self) -> None:
        return None
