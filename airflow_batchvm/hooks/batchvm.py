"""Hooks for the two services a batch job touches: Pub/Sub (job and status) and Compute Engine (its VM).

Built on the google provider's ``GoogleBaseHook`` so that ``gcp_conn_id`` and
``impersonation_chain`` mean what they mean everywhere else. Local mode differs only in
endpoints: ``PUBSUB_EMULATOR_HOST`` (honoured by the Pub/Sub clients themselves) and a Compute
``api_endpoint`` (``compute_api_endpoint`` or ``$BATCHVM_COMPUTE_API_ENDPOINT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import requests
from airflow.providers.google.common.hooks.base_google import GoogleBaseAsyncHook, GoogleBaseHook
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry, if_exception_type
from google.api_core.retry_async import AsyncRetry
from google.cloud import pubsub_v1
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.pubsub_v1.services.subscriber.async_client import SubscriberAsyncClient
from google.pubsub_v1.types import ExpirationPolicy, ReceivedMessage

from airflow_batchvm.wire import JOB_TOPIC, STATUS_TOPIC, JobSpec

if TYPE_CHECKING:
    from google.cloud import compute_v1

COMPUTE_ENDPOINT_ENV = "BATCHVM_COMPUTE_API_ENDPOINT"

# A per-job subscription nobody pulls for a day is deleted by Pub/Sub itself (one day is the
# minimum it allows): the safety net for a task that crashed before it could clean up.
SUBSCRIPTION_TTL_SECONDS = 24 * 3600
# The agent extends the job's lease while it runs; a short base deadline means a job whose VM was
# lost is redelivered within a minute.
JOB_ACK_DEADLINE_SECONDS = 60
# The watcher never acks a terminal status (the task deletes the subscription instead), so a
# restarted triggerer sees it again after this long; so does a watcher whose pull was cut off
# (a message handed to a pull that timed out client-side is redelivered only after it). 10 s is
# the minimum Pub/Sub allows.
STATUS_ACK_DEADLINE_SECONDS = 10
# The triggerer's shared status pull acks each batch as soon as it has it.
HUB_ACK_DEADLINE_SECONDS = 20
# Its statuses matter only while its process runs; ten minutes is the least Pub/Sub keeps.
HUB_RETENTION_SECONDS = 600

# Compute Engine's words for "no capacity for this machine in this zone right now".
STOCKOUT_REASONS = frozenset(
    {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "resourcePoolExhausted"}
)
# States in which a VM is booting or working: a retried task reattaches to such a VM.
VM_ALIVE_STATES = frozenset({"PROVISIONING", "STAGING", "RUNNING", "REPAIRING"})
# How long an insert may take before Compute Engine has accepted it (its operation is DONE).
INSERT_TIMEOUT_SECONDS = 300.0

# Unavailable / deadline errors are what a Pub/Sub or Compute blip looks like.
_TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.TooManyRequests)
API_RETRY = Retry(predicate=if_exception_type(*_TRANSIENT), initial=0.5, maximum=10, timeout=120)


class VmInsertError(RuntimeError):
    """Compute Engine refused or failed to create the VM; ``reason`` is its error code."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JobNames:
    """Everything named after a job id (and, in a multi-task job, a task index), in one place.

    Each task of a multi-task job has names of its own (``JOB-tI``): its own job subscription, so
    that its message has its own lease and redelivery, and its own status subscription and VMs.
    """

    project_id: str
    job_id: str
    task_index: int | None = None

    def task(self, task_index: int) -> JobNames:
        return JobNames(self.project_id, self.job_id, task_index)

    @property
    def stem(self) -> str:
        return self.job_id if self.task_index is None else f"{self.job_id}-t{self.task_index}"

    @property
    def vm_name(self) -> str:
        return self.vm_name_for(1)

    def vm_name_for(self, vm_attempt: int) -> str:
        """The first VM of a job is ``bvm-JOB`` (``bvm-JOB-tI`` for task I); a replacement is ``...-rN``."""
        return f"bvm-{self.stem}" if vm_attempt <= 1 else f"bvm-{self.stem}-r{vm_attempt}"

    def binding_metadata(self, attempt: int, task_count: int = 1) -> dict[str, str]:
        """The VM metadata that binds a VM to this job: what its agent reads (docs/ARCHITECTURE.md)."""
        binding = {
            "batchvm-job-id": self.job_id,
            "batchvm-attempt": str(attempt),
            "batchvm-job-subscription": short_name(self.job_subscription),
            "batchvm-status-topic": short_name(self.status_topic),
        }
        if self.task_index is not None:
            binding |= {"batchvm-task-index": str(self.task_index), "batchvm-task-count": str(task_count)}
        return binding

    @property
    def subscription_filter(self) -> str:
        job = f'attributes.job_id = "{self.job_id}"'
        return job if self.task_index is None else f'{job} AND attributes.task_index = "{self.task_index}"'

    @property
    def job_topic(self) -> str:
        return f"projects/{self.project_id}/topics/{JOB_TOPIC}"

    @property
    def status_topic(self) -> str:
        return f"projects/{self.project_id}/topics/{STATUS_TOPIC}"

    @property
    def job_subscription(self) -> str:
        return f"projects/{self.project_id}/subscriptions/batchvm-job-{self.stem}"

    @property
    def status_subscription(self) -> str:
        return f"projects/{self.project_id}/subscriptions/batchvm-status-{self.stem}"


def vm_attempt_of(vm_name: str) -> int:
    """``bvm-JOB`` is a job's (or task's) first VM, ``bvm-JOB-rN`` its N-th."""
    match = re.search(r"-r(\d+)$", vm_name)
    return int(match.group(1)) if match else 1


def short_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class BatchVmHook(GoogleBaseHook):
    """Publishes jobs, manages the per-job subscriptions, and creates, reads and deletes job VMs."""

    def __init__(
        self,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | Sequence[str] | None = None,
        compute_api_endpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(gcp_conn_id=gcp_conn_id, impersonation_chain=impersonation_chain, **kwargs)
        self.compute_api_endpoint = compute_api_endpoint or os.environ.get(COMPUTE_ENDPOINT_ENV) or None

    # -- clients -------------------------------------------------------------------------------

    @cached_property
    def publisher(self) -> pubsub_v1.PublisherClient:
        return pubsub_v1.PublisherClient(credentials=self.get_credentials())

    @cached_property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        return pubsub_v1.SubscriberClient(credentials=self.get_credentials())

    @property
    def _compute_options(self) -> ClientOptions | None:
        return ClientOptions(api_endpoint=self.compute_api_endpoint) if self.compute_api_endpoint else None

    @cached_property
    def instances(self) -> compute_v1.InstancesClient:
        from google.cloud import compute_v1  # a 5 s import: paid by the tasks that use Compute only

        return compute_v1.InstancesClient(
            credentials=self.get_credentials(), client_options=self._compute_options
        )

    @cached_property
    def zone_operations(self) -> compute_v1.ZoneOperationsClient:
        # operation.result() would poll the default endpoint; our own client keeps local mode honest.
        from google.cloud import compute_v1

        return compute_v1.ZoneOperationsClient(
            credentials=self.get_credentials(), client_options=self._compute_options
        )

    # -- Pub/Sub -------------------------------------------------------------------------------

    def create_job_subscriptions(self, names: JobNames) -> None:
        """Create the job and status subscriptions, filtered on the job id (and task index), before
        anything is published.

        Idempotent, so a retried task that got this far before does not fail on "already exists".
        """
        job_filter = names.subscription_filter
        for name, topic, deadline in (
            (names.job_subscription, names.job_topic, JOB_ACK_DEADLINE_SECONDS),
            (names.status_subscription, names.status_topic, STATUS_ACK_DEADLINE_SECONDS),
        ):
            try:
                self.subscriber.create_subscription(
                    request={
                        "name": name,
                        "topic": topic,
                        "filter": job_filter,
                        "ack_deadline_seconds": deadline,
                        "expiration_policy": ExpirationPolicy(ttl=Duration(seconds=SUBSCRIPTION_TTL_SECONDS)),
                        # Pub/Sub keeps no creation time: gc reads the age of an orphan from this label.
                        "labels": {
                            "managed-by": "airflow-batchvm",
                            "batchvm-job-id": names.job_id,
                            "batchvm-created": str(int(time.time())),
                            **({} if names.task_index is None else {"batchvm-task-index": str(names.task_index)}),
                        },
                    },
                    retry=API_RETRY,
                )
            except gexc.AlreadyExists:
                self.log.info("Subscription %s already exists; reusing it", name)

    def delete_job_subscriptions(self, names: JobNames) -> None:
        for name in (names.job_subscription, names.status_subscription):
            try:
                self.subscriber.delete_subscription(request={"subscription": name}, retry=API_RETRY)
            except gexc.NotFound:
                pass

    def release_job(self, names: JobNames) -> None:
        """Make the job's unacked message deliverable now, for a replacement VM.

        A lost VM's agent held the message's lease (up to 10 minutes, extended while the job ran);
        a seek to a time before the job was published marks it unacknowledged at once, so the
        replacement does not wait for that lease to run out. Acked messages are not retained, so
        nothing that was done comes back.
        """
        self.subscriber.seek(
            request={"subscription": names.job_subscription, "time": Timestamp(seconds=0)}, retry=API_RETRY
        )

    def publish_job(self, names: JobNames, spec: JobSpec) -> str:
        data, attributes = spec.to_pubsub()
        return self.publisher.publish(names.job_topic, data, **attributes).result(timeout=120)

    def pull_statuses(self, names: JobNames, timeout: float) -> list[ReceivedMessage]:
        """A long poll: returns as soon as statuses arrive, or empty after ``timeout``."""
        try:
            response = self.subscriber.pull(
                request={"subscription": names.status_subscription, "max_messages": 100},
                timeout=timeout,
                retry=None,
            )
        except gexc.DeadlineExceeded:
            return []
        return list(response.received_messages)

    def acknowledge(self, names: JobNames, ack_ids: list[str]) -> None:
        if ack_ids:
            self.subscriber.acknowledge(
                request={"subscription": names.status_subscription, "ack_ids": ack_ids}, retry=API_RETRY
            )

    # -- Compute Engine ------------------------------------------------------------------------

    def insert_vm(
        self,
        *,
        project_id: str,
        zone: str,
        vm_name: str,
        instance_template: str,
        metadata: dict[str, str],
        labels: dict[str, str],
        request_id: str,
        machine_type: str | None = None,
        spot: bool = False,
        max_run_seconds: int | None = None,
        timeout: float = INSERT_TIMEOUT_SECONDS,
    ) -> None:
        """Create the job's VM from the template and wait until Compute Engine accepted it.

        ``request_id`` makes a retried call a no-op instead of a second VM. ``max_run_seconds``
        has Compute Engine delete the VM after that long even if Airflow is gone.
        """
        from google.cloud import compute_v1

        instance = compute_v1.Instance(
            name=vm_name,
            labels=labels,
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in sorted(metadata.items())]
            ),
        )
        if machine_type:
            instance.machine_type = f"zones/{zone}/machineTypes/{machine_type}"
        if spot or max_run_seconds:
            scheduling = compute_v1.Scheduling(instance_termination_action="DELETE")
            if spot:
                scheduling.provisioning_model = "SPOT"
                scheduling.automatic_restart = False
                scheduling.on_host_maintenance = "TERMINATE"
            if max_run_seconds:
                scheduling.max_run_duration = compute_v1.Duration(seconds=max_run_seconds)
            instance.scheduling = scheduling
        request = compute_v1.InsertInstanceRequest(
            project=project_id,
            zone=zone,
            instance_resource=instance,
            source_instance_template=_template_path(project_id, instance_template),
            request_id=request_id,
        )
        try:
            operation = self.instances.insert_unary(request=request, retry=API_RETRY)
        except gexc.Conflict:
            self.log.info("VM %s already exists: a retry of this same request", vm_name)
            return
        except gexc.GoogleAPICallError as exc:
            raise VmInsertError(
                f"Compute Engine refused to create VM {vm_name} in {zone}: {exc.message}",
                reason=_error_reason(exc),
            ) from exc
        self._wait(project_id, zone, operation, f"create VM {vm_name}", timeout)

    def find_job_vms(self, *, project_id: str, zone: str, job_id: str) -> list[compute_v1.Instance]:
        """The VMs of a job, found by label as the KubernetesPodOperator finds a task's pod."""
        return list(
            self.instances.list(
                request={"project": project_id, "zone": zone, "filter": f'labels.batchvm-job-id = "{job_id}"'},
                retry=API_RETRY,
            )
        )

    def list_managed_vms(self, *, project_id: str, zone: str) -> list[compute_v1.Instance]:
        """Every VM this provider made in the zone: one call answers the liveness of all their waits."""
        return list(
            self.instances.list(
                request={"project": project_id, "zone": zone, "filter": 'labels.managed-by = "airflow-batchvm"'},
                retry=API_RETRY,
            )
        )

    def get_vm(self, *, project_id: str, zone: str, vm_name: str) -> compute_v1.Instance | None:
        try:
            return self.instances.get(project=project_id, zone=zone, instance=vm_name, retry=API_RETRY)
        except gexc.NotFound:
            return None

    def delete_vm(self, *, project_id: str, zone: str, vm_name: str, wait: bool = True) -> bool:
        """Delete the VM; False if it was already gone."""
        try:
            operation = self.instances.delete_unary(
                project=project_id, zone=zone, instance=vm_name, retry=API_RETRY
            )
        except gexc.NotFound:
            return False
        if wait:
            self._wait(project_id, zone, operation, f"delete VM {vm_name}")
        return True

    def _wait(
        self, project_id: str, zone: str, operation: compute_v1.Operation, what: str,
        timeout: float = INSERT_TIMEOUT_SECONDS,
    ) -> None:
        from google.cloud import compute_v1

        deadline = time.monotonic() + timeout
        while operation.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise VmInsertError(f"Compute Engine did not {what} within {timeout:.0f} s", "TIMEOUT")
            try:
                operation = self.zone_operations.wait(
                    project=project_id, zone=zone, operation=operation.name, retry=API_RETRY,
                    timeout=min(60.0, max(1.0, deadline - time.monotonic())),
                )
            except (gexc.DeadlineExceeded, requests.exceptions.Timeout):
                continue  # wait() returns after at most its timeout anyway; the deadline decides
        if operation.error and operation.error.errors:
            first = operation.error.errors[0]
            raise VmInsertError(f"Compute Engine could not {what}: {first.code}: {first.message}", first.code)


def _template_path(project_id: str, template: str) -> str:
    if "/" in template:
        return template
    return f"projects/{project_id}/global/instanceTemplates/{template}"


def _error_reason(exc: gexc.GoogleAPICallError) -> str:
    for error in exc.errors or ():
        if isinstance(error, dict) and error.get("reason"):
            return error["reason"]
    return exc.reason or type(exc).__name__


class BatchVmAsyncHook(GoogleBaseAsyncHook):
    """What the watcher needs in the triggerer: status long polls, acks, and the VM's state."""

    sync_hook_class = BatchVmHook

    async def pull_statuses(self, names: JobNames, timeout: float, max_messages: int = 100) -> list[ReceivedMessage]:
        return await self.pull(names.status_subscription, timeout, max_messages)

    async def acknowledge(self, names: JobNames, ack_ids: list[str]) -> None:
        await self.acknowledge_on(names.status_subscription, ack_ids)

    async def pull(self, subscription: str, timeout: float, max_messages: int = 100) -> list[ReceivedMessage]:
        """A long poll: returns as soon as messages arrive, or empty after ``timeout``."""
        client = await self._subscriber()
        try:
            response = await client.pull(
                request={"subscription": subscription, "max_messages": max_messages},
                timeout=timeout,
                retry=None,
            )
        except gexc.DeadlineExceeded:
            return []
        return list(response.received_messages)

    async def acknowledge_on(self, subscription: str, ack_ids: list[str]) -> None:
        if ack_ids:
            client = await self._subscriber()
            await client.acknowledge(
                request={"subscription": subscription, "ack_ids": ack_ids},
                retry=AsyncRetry(predicate=if_exception_type(*_TRANSIENT), timeout=60),
            )

    async def create_hub_subscription(self, name: str, project_id: str) -> None:
        """The triggerer process's own subscription to every status (see triggers/status_hub.py)."""
        client = await self._subscriber()
        await client.create_subscription(
            request={
                "name": name,
                "topic": f"projects/{project_id}/topics/{STATUS_TOPIC}",
                "ack_deadline_seconds": HUB_ACK_DEADLINE_SECONDS,
                "expiration_policy": ExpirationPolicy(ttl=Duration(seconds=SUBSCRIPTION_TTL_SECONDS)),
                "message_retention_duration": Duration(seconds=HUB_RETENTION_SECONDS),
                "labels": {"managed-by": "airflow-batchvm", "batchvm-role": "status-hub",
                           "batchvm-created": str(int(time.time()))},
            },
            retry=AsyncRetry(predicate=if_exception_type(*_TRANSIENT), timeout=60),
        )

    async def delete_subscription(self, name: str) -> None:
        client = await self._subscriber()
        with contextlib.suppress(gexc.NotFound):
            await client.delete_subscription(
                request={"subscription": name},
                retry=AsyncRetry(predicate=if_exception_type(*_TRANSIENT), timeout=30),
            )

    async def get_vm(self, *, project_id: str, zone: str, vm_name: str) -> compute_v1.Instance | None:
        sync_hook = await self.get_sync_hook()
        return await asyncio.to_thread(sync_hook.get_vm, project_id=project_id, zone=zone, vm_name=vm_name)

    async def list_managed_vms(self, *, project_id: str, zone: str) -> list[compute_v1.Instance]:
        sync_hook = await self.get_sync_hook()
        return await asyncio.to_thread(sync_hook.list_managed_vms, project_id=project_id, zone=zone)

    async def delete_job(self, names: JobNames, zone: str, vm_name: str) -> None:
        """Delete the job's VM and subscriptions: the cleanup for a task killed while deferred."""
        await self.delete_vm(zone, vm_name, names.project_id)
        await self.delete_subscriptions(names)

    async def delete_vm(self, zone: str, vm_name: str, project_id: str) -> None:
        sync_hook = await self.get_sync_hook()
        await asyncio.to_thread(sync_hook.delete_vm, project_id=project_id, zone=zone, vm_name=vm_name, wait=False)

    async def delete_subscriptions(self, names: JobNames) -> None:
        sync_hook = await self.get_sync_hook()
        await asyncio.to_thread(sync_hook.delete_job_subscriptions, names)

    async def _subscriber(self) -> SubscriberAsyncClient:
        """One gRPC client per connection and event loop, shared by every watcher in the triggerer."""
        loop = asyncio.get_running_loop()
        key = (self._hook_kwargs.get("gcp_conn_id"), str(self._hook_kwargs.get("impersonation_chain")))
        clients = _ASYNC_SUBSCRIBERS.setdefault(loop, {})
        if key not in clients:
            sync_hook = await self.get_sync_hook()
            credentials = await asyncio.to_thread(sync_hook.get_credentials)
            clients[key] = SubscriberAsyncClient(credentials=credentials)
        return clients[key]


_ASYNC_SUBSCRIBERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict] = weakref.WeakKeyDictionary()
