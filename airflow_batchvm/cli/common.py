"""What the commands share: options, the connection, consoles, and small parsers.

The CLI needs no Airflow metadata database. It reads the Google connection from the environment
(``AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT``, as the local stack sets it), and without one it uses
Application Default Credentials, exactly as a ``google_cloud_platform`` connection with no key does.
Local mode differs only in endpoints: ``PUBSUB_EMULATOR_HOST`` and ``BATCHVM_COMPUTE_API_ENDPOINT``.

Airflow and the Google clients are imported inside the commands, so that ``batchvm --help`` and
``batchvm local`` start at once.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress

if TYPE_CHECKING:
    from airflow_batchvm.hooks.batchvm import BatchVmHook

DEFAULT_CONN_ID = "google_cloud_default"
DEFAULT_TEMPLATE = "batchvm-worker"
DEFAULT_MONITOR_SUBSCRIPTION = "batchvm-monitor"

# --- options shared by several commands ---------------------------------------------------------

ProjectOpt = Annotated[
    str | None,
    typer.Option(
        "--project",
        envvar=["BATCHVM_PROJECT", "GOOGLE_CLOUD_PROJECT"],
        help="GCP project (default: the connection's or ADC's project).",
        show_default=False,
    ),
]
ConnIdOpt = Annotated[
    str,
    typer.Option(
        "--gcp-conn-id",
        help="Airflow connection id, read from AIRFLOW_CONN_<ID> in the environment; without it, ADC.",
    ),
]
ZoneOpt = Annotated[str, typer.Option("--zone", envvar="BATCHVM_ZONE", help="Zone of the job's VM.")]
TemplateOpt = Annotated[
    str,
    typer.Option("--template", envvar="BATCHVM_INSTANCE_TEMPLATE", help="Instance template name (or path)."),
]
MonitorSubOpt = Annotated[
    str,
    typer.Option("--monitor-subscription", help="Subscription on batch_jobs_status that `monitor` reads."),
]


def out() -> Console:
    """Results: stdout. Made per call so that it follows the current terminal (and test runners)."""
    return Console(highlight=False)


def err() -> Console:
    """Progress, notes and errors: stderr, so that stdout stays clean for scripts."""
    return Console(stderr=True, highlight=False)


class _Quiet:
    """A stand-in for a spinner where there is no terminal to draw it on (pipes, CI logs)."""

    def __init__(self, console: Console):
        self.console = console

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> None:
        pass


def spinner(text: str):
    """``console.status`` on a terminal; nothing otherwise (no stray blank lines in logs).

    Print through its ``.console`` while it spins, so that lines go above the spinner.
    """
    console = err()
    return console.status(text) if console.is_terminal else _Quiet(console)


def progress(*columns: Any) -> Progress:
    console = err()
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def fail(message: str, code: int = 1) -> typer.Exit:
    err().print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def cloud_errors(command: Callable[..., None]) -> Callable[..., None]:
    """A refused or failed Google API call ends the command with its message, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from google.api_core.exceptions import GoogleAPICallError
        from google.auth.exceptions import GoogleAuthError

        try:
            command(*args, **kwargs)
        except GoogleAPICallError as exc:
            raise fail(f"{type(exc).__name__}: {exc.message}") from None
        except GoogleAuthError as exc:
            raise fail(f"credentials: {exc}") from None

    return wrapper


# --- the connection ---------------------------------------------------------------------------


@dataclass
class Cloud:
    """The hook and the project every command works in."""

    hook: BatchVmHook
    project: str

    @property
    def local_endpoints(self) -> dict[str, str]:
        found = {
            "Pub/Sub": os.environ.get("PUBSUB_EMULATOR_HOST", ""),
            "Compute": self.hook.compute_api_endpoint or "",
        }
        return {k: v for k, v in found.items() if v}

    def announce(self) -> None:
        where = ", ".join(f"{k} at {v}" for k, v in self.local_endpoints.items())
        suffix = f" [dim](endpoints: {where})[/]" if where else ""
        err().print(f"[dim]project[/] [bold]{self.project}[/]{suffix}")


def open_cloud(project: str | None, conn_id: str = DEFAULT_CONN_ID) -> Cloud:
    """The provider's own hook on a connection from the environment, else on ADC."""
    env_key = f"AIRFLOW_CONN_{conn_id.upper()}"
    if env_key not in os.environ:
        if conn_id != DEFAULT_CONN_ID:
            raise fail(f"connection {conn_id!r} is not in the environment: set {env_key}")
        # A google_cloud_platform connection without a key file means Application Default Credentials.
        extra = {"project": project} if project else {}
        os.environ[env_key] = json.dumps({"conn_type": "google_cloud_platform", "extra": extra})
    from airflow_batchvm.hooks.batchvm import BatchVmHook

    hook = BatchVmHook(gcp_conn_id=conn_id)
    try:
        resolved = project or hook.project_id
    except Exception as exc:  # google.auth's DefaultCredentialsError and the like
        raise fail(f"no credentials: {exc}") from None
    if not resolved:
        raise fail("no project: pass --project or set BATCHVM_PROJECT")
    return Cloud(hook=hook, project=resolved)


# --- parsers ----------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90`` / ``90s`` / ``15m`` / ``6h`` / ``2d`` / ``1h30m`` → seconds."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise typer.BadParameter(f"{text!r} is not a duration (like 90s, 15m, 6h, 2d, 1h30m)")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)


def parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` options (repeatable) → a dict; the value may contain ``=``."""
    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds % 86400 == 0 and seconds >= 86400:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"
