"""The instance metadata server: the one place a VM learns which job it is bound to.

The operator writes the binding into the VM's metadata when it creates the VM, so the agent needs
no other configuration. Locally the Compute stand-in serves the same paths; ``GCE_METADATA_HOST``
points the agent at it, exactly as Google's own client libraries honour that variable.
Plain ``urllib`` keeps the agent free of extra dependencies.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_HOST = "metadata.google.internal"
HEADERS = {"Metadata-Flavor": "Google"}

# Attribute keys (docs/ARCHITECTURE.md, "VM metadata the agent reads").
ATTR_JOB_ID = "batchvm-job-id"
ATTR_ATTEMPT = "batchvm-attempt"
ATTR_JOB_SUBSCRIPTION = "batchvm-job-subscription"
ATTR_STATUS_TOPIC = "batchvm-status-topic"
# Which of the job's tasks this VM runs; both absent on a single-task job (index 0 of 1).
ATTR_TASK_INDEX = "batchvm-task-index"
ATTR_TASK_COUNT = "batchvm-task-count"
ATTR_IMAGE_REGISTRY = "batchvm-image-registry"
ATTR_CONTAINER_CLI = "batchvm-container-cli"
ATTR_CONTAINER_RUN_ARGS = "batchvm-container-run-args"
ATTR_HEARTBEAT_SECONDS = "batchvm-heartbeat-seconds"
# Image prefixes this VM may run, set in the instance template by whoever owns the project: so
# that whoever can publish to batch_jobs cannot run an arbitrary image. Empty: any image.
ATTR_IMAGE_ALLOWLIST = "batchvm-image-allowlist"

DEFAULT_CONTAINER_CLI = "docker"
DEFAULT_HEARTBEAT_SECONDS = 60.0


class MetadataUnavailable(RuntimeError):
    """The metadata server did not answer (connection error, timeout or a 5xx)."""


class BindingError(RuntimeError):
    """The VM's metadata does not say what to run. ``partial`` holds what could be read."""

    def __init__(self, message: str, partial: dict[str, object]):
        super().__init__(message)
        self.partial = partial


class MetadataClient:
    """Reads ``/computeMetadata/v1/`` paths; a missing key (404) reads as ``None``."""

    def __init__(self, host: str | None = None, request_timeout: float = 10.0):
        host = host or os.environ.get("GCE_METADATA_HOST") or DEFAULT_HOST
        self.base_url = f"http://{host}/computeMetadata/v1/"
        self.request_timeout = request_timeout

    def get(
        self, path: str, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> str | None:
        value, _etag = self.get_with_etag(path, params, timeout)
        return value

    def get_with_etag(
        self, path: str, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> tuple[str | None, str | None]:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, headers=HEADERS)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as resp:
                return resp.read().decode(), resp.headers.get("ETag")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None, None
            raise MetadataUnavailable(f"GET {url}: HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets
            raise MetadataUnavailable(f"GET {url}: {exc}") from None

    def attribute(self, name: str) -> str | None:
        return self.get("instance/attributes/" + name)

    def wait_until_answering(self, wait_seconds: float) -> None:
        """A VM's network (or the local stand-in) may come up after the agent: retry, bounded."""
        deadline = time.monotonic() + wait_seconds
        delay = 0.2
        while True:
            try:
                self.get("project/project-id")
                return
            except MetadataUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise MetadataUnavailable(
                        f"the metadata server at {self.base_url} did not answer within {wait_seconds:g} s: {exc}"
                    ) from None
                log.info("metadata server not answering yet (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class Binding:
    """Everything the VM's metadata says about the one job it runs."""

    project: str
    vm_name: str
    zone: str  # short name, e.g. "europe-west1-b"
    job_id: str
    attempt: int
    job_subscription: str  # short name
    status_topic: str  # short name
    task_index: int = 0
    task_count: int | None = None  # None: absent, so the job message's task_count holds
    image_registry: str = ""
    container_cli: list[str] = field(default_factory=lambda: [DEFAULT_CONTAINER_CLI])
    container_run_args: list[str] = field(default_factory=list)
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    image_allowlist: tuple[str, ...] = ()

    def image_allowed(self, image: str) -> bool:
        return not self.image_allowlist or any(image.startswith(prefix) for prefix in self.image_allowlist)

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.job_subscription}"

    @property
    def status_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.status_topic}"


def zone_short_name(zone: str) -> str:
    """``projects/N/zones/Z`` → ``Z`` (statuses carry the short name)."""
    return zone.rstrip("/").rsplit("/", 1)[-1]


def read_binding(client: MetadataClient, wait_seconds: float = 300.0) -> Binding:
    """Read the binding; raise :class:`BindingError` (with what was readable) if it is unusable."""
    client.wait_until_answering(wait_seconds)
    partial: dict[str, object] = {}

    def required(path: str, key: str) -> str:
        value = (client.get(path) or "").strip()
        if not value:
            raise BindingError(
                f"metadata {path} is missing: this VM was not created for a batchvm job", partial
            )
        partial[key] = value
        return value

    required("project/project-id", "project")
    required("instance/name", "vm_name")
    partial["zone"] = zone_short_name(required("instance/zone", "zone"))
    required("instance/attributes/" + ATTR_JOB_ID, "job_id")

    def integer(name: str, minimum: int) -> int | None:
        text = (client.attribute(name) or "").strip()
        if not text:
            return None
        try:
            value = int(text)
            if value < minimum:
                raise ValueError
        except ValueError:
            what = "a positive integer" if minimum == 1 else "a non-negative integer"
            raise BindingError(f"metadata {name}={text!r} is not {what}", partial) from None
        return value

    attempt = integer(ATTR_ATTEMPT, 1) or 1
    partial["attempt"] = attempt
    task_index = integer(ATTR_TASK_INDEX, 0) or 0
    partial["task_index"] = task_index
    task_count = integer(ATTR_TASK_COUNT, 1)
    if task_index >= (task_count or 1):
        raise BindingError(
            f"metadata {ATTR_TASK_INDEX}={task_index} is not below {ATTR_TASK_COUNT}="
            + (str(task_count) if task_count else "1 (absent)"),
            partial,
        )
    required("instance/attributes/" + ATTR_STATUS_TOPIC, "status_topic")
    required("instance/attributes/" + ATTR_JOB_SUBSCRIPTION, "job_subscription")

    try:
        cli = shlex.split(client.attribute(ATTR_CONTAINER_CLI) or DEFAULT_CONTAINER_CLI)
        run_args = shlex.split(client.attribute(ATTR_CONTAINER_RUN_ARGS) or "")
    except ValueError as exc:
        raise BindingError(f"container CLI settings cannot be split: {exc}", partial) from None
    if not cli:
        cli = [DEFAULT_CONTAINER_CLI]

    heartbeat_text = client.attribute(ATTR_HEARTBEAT_SECONDS)
    heartbeat = DEFAULT_HEARTBEAT_SECONDS
    if heartbeat_text:
        try:
            heartbeat = float(heartbeat_text)
            if not heartbeat > 0:
                raise ValueError
        except ValueError:
            log.warning("ignoring %s=%r: not a positive number", ATTR_HEARTBEAT_SECONDS, heartbeat_text)
            heartbeat = DEFAULT_HEARTBEAT_SECONDS

    return Binding(
        project=str(partial["project"]),
        vm_name=str(partial["vm_name"]),
        zone=str(partial["zone"]),
        job_id=str(partial["job_id"]),
        attempt=attempt,
        job_subscription=str(partial["job_subscription"]),
        status_topic=str(partial["status_topic"]),
        task_index=task_index,
        task_count=task_count,
        image_registry=(client.attribute(ATTR_IMAGE_REGISTRY) or "").strip(),
        container_cli=cli,
        container_run_args=run_args,
        heartbeat_seconds=heartbeat,
        image_allowlist=tuple((client.attribute(ATTR_IMAGE_ALLOWLIST) or "").replace(",", " ").split()),
    )
