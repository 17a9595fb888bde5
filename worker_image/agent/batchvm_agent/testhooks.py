"""Test-only fault hooks, for the fault matrix: make the agent crash at a chosen moment.

A hook is armed only when BOTH are true:

- the agent's process environment has ``BATCHVM_AGENT_TEST_HOOKS=1`` (the local Compute stand-in
  sets it for its "VMs" in tests); production units (``batchvm-agent.service``, ``startup.sh``) never
  set it, and job data cannot reach the agent's environment, so a real VM cannot turn a hook on;
- the VM's metadata has the hook's attribute (``batchvm-test-crash-after-started``, any value).

``crash-after-started``: right after STARTED is published, before the container starts, the agent
exits at once with :data:`CRASH_EXIT_CODE`, acking nothing and publishing nothing more, like a VM
that died: the job message stays unacked and its lease runs out, so it is redelivered.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from .metadata import MetadataClient, MetadataUnavailable

log = logging.getLogger(__name__)

ENV_VAR = "BATCHVM_AGENT_TEST_HOOKS"
ATTR_CRASH_AFTER_STARTED = "batchvm-test-crash-after-started"
CRASH_EXIT_CODE = 86


@dataclass(frozen=True)
class Hooks:
    crash_after_started: bool = False

    def after_started(self) -> None:
        if self.crash_after_started:
            log.critical("TEST HOOK %s: crashing right after STARTED", ATTR_CRASH_AFTER_STARTED)
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)  # no cleanup, no ack: as abrupt as a lost VM


DISABLED = Hooks()


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def load(client: MetadataClient) -> Hooks:
    """The armed hooks; without the environment switch the metadata is not even read."""
    if not enabled_by_environment():
        return DISABLED
    try:
        crash = client.attribute(ATTR_CRASH_AFTER_STARTED) is not None
    except MetadataUnavailable:
        crash = False
    if crash:
        log.warning("test hooks armed: %s", ATTR_CRASH_AFTER_STARTED)
    return Hooks(crash_after_started=crash)
