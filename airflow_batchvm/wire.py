"""The wire format, version 1: the one definition of the job and status messages.

Both the provider and the worker agent import this module; it imports nothing else of the project
and nothing of Airflow, so it installs on a bare VM image.

Messages are JSON in ``data``; their routing keys (``job_id``, ``attempt``, ``task_index``, and
``status`` for status messages) are also Pub/Sub attributes so that subscriptions can filter on them. Unknown
fields are ignored. A message of a newer ``schema_version`` is refused with
:class:`UnsupportedSchemaVersion`; any other malformed message raises :class:`MalformedMessage`.
Consumers log and drop both; they never crash on them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

JOB_TOPIC = "batch_jobs"
STATUS_TOPIC = "batch_jobs_status"

# JOB_DATA reaches the container as one environment variable, and Linux caps a single
# environment string at 128 KiB (MAX_ARG_STRLEN); 64 KiB keeps well clear of it. Larger inputs
# belong in Cloud Storage, with their URI in the payload.
MAX_PAYLOAD_BYTES = 64 * 1024
# What a status message keeps of the container's output.
MAX_LOG_TAIL_BYTES = 8 * 1024

# A job id becomes part of VM and subscription names (always after a prefix), so it obeys the
# stricter of the two: lowercase letters, digits and hyphens, short enough to leave room.
JOB_ID_MAX_LEN = 48
JOB_ID_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Compute Engine instance names.
VM_NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
# Compute Engine label keys and values.
LABEL_KEY_PATTERN = r"^[a-z][-_a-z0-9]{0,62}$"
LABEL_VALUE_PATTERN = r"^[-_a-z0-9]{0,63}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A job of N tasks runs on N VMs, each with two subscriptions and a wait of its own in the
# triggerer; past a hundred, shard over mapped tasks instead (or use Cloud Batch).
MAX_TASK_COUNT = 100
# Set by the agent in every container: which of the job's tasks this is (as Cloud Batch's
# BATCH_TASK_INDEX / BATCH_TASK_COUNT).
TASK_INDEX_ENV = "BATCHVM_TASK_INDEX"
TASK_COUNT_ENV = "BATCHVM_TASK_COUNT"
RESERVED_ENV = frozenset({"JOB_DATA", TASK_INDEX_ENV, TASK_COUNT_ENV})


class WireError(ValueError):
    """A message that cannot be used."""


class MalformedMessage(WireError):
    """Not a valid message of this format: log it and drop it."""


class UnsupportedSchemaVersion(WireError):
    """A message written by a newer version of this format than this code understands."""


class Status(StrEnum):
    STARTED = "STARTED"
    RUNNING = "RUNNING"  # heartbeat
    FINISHED = "FINISHED"  # exit 0
    FAILED = "FAILED"  # anything else, with a reason
    PREEMPTED = "PREEMPTED"

    @property
    def terminal(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.PREEMPTED)


JobId = Annotated[str, Field(min_length=1, max_length=JOB_ID_MAX_LEN, pattern=JOB_ID_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION

    def to_pubsub(self) -> tuple[bytes, dict[str, str]]:
        """The ``data`` and attributes to publish."""
        return self.model_dump_json(exclude_none=True).encode(), self.attributes()

    def attributes(self) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def from_pubsub(cls, data: bytes) -> Any:
        obj = _load_object(data)
        _check_version(obj)
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise MalformedMessage(f"invalid {cls.__name__}: {_describe(exc)}") from None


class JobSpec(_Message):
    """A job on ``batch_jobs``: what to run, once, on the VM bound to ``job_id`` (and ``task_index``).

    A job of ``task_count`` N is published as N messages, one per ``task_index``, each taken by a
    VM of its own.
    """

    job_id: JobId
    attempt: int = Field(default=1, ge=1)
    task_index: int = Field(default=0, ge=0)
    task_count: int = Field(default=1, ge=1, le=MAX_TASK_COUNT)
    image: str = Field(min_length=1)
    command: list[StrictStr] | None = None
    args: list[StrictStr] = []
    env: dict[str, StrictStr] = {}
    timeout_seconds: int | None = Field(default=None, gt=0)
    payload: Any = None
    labels: dict[str, str] = {}

    @field_validator("image")
    @classmethod
    def _image_has_no_whitespace(cls, image: str) -> str:
        if image != image.strip() or any(c.isspace() for c in image):
            raise ValueError("must be an image reference without whitespace")
        return image

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.match(ENV_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by the agent (reserved: {', '.join(sorted(RESERVED_ENV))})")
        return env

    @model_validator(mode="after")
    def _index_within_count(self) -> JobSpec:
        if self.task_index >= self.task_count:
            raise ValueError(f"task_index {self.task_index} is not below task_count {self.task_count}")
        return self

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, payload: Any) -> Any:
        size = len(json.dumps(payload, separators=(",", ":")).encode())
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"is {size} bytes serialized; the limit is {MAX_PAYLOAD_BYTES}")
        return payload

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.match(LABEL_KEY_PATTERN, key) or not re.match(LABEL_VALUE_PATTERN, value):
                raise ValueError(f"{key}={value!r} is not a valid Compute Engine label")
        return labels

    def attributes(self) -> dict[str, str]:
        return {"job_id": self.job_id, "attempt": str(self.attempt), "task_index": str(self.task_index)}

    def for_task(self, task_index: int) -> JobSpec:
        return type(self).model_validate({**self.model_dump(), "task_index": task_index})

    @property
    def job_data(self) -> str:
        """The payload as the container sees it in ``JOB_DATA``."""
        return "" if self.payload is None else json.dumps(self.payload, separators=(",", ":"))


class LegacyJob(BaseModel):
    """The earlier MIG design's job message, still accepted by the worker."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    process_type: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    sleep_time: int = Field(default=0, ge=0)
    vm_count: int = Field(default=1, ge=1, le=MAX_TASK_COUNT)

    def to_job_spec(self, registry: str, attempt: int = 1) -> JobSpec:
        """``process_type`` names an image in ``registry``; the whole message is the payload, as before.

        ``vm_count`` becomes ``task_count``: the job runs on that many VMs, each with its index.
        """
        return JobSpec(
            job_id=self.job_id,
            attempt=attempt,
            task_count=self.vm_count,
            image=f"{registry.rstrip('/')}/{self.process_type}:latest",
            env={"SLEEP_TIME": str(self.sleep_time)},
            payload=self.model_dump(),
        )


class StatusMessage(_Message):
    """A status on ``batch_jobs_status``; a superset of the earlier ``{job_id, status, vm_name}``."""

    job_id: str = Field(min_length=1)
    attempt: int = Field(default=1, ge=1)
    task_index: int = Field(default=0, ge=0)
    status: Status
    vm_name: str = ""
    zone: str = ""
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None

    @field_validator("log_tail")
    @classmethod
    def _cap_log_tail(cls, tail: str | None) -> str | None:
        if tail is None or len(tail.encode()) <= MAX_LOG_TAIL_BYTES:
            return tail
        return tail.encode()[-MAX_LOG_TAIL_BYTES:].decode(errors="ignore")

    def attributes(self) -> dict[str, str]:
        return {
            "job_id": self.job_id,
            "attempt": str(self.attempt),
            "task_index": str(self.task_index),
            "status": self.status.value,
        }


def parse_job(data: bytes, registry: str = "") -> JobSpec:
    """A job message in either format; the earlier design's is recognised by ``process_type``."""
    obj = _load_object(data)
    if "process_type" in obj and "image" not in obj:
        if not registry:
            raise MalformedMessage("a process_type job needs an image registry configured")
        try:
            legacy = LegacyJob.model_validate(obj)
            return legacy.to_job_spec(registry)
        except ValidationError as exc:
            raise MalformedMessage(f"invalid legacy job: {_describe(exc)}") from None
    return JobSpec.from_pubsub(data)


def _load_object(data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _check_version(obj: dict) -> None:
    version = obj.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedMessage(f"schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(
            f"schema_version {version} is newer than the supported {SCHEMA_VERSION}; upgrade airflow-batchvm"
        )


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors()
    )
