"""Compute Engine resource shapes: errors, operations, ids, timestamps and links.

Field names and values follow the real REST API v1 (camelCase JSON), so that the real
``google-cloud-compute`` client parses what the stand-in returns exactly as it parses Google's.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import threading
import time
from datetime import UTC, datetime

# Compute Engine's own patterns (https://cloud.google.com/compute/docs/naming-resources).
NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
LABEL_KEY_PATTERN = r"^[a-z][-_a-z0-9]{0,62}$"
LABEL_VALUE_PATTERN = r"^[-_a-z0-9]{0,63}$"
METADATA_KEY_PATTERN = r"^[a-zA-Z0-9-_]{1,128}$"
MAX_LABELS = 64
MAX_METADATA_VALUE_BYTES = 256 * 1024
MAX_METADATA_TOTAL_BYTES = 512 * 1024


class ApiError(Exception):
    """An error response in Google's JSON shape; google-api-core maps ``code`` to its exception class."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def to_json(self) -> dict:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


def not_found(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


def already_exists(path: str) -> ApiError:
    return ApiError(409, "alreadyExists", f"The resource '{path}' already exists")


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


def forbidden(permission: str, path: str) -> ApiError:
    return ApiError(403, "forbidden", f"Required '{permission}' permission for '{path}'")


def now_rfc3339() -> str:
    """Compute Engine's timestamp form: RFC 3339 with milliseconds and a numeric offset."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_id() -> str:
    """A resource id: an unsigned 64-bit integer, sent as a string as the API does."""
    return str(secrets.randbits(63) | (1 << 62))


def fingerprint(value: object) -> str:
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


def project_number(project: str) -> str:
    """A stable 12-digit project number for a project id (a real project has one)."""
    return str(100_000_000_000 + int(hashlib.sha256(project.encode()).hexdigest(), 16) % 900_000_000_000)


def operation_name() -> str:
    """Shaped like GCE's: ``operation-<ms>-<13 hex>-<8 hex>-<8 hex>``."""
    return (
        f"operation-{int(time.time() * 1000)}-{secrets.token_hex(7)[:13]}"
        f"-{secrets.token_hex(4)}-{secrets.token_hex(4)}"
    )


class Operation:
    """A zonal or global operation; ``done`` is set once its status is DONE."""

    def __init__(
        self,
        *,
        base_url: str,
        project: str,
        zone: str | None,
        operation_type: str,
        target_link: str,
        target_id: str,
        request_id: str | None = None,
    ):
        self.project = project
        self.zone = zone
        self.name = operation_name()
        scope = f"projects/{project}/zones/{zone}" if zone else f"projects/{project}/global"
        now = now_rfc3339()
        self._lock = threading.Lock()
        self.done = threading.Event()
        self._resource = {
            "kind": "compute#operation",
            "id": new_id(),
            "name": self.name,
            "operationType": operation_type,
            "targetLink": target_link,
            "targetId": target_id,
            "status": "RUNNING",
            "user": "local-user@batchvm-local",
            "progress": 0,
            "insertTime": now,
            "startTime": now,
            "selfLink": f"{base_url}{scope}/operations/{self.name}",
        }
        if zone:
            self._resource["zone"] = f"{base_url}projects/{project}/zones/{zone}"
        if request_id:
            self._resource["clientOperationId"] = request_id

    def finish(self, errors: list[dict] | None = None, http_status: int = 0, http_message: str = "") -> None:
        """Mark DONE (once); ``errors`` are ``{"code", "message"}`` items as in ``error.errors[]``."""
        with self._lock:
            if self.done.is_set():
                return
            self._resource.update(status="DONE", progress=100, endTime=now_rfc3339())
            if errors:
                self._resource["error"] = {"errors": errors}
                self._resource["httpErrorStatusCode"] = http_status
                self._resource["httpErrorMessage"] = http_message
            self.done.set()

    def to_json(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._resource)
