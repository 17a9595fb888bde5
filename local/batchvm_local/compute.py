"""A local Compute Engine stand-in: the subset of the Compute REST API v1 this project uses.

    python -m batchvm_local.compute --port 8086 [--host 127.0.0.1] [--boot-seconds 0.2]
        [--state-dir DIR] [--agent-command 'python -m batchvm_agent --poweroff-command ""']
        [--port-file FILE] [--wait-seconds 60] [--verbose]

The real ``google-cloud-compute`` client talks to it unchanged, given
``client_options={"api_endpoint": "http://127.0.0.1:PORT"}`` and ``AnonymousCredentials()``.
Each instance is a local "VM": a process tree running the worker agent (``--agent-command``) with
the stand-in's environment plus ``GCE_METADATA_HOST`` pointing at that VM's own metadata server.
See ``local/README.md`` for the endpoints and the test-only ``/_local/`` knobs.

API (under ``/compute/v1/projects/{project}``):
    zones/{zone}/instances                POST insert (?sourceInstanceTemplate=, ?requestId=), GET list (?filter=)
    zones/{zone}/instances/{name}         GET, DELETE (?requestId=)
    zones/{zone}/instances/{name}/serialPort   GET (?port=1&start=N)
    aggregated/instances                  GET (?filter=)
    zones/{zone}/operations[/{op}[/wait]] GET list, GET, POST wait
    global/instanceTemplates[/{name}]     POST insert, GET list, GET, DELETE
    global/operations/{op}[/wait]         GET, POST wait

Test-only knobs (nothing on Compute Engine answers these; a VM never reads them):
    GET  /_local/stats                    API calls by method: {"calls": {"instances.insert": 3, ...}, "total": N}
    POST /_local/reset                    {"deleteInstances": false}: clears faults and counters
    GET  /_local/faults, POST /_local/faults   {"fault": KIND, "zone": null, "count": 1, "seconds": 0, "code": null}
    GET  /_local/vms                      every VM's status, pid, metadata host and serial log
    POST /_local/projects/{p}/zones/{z}/instances/{name}/preempt   {"graceSeconds": 30, "sigterm": false}
    POST /_local/projects/{p}/zones/{z}/instances/{name}/kill
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from batchvm_local.engine import ComputeEngine
from batchvm_local.faults import INSERT_FAULTS
from batchvm_local.resources import ApiError, invalid
from batchvm_local.vm import DEFAULT_AGENT_COMMAND, VmConfig

log = logging.getLogger("batchvm_local.compute")

Handler = Callable[[ComputeEngine, dict[str, str], dict[str, str], dict], object]

_P = r"/compute/v1/projects/(?P<project>[^/]+)"
_Z = _P + r"/zones/(?P<zone>[^/]+)"
_L = r"/_local/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)"


def _int(query: dict[str, str], key: str, default: int | None = None) -> int | None:
    if key not in query:
        return default
    try:
        return int(query[key])
    except ValueError:
        raise invalid(f"Invalid value for field '{key}': '{query[key]}'.") from None


# (HTTP method, path pattern, method name for the statistics or None for a knob, handler)
ROUTES: list[tuple[str, re.Pattern, str | None, Handler]] = [
    (m, re.compile(p + "$"), name, h)
    for m, p, name, h in [
        ("POST", _Z + "/instances", "instances.insert",
         lambda e, a, q, b: e.insert_instance(a["project"], a["zone"], b, q.get("sourceInstanceTemplate"), q.get("requestId"))),
        ("GET", _Z + "/instances", "instances.list",
         lambda e, a, q, b: e.list_instances(a["project"], a["zone"], q.get("filter"), _int(q, "maxResults"), q.get("pageToken"))),
        ("GET", _Z + "/instances/(?P<name>[^/]+)", "instances.get",
         lambda e, a, q, b: e.get_instance(a["project"], a["zone"], a["name"])),
        ("DELETE", _Z + "/instances/(?P<name>[^/]+)", "instances.delete",
         lambda e, a, q, b: e.delete_instance(a["project"], a["zone"], a["name"], q.get("requestId"))),
        ("GET", _Z + "/instances/(?P<name>[^/]+)/serialPort", "instances.getSerialPortOutput",
         lambda e, a, q, b: e.serial_port_output(a["project"], a["zone"], a["name"], _int(q, "port", 1), _int(q, "start", 0))),
        ("GET", _P + "/aggregated/instances", "instances.aggregatedList",
         lambda e, a, q, b: e.aggregated_instances(a["project"], q.get("filter"))),
        ("GET", _Z + "/operations", "zoneOperations.list",
         lambda e, a, q, b: e.list_operations(a["project"], a["zone"], _int(q, "maxResults"), q.get("pageToken"))),
        ("GET", _Z + "/operations/(?P<op>[^/]+)", "zoneOperations.get",
         lambda e, a, q, b: e.get_operation(a["project"], a["zone"], a["op"])),
        ("POST", _Z + "/operations/(?P<op>[^/]+)/wait", "zoneOperations.wait",
         lambda e, a, q, b: e.wait_operation(a["project"], a["zone"], a["op"])),
        ("POST", _P + "/global/instanceTemplates", "instanceTemplates.insert",
         lambda e, a, q, b: e.insert_template(a["project"], b, q.get("requestId"))),
        ("GET", _P + "/global/instanceTemplates", "instanceTemplates.list",
         lambda e, a, q, b: e.list_templates(a["project"], _int(q, "maxResults"), q.get("pageToken"))),
        ("GET", _P + "/global/instanceTemplates/(?P<name>[^/]+)", "instanceTemplates.get",
         lambda e, a, q, b: e.get_template(a["project"], a["name"])),
        ("DELETE", _P + "/global/instanceTemplates/(?P<name>[^/]+)", "instanceTemplates.delete",
         lambda e, a, q, b: e.delete_template(a["project"], a["name"], q.get("requestId"))),
        ("GET", _P + "/global/operations/(?P<op>[^/]+)", "globalOperations.get",
         lambda e, a, q, b: e.get_operation(a["project"], None, a["op"])),
        ("POST", _P + "/global/operations/(?P<op>[^/]+)/wait", "globalOperations.wait",
         lambda e, a, q, b: e.wait_operation(a["project"], None, a["op"])),
        # --- test-only knobs ---
        ("GET", "/_local/stats", None, lambda e, a, q, b: e.stats.snapshot()),
        ("POST", "/_local/reset", None, lambda e, a, q, b: e.reset(bool(b.get("deleteInstances")))),
        ("GET", "/_local/faults", None, lambda e, a, q, b: {"faults": e.faults.pending(), "kinds": INSERT_FAULTS}),
        ("POST", "/_local/faults", None, lambda e, a, q, b: e.arm_fault(b)),
        ("GET", "/_local/vms", None, lambda e, a, q, b: {"vms": e.vms()}),
        ("POST", _L + "/preempt", None,
         lambda e, a, q, b: e.preempt(a["project"], a["zone"], a["name"], float(b.get("graceSeconds", 30)), bool(b.get("sigterm")))),
        ("POST", _L + "/kill", None, lambda e, a, q, b: e.kill(a["project"], a["zone"], a["name"])),
    ]
]  # fmt: skip


class ComputeServer(ThreadingHTTPServer):
    daemon_threads = True  # an operations.wait in flight must not hold up shutdown
    block_on_close = False
    request_queue_size = 128  # many triggers and tasks may connect at once

    def __init__(self, address: tuple[str, int], config: VmConfig, wait_seconds: float = 60.0):
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.engine = ComputeEngine(f"{self.url}/compute/v1/", config, wait_seconds)

    def close(self) -> None:
        """Kill every VM, then stop listening."""
        self.engine.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ComputeServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's session expects
    server_version = "batchvm-local-compute"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        engine = self.server.engine
        try:
            body = self._body()
            for route_method, pattern, name, handler in ROUTES:
                match = pattern.match(url.path)
                if match and route_method == method:
                    if name:
                        engine.stats.count(name)
                    args = {k: unquote(v) for k, v in match.groupdict().items()}
                    self._reply(200, handler(engine, args, query, body))
                    return
            raise ApiError(
                404, "notFound", f"The requested URL {method} {url.path} was not found on the local stand-in."
            )
        except ApiError as exc:
            self._reply(exc.code, exc.to_json())
        except Exception as exc:  # a bug here must reach the client as a 500, not a dropped connection
            log.exception("%s %s failed", method, self.path)
            self._reply(500, ApiError(500, "backendError", f"local stand-in error: {exc}").to_json())

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise invalid("Invalid JSON payload received.") from None
        if not isinstance(body, dict):
            raise invalid("Invalid JSON payload received: expected an object.")
        return body

    def _reply(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchvm_local.compute", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8086, help="0 picks a free port (see --port-file)")
    parser.add_argument("--boot-seconds", type=float, default=0.2, help="time of each boot step")
    parser.add_argument(
        "--state-dir", type=Path, help="per-VM serial logs (default: a new temporary directory)"
    )
    parser.add_argument(
        "--agent-command",
        default=shlex.join(DEFAULT_AGENT_COMMAND),
        help="what each VM runs, as a shell-quoted command line (default: the worker agent)",
    )
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--wait-seconds", type=float, default=60.0, help="longest operations.wait call")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="batchvm-compute-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    config = VmConfig(
        state_dir=state_dir,
        agent_command=shlex.split(args.agent_command),
        boot_seconds=args.boot_seconds,
        env=dict(os.environ),
    )
    server = ComputeServer((args.host, args.port), config, args.wait_seconds)

    def on_signal(signum: int, _frame: object) -> None:
        # serve_forever must be left from another thread; raising here could be swallowed by
        # socketserver's per-request error handling.
        log.info("%s: stopping every VM", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(server.server_address[1]))
            tmp.replace(args.port_file)
        log.info("Compute Engine stand-in on %s (state in %s)", server.url, state_dir)
        server.serve_forever(poll_interval=0.2)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
