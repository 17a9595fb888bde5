"""The instance metadata server of one local VM, on its own loopback port (each real VM has its own).

It serves ``/computeMetadata/v1/`` the way ``metadata.google.internal`` does, for what the worker
agent and google-auth read: a request needs ``Metadata-Flavor: Google`` (403 otherwise), a
directory lists its entries one a line (sub-directories end in ``/``), ``?recursive=true`` or
``?alt=json`` gives JSON, and ``?wait_for_change=true`` (with optional ``last_etag`` and
``timeout_sec``) holds the request until the value changes: the agent watches
``instance/preempted`` that way. Every response carries ``Metadata-Flavor: Google`` and an ``ETag``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

ROOT = "/computeMetadata/v1"
DEFAULT_WAIT_SECONDS = 60.0
MAX_WAIT_SECONDS = 3600.0


class MetadataSource(Protocol):
    """What the server serves: a tree of strings, and a condition notified when it changes."""

    changed: threading.Condition

    def metadata_tree(self) -> dict: ...


class MetadataServer:
    def __init__(self, source: MetadataSource, count: Callable[[str], None] = lambda _: None):
        self.source = source
        self.count = count
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.metadata = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metadata", daemon=True)
        self._stop_lock = threading.Lock()
        self.closed = False

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        """The value for ``GCE_METADATA_HOST``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (idempotent) and answer pending ``wait_for_change`` requests at once."""
        with self._stop_lock:
            if self.closed:
                return
            self.closed = True
        with self.source.changed:
            self.source.changed.notify_all()
        if self._thread.is_alive():
            self._httpd.shutdown()  # returns within serve_forever's poll interval (0.5 s)
        self._httpd.server_close()

    def stop_soon(self) -> None:
        """``stop`` in the background: a deleted VM's server need not hold up the delete call."""
        threading.Thread(target=self.stop, name="metadata-stop", daemon=True).start()

    def render(self, path: str, query: dict[str, str]) -> tuple[str, str] | None:
        """The body and content type for ``path`` (relative to the root), or None if there is none."""
        node: object = self.source.metadata_tree()
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if isinstance(node, JsonLeaf):
            return json.dumps(node.value), "application/json"
        want_json = query.get("alt") == "json" or query.get("recursive") == "true"
        if isinstance(node, dict):
            if want_json:
                return json.dumps(_plain(node, deep=query.get("recursive") == "true")), "application/json"
            return "".join(
                f"{k}/\n" if isinstance(v, dict) else f"{k}\n" for k, v in node.items()
            ), "application/text"
        if want_json:
            return json.dumps(node), "application/json"
        if isinstance(node, list):
            return "".join(f"{item}\n" for item in node), "application/text"
        return str(node), "application/text"


class JsonLeaf:
    """A leaf served as JSON rather than text (the token endpoint)."""

    def __init__(self, value: object):
        self.value = value


def _plain(node: object, deep: bool) -> object:
    """The JSON form of a directory; ``deep`` for ``recursive=true``, else its sub-directories are empty."""
    if isinstance(node, JsonLeaf):
        return node.value
    if isinstance(node, dict):
        return {k: (_plain(v, deep) if deep or not isinstance(v, dict) else {}) for k, v in node.items()}
    return node


def etag(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    metadata: MetadataServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "Metadata Server for VM"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self._get()
        except Exception as exc:  # a bug must reach the client as a 500, not a dropped connection
            self._reply(500, f"local metadata server error: {exc}\n", "text/plain")

    def _get(self) -> None:
        metadata = self.server.metadata
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path in ("", "/"):  # google-auth's "am I on GCE" ping
            self._reply(200, "computeMetadata/\n", "application/text")
            return
        if self.headers.get("Metadata-Flavor") != "Google":
            self._reply(403, "Missing required header: Metadata-Flavor: Google\n", "text/plain")
            return
        if url.path != ROOT and not url.path.startswith(ROOT + "/"):
            self._reply(404, "Not Found\n", "text/plain")
            return
        metadata.count("metadata.get")
        path = url.path[len(ROOT) :]
        rendered = metadata.render(path, query)
        if rendered is None:
            self._reply(404, "Not Found\n", "text/html")
            return
        if query.get("wait_for_change") == "true":
            rendered = self._wait_for_change(path, query, rendered)
        self._reply(200, *rendered)

    def _wait_for_change(self, path: str, query: dict, rendered: tuple[str, str]) -> tuple[str, str]:
        """Hold the request until the value's ETag differs from ``last_etag`` (or from now), or time out."""
        metadata = self.server.metadata
        try:
            timeout = min(float(query.get("timeout_sec", DEFAULT_WAIT_SECONDS)), MAX_WAIT_SECONDS)
        except ValueError:
            timeout = DEFAULT_WAIT_SECONDS
        last = query.get("last_etag", etag(rendered[0]))
        if etag(rendered[0]) != last:
            return rendered
        changed = metadata.source.changed
        with changed:
            changed.wait_for(
                lambda: (
                    metadata.closed or (now := metadata.render(path, query)) is None or etag(now[0]) != last
                ),
                timeout=timeout,
            )
        return metadata.render(path, query) or rendered

    def _reply(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 200:
            self.send_header("ETag", etag(body))
        self.end_headers()
        self.wfile.write(data)
