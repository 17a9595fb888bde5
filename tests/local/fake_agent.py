"""A stand-in for the worker agent in tests: behaves as the VM's metadata tells it.

Attributes it reads (all optional): ``test-sleep`` (seconds to run, default 30), ``test-exit-code``,
``test-escape`` (``true``: start a ``setsid`` grandchild that leaves the process group, as podman's
conmon does), ``test-trap-term`` (``true``: on SIGTERM print and exit 0). It prints its environment's
relevant variables to the serial console.
"""

import os
import signal
import sys
import time
import urllib.error
import urllib.request

HOST = os.environ["GCE_METADATA_HOST"]


def attribute(key: str, default: str = "") -> str:
    request = urllib.request.Request(
        f"http://{HOST}/computeMetadata/v1/instance/attributes/{key}", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return default
        raise


def escape() -> int:
    """Start ``sleep 300`` the way podman starts conmon: fork, setsid, fork again, let the middle exit.
    The grandchild is in its own session and process group, re-parented away from the agent."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            os.execvp("sleep", ["sleep", "300"])
        os.write(write_end, str(grandchild).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(write_end)
    return int(os.read(read_end, 32))


def main() -> int:
    for name in ("GCE_METADATA_HOST", "PUBSUB_EMULATOR_HOST", "CONTAINERS_CONF"):
        print(f"env {name}={os.environ.get(name, '')}", flush=True)
    if attribute("test-trap-term") == "true":

        def on_term(*_: object) -> None:
            print("fake agent got SIGTERM", flush=True)
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
    if attribute("test-escape") == "true":
        print(f"escaped {escape()}", flush=True)
    print("fake agent up", flush=True)
    time.sleep(float(attribute("test-sleep", "30")))
    print("fake agent done", flush=True)
    return int(attribute("test-exit-code", "0"))


if __name__ == "__main__":
    sys.exit(main())
