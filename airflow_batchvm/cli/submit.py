"""``batchvm submit``: publish one job and create its VM, without Airflow.

The same calls as ``BatchVmSubmitJobOperator`` (the provider's hook, the wire format): the job's
subscriptions first, then the job message, then its VM from the instance template. ``--wait``
then watches it with the provider's own watcher (the trigger), prints the result and the
container's log tail, and deletes the VM and the subscriptions, as ``BatchVmRunJobOperator`` does.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from airflow_batchvm.cli.common import (
    DEFAULT_CONN_ID,
    DEFAULT_TEMPLATE,
    Cloud,
    ConnIdOpt,
    ProjectOpt,
    TemplateOpt,
    ZoneOpt,
    err,
    fail,
    open_cloud,
    out,
    parse_duration,
    parse_pairs,
    progress,
    spinner,
)
from airflow_batchvm.timeline import log_timeline
from airflow_batchvm.wire import JOB_ID_MAX_LEN, JOB_ID_PATTERN, JobSpec, LegacyJob

ATTR_IMAGE_REGISTRY = "batchvm-image-registry"


def new_job_id(stem: str) -> str:
    """``cli-<stem>-<8 hex>``: unique, and a valid job id (so a valid VM and subscription name)."""
    suffix = secrets.token_hex(4)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "job"
    slug = slug[: JOB_ID_MAX_LEN - len("cli--") - len(suffix)].strip("-")
    return f"cli-{slug}-{suffix}"


def image_stem(image: str) -> str:
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def _describe(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in errors())
    return str(exc)


def template_registry(cloud: Cloud, template: str) -> str:
    """The ``batchvm-image-registry`` the instance template gives its VMs ('' if none)."""
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.cloud import compute_v1

    endpoint = cloud.hook.compute_api_endpoint
    client = compute_v1.InstanceTemplatesClient(
        credentials=cloud.hook.get_credentials(),
        client_options=ClientOptions(api_endpoint=endpoint) if endpoint else None,
    )
    try:
        found = client.get(project=cloud.project, instance_template=template.rsplit("/", 1)[-1])
    except gexc.NotFound:
        raise ValueError(
            f"instance template {template} does not exist in {cloud.project}: see batchvm setup"
        ) from None
    for item in found.properties.metadata.items:
        if item.key == ATTR_IMAGE_REGISTRY:
            return item.value
    return ""


def submit(
    process_type: Annotated[
        str | None,
        typer.Option(help="The earlier publish script's job: an image name in the template's registry."),
    ] = None,
    sleep_time: Annotated[
        int | None,
        typer.Option(help="The earlier script's sleep time: SLEEP_TIME for the job.", show_default=False),
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="Container image to run (instead of --process-type).")
    ] = None,
    command: Annotated[
        str | None, typer.Option(help="Replaces the image's entrypoint (split like a shell would).")
    ] = None,
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="Argument to the command (repeatable).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="Container env NAME=VALUE (repeatable).")
    ] = None,
    payload: Annotated[
        str | None, typer.Option(help="JSON for the job (JOB_DATA), or @FILE to read it from a file.")
    ] = None,
    timeout_seconds: Annotated[
        int | None, typer.Option(help="The agent kills the container after this long.", show_default=False)
    ] = None,
    job_id: Annotated[
        str | None, typer.Option(help="Default: cli-<image>-<random>.", show_default=False)
    ] = None,
    attempt: Annotated[
        int, typer.Option(min=1, help="The job attempt (a replacement run of the same job id).")
    ] = 1,
    label: Annotated[list[str] | None, typer.Option("--label", help="Label KEY=VALUE (repeatable).")] = None,
    registry: Annotated[
        str | None,
        typer.Option(help="Registry for --process-type (default: the template's).", show_default=False),
    ] = None,
    legacy_format: Annotated[
        bool,
        typer.Option(
            "--legacy-format",
            help="Publish the earlier design's message {job_id, process_type, sleep_time, vm_count} as is.",
        ),
    ] = False,
    zone: ZoneOpt = "us-central1-a",
    template: TemplateOpt = DEFAULT_TEMPLATE,
    machine_type: Annotated[
        str | None, typer.Option(help="Overrides the template's machine type.", show_default=False)
    ] = None,
    max_run_duration: Annotated[
        str | None,
        typer.Option(help="Overrides the template's safety-net max run duration.", show_default=False),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the result, then clean up.")
    ] = False,
    keep_vm: Annotated[bool, typer.Option("--keep-vm", help="With --wait: do not delete the VM.")] = False,
    liveness_check_seconds: Annotated[
        float, typer.Option(help="With --wait: how often to look at the VM.")
    ] = 10.0,
    project: ProjectOpt = None,
    gcp_conn_id: ConnIdOpt = DEFAULT_CONN_ID,
) -> None:
    """Publish a job to batch_jobs and create the VM that runs it (no Airflow needed)."""
    if bool(process_type) == bool(image):
        raise fail("give exactly one of --image and --process-type")
    if legacy_format and not process_type:
        raise fail("--legacy-format needs --process-type (the earlier message has no image)")
    if legacy_format and (command or arg or env or payload or timeout_seconds or label):
        raise fail("--legacy-format carries only --process-type and --sleep-time")

    cloud = open_cloud(project, gcp_conn_id)
    cloud.announce()
    job_id = job_id or new_job_id(process_type or image_stem(image or ""))
    if not re.match(JOB_ID_PATTERN, job_id) or len(job_id) > JOB_ID_MAX_LEN:
        raise fail(
            f"job id {job_id!r} must match {JOB_ID_PATTERN} and have at most {JOB_ID_MAX_LEN} characters"
        )

    from pydantic import ValidationError

    try:
        if legacy_format:
            legacy = LegacyJob(job_id=job_id, process_type=process_type, sleep_time=sleep_time or 0)
            message = (legacy.model_dump_json().encode(), {"job_id": job_id, "attempt": str(attempt)})
            spec = None
        else:
            spec = _build_spec(
                cloud, template, job_id, attempt,
                process_type=process_type, sleep_time=sleep_time, image=image, command=command, args=arg,
                env=env, payload=payload, timeout_seconds=timeout_seconds, labels=label, registry=registry,
            )  # fmt: skip
            message = None
    except (ValidationError, ValueError) as exc:
        raise fail(f"invalid job: {_describe(exc)}") from None

    max_run_seconds = int(parse_duration(max_run_duration)) if max_run_duration else None
    if max_run_seconds is None and timeout_seconds:
        from airflow_batchvm.operators.batchvm import MAX_RUN_MARGIN_SECONDS

        # As the operator does: the VM outlives the job's timeout by a margin, and no more.
        max_run_seconds = timeout_seconds + MAX_RUN_MARGIN_SECONDS
    names = _submit(cloud, job_id, attempt, spec, message, zone, template, machine_type, max_run_seconds)
    out().print(f"submitted job [bold]{job_id}[/] attempt {attempt}: VM [bold]{names.vm_name}[/] in {zone}")
    if not wait:
        out().print(
            f"follow it with: batchvm monitor --job-id {job_id}\n"
            "its VM powers off when the job is done; `batchvm gc` deletes it and the job's subscriptions"
        )
        return
    event = _wait(cloud, names, zone, attempt, gcp_conn_id, liveness_check_seconds)
    log_timeline(ConsoleLog(err()), event.get("timeline"))  # the last steps, after the ones the watcher printed
    _show(event)
    _clean_up(cloud, names, zone, keep_vm)
    if event["status"] != "FINISHED":
        raise typer.Exit(1)


def _build_spec(
    cloud: Cloud,
    template: str,
    job_id: str,
    attempt: int,
    *,
    process_type: str | None,
    sleep_time: int | None,
    image: str | None,
    command: str | None,
    args: list[str] | None,
    env: list[str] | None,
    payload: str | None,
    timeout_seconds: int | None,
    labels: list[str] | None,
    registry: str | None,
) -> JobSpec:
    fields: dict[str, Any] = {"job_id": job_id, "attempt": attempt}
    if process_type:
        registry = registry or template_registry(cloud, template)
        if not registry:
            raise ValueError(
                f"template {template} sets no {ATTR_IMAGE_REGISTRY} for --process-type: pass --registry"
            )
        # The wire format's own reading of the earlier message: image, SLEEP_TIME and payload.
        fields.update(
            LegacyJob(job_id=job_id, process_type=process_type, sleep_time=sleep_time or 0)
            .to_job_spec(registry, attempt)
            .model_dump(include={"image", "env", "payload"})
        )
    else:
        fields["image"] = image
        if sleep_time is not None:
            fields["env"] = {"SLEEP_TIME": str(sleep_time)}
    fields["env"] = {**fields.get("env", {}), **parse_pairs(env, "--env")}
    if payload is not None:
        text = Path(payload[1:]).read_text() if payload.startswith("@") else payload
        try:
            fields["payload"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--payload is not JSON: {exc}") from None
    if command:
        fields["command"] = shlex.split(command)
    fields["args"] = list(args or [])
    fields["timeout_seconds"] = timeout_seconds
    fields["labels"] = parse_pairs(labels, "--label")
    return JobSpec.model_validate(fields)


def _submit(cloud: Cloud, job_id, attempt, spec, message, zone, template, machine_type, max_run_seconds):
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from airflow_batchvm.hooks.batchvm import JobNames, VmInsertError
    from airflow_batchvm.operators.batchvm import MANAGED_BY

    hook = cloud.hook
    names = JobNames(cloud.project, job_id)
    if hook.get_vm(project_id=cloud.project, zone=zone, vm_name=names.vm_name) is not None:
        raise fail(f"VM {names.vm_name} already exists in {zone}: pick another --job-id, or delete it first")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with progress(*columns) as bar:
        step = bar.add_task("creating the job's subscriptions")
        hook.create_job_subscriptions(names)
        try:
            bar.update(step, description="publishing the job")
            if spec is not None:
                message_id = hook.publish_job(names, spec)
            else:
                data, attributes = message
                message_id = hook.publisher.publish(names.job_topic, data, **attributes).result(timeout=120)
            err().print(f"[dim]published job {job_id} as message {message_id}[/]")
            bar.update(step, description=f"creating VM {names.vm_name} from {template}")
            extra: dict[str, Any] = {"max_run_seconds": max_run_seconds} if max_run_seconds else {}
            hook.insert_vm(
                project_id=cloud.project,
                zone=zone,
                vm_name=names.vm_name,
                instance_template=template,
                machine_type=machine_type,
                metadata=names.binding_metadata(attempt),
                labels={
                    **(spec.labels if spec else {}),
                    "batchvm-job-id": job_id,
                    "submitted-by": "batchvm-cli",
                    **MANAGED_BY,
                },
                request_id=str(uuid.uuid4()),
                **extra,
            )
        except VmInsertError as exc:
            hook.delete_job_subscriptions(names)
            raise fail(f"could not create the VM for job {job_id}: {exc} [{exc.reason}]") from None
        except BaseException:
            hook.delete_job_subscriptions(names)
            raise
    return names


def _wait(cloud: Cloud, names, zone: str, attempt: int, gcp_conn_id: str, liveness: float) -> dict[str, Any]:
    """The provider's watcher, run here as the sensor runs it when not deferrable."""
    from airflow_batchvm.triggers.batchvm import BatchVmJobTrigger

    watcher = BatchVmJobTrigger(
        job_id=names.job_id,
        attempt=attempt,
        project_id=cloud.project,
        zone=zone,
        vm_name=names.vm_name,
        gcp_conn_id=gcp_conn_id,
        liveness_check_seconds=liveness,
        submitted_at=time.time(),
    )

    async def first_event() -> dict[str, Any]:
        async for event in watcher.run():
            return event.payload
        raise RuntimeError("the job watcher ended without an event")

    with spinner(
        f"waiting for job {names.job_id} on {names.vm_name} (Ctrl-C stops waiting; the job goes on)"
    ) as live:
        watcher._log = ConsoleLog(live.console)  # the watcher's timeline lines, above the spinner
        try:
            return asyncio.run(first_event())
        except KeyboardInterrupt:
            raise fail(
                f"stopped waiting; job {names.job_id} goes on. Follow it with: batchvm monitor --job-id "
                f"{names.job_id}; `batchvm gc` cleans up after it",
                code=130,
            ) from None


class ConsoleLog:
    """Enough of a logger for the watcher: its timeline and warnings go to the terminal (stderr)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def _emit(self, style: str, msg: str, args: tuple) -> None:
        self.console.print(msg % args if args else msg, style=style, markup=False, highlight=False)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        pass

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("", msg, args)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("yellow", msg, args)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("red", msg, args)

    exception = error


def _show(event: dict[str, Any]) -> None:
    console = out()
    ok = event["status"] == "FINISHED"
    table = Table(show_header=False, title=f"job {event['job_id']}")
    table.add_column(style="dim")
    table.add_column(overflow="fold")
    table.add_row("status", f"[{'green' if ok else 'red'}]{event['status']}[/]")
    for key in ("attempt", "vm_name", "zone", "exit_code", "reason", "started_at", "time"):
        if event.get(key) not in (None, ""):
            table.add_row(key, str(event[key]))
    console.print(table)
    if event.get("log_tail"):
        console.print(Panel(event["log_tail"].rstrip("\n"), title="container log tail", expand=False))


def _clean_up(cloud: Cloud, names, zone: str, keep_vm: bool) -> None:
    hook = cloud.hook
    if keep_vm:
        err().print(f"[dim]keeping VM {names.vm_name} (--keep-vm)[/]")
    else:
        hook.delete_vm(project_id=cloud.project, zone=zone, vm_name=names.vm_name, wait=True)
    hook.delete_job_subscriptions(names)
    err().print(f"[dim]deleted {'' if keep_vm else f'VM {names.vm_name} and '}the job's subscriptions[/]")
