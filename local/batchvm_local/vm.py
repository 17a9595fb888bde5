"""One local "VM": its Instance resource, its boot, its process tree and its metadata server.

Lifecycle, as on Compute Engine: PROVISIONING -> STAGING (the insert operation is DONE) ->
RUNNING (the "guest" starts: :mod:`batchvm_local.vminit` running the agent command in a new
session) -> STOPPING -> TERMINATED once the agent exits, as a VM that powered itself off.
The process output is the VM's serial console. Deleting, preempting or killing a VM ends its
process tree, whatever state it is in.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batchvm_local import procs
from batchvm_local.faults import BootPlan
from batchvm_local.metadata import JsonLeaf, MetadataServer
from batchvm_local.resources import ApiError, Operation, now_rfc3339, project_number

log = logging.getLogger(__name__)

DEFAULT_AGENT_COMMAND = [sys.executable, "-m", "batchvm_agent", "--poweroff-command", ""]
MAX_SERIAL_BYTES = 1024 * 1024  # what one getSerialPortOutput call returns at most, as on GCE
DEFAULT_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


@dataclass
class VmConfig:
    """Settings shared by every VM of one stand-in."""

    state_dir: Path
    agent_command: list[str] = field(default_factory=lambda: list(DEFAULT_AGENT_COMMAND))
    boot_seconds: float = 0.2
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    count: Callable[[str], None] = lambda _: None  # API-call statistics


class Vm:
    def __init__(
        self,
        *,
        project: str,
        zone: str,
        resource: dict,
        lock: threading.RLock,
        config: VmConfig,
        plan: BootPlan,
        insert_op: Operation,
        remove: Callable[[Vm], None],
    ):
        self.project = project
        self.zone = zone
        self.name: str = resource["name"]
        self.lock = lock
        self.changed = threading.Condition(lock)  # metadata wait_for_change
        self.config = config
        self.plan = plan
        self.insert_op = insert_op
        self._remove = remove
        self._resource = resource
        self.preempted = False
        self.deleting: Operation | None = None
        self.process: subprocess.Popen | None = None
        self._guest: procs.Proc | None = None  # the process's identity, safe against pid reuse
        self._stopping = False  # no further boot step may run
        self._halt = threading.Event()  # interrupts boot pauses
        self.off = threading.Event()  # lifecycle over: TERMINATED
        self.vm_dir = config.state_dir / "vms" / project / zone / f"{self.name}-{resource['id']}"
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self.serial_path = self.vm_dir / "serial.log"
        self.metadata = MetadataServer(self, config.count)
        self._thread = threading.Thread(target=self._lifecycle, name=f"vm-{self.name}", daemon=True)

    # --- what the API shows ---------------------------------------------------------------

    @property
    def status(self) -> str:
        with self.lock:
            return self._resource["status"]

    def to_json(self) -> dict:
        with self.lock:
            return copy.deepcopy(self._resource)

    def local_info(self) -> dict:
        """What ``GET /_local/vms`` reports: the resource's local side."""
        with self.lock:
            proc = self.process
            return {
                "project": self.project,
                "zone": self.zone,
                "name": self.name,
                "id": self._resource["id"],
                "status": self._resource["status"],
                "preempted": self.preempted,
                "pid": proc.pid if proc else None,
                "exitCode": proc.returncode if proc else None,
                "metadataHost": self.metadata.host,
                "serialLog": str(self.serial_path),
            }

    def serial_output(self, start: int) -> dict:
        """``getSerialPortOutput``: the console from byte ``start`` (at most 1 MiB), and where to go on."""
        try:
            size = self.serial_path.stat().st_size
        except FileNotFoundError:
            size = 0
        start = min(max(start, 0), size)
        data = b""
        if size:
            with open(self.serial_path, "rb") as fh:
                fh.seek(start)
                data = fh.read(MAX_SERIAL_BYTES)
        return {
            "contents": data.decode(errors="replace"),
            "start": str(start),
            "next": str(start + len(data)),
        }

    def metadata_tree(self) -> dict:
        """The VM's view of itself, as its metadata server serves it."""
        with self.lock:
            res = self._resource
            number = project_number(self.project)
            items = {i["key"]: i.get("value", "") for i in res.get("metadata", {}).get("items", [])}
            scheduling = res.get("scheduling", {})
            accounts = res.get("serviceAccounts") or [{}]
            email = accounts[0].get("email") or f"{number}-compute@developer.gserviceaccount.com"
            account = {
                "aliases": ["default"],
                "email": email,
                "scopes": accounts[0].get("scopes") or DEFAULT_SCOPES,
                "token": JsonLeaf(
                    {"access_token": "local-fake-token", "expires_in": 3599, "token_type": "Bearer"}
                ),
            }
            return {
                "project": {"project-id": self.project, "numeric-project-id": number, "attributes": {}},
                "instance": {
                    "attributes": items,
                    "hostname": f"{self.name}.{self.zone}.c.{self.project}.internal",
                    "id": res["id"],
                    "machine-type": f"projects/{number}/machineTypes/{res['machineType'].rsplit('/', 1)[-1]}",
                    "maintenance-event": "NONE",
                    "name": self.name,
                    "preempted": "TRUE" if self.preempted else "FALSE",
                    "scheduling": {
                        "automatic-restart": "TRUE" if scheduling.get("automaticRestart", True) else "FALSE",
                        "on-host-maintenance": scheduling.get("onHostMaintenance", "MIGRATE"),
                        "preemptible": "TRUE" if _is_spot(scheduling) else "FALSE",
                    },
                    "service-accounts": {"default": account, email: account},
                    "zone": f"projects/{number}/zones/{self.zone}",
                },
            }

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.metadata.start()
        self._thread.start()

    def _set_status(self, status: str, **timestamps: str) -> None:
        with self.lock:
            self._resource["status"] = status
            self._resource.update(timestamps)
            self.changed.notify_all()

    def _lifecycle(self) -> None:
        try:
            self._boot_and_run()
        except Exception:
            log.exception("VM %s failed", self.name)
            self.console("internal error in the local stand-in; powering off")
        finally:
            self._power_off()

    def _boot_and_run(self) -> None:
        self.console(f"booting {self.name} in {self.zone}")
        if self._halt.wait(self.config.boot_seconds + self.plan.extra_delay):
            return
        if self.plan.stuck:
            self.console("stuck in PROVISIONING (fault injected)")
            self._halt.wait()
            return
        with self.lock:
            if self._stopping:
                return
            self._set_status("STAGING")
        self.insert_op.finish()
        if self._halt.wait(self.config.boot_seconds):
            return
        with self.lock:
            if self._stopping:
                return
            self._set_status("RUNNING", lastStartTimestamp=now_rfc3339())
            if not self.plan.fail:
                self.process = self._spawn()
                self._guest = procs.read_proc(self.process.pid)
        if self.plan.fail:
            self.console("boot failed: the guest never came up (fault injected); powering off")
            self._halt.wait(self.config.boot_seconds)
            return
        code = self.process.wait()
        self.console(f"guest exited with code {code}")

    def _spawn(self) -> subprocess.Popen:
        env = {
            **self.config.env,
            "GCE_METADATA_HOST": self.metadata.host,
            "GCE_METADATA_IP": self.metadata.host,
            "BATCHVM_LOCAL_VM": f"{self.project}/{self.zone}/{self.name}/{self._resource['id']}",
        }
        command = [sys.executable, "-m", "batchvm_local.vminit", "--", *self.config.agent_command]
        with open(self.serial_path, "ab") as console:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.vm_dir,
                start_new_session=True,  # its own session and process group, apart from the stand-in
            )

    def _power_off(self) -> None:
        """STOPPING -> TERMINATED; then removal if the VM is being deleted (or a DELETE-on-preemption Spot VM)."""
        with self.lock:
            self._stopping = True
            started = self.process is not None
            if self._resource["status"] != "PROVISIONING" or self.deleting or self.preempted:
                self._set_status("STOPPING")
        if started:  # vminit has already killed what the guest left behind
            self._halt.wait(self.config.boot_seconds)  # an orderly stop is visible as STOPPING for a moment
        self.console("powered off")  # before TERMINATED: by then the console is final
        with self.lock:
            self._set_status("TERMINATED", lastStopTimestamp=now_rfc3339())
            self.off.set()
            delete_op = self.deleting
            action = self._resource.get("scheduling", {}).get("instanceTerminationAction")
            remove = delete_op is not None or (self.preempted and action == "DELETE")
        self.insert_op.finish()
        if remove:
            self._remove(self)
            if delete_op is not None:
                delete_op.finish()
            self.metadata.stop_soon()

    # --- what stops a VM ------------------------------------------------------------------

    def kill(self) -> bool:
        """Pull the plug: the process tree dies at once. False if the VM was already off."""
        with self.lock:
            if self.off.is_set():
                return False
            self._stopping = True
            self._set_status("STOPPING")
            self._halt.set()
            guest = self._guest
        if guest is not None:
            procs.kill_tree(guest)  # a no-op if the guest has already exited
        return True

    def preempt(self, grace_seconds: float, sigterm: bool = False) -> None:
        """As GCE preempts a Spot VM: ``instance/preempted`` turns TRUE and the VM is STOPPING;
        after ``grace_seconds`` (unless the guest powered off before) the plug is pulled.
        ``sigterm`` also sends SIGTERM to the guest at once, as the ACPI shutdown would."""
        with self.lock:
            if self.off.is_set() or self._stopping:
                raise ApiError(400, "resourceNotReady", f"The instance '{self.name}' is not running")
            self.preempted = True
            self._stopping = True
            self._set_status("STOPPING")
            guest = self._guest
        self.console(f"preempted; shutting down in {grace_seconds:g} s")
        if sigterm and guest is not None and procs.is_alive(guest):
            try:
                os.kill(guest.pid, signal.SIGTERM)  # vminit passes it on to every process of the VM
            except ProcessLookupError:
                pass

        def pull_plug() -> None:
            if not self.off.wait(grace_seconds):
                self.kill()

        threading.Thread(target=pull_plug, name=f"preempt-{self.name}", daemon=True).start()

    def delete(self, op: Operation) -> Operation:
        """Stop whatever runs and remove the instance; ``op`` is DONE once it is gone."""
        with self.lock:
            if self.deleting is not None:
                return self.deleting
            self.deleting = op
            already_off = self.off.is_set()
        if already_off:
            self._remove(self)
            op.finish()
            self.metadata.stop_soon()
        else:
            self.kill()
        return op

    def shutdown(self) -> None:
        """The stand-in is going away: kill the VM and wait until its lifecycle is over."""
        self.kill()
        self._thread.join(timeout=10)

    def console(self, line: str) -> None:
        """A line on the serial console from the "firmware" (the stand-in), as GCE's boot lines are."""
        try:
            with open(self.serial_path, "a") as fh:
                fh.write(f"[{now_rfc3339()}] batchvm-local: {line}\n")
        except OSError:
            pass


def _is_spot(scheduling: dict) -> bool:
    return bool(scheduling.get("preemptible")) or scheduling.get("provisioningModel") == "SPOT"
