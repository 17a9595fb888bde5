"""The ``batchvm`` CLI against the real Pub/Sub emulator and the Compute stand-in (``local_stack``).

Each test module works in a project of its own, so that what it creates and checks never meets what
other tests do in the stack's default project.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from click.testing import Result
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1, pubsub_v1
from typer.testing import CliRunner

from airflow_batchvm.cli import app

ZONE = "us-central1-a"
TEMPLATE = "cli-worker"


def invoke(*args: str, code: int | None = 0) -> Result:
    """Run ``batchvm ARGS`` in this process; check its exit code (``None``: any)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    if code is not None and result.exit_code != code:
        raise AssertionError(
            f"batchvm {' '.join(args)} exited {result.exit_code}, not {code}\n{result.output}"
            + (
                f"\n{result.exception!r}"
                if result.exception and not isinstance(result.exception, SystemExit)
                else ""
            )
        )
    return result


class Gcp:
    """A look at one project of the local stack: topics, subscriptions, templates, VMs."""

    def __init__(self, project: str):
        self.project = project
        options = ClientOptions(api_endpoint=os.environ["BATCHVM_COMPUTE_API_ENDPOINT"])
        self.instances = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(), client_options=options
        )
        self.templates = compute_v1.InstanceTemplatesClient(
            credentials=AnonymousCredentials(), client_options=options
        )
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def topics(self) -> list[str]:
        return sorted(
            t.name.rsplit("/", 1)[-1] for t in self.publisher.list_topics(project=f"projects/{self.project}")
        )

    def subscriptions(self) -> list[str]:
        found = self.subscriber.list_subscriptions(project=f"projects/{self.project}")
        return sorted(s.name.rsplit("/", 1)[-1] for s in found)

    def job_subscriptions(self) -> list[str]:
        return [s for s in self.subscriptions() if s.startswith(("batchvm-job-", "batchvm-status-"))]

    def template(self, name: str) -> compute_v1.InstanceTemplate | None:
        try:
            return self.templates.get(project=self.project, instance_template=name)
        except gexc.NotFound:
            return None

    def vms(self) -> dict[str, str]:
        return {vm.name: vm.status for vm in self.instances.list(project=self.project, zone=ZONE)}

    def wait_vm(self, name: str, status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.vms().get(name) != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"VM {name} is {self.vms().get(name)}, not {status}, after {timeout} s")
            time.sleep(0.2)

    def wait_no_vm(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while name in self.vms():
            if time.monotonic() > deadline:
                raise AssertionError(f"VM {name} still exists after {timeout} s")
            time.sleep(0.2)


def new_project() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def setup_args(project: str, *more: str) -> list[str]:
    """``batchvm setup`` for VMs of this machine: podman as the container CLI (see the stand-in's template)."""
    from batchvm_local.stack import TEMPLATE_METADATA

    return [
        "setup",
        "--project", project,
        "--template", TEMPLATE,
        "--container-cli", TEMPLATE_METADATA["batchvm-container-cli"],
        "--container-run-args", TEMPLATE_METADATA["batchvm-container-run-args"],
        "--registry", TEMPLATE_METADATA["batchvm-image-registry"],
        *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def worker_project(local_stack) -> Iterator[Gcp]:
    """A project set up by ``batchvm setup`` whose template runs jobs on this machine; left clean."""
    gcp = Gcp(new_project())
    invoke(*setup_args(gcp.project))
    yield gcp
    assert gcp.vms() == {}, "a test left VMs behind"
    assert gcp.job_subscriptions() == [], "a test left per-job subscriptions behind"
