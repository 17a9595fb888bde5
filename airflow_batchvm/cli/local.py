"""``batchvm local up|down|status|env``: the embedded local stack (Pub/Sub emulator + Compute stand-in).

A thin wrapper over ``python -m batchvm_local``. That package is for development only (it is in this
repository's dev dependencies, never a dependency of the provider), so it is imported here, lazily,
and nowhere in production code.
"""

from __future__ import annotations

from typing import Annotated

import typer

from airflow_batchvm.cli.common import fail, spinner

local_app = typer.Typer(
    help="The local stack: Google's Pub/Sub emulator and the Compute Engine stand-in (development only).",
    no_args_is_help=True,
)


def _run(argv: list[str], what: str) -> None:
    try:
        from batchvm_local.__main__ import main
    except ImportError:
        raise fail(
            "`batchvm local` needs the development package batchvm-local, which is not installed. It lives "
            "in this project's repository (local/); install the repository's dev environment "
            "(`make install`, or `uv sync` in a clone) and run this from there.",
            code=2,
        ) from None
    if what:
        with spinner(what):
            code = main(argv)
    else:
        code = main(argv)
    raise typer.Exit(code)


@local_app.command()
def up(
    project: Annotated[str, typer.Option(help="Project the emulators serve.")] = "batchvm-local",
    zone: Annotated[str, typer.Option(help="Zone of the local VMs.")] = "us-central1-a",
    pubsub_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 8085,
    compute_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 8086,
) -> None:
    """Start the stack in the background; prints the export lines (eval "$(batchvm local up)")."""
    argv = ["up", "--project", project, "--zone", zone, "--pubsub-port", str(pubsub_port)]
    _run(
        [*argv, "--compute-port", str(compute_port)], "starting the Pub/Sub emulator and the Compute stand-in"
    )


@local_app.command()
def down() -> None:
    """Stop the stack and every local VM; fails if anything had to be killed."""
    _run(["down"], "stopping the local stack")


@local_app.command()
def status() -> None:
    """Tell what runs: the emulator, the stand-in, the local VMs."""
    _run(["status"], "")


@local_app.command()
def env() -> None:
    """Print the export lines of the running stack again."""
    _run(["env"], "")
