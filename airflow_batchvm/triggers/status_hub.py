"""One status pull per triggerer process, handing each status to the wait for its job.

A long poll per waiting job costs a pending pull per job: at 1,000 waits on one triggerer the
benchmark measured a detection p99 of 19.6 s and 16 % of a core while idle (docs/BENCHMARKS.md,
P3), and Pub/Sub serves only so many concurrent streams per connection. Here one subscription of
the process's own on ``batch_jobs_status`` is long-polled; each batch is acked at once and each
status goes straight to the mailbox of the wait for its ``(job_id, task_index)``: a dict lookup,
never a wake-up of every wait.

Airflow 3.3's shared trigger streams give the pull its lifecycle: the triggerer runs one
``open_shared_stream`` per key and process, started by the first wait and cancelled after the
last. Nothing goes through the stream's fan-out, which would wake every wait for every status.

Nothing is lost by acking early: a wait's own per-job status subscription stays its durable
mailbox. The wait reads it once the hub is up (anything published before the hub existed, or
while another triggerer held the wait, is there) and when its VM is found down, and never acks a
terminal status there. Each time a hub (re)creates its subscription, every wait reads its own again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.pubsub_v1.types import ReceivedMessage

from airflow_batchvm.hooks.batchvm import BatchVmAsyncHook

# A long poll returns as soon as statuses arrive; this bounds how long one call waits.
HUB_PULL_SECONDS = 30.0
HUB_MAX_MESSAGES = 1000
# A wait that finds no hub up after this long reads its own subscription instead.
HUB_READY_SECONDS = 30.0
# The first wait after a failed call; it doubles up to 30 s while the failures go on.
HUB_RETRY_SECONDS = 1.0
# Put in a mailbox when its wait must read its own subscription: the wait is new, or the hub
# (re)subscribed, so statuses published before may be on the wait's own subscription only.
CATCH_UP = object()


def hub_key(gcp_conn_id: str, project_id: str, impersonation_chain: str | Sequence[str] | None) -> tuple:
    """Waits with equal keys share one pull: same credentials, same project's status topic."""
    chain = impersonation_chain if isinstance(impersonation_chain, str | None) else tuple(impersonation_chain)
    return ("airflow-batchvm-status", gcp_conn_id, project_id, chain)


def hub_subscription_id() -> str:
    """Unique per process and run; says where it came from, for whoever lists subscriptions."""
    host = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower())[:40].strip("-") or "host"
    return f"batchvm-hub-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(eq=False)
class StatusHub:
    """The shared pull of one key in one event loop, and the mailboxes of its waits."""

    key: tuple
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    subscription: str | None = None
    mailboxes: dict[tuple[str, int], set[asyncio.Queue]] = field(default_factory=dict)

    @property
    def project_id(self) -> str:
        return self.key[2]

    def register(self, job_id: str, task_index: int) -> asyncio.Queue:
        """A mailbox for one wait; it starts with a catch-up, for what came before it."""
        mailbox: asyncio.Queue = asyncio.Queue()
        mailbox.put_nowait(CATCH_UP)
        self.mailboxes.setdefault((job_id, task_index), set()).add(mailbox)
        return mailbox

    def unregister(self, job_id: str, task_index: int, mailbox: asyncio.Queue) -> None:
        boxes = self.mailboxes.get((job_id, task_index))
        if boxes is not None:
            boxes.discard(mailbox)
            if not boxes:
                del self.mailboxes[(job_id, task_index)]

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    def dispatch(self, received: Sequence[ReceivedMessage]) -> int:
        """Hand each status to its job's waits; another process's job is left to its own subscription.

        The hub's ack id stays behind: the hub acked the batch already, and a wait acks only on its
        own subscription.
        """
        delivered = 0
        for item in received:
            attrs = item.message.attributes
            try:
                route = (attrs.get("job_id", ""), int(attrs.get("task_index", "0")))
            except ValueError:
                continue
            for mailbox in self.mailboxes.get(route, ()):
                mailbox.put_nowait(ReceivedMessage(message=item.message))
                delivered += 1
        return delivered

    def _catch_up_all(self) -> None:
        for boxes in self.mailboxes.values():
            for mailbox in boxes:
                mailbox.put_nowait(CATCH_UP)

    async def run(self, hook: BatchVmAsyncHook, log: Any) -> None:
        """Subscribe, then pull, ack and dispatch until cancelled; never ends on an error.

        The subscription goes when the pull ends. One left by a killed process expires after a day
        unread and keeps its messages ten minutes only; ``batchvm gc`` leaves it, since it cannot
        tell a live triggerer's from a dead one.
        """
        name = f"projects/{self.project_id}/subscriptions/{hub_subscription_id()}"
        backoff = HUB_RETRY_SECONDS
        try:
            while True:
                try:
                    if self.subscription != name:
                        with contextlib.suppress(gexc.AlreadyExists):  # a retried create that had landed
                            await hook.create_hub_subscription(name, self.project_id)
                        self.subscription = name
                        self._catch_up_all()
                        self.ready.set()
                        log.info("Status hub %s is up for %d waits", name.rsplit("/", 1)[-1], len(self.mailboxes))
                    received = await hook.pull(name, timeout=HUB_PULL_SECONDS, max_messages=HUB_MAX_MESSAGES)
                    if received:
                        # Handed over first: the ack is off the waits' path (each status's durable
                        # copy is on its job's own subscription anyway).
                        self.dispatch(received)
                        await hook.acknowledge_on(name, [item.ack_id for item in received])
                    backoff = HUB_RETRY_SECONDS
                except gexc.NotFound:
                    # Pub/Sub lost it (an emulator restart, an expiry): make a new one, and let every
                    # wait read its own subscription for what went by meanwhile.
                    log.warning("Status hub subscription %s is gone; making it again", name)
                    self.subscription = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                except Exception as exc:  # the hub must outlive any outage; its waits keep their state
                    log.warning("Status hub: %s: %s; retrying in %.0f s", type(exc).__name__, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            if self.subscription == name:
                self.subscription = None
            self.ready.clear()
            # Shielded: the deletion finishes even if the triggerer cancels this wait for it too.
            deletion = asyncio.ensure_future(hook.delete_subscription(name))
            _DELETIONS.add(deletion)
            deletion.add_done_callback(_DELETIONS.discard)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(deletion)


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, StatusHub]] = weakref.WeakKeyDictionary()
# Deletions of ended hubs' subscriptions, referenced so that they are not collected before they finish.
_DELETIONS: set[asyncio.Future] = set()


def status_hub(key: tuple) -> StatusHub:
    """The hub for ``key`` in the running event loop (the triggerer's): one per process."""
    hubs = _HUBS.setdefault(asyncio.get_running_loop(), {})
    if key not in hubs:
        hubs[key] = StatusHub(key)
    return hubs[key]
