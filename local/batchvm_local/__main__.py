"""``python -m batchvm_local up|down|status|env``: the local stack as a background service.

    eval "$(python -m batchvm_local up)"     # start it (detached) and export its environment
    python -m batchvm_local status           # what runs
    python -m batchvm_local env              # the export lines again
    python -m batchvm_local down             # stop everything; non-zero if anything was left running

State (pids, ports, logs, VM serial consoles) lives in ``$BATCHVM_LOCAL_DIR``, else ``<repo>/.local/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import urllib.request
from pathlib import Path

from batchvm_local import procs
from batchvm_local.pubsub_emulator import stop_process_group
from batchvm_local.stack import DEFAULT_PROJECT, DEFAULT_ZONE, REPO_ROOT, STACK_MARKER, LocalStack

STATE_FILE = "stack.json"


def local_dir() -> Path:
    return Path(os.environ.get("BATCHVM_LOCAL_DIR") or REPO_ROOT / ".local")


def load_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def _identity(component: dict | None) -> procs.Proc | None:
    """The recorded process, if that very process still runs."""
    if not component or component.get("start_time") is None:
        return None
    proc = procs.read_proc(component["pid"])
    if proc is None or proc.start_time != component["start_time"] or not procs.is_alive(proc):
        return None
    return proc


def _answers(url: str, headers: dict[str, str] | None = None) -> bytes | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


def _running(state: dict) -> bool:
    return _identity(state["pubsub"]) is not None and _identity(state["compute"]) is not None


def teardown(state: dict) -> list[procs.Proc]:
    """Stop the stack's services; returns what was still running afterwards (and has now been SIGKILLed)."""
    marker = f"{STACK_MARKER}={state['stack_id']}"
    before = {p.pid: p for p in procs.marked(marker)}
    leaders = [p for p in (_identity(state["compute"]), _identity(state["pubsub"])) if p is not None]
    for proc in procs.all_procs():
        if any(proc.pgid == leader.pid for leader in leaders):
            before.setdefault(proc.pid, proc)
    for leader in leaders:  # the stand-in first: on SIGTERM it kills its VMs
        stop_process_group(leader.pid, grace=15)
    left = {p.pid: p for p in procs.wait_gone(list(before.values()), timeout=2)}
    left.update({p.pid: p for p in procs.marked(marker)})
    for proc in left.values():
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return list(left.values())


def cmd_up(args: argparse.Namespace) -> int:
    directory = local_dir()
    state = load_state(directory)
    if state is not None:
        if _running(state):
            print(f"the local stack already runs (state in {directory})", file=sys.stderr)
            sys.stdout.write(exports(state["env"]))
            return 0
        print("a previous local stack is no longer whole: stopping what is left of it", file=sys.stderr)
        teardown(state)
        (directory / STATE_FILE).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(
        project=args.project,
        zone=args.zone,
        pubsub_port=args.pubsub_port,
        compute_port=args.compute_port,
        state_dir=directory,
        boot_seconds=args.boot_seconds,
        agent_command=args.agent_command,
    )
    stack.start()
    state = stack.state()
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(directory / STATE_FILE)
    print(
        f"local stack up: Pub/Sub emulator {stack.pubsub.host}, Compute stand-in {stack.compute_url} "
        f"(state in {directory}); stop it with: python -m batchvm_local down",
        file=sys.stderr,
    )
    sys.stdout.write(exports(state["env"]))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    state = load_state(local_dir())
    if state is None:
        print(
            f"no local stack (no {local_dir() / STATE_FILE}); start it with: python -m batchvm_local up",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(exports(state["env"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    directory = local_dir()
    state = load_state(directory)
    if state is None:
        print(f"no local stack (no {directory / STATE_FILE})")
        return 1
    env = state["env"]
    pubsub_up = _identity(state["pubsub"]) is not None and _answers(f"http://{env['PUBSUB_EMULATOR_HOST']}/")
    vms_raw = _answers(f"{env['BATCHVM_COMPUTE_API_ENDPOINT']}/_local/vms")
    compute_up = _identity(state["compute"]) is not None and vms_raw is not None
    print(f"state:   {directory / STATE_FILE} (project {state['project']}, zone {state['zone']})")
    print(
        f"pubsub:  {'running' if pubsub_up else 'DOWN'} on {env['PUBSUB_EMULATOR_HOST']} "
        f"(pid {state['pubsub']['pid']})"
    )
    print(
        f"compute: {'running' if compute_up else 'DOWN'} on {env['BATCHVM_COMPUTE_API_ENDPOINT']} "
        f"(pid {state['compute']['pid']})"
    )
    if vms_raw is not None:
        vms = json.loads(vms_raw)["vms"]
        print(f"vms:     {len(vms)}")
        for vm in vms:
            print(f"  {vm['zone']}/{vm['name']}: {vm['status']} (pid {vm['pid']}, serial {vm['serialLog']})")
    return 0 if pubsub_up and compute_up else 1


def cmd_down(args: argparse.Namespace) -> int:
    directory = local_dir()
    state = load_state(directory)
    if state is None:
        print("no local stack to stop")
        return 0
    left = teardown(state)
    (directory / STATE_FILE).unlink(missing_ok=True)
    if left:
        print("these processes of the local stack were still running and have been killed:", file=sys.stderr)
        for proc in left:
            print(f"  pid {proc.pid} (pgid {proc.pgid}) {proc.comm}", file=sys.stderr)
        return 1
    print("local stack stopped; nothing of it is left running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchvm_local", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the stack in the background and print its environment")
    up.add_argument("--project", default=DEFAULT_PROJECT)
    up.add_argument("--zone", default=DEFAULT_ZONE)
    up.add_argument("--pubsub-port", type=int, default=8085, help="0 picks a free port")
    up.add_argument("--compute-port", type=int, default=8086, help="0 picks a free port")
    up.add_argument("--boot-seconds", type=float, default=0.2)
    up.add_argument("--agent-command", help="what each VM runs (default: the worker agent)")
    up.set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop everything and check nothing is left").set_defaults(run=cmd_down)
    commands.add_parser("status", help="tell what runs").set_defaults(run=cmd_status)
    commands.add_parser("env", help="print the export lines again").set_defaults(run=cmd_env)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
