"""Watching for Spot VM preemption through the metadata server's ``instance/preempted`` key.

Compute Engine sets it to ``TRUE`` when it reclaims a Spot VM, about 30 s before the VM stops.
A long poll (``wait_for_change=true``) costs nothing while it waits. On ``TRUE`` the agent stops the
container and reports PREEMPTED *without* acking, so the job message goes to a replacement VM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .metadata import MetadataClient, MetadataUnavailable

log = logging.getLogger(__name__)

PATH = "instance/preempted"
WAIT_SECONDS = 60  # one long poll; the server answers earlier when the value changes


class PreemptionWatcher:
    """Calls ``on_preempted`` once, from its own daemon thread, when the VM is preempted."""

    def __init__(self, client: MetadataClient, on_preempted: Callable[[], None], retry_seconds: float = 2.0):
        self.client = client
        self.on_preempted = on_preempted
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preemption-watch", daemon=True)

    def start(self) -> PreemptionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def is_preempted_now(self) -> bool:
        """One plain read (used on SIGTERM, to tell preemption from an ordinary shutdown)."""
        try:
            return (self.client.get(PATH, timeout=2) or "").strip().upper() == "TRUE"
        except MetadataUnavailable:
            return False

    def _run(self) -> None:
        etag = None
        while not self._stop.is_set():
            asked = time.monotonic()
            params = {"wait_for_change": "true", "timeout_sec": str(WAIT_SECONDS)}
            if etag:
                params["last_etag"] = etag
            try:
                value, etag = self.client.get_with_etag(PATH, params, timeout=WAIT_SECONDS + 10)
            except MetadataUnavailable as exc:
                log.debug("preemption watch: %s", exc)
                self._stop.wait(self.retry_seconds)
                continue
            if (value or "").strip().upper() == "TRUE":
                if not self._stop.is_set():
                    log.warning("this VM is being preempted")
                    self.on_preempted()
                return
            if value is None:  # the key does not exist here (not a Spot VM on this server): poll slowly
                self._stop.wait(WAIT_SECONDS)
            elif time.monotonic() - asked < 1.0:  # a server that does not hold the poll: don't spin
                self._stop.wait(1.0)
