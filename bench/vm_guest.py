"""What each benchmark VM runs (the stand-in's ``--agent-command``): ``python -m bench.vm_guest``.

The VM's metadata attribute ``bench-role`` decides:

- ``idle``: a guest that does nothing until the VM is deleted (P1/P2 measure the waiting side and
  the control plane; the harness publishes the status itself, so that ours and the stock chain see
  the same FINISHED at a known moment);
- anything else (or none): the real worker agent, ``python -m batchvm_agent --poweroff-command ''``,
  with every Pub/Sub RPC it makes recorded in ``bench-events.jsonl`` in the VM's directory (P4, P5).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def metadata_attribute(name: str) -> str | None:
    host = os.environ.get("GCE_METADATA_HOST", "")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{name}", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.read().decode()
    except OSError:
        return None


def main() -> int:
    role = metadata_attribute("bench-role")
    if role == "idle":
        os.execvp("sleep", ["sleep", "infinity"])  # the smallest guest there is
    os.environ["BENCH_EVENTS"] = os.path.abspath("bench-events.jsonl")
    import bench.instrument  # noqa: F401 - arms the counters before any client exists
    from batchvm_agent.main import main as agent_main

    return agent_main(["--poweroff-command", ""])


if __name__ == "__main__":
    sys.exit(main())
