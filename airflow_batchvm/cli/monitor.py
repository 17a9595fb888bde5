"""``batchvm monitor``: the status logger. Streams ``batch_jobs_status`` to the terminal and a log file.

It reads the monitoring subscription that ``batchvm setup`` creates, so it sees every status of
every job (and of the earlier design's VMs: their ``{job_id, status, vm_name}`` is a subset of the
current status message). What it has shown it acks; a malformed message is shown as dropped and
acked, never a crash. Give each person or process that monitors its own ``--monitor-subscription``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.markup import escape

from airflow_batchvm.cli.common import (
    DEFAULT_CONN_ID,
    DEFAULT_MONITOR_SUBSCRIPTION,
    ConnIdOpt,
    MonitorSubOpt,
    ProjectOpt,
    err,
    fail,
    open_cloud,
    out,
    parse_duration,
    spinner,
)
from airflow_batchvm.wire import Status, StatusMessage, WireError

DEFAULT_LOG_FILE = Path("batchvm_status.log")
MAX_PULL_SECONDS = 10.0
STATUS_STYLE = {
    Status.STARTED: "cyan",
    Status.RUNNING: "dim",
    Status.FINISHED: "bold green",
    Status.FAILED: "bold red",
    Status.PREEMPTED: "bold yellow",
}


def describe(status: StatusMessage) -> str:
    parts = [f"job={status.job_id}", f"attempt={status.attempt}"]
    if status.vm_name:
        parts.append(f"vm={status.vm_name}")
    if status.zone:
        parts.append(f"zone={status.zone}")
    if status.exit_code is not None:
        parts.append(f"exit_code={status.exit_code}")
    if status.reason:
        parts.append(f"reason={json.dumps(status.reason)}")
    return " ".join(parts)


class Sink:
    """One line per message in the terminal and in the log file (text, or JSON lines)."""

    def __init__(self, file: TextIO, jsonl: bool, show_log_tail: bool):
        self.file = file
        self.jsonl = jsonl
        self.show_log_tail = show_log_tail
        self.console = out()

    def status(self, status: StatusMessage, raw: dict[str, Any], when: datetime, message_id: str) -> None:
        stamp = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        style = STATUS_STYLE.get(status.status, "")
        self.console.print(
            f"{stamp} [{style}]{status.status.value:<9}[/] {escape(describe(status))}", soft_wrap=True
        )
        tail = (status.log_tail or "").rstrip("\n")
        if tail and self.show_log_tail:
            self.console.print(
                "\n".join(f"    | {line}" for line in tail.splitlines()), style="dim", markup=False
            )
        if self.jsonl:
            self.file.write(json.dumps({"received": stamp, "message_id": message_id, **raw}) + "\n")
        else:
            self.file.write(f"{stamp} {status.status.value:<9} {describe(status)}\n")
            self.file.writelines(f"    | {line}\n" for line in tail.splitlines())
        self.file.flush()

    def dropped(self, reason: str, message_id: str) -> None:
        self.console.print(f"[yellow]dropped[/] message {message_id}: {escape(reason)}")
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.jsonl:
            self.file.write(
                json.dumps({"received": stamp, "message_id": message_id, "dropped": reason}) + "\n"
            )
        else:
            self.file.write(f"{stamp} DROPPED   message={message_id} reason={json.dumps(reason)}\n")
        self.file.flush()


def monitor(
    job_id: Annotated[
        str | None,
        typer.Option(help="Show only this job's statuses (others are acked unseen).", show_default=False),
    ] = None,
    log_file: Annotated[Path, typer.Option(help="Append every status to this file.")] = DEFAULT_LOG_FILE,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Write the log file as JSON lines.")] = False,
    show_log_tail: Annotated[
        bool, typer.Option("--log-tail/--no-log-tail", help="Show terminal statuses' log tails.")
    ] = True,
    max_messages: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many messages.", show_default=False)
    ] = None,
    timeout: Annotated[
        str | None, typer.Option(help="Stop after this long (90s, 15m, ...).", show_default=False)
    ] = None,
    monitor_subscription: MonitorSubOpt = DEFAULT_MONITOR_SUBSCRIPTION,
    project: ProjectOpt = None,
    gcp_conn_id: ConnIdOpt = DEFAULT_CONN_ID,
) -> None:
    """Stream status messages from batch_jobs_status to the terminal and a log file."""
    from google.api_core import exceptions as gexc

    cloud = open_cloud(project, gcp_conn_id)
    cloud.announce()
    subscriber = cloud.hook.subscriber
    path = f"projects/{cloud.project}/subscriptions/{monitor_subscription}"
    deadline = time.monotonic() + parse_duration(timeout) if timeout else None
    shown = 0
    backoff = 1.0
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as file, spinner(f"listening on {path} (Ctrl-C stops)") as status_line:
        sink = Sink(file, jsonl, show_log_tail)
        try:
            while max_messages is None or shown < max_messages:
                remaining = deadline - time.monotonic() if deadline else MAX_PULL_SECONDS
                if remaining <= 0:
                    break
                try:
                    response = subscriber.pull(
                        request={"subscription": path, "max_messages": 100},
                        timeout=max(0.5, min(remaining, MAX_PULL_SECONDS)),
                        retry=None,
                    )
                except gexc.DeadlineExceeded:
                    continue
                except gexc.NotFound:
                    raise fail(
                        f"subscription {path} does not exist: create it with `batchvm setup`"
                    ) from None
                except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.Unknown) as exc:
                    err().print(
                        f"[yellow]Pub/Sub unavailable[/] ({exc.message}); retrying in {backoff:.0f} s"
                    )
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 1.0
                done, left = [], []
                for received in response.received_messages:
                    if max_messages is not None and shown >= max_messages:
                        left.append(received.ack_id)
                        continue
                    done.append(received.ack_id)
                    shown += _handle(sink, received, job_id)
                status_line.update(f"listening on {path}: {shown} shown (Ctrl-C stops)")
                if done:
                    subscriber.acknowledge(request={"subscription": path, "ack_ids": done})
                if left:  # not shown: back to the subscription at once, for the next reader
                    subscriber.modify_ack_deadline(
                        request={"subscription": path, "ack_ids": left, "ack_deadline_seconds": 0}
                    )
        except KeyboardInterrupt:
            pass
    err().print(f"[dim]{shown} message(s) shown; log: {log_file}[/]")


def _handle(sink: Sink, received: Any, job_id: str | None) -> int:
    """Show one message; 1 if it was shown, 0 if it was another job's."""
    message = received.message
    attributes = dict(message.attributes)
    if job_id and attributes.get("job_id", job_id) != job_id:
        return 0
    try:
        status = StatusMessage.from_pubsub(message.data)
    except WireError as exc:
        if job_id:  # cannot tell whose it is
            return 0
        sink.dropped(str(exc), message.message_id)
        return 1
    if job_id and status.job_id != job_id:
        return 0
    raw = json.loads(message.data)
    # The earlier design's statuses carry no time: when Pub/Sub got them is the closest.
    when = status.time if "time" in raw else _publish_time(message)
    sink.status(status, raw, when, message.message_id)
    return 1


def _publish_time(message: Any) -> datetime:
    stamp = message.publish_time
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.now(UTC)
