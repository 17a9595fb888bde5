"""``batchvm gc``: delete the VMs and per-job subscriptions that no running task owns.

The rules are :func:`airflow_batchvm.gc.collect_garbage`'s (the same callable a DAG task can run).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, SpinnerColumn, TextColumn
from rich.table import Table

from airflow_batchvm.cli.common import (
    DEFAULT_CONN_ID,
    ConnIdOpt,
    ProjectOpt,
    format_seconds,
    open_cloud,
    out,
    parse_duration,
    progress,
)
from airflow_batchvm.gc import DEFAULT_GRACE_SECONDS, GcItem, collect_garbage


def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be deleted; delete nothing.")
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(
            help="Also delete managed VMs older than this (6h, 2d), whatever their state.", show_default=False
        ),
    ] = None,
    grace: Annotated[
        str,
        typer.Option(help="How long a VM must have been off, and an orphan subscription must exist, first."),
    ] = format_seconds(DEFAULT_GRACE_SECONDS),
    zone: Annotated[
        list[str] | None,
        typer.Option("--zone", help="Only VMs in this zone (repeatable; default: all zones)."),
    ] = None,
    output_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    project: ProjectOpt = None,
    gcp_conn_id: ConnIdOpt = DEFAULT_CONN_ID,
) -> None:
    """Find VMs labelled managed-by=airflow-batchvm and per-job subscriptions left behind; delete them."""
    max_age = parse_duration(older_than) if older_than else None
    grace_seconds = parse_duration(grace)
    cloud = open_cloud(project, gcp_conn_id)
    cloud.announce()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"))
    with progress(*columns) as bar:
        task = bar.add_task("looking for garbage" if dry_run else "collecting garbage", total=None)

        def advance(item: GcItem) -> None:
            bar.update(task, advance=1, description=f"{item.kind} {item.name}")

        report = collect_garbage(
            cloud.hook,
            cloud.project,
            zones=zone or None,
            dry_run=dry_run,
            grace_seconds=grace_seconds,
            max_age_seconds=max_age,
            on_item=advance,
        )
    if output_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    if report.failed:
        raise typer.Exit(1)


def _print(report) -> None:
    console = out()
    verb = "would delete" if report.dry_run else "deleted"
    table = Table(title=f"batchvm gc {'(dry run: nothing deleted)' if report.dry_run else ''}".strip())
    for column in ("action", "kind", "name", "zone", "why"):
        table.add_column(column, overflow="fold")
    for item in report.garbage:
        action = f"[red]failed[/]: {item.error}" if item.error else f"[yellow]{verb}[/]"
        table.add_row(action, item.kind, item.name, item.zone, item.reason)
    for item in report.kept:
        table.add_row("[dim]keep[/]", item.kind, item.name, item.zone, item.reason)
    console.print(table)
    done = len(report.garbage) if report.dry_run else len(report.deleted)
    console.print(
        f"{report.vms_seen} managed VM(s) and {report.subscriptions_seen} per-job subscription(s) seen; "
        f"{done} {verb}, {len(report.kept)} kept"
    )
