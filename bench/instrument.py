"""Timing and call counting inside the processes being measured: the triggerer, task processes,
the VMs' agents and the harness itself.

Everything is appended as one JSON object per line to the file named by ``$BENCH_EVENTS`` (one
``os.write`` on an ``O_APPEND`` descriptor per line, so lines from many processes never interleave).
Without ``$BENCH_EVENTS`` nothing is recorded and nothing is patched.

- :func:`emit` records a named moment (a trigger started, a trigger yielded, ...).
- :func:`install_counters` wraps gRPC channel creation (Pub/Sub: every RPC, when it is made, with
  its method and subscription or topic) and the two HTTP stacks the Compute clients use (``requests`` for
  ``google-cloud-compute``, ``httplib2`` for the discovery client of the stock hook), so every cloud
  API call made by this process is recorded, whoever makes it. Only calls are counted here; the
  production code is not changed in any way.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

EVENTS_ENV = "BENCH_EVENTS"
_fd: int | None = None
_fd_lock = threading.Lock()
_installed = False


def _events_fd() -> int | None:
    global _fd
    if _fd is None:
        path = os.environ.get(EVENTS_ENV)
        if not path:
            return None
        with _fd_lock:
            if _fd is None:
                _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


def emit(kind: str, **fields: Any) -> None:
    """Record one moment: ``{"k": kind, "t": <unix time>, "pid": ..., **fields}``."""
    fd = _events_fd()
    if fd is None:
        return
    record = {"k": kind, "t": fields.pop("t", None) or time.time(), "pid": os.getpid(), **fields}
    os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


def process_start_time(pid: int | None = None) -> float | None:
    """When the process started (Unix time), from ``/proc``."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def read_events(path: str | os.PathLike) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


# --- Pub/Sub: gRPC ----------------------------------------------------------------------------


def _resource(request: Any) -> str:
    """The subscription or topic a Pub/Sub request is about (short name)."""
    for field in ("subscription", "name", "topic"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value.rsplit("/", 1)[-1]
    return ""


def _method(details: Any) -> str:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return method.rsplit("/", 1)[-1]  # "Pull", "Acknowledge", "Publish", "CreateSubscription", ...


def _sync_interceptor():
    import grpc

    class Counter(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            emit("rpc", m=_method(details), r=_resource(request))
            return continuation(details, request)

        def intercept_unary_stream(self, continuation, details, request):
            emit("rpc", m=_method(details), r=_resource(request))
            return continuation(details, request)

    return Counter()


def _aio_interceptors():
    import grpc

    class Counter(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            emit("rpc", m=_method(details), r=_resource(request))
            return await continuation(details, request)

    return [Counter()]


_ORIGINAL: dict[str, Any] = {}


def uncounted_publish(topic: str, data: bytes, attributes: dict[str, str]) -> str:
    """Publish on a channel of its own that is not counted (what another party would publish)."""
    import grpc
    from google.pubsub_v1 import PublisherClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    insecure = _ORIGINAL.get("insecure_channel", grpc.insecure_channel)
    channel = insecure(os.environ["PUBSUB_EMULATOR_HOST"])
    try:
        client = PublisherClient(transport=PublisherGrpcTransport(channel=channel))
        response = client.publish(
            topic=topic, messages=[{"data": data, "attributes": attributes}], timeout=60
        )
        return response.message_ids[0]
    finally:
        channel.close()


def _patch_grpc() -> None:
    import grpc
    import grpc.aio

    sync_insecure = _ORIGINAL["insecure_channel"] = grpc.insecure_channel
    aio_insecure = grpc.aio.insecure_channel

    def insecure_channel(target, options=None, compression=None):
        return grpc.intercept_channel(sync_insecure(target, options, compression), _sync_interceptor())

    def aio_insecure_channel(target, options=None, compression=None, interceptors=None):
        return aio_insecure(target, options, compression, [*(interceptors or []), *_aio_interceptors()])

    grpc.insecure_channel = insecure_channel
    grpc.aio.insecure_channel = aio_insecure_channel


# --- Compute: HTTP ----------------------------------------------------------------------------


def _compute_call(method: str, url: str) -> None:
    if "/compute/v1/" not in url:
        return
    path = url.split("/compute/v1/", 1)[1].split("?", 1)[0]
    emit("http", m=method.upper(), p=path)


def _patch_http() -> None:
    import requests

    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        _compute_call(method, str(url))
        return original(self, method, url, *args, **kwargs)

    requests.Session.request = request
    try:
        import httplib2
    except ImportError:  # pragma: no cover - the google provider brings it
        return
    original_h = httplib2.Http.request

    def h_request(self, uri, method="GET", *args, **kwargs):
        _compute_call(method, str(uri))
        return original_h(self, uri, method, *args, **kwargs)

    httplib2.Http.request = h_request


def install_counters() -> bool:
    """Count every Pub/Sub RPC and Compute HTTP call of this process (once; only with ``$BENCH_EVENTS``)."""
    global _installed
    if _installed or not os.environ.get(EVENTS_ENV):
        return False
    _installed = True
    _patch_grpc()
    _patch_http()
    return True


# Importing this module in a measured process (the bench triggers and DAGs do) is what arms it.
install_counters()
