"""The init process of a local "VM": ``python -m batchvm_local.vminit -- COMMAND [ARGS...]``.

It plays the part PID 1 plays on a real VM:

- it is a child subreaper, so whatever the agent starts (podman's ``conmon`` and the container
  detach into their own sessions) stays in this process tree, where the stand-in can find and kill it;
- it reaps those orphans;
- when the agent exits, the VM powers off: everything still running in it is killed, and this
  process exits with the agent's exit code (written to the serial console, as a real VM's last
  lines are);
- SIGTERM (an ACPI shutdown) is passed on to every process of the VM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from batchvm_local import procs

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def console(message: str) -> None:
    print(f"batchvm-local vminit: {message}", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        console("usage: python -m batchvm_local.vminit -- COMMAND [ARGS...]")
        return 2
    become_subreaper()
    me = os.getpid()
    signal.signal(signal.SIGTERM, lambda *_: procs.signal_tree(me, signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        agent = os.posix_spawnp(argv[0], argv, os.environ)
    except OSError as exc:
        console(f"cannot start {argv[0]!r}: {exc}; powering off")
        return 127
    console(f"started {' '.join(argv)} (pid {agent})")
    code = 0
    while True:
        try:
            pid, status = os.wait()  # reaps adopted orphans as well as the agent
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == agent:
            code = os.waitstatus_to_exitcode(status)
            break
    console(f"agent exited with code {code}; powering off")
    procs.kill_tree(procs.read_proc(me), group=False)  # everything but this process
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
