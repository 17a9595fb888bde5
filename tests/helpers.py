"""Helpers for tests that run jobs on the local stack: what is left in the cloud, and an Airflow-like driver."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
import weakref
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from airflow.sdk.exceptions import TaskDeferred
from airflow.triggers.shared_stream import SharedStreamManager
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import NotFound
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1, pubsub_v1

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/sleep_test:latest"


class Cloud:
    """What a test looks at afterwards: the VMs and per-job subscriptions that exist."""

    def __init__(self, stack):
        env = stack.env()
        self.project = env["BATCHVM_PROJECT"]
        self.zone = env["BATCHVM_ZONE"]
        self.template = env["BATCHVM_INSTANCE_TEMPLATE"]
        self.compute_url = env["BATCHVM_COMPUTE_API_ENDPOINT"]
        self.instances = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=env["BATCHVM_COMPUTE_API_ENDPOINT"]),
        )
        self.templates = compute_v1.InstanceTemplatesClient(
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=env["BATCHVM_COMPUTE_API_ENDPOINT"]),
        )
        self.subscriber = pubsub_v1.SubscriberClient()
        self.publisher = pubsub_v1.PublisherClient()

    zones: tuple[str, ...] = ()

    def vms(self, job_id: str = "") -> list[str]:
        return [
            i.name
            for zone in (self.zone, *self.zones)
            for i in self.instances.list(project=self.project, zone=zone)
            if job_id in i.name
        ]

    def vm(self, name: str, zone: str | None = None):
        try:
            return self.instances.get(project=self.project, zone=zone or self.zone, instance=name)
        except NotFound:
            return None

    # -- the stand-in's test-only knobs (/_local/) ---------------------------------------------

    def _local(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.compute_url}/_local/{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def arm(self, fault: str, zone: str | None = None, count: int | None = 1, **extra) -> None:
        self._local("POST", "faults", {"fault": fault, "zone": zone, "count": count, **extra})

    def reset_faults(self) -> None:
        self._local("POST", "reset", {})

    def preempt(self, vm_name: str, grace_seconds: float = 1, zone: str | None = None) -> None:
        self._local("POST", f"projects/{self.project}/zones/{zone or self.zone}/instances/{vm_name}/preempt",
                    {"graceSeconds": grace_seconds})

    def kill(self, vm_name: str, zone: str | None = None) -> None:
        self._local("POST", f"projects/{self.project}/zones/{zone or self.zone}/instances/{vm_name}/kill")

    def calls(self, method: str) -> int:
        return self._local("GET", "stats")["calls"].get(method, 0)

    async def wait_for_output(self, name: str, text: str, timeout: float = 30, zone: str | None = None) -> None:
        """Wait until the VM's serial console (the agent's and the container's output) shows ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                output = await asyncio.to_thread(
                    self.instances.get_serial_port_output, project=self.project, zone=zone or self.zone, instance=name
                )
                if text in output.contents:
                    return
            except NotFound:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"VM {name} did not print {text!r} within {timeout} s")

    async def wait_for_vm(self, name: str, status: str = "RUNNING", timeout: float = 30, zone: str | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            vm = await asyncio.to_thread(self.vm, name, zone)
            if vm is not None and vm.status == status:
                return vm
            await asyncio.sleep(0.2)
        raise AssertionError(f"VM {name} did not reach {status} within {timeout} s")

    def job_subscriptions(self, job_id: str = "") -> list[str]:
        names = [s.name.rsplit("/", 1)[-1] for s in self.subscriber.list_subscriptions(project=f"projects/{self.project}")]
        return [n for n in names if n.startswith(("batchvm-job-", "batchvm-status-", "batchvm-hub-")) and job_id in n]

    def assert_nothing_left(self, job_id: str = "", timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.vms(job_id) and not self.job_subscriptions(job_id):
                return
            time.sleep(0.2)
        assert self.vms(job_id) == []
        assert self.job_subscriptions(job_id) == []


def task_context(task_id: str, try_number: int = 1, map_index: int = -1) -> dict[str, Any]:
    """The slice of an Airflow context the operators use; XComs land in ``ti.xcoms``."""
    xcoms: dict[str, Any] = {}
    ti = SimpleNamespace(
        dag_id="integration", task_id=task_id, run_id=f"test__{time.time_ns()}",
        map_index=map_index, try_number=try_number, xcoms=xcoms,
        xcom_push=lambda key, value: xcoms.__setitem__(key, value),
    )
    return {"ti": ti}


async def run_deferred(operator, context) -> Any:
    """Run a deferrable operator as Airflow does: execute; then, for as long as it defers, its
    trigger in an event loop and the method it named, with the event and its kwargs."""
    step = partial(operator.execute, context)
    deferrals = 0
    while True:
        try:
            result = await asyncio.to_thread(step)
        except TaskDeferred as deferred:
            deferrals += 1
            # Rebuilt from its serialized form, as the triggerer does.
            _classpath, kwargs = deferred.trigger.serialize()
            trigger = type(deferred.trigger)(**kwargs)
            trigger.earliest_event_seconds = 0.0  # it holds off a race of Airflow's scheduler, absent here
            event = await first_event(trigger)
            step = partial(getattr(operator, deferred.method_name), context, event.payload, **(deferred.kwargs or {}))
            continue
        assert deferrals, f"the operator did not defer; it returned {result!r}"
        return result


_MANAGERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SharedStreamManager] = weakref.WeakKeyDictionary()
_TRIGGER_IDS = itertools.count(1)


async def first_event(trigger):
    """The trigger's first event, as the triggerer gets it: through Airflow's SharedStreamManager
    (one status pull for the waits of the event loop) when the trigger has a shared stream."""
    key = trigger.shared_stream_key()
    if key is None:
        return await trigger.run().asend(None)
    manager = _MANAGERS.setdefault(asyncio.get_running_loop(), SharedStreamManager())
    trigger_id = next(_TRIGGER_IDS)
    stream = manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
    try:
        return await trigger.filter_shared_stream(stream).__anext__()
    finally:
        await manager.unsubscribe(trigger_id, key)
