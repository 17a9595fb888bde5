"""``python -m batchvm_agent [--poweroff-command CMD]``: run this VM's one job, then power off.

The order is what makes the job safe to lose a VM at any moment:

1. read the binding from the metadata server;
2. take our job's message and start holding its lease;
3. publish STARTED, run the container (RUNNING heartbeats meanwhile);
4. publish FINISHED or FAILED, retrying through a Pub/Sub outage;
5. ack the message, only now: until here a lost VM leaves the job for a replacement;
6. power off (``''`` just exits, which is how the local stand-in's "VMs" power off).

A preempted (or shut down) VM kills the container and releases the message unacked. Bad input
(an unusable job message, an unknown image) becomes a FAILED status with a reason, never a crash,
so the waiting Airflow task learns about it at once.

Exit status: 0 the job's terminal status was published (whatever the job's own result), 2 no usable
binding, 3 the terminal status could not be published, 4 no job to run, 5 interrupted, 1 agent bug.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys
import threading

from airflow_batchvm import wire

from . import testhooks
from .container import ContainerRunner, container_name
from .jobsource import JobSource, Lease, Superseded, Taken
from .metadata import Binding, BindingError, MetadataClient, MetadataUnavailable, read_binding
from .preemption import PreemptionWatcher
from .status import Heartbeat, PublishFailed, StatusPublisher

log = logging.getLogger("batchvm_agent")

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
EXIT_NO_BINDING = 2
EXIT_UNREPORTED = 3
EXIT_NO_JOB = 4
EXIT_INTERRUPTED = 5

DEFAULT_POWEROFF = "systemctl poweroff"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batchvm_agent", description="Run this VM's one batch job, then power the VM off."
    )
    parser.add_argument(
        "--poweroff-command",
        default=DEFAULT_POWEROFF,
        help="run (shlex split, no shell) when done; '' just exits (default: %(default)s)",
    )
    parser.add_argument(
        "--job-wait-seconds",
        type=float,
        default=600.0,
        help="give up (FAILED) if no job message for this VM arrives within this time",
    )
    parser.add_argument(
        "--metadata-wait-seconds",
        type=float,
        default=300.0,
        help="how long to retry until the metadata server answers",
    )
    parser.add_argument(
        "--lease-seconds",
        type=int,
        default=600,
        help="ack deadline to keep extending while the job runs, renewed every third of it "
        "(1-600; below 10 only for tests that need a lapsed lease to show quickly). A replacement "
        "VM does not wait for a lost VM's lease: the operator frees the job with a seek",
    )
    parser.add_argument(
        "--status-deadline-seconds",
        type=float,
        default=300.0,
        help="how long to retry publishing the terminal status",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.lease_seconds <= 600:
        parser.error("--lease-seconds must be between 1 and 600")
    try:
        args.poweroff_argv = shlex.split(args.poweroff_command)
    except ValueError as exc:
        parser.error(f"--poweroff-command: {exc}")
    return args


class Agent:
    """One job on one VM. Everything external is passed in, so tests can drive it."""

    def __init__(
        self,
        binding: Binding,
        metadata: MetadataClient,
        publisher,
        subscriber,
        args: argparse.Namespace,
        hooks: testhooks.Hooks = testhooks.DISABLED,
    ):
        self.binding = binding
        self.args = args
        self.hooks = hooks
        self.stop = threading.Event()
        self.preempted = False
        self.status = StatusPublisher(
            publisher,
            binding.status_topic_path,
            binding.job_id,
            binding.attempt,
            binding.vm_name,
            binding.zone,
            task_index=binding.task_index,
        )
        self.source = JobSource(
            subscriber,
            binding.subscription_path,
            binding.job_id,
            binding.attempt,
            binding.image_registry,
            binding.task_index,
            binding.task_count,
        )
        self.runner = ContainerRunner(binding.container_cli, binding.container_run_args)
        self.watcher = PreemptionWatcher(metadata, self._on_preempted)

    def _on_preempted(self) -> None:
        self.preempted = True
        self.stop.set()

    def request_stop(self, signum: int, _frame=None) -> None:
        """SIGTERM/SIGINT: the VM is shutting down. Stop the container; leave the message unacked."""
        log.warning("received signal %s: stopping", signum)
        self.stop.set()

    def run(self) -> int:
        b = self.binding
        log.info(
            "bound to job %s attempt %s task %s of %s on %s (%s); pulling %s",
            b.job_id,
            b.attempt,
            b.task_index,
            b.task_count or "1 (or the job message's task_count)",
            b.vm_name,
            b.zone,
            b.subscription_path,
        )
        self.watcher.start()
        try:
            taken = self.source.take(self.args.job_wait_seconds, self.stop)
            if taken is None:
                return self._no_job()
            if isinstance(taken, Superseded):
                log.warning(
                    "the job message is for attempt %s: this VM's attempt %s is obsolete",
                    taken.newer_attempt,
                    b.attempt,
                )
                self.source.release(taken.ack_id)  # for the newer attempt's VM
                self.status.try_publish(
                    wire.Status.FAILED, deadline=30, reason=f"superseded by attempt {taken.newer_attempt}"
                )
                return EXIT_NO_JOB
            with self.source.lease(taken.ack_id, self.args.lease_seconds) as lease:
                if taken.spec is None:
                    return self._finish(taken, lease, wire.Status.FAILED, reason=taken.error)
                try:
                    return self._run_job(taken, lease)
                except Exception as exc:  # an agent bug must still end the wait of the task
                    log.exception("agent error while running the job")
                    return self._finish(
                        taken, lease, wire.Status.FAILED, reason=f"agent error: {type(exc).__name__}: {exc}"
                    )
        finally:
            self.watcher.stop()

    def _no_job(self) -> int:
        if self.stop.is_set():
            if self.preempted or self.watcher.is_preempted_now():
                self.status.try_publish(
                    wire.Status.PREEMPTED, deadline=15, reason="the VM was preempted before the job started"
                )
            return EXIT_INTERRUPTED
        reason = (
            f"no job message for attempt {self.binding.attempt} task {self.binding.task_index} arrived on "
            f"{self.binding.job_subscription} within {self.args.job_wait_seconds:g} s"
        )
        log.error("%s", reason)
        self.status.try_publish(wire.Status.FAILED, deadline=60, reason=reason)
        return EXIT_NO_JOB

    def _run_job(self, taken: Taken, lease: Lease) -> int:
        spec = taken.spec
        log.info(
            "took job message %s: job %s task %s of %s, image %s",
            taken.message_id,
            spec.job_id,
            spec.task_index,
            spec.task_count,
            spec.image,
        )
        if not self.binding.image_allowed(spec.image):
            allowed = " ".join(self.binding.image_allowlist)
            log.error("refusing image %s: not under this VM's allowlist (%s)", spec.image, allowed)
            return self._finish(
                taken, lease, wire.Status.FAILED,
                reason=f"image {spec.image} is not allowed on this VM (allowed prefixes: {allowed})",
            )
        try:
            self.status.publish(wire.Status.STARTED, deadline=60)
        except PublishFailed as exc:  # the terminal status retries longer; the work matters more
            log.error("%s; running the job anyway", exc)
        self.hooks.after_started()
        if self.stop.is_set():
            return self._interrupted(taken, lease, "")
        with Heartbeat(self.status, self.binding.heartbeat_seconds):
            name = container_name(spec.job_id, spec.attempt, spec.task_index)
            result = self.runner.run(spec, name, self.stop)
        if result.stopped:
            return self._interrupted(taken, lease, result.log_tail)
        if result.succeeded:
            return self._finish(taken, lease, wire.Status.FINISHED, exit_code=0, log_tail=result.log_tail)
        return self._finish(
            taken,
            lease,
            wire.Status.FAILED,
            exit_code=result.exit_code,
            reason=result.reason,
            log_tail=result.log_tail,
        )

    def _finish(self, taken: Taken, lease: Lease, status: wire.Status, **fields) -> int:
        """Publish the terminal status, then, and only then, ack the job message."""
        try:
            self.status.publish(status, deadline=self.args.status_deadline_seconds, **fields)
        except PublishFailed as exc:
            log.error("%s; leaving the job message unacked so that the job is not lost", exc)
            return EXIT_UNREPORTED
        lease.stop()
        try:
            self.source.ack(taken.ack_id)
            log.info("acked job message %s", taken.message_id)
        except Exception as exc:  # the status is out; a redelivery finds the task already done
            log.error("acking the job message failed: %s", exc)
        return EXIT_OK

    def _interrupted(self, taken: Taken, lease: Lease, log_tail: str) -> int:
        """Preempted or shut down: release the message (unacked) for a replacement VM."""
        lease.stop()
        self.source.release(taken.ack_id)
        if self.preempted or self.watcher.is_preempted_now():
            self.status.try_publish(
                wire.Status.PREEMPTED, deadline=15, reason="the VM was preempted", log_tail=log_tail or None
            )
        else:
            log.warning("stopped before the job finished; the job message is left for redelivery")
        return EXIT_INTERRUPTED


def power_off(argv: list[str]) -> None:
    if not argv:
        return
    log.info("powering off: %s", argv)
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("power-off command %s failed: %s", argv, exc)


def report_unusable_binding(exc: BindingError) -> None:
    """If enough of the binding was readable to know where to report, say why nothing will run."""
    p = exc.partial
    if not all(p.get(k) for k in ("project", "job_id", "status_topic")):
        return
    from google.cloud import pubsub_v1

    status = StatusPublisher(
        pubsub_v1.PublisherClient(),
        f"projects/{p['project']}/topics/{p['status_topic']}",
        str(p["job_id"]),
        int(p.get("attempt") or 1),
        str(p.get("vm_name", "")),
        str(p.get("zone", "")),
        task_index=int(p.get("task_index") or 0),
    )
    status.try_publish(wire.Status.FAILED, deadline=30, reason=f"VM configuration: {exc}")


def run(args: argparse.Namespace) -> int:
    metadata = MetadataClient()
    try:
        binding = read_binding(metadata, args.metadata_wait_seconds)
    except MetadataUnavailable as exc:
        log.error("%s", exc)
        return EXIT_NO_BINDING
    except BindingError as exc:
        log.error("%s", exc)
        report_unusable_binding(exc)
        return EXIT_NO_BINDING

    from google.cloud import pubsub_v1  # after the binding: a VM without one needs no client

    agent = Agent(
        binding,
        metadata,
        pubsub_v1.PublisherClient(),
        pubsub_v1.SubscriberClient(),
        args,
        testhooks.load(metadata),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, agent.request_stop)
    return agent.run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="batchvm-agent %(asctime)s %(levelname)s %(message)s"
    )
    for noisy in ("google", "grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        code = run(args)
    except Exception:
        log.exception("agent error")
        code = EXIT_AGENT_ERROR
    log.info("done (exit %s)", code)
    power_off(args.poweroff_argv)
    return code
