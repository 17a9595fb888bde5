"""Publishing this job's statuses on the status topic, with retries that outlast a Pub/Sub outage.

Retries use google-api-core's :class:`~google.api_core.retry.Retry`, not tenacity: google-cloud-pubsub
already depends on api-core, so the VM image needs no extra package, and api-core's exception
types are exactly what the Pub/Sub client raises. The client's own per-RPC retry is switched off
(``retry=None``) and one outer Retry wraps publish-and-wait, so a single policy decides: exponential
backoff (0.5 s doubling to 10 s) until ``deadline`` (5 minutes for a terminal status, well past a
30 s outage). Each try is bounded by ``attempt_timeout`` so a frozen server cannot hang it.

A status that may have been published twice (a try timed out after the server took it) is fine:
consumers treat statuses as at-least-once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry

from airflow_batchvm import wire

log = logging.getLogger(__name__)

TERMINAL_DEADLINE_SECONDS = 300.0
RETRYABLE = (
    gexc.DeadlineExceeded,
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.TooManyRequests,  # RESOURCE_EXHAUSTED
    gexc.Aborted,
    gexc.Unknown,
    gexc.Cancelled,
    gexc.GatewayTimeout,
    gexc.BadGateway,
    concurrent.futures.TimeoutError,
    TimeoutError,
)


class PublishFailed(RuntimeError):
    """A status could not be published before its deadline."""


class StatusPublisher:
    """Publishes :class:`wire.StatusMessage` for one task of one job attempt, on one VM."""

    def __init__(
        self,
        publisher,
        topic_path: str,
        job_id: str,
        attempt: int,
        vm_name: str,
        zone: str,
        *,
        task_index: int = 0,
        attempt_timeout: float = 15.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ):
        self.publisher = publisher
        self.topic_path = topic_path
        self.job_id = job_id
        self.attempt = attempt
        self.vm_name = vm_name
        self.zone = zone
        self.task_index = task_index
        self.attempt_timeout = attempt_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff

    def message(self, status: wire.Status, **fields) -> wire.StatusMessage:
        return wire.StatusMessage(
            job_id=self.job_id,
            attempt=self.attempt,
            task_index=self.task_index,
            status=status,
            vm_name=self.vm_name,
            zone=self.zone,
            **fields,
        )

    def publish(self, status: wire.Status, *, deadline: float = TERMINAL_DEADLINE_SECONDS, **fields) -> str:
        """Publish, retrying transient failures until ``deadline`` seconds; returns the message id."""
        data, attributes = self.message(status, **fields).to_pubsub()

        def once() -> str:
            future = self.publisher.publish(
                self.topic_path, data, retry=None, timeout=self.attempt_timeout, **attributes
            )
            return future.result(timeout=self.attempt_timeout + 5)

        def on_error(exc: Exception) -> None:
            log.warning("publishing %s failed (%s: %s); retrying", status.value, type(exc).__name__, exc)

        retry = gretry.Retry(
            predicate=gretry.if_exception_type(*RETRYABLE),
            initial=self.initial_backoff,
            maximum=self.max_backoff,
            multiplier=2.0,
            timeout=deadline,
            on_error=on_error,
        )
        try:
            message_id = retry(once)()
        except gexc.RetryError as exc:
            raise PublishFailed(f"{status.value} not published within {deadline:g} s: {exc.cause}") from exc
        except Exception as exc:
            raise PublishFailed(f"{status.value} not published: {type(exc).__name__}: {exc}") from exc
        log.info("published %s for task %s (message %s)", status.value, self.task_index, message_id)
        return message_id

    def try_publish(self, status: wire.Status, *, deadline: float = 10.0, **fields) -> bool:
        """Best effort (heartbeats, PREEMPTED): log a failure, never raise."""
        try:
            self.publish(status, deadline=deadline, **fields)
            return True
        except PublishFailed as exc:
            log.warning("%s", exc)
            return False


class Heartbeat:
    """Publishes RUNNING every ``every_seconds`` while the container runs (best effort)."""

    def __init__(self, status: StatusPublisher, every_seconds: float):
        self.status = status
        self.every_seconds = every_seconds
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_seconds):
            if self.status.try_publish(wire.Status.RUNNING, deadline=min(self.every_seconds, 30.0)):
                self.sent += 1

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_seconds + 60)
