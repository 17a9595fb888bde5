"""Taking this VM's one job from its job subscription, and holding the message's lease.

The job message is the durable record of the work: it is acked only after the terminal status is
published, so a VM lost mid-job leaves it unacked and a replacement VM takes the same job. While
the container runs, a :class:`Lease` keeps extending the ack deadline, because Pub/Sub's maximum
(600 s) is far shorter than a batch job.

The pull is a synchronous long poll (``return_immediately`` stays false): the emulator and the
service hold an empty pull open for a while instead of letting us spin.

Pub/Sub drops other jobs' and other task indexes' messages through the subscription filter; the
emulator does not apply filters, so every message is routed here too (:func:`route`): other jobs',
other task indexes' and older attempts' messages are acked and ignored, exactly what the service's
filter would have done.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from dataclasses import dataclass

from google.api_core import exceptions as gexc

from airflow_batchvm import wire

log = logging.getLogger(__name__)

PULL_TIMEOUT_SECONDS = 20.0
# Errors after which pulling again is worth it (the service or the network is briefly unwell).
TRANSIENT_ERRORS = (
    gexc.DeadlineExceeded,
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.Aborted,
    gexc.Unknown,
    gexc.Cancelled,
    gexc.GatewayTimeout,
    gexc.BadGateway,
)


class Route(enum.Enum):
    OTHER_JOB = "other job"  # not ours: ack and ignore
    OTHER_TASK = "other task"  # our job, another task index (another VM's): ack and ignore
    STALE = "stale attempt"  # ours, from an older attempt: ack and ignore
    SUPERSEDED = "newer attempt"  # ours, from a newer attempt: this VM is obsolete; leave it for that VM
    MINE = "mine"


def _data_object(data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def message_attempt(attributes: dict[str, str], data: bytes) -> int | None:
    """The attempt a message belongs to: attribute, else data field, else ``None`` (earlier design).

    Raises :class:`wire.MalformedMessage` for an attempt that is not a positive integer.
    """
    if "attempt" in attributes:
        text = attributes["attempt"]
        try:
            value = int(text)
        except ValueError:
            raise wire.MalformedMessage(f"attempt attribute {text!r} is not an integer") from None
    else:
        value = _data_object(data).get("attempt")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise wire.MalformedMessage(f"attempt {value!r} is not an integer")
    if value < 1:
        raise wire.MalformedMessage(f"attempt {value} is not positive")
    return value


def message_task_index(attributes: dict[str, str], data: bytes) -> int | None:
    """The task index a message is for: attribute, else data field, else ``None`` (earlier design).

    Raises :class:`wire.MalformedMessage` for an index that is not a non-negative integer.
    """
    if "task_index" in attributes:
        text = attributes["task_index"]
        try:
            value = int(text)
        except ValueError:
            raise wire.MalformedMessage(f"task_index attribute {text!r} is not an integer") from None
    else:
        value = _data_object(data).get("task_index")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise wire.MalformedMessage(f"task_index {value!r} is not an integer")
    if value < 0:
        raise wire.MalformedMessage(f"task_index {value} is negative")
    return value


def route(
    attributes: dict[str, str], data: bytes, job_id: str, attempt: int, task_index: int = 0
) -> tuple[Route, int | None]:
    """Whose message this is: by ``job_id`` (attribute, else data), ``task_index``, then ``attempt``.

    The index comes before the attempt because the service's filter (job id and task index) never
    shows this subscription another index's message, of whatever attempt. A message without an
    index or an attempt (the earlier design's format) counts as this VM's. An unreadable index or
    attempt on our own job routes as MINE so that :func:`interpret` reports it. The second value is
    the message's attempt.
    """
    owner = attributes.get("job_id")
    if owner is None:
        owner = _data_object(data).get("job_id")
    if owner != job_id:
        return Route.OTHER_JOB, None
    try:
        msg_index = message_task_index(attributes, data)
    except wire.MalformedMessage:
        return Route.MINE, None
    if msg_index is not None and msg_index != task_index:
        return Route.OTHER_TASK, None
    try:
        msg_attempt = message_attempt(attributes, data)
    except wire.MalformedMessage:
        return Route.MINE, None
    if msg_attempt is None or msg_attempt == attempt:
        return Route.MINE, attempt
    if msg_attempt < attempt:
        return Route.STALE, msg_attempt
    return Route.SUPERSEDED, msg_attempt


def interpret(
    attributes: dict[str, str],
    data: bytes,
    job_id: str,
    attempt: int,
    registry: str,
    task_index: int = 0,
    task_count: int | None = None,
) -> wire.JobSpec:
    """This VM's job as a :class:`wire.JobSpec`; raises :class:`wire.WireError` when unusable.

    The spec carries this VM's ``task_index``, and its ``task_count`` when the VM's metadata has one
    (else the message's: an earlier-design message's ``vm_count``).
    """
    msg_attempt = message_attempt(attributes, data)
    msg_index = message_task_index(attributes, data)
    spec = wire.parse_job(data, registry)
    if spec.job_id != job_id:
        raise wire.MalformedMessage(f"job_id {spec.job_id!r} in the data does not match {job_id!r}")
    if msg_attempt is not None and spec.attempt != msg_attempt and "attempt" in _data_object(data):
        raise wire.MalformedMessage(
            f"attempt attribute {msg_attempt} does not match attempt {spec.attempt} in the data"
        )
    if "task_index" in attributes and "task_index" in _data_object(data) and spec.task_index != msg_index:
        raise wire.MalformedMessage(
            f"task_index attribute {msg_index} does not match task_index {spec.task_index} in the data"
        )
    if msg_index is not None and msg_index != task_index:
        raise wire.MalformedMessage(f"task_index {msg_index} is not this VM's task index {task_index}")
    count = task_count or spec.task_count
    if task_index >= count:  # only without a validated binding: never hand a container index >= count
        raise wire.MalformedMessage(f"this VM's task index {task_index} is not below task_count {count}")
    # An earlier-design message has no attempt or index: it belongs to this VM's.
    return spec.model_copy(update={"attempt": attempt, "task_index": task_index, "task_count": count})


@dataclass
class Taken:
    """Our job's message, held (unacked). ``spec`` is None when ``error`` says why it is unusable."""

    ack_id: str
    message_id: str
    spec: wire.JobSpec | None
    error: str | None = None


@dataclass
class Superseded:
    """A newer attempt's message for our job: this VM's attempt is over."""

    ack_id: str
    newer_attempt: int


class JobSource:
    """Pulls from the job subscription; knows only this VM's job id, attempt and task index."""

    def __init__(
        self,
        subscriber,
        subscription_path: str,
        job_id: str,
        attempt: int,
        registry: str = "",
        task_index: int = 0,
        task_count: int | None = None,
    ):
        self.subscriber = subscriber
        self.subscription = subscription_path
        self.job_id = job_id
        self.attempt = attempt
        self.registry = registry
        self.task_index = task_index
        self.task_count = task_count

    def take(self, wait_seconds: float, stop: threading.Event) -> Taken | Superseded | None:
        """Long-poll until our job's message arrives; ``None`` after ``wait_seconds`` or on ``stop``."""
        deadline = time.monotonic() + wait_seconds
        backoff = 0.5
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                response = self.subscriber.pull(
                    subscription=self.subscription,
                    max_messages=1,
                    timeout=max(1.0, min(PULL_TIMEOUT_SECONDS, remaining)),
                    retry=None,  # our loop is the retry: it also watches `stop` and the deadline
                )
            except gexc.DeadlineExceeded:
                continue  # an empty long poll
            except TRANSIENT_ERRORS as exc:
                log.warning("pull from %s failed (%s); retrying in %.1f s", self.subscription, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            for received in response.received_messages:
                outcome = self._consider(received)
                if outcome is not None:
                    return outcome
        return None

    def _consider(self, received) -> Taken | Superseded | None:
        message = received.message
        attributes = dict(message.attributes)
        where, msg_attempt = route(attributes, message.data, self.job_id, self.attempt, self.task_index)
        if where is Route.OTHER_JOB:
            log.info(
                "acking and ignoring message %s: it is not for job %s (task %s)",
                message.message_id,
                self.job_id,
                self.task_index,
            )
            self._drop(received.ack_id)
            return None
        if where is Route.OTHER_TASK:
            log.info(
                "acking and ignoring message %s: it is for task %s of job %s; this VM runs task %s",
                message.message_id,
                message_task_index(attributes, message.data),
                self.job_id,
                self.task_index,
            )
            self._drop(received.ack_id)
            return None
        if where is Route.STALE:
            log.info(
                "acking and ignoring message %s: attempt %s is older than this VM's attempt %s (job %s task %s)",
                message.message_id,
                msg_attempt,
                self.attempt,
                self.job_id,
                self.task_index,
            )
            self._drop(received.ack_id)
            return None
        if where is Route.SUPERSEDED:
            return Superseded(received.ack_id, msg_attempt or 0)
        try:
            spec = interpret(
                attributes,
                message.data,
                self.job_id,
                self.attempt,
                self.registry,
                self.task_index,
                self.task_count,
            )
        except wire.WireError as exc:
            log.error("job message %s is unusable: %s", message.message_id, exc)
            return Taken(received.ack_id, message.message_id, None, f"unusable job message: {exc}")
        return Taken(received.ack_id, message.message_id, spec)

    def _drop(self, ack_id: str) -> None:
        """Ack a message that is not ours; if that fails it only comes back later, to be dropped again."""
        try:
            self.ack(ack_id)
        except Exception as exc:
            log.warning("could not ack an ignored message: %s", exc)

    def ack(self, ack_id: str) -> None:
        """Ack with a few quick retries; raises the last error if Pub/Sub stays unreachable."""
        self._ack_call(lambda: self.subscriber.acknowledge(subscription=self.subscription, ack_ids=[ack_id]))

    def release(self, ack_id: str) -> None:
        """Nack: deadline 0 makes the message deliverable again at once (to a replacement VM)."""
        try:
            self._ack_call(
                lambda: self.subscriber.modify_ack_deadline(
                    subscription=self.subscription, ack_ids=[ack_id], ack_deadline_seconds=0
                ),
                attempts=2,
            )
        except Exception as exc:  # best effort: the lease runs out on its own anyway
            log.warning("could not release message: %s", exc)

    @staticmethod
    def _ack_call(call, attempts: int = 6) -> None:
        delay = 0.5
        for i in range(attempts):
            try:
                call()
                return
            except TRANSIENT_ERRORS as exc:
                if i == attempts - 1:
                    raise
                log.warning("ack call failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def lease(self, ack_id: str, deadline_seconds: int = 60, every_seconds: float | None = None) -> Lease:
        return Lease(self.subscriber, self.subscription, ack_id, deadline_seconds, every_seconds)


class Lease:
    """Keeps a message's ack deadline extended from a background thread until :meth:`stop`.

    The first extension happens at once, so a subscription whose own ack deadline is shorter than
    the extension interval is covered from the start. A failed extension is logged and retried at
    the next tick: an extension is only lost if Pub/Sub is unreachable for a whole ``deadline``.
    """

    def __init__(
        self,
        subscriber,
        subscription: str,
        ack_id: str,
        deadline_seconds: int = 60,
        every_seconds: float | None = None,
    ):
        if not 1 <= deadline_seconds <= 600:
            raise ValueError("an ack deadline extension is 1 to 600 seconds")
        self.subscriber = subscriber
        self.subscription = subscription
        self.ack_id = ack_id
        self.deadline_seconds = deadline_seconds
        self.every_seconds = every_seconds or deadline_seconds / 3
        self.extensions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.subscriber.modify_ack_deadline(
                    subscription=self.subscription,
                    ack_ids=[self.ack_id],
                    ack_deadline_seconds=self.deadline_seconds,
                    timeout=min(10.0, self.every_seconds),
                )
                self.extensions += 1
            except Exception as exc:  # keep holding: the next tick tries again
                log.warning("extending the job message's ack deadline failed: %s", exc)
            if self._stop.wait(self.every_seconds):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
