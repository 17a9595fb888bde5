"""The harness's own view of the local cloud: Pub/Sub admin and publishing, and the Compute stand-in
(its operations, VMs and test-only knobs). The harness never counts its own calls: only the
processes it measures record calls (see ``bench.instrument``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from airflow_batchvm.wire import STATUS_TOPIC, Status, StatusMessage


def epoch(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Cloud:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.project = stack.project
        self.zone = stack.zone
        self.compute_url = stack.compute_url
        # The emulator answers in milliseconds: publish at once, one message per request.
        self.publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=1, max_latency=0.0)
        )
        self.subscriber = pubsub_v1.SubscriberClient()
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="bench-cloud")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.publisher.stop()
        self.subscriber.close()

    # --- Pub/Sub ----------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create_subscriptions(self, pairs: list[tuple[str, str]], ack_deadline: int = 20) -> None:
        """Create ``(subscription, topic)`` pairs (short names), in parallel; existing ones are fine."""

        def create(pair: tuple[str, str]) -> None:
            try:
                self.subscriber.create_subscription(
                    request={
                        "name": self.subscription(pair[0]),
                        "topic": self.topic(pair[1]),
                        "ack_deadline_seconds": ack_deadline,
                    },
                    timeout=60,
                )
            except gexc.AlreadyExists:
                pass

        list(self.pool.map(create, pairs))

    def create_topics(self, names: list[str]) -> None:
        def create(name: str) -> None:
            try:
                self.publisher.create_topic(name=self.topic(name), timeout=60)
            except gexc.AlreadyExists:
                pass

        list(self.pool.map(create, names))

    def delete_subscriptions(self, names: list[str]) -> None:
        def delete(name: str) -> None:
            try:
                self.subscriber.delete_subscription(subscription=self.subscription(name), timeout=60)
            except gexc.NotFound:
                pass

        list(self.pool.map(delete, names))

    def delete_topics(self, names: list[str]) -> None:
        def delete(name: str) -> None:
            try:
                self.publisher.delete_topic(topic=self.topic(name), timeout=60)
            except gexc.NotFound:
                pass

        list(self.pool.map(delete, names))

    def publish_finished(
        self, job_id: str, topic: str = STATUS_TOPIC, vm_name: str = ""
    ) -> tuple[float, Any]:
        """Publish the job's FINISHED (attempt 1, exit 0); returns (when the call was made, its future)."""
        message = StatusMessage(
            job_id=job_id,
            attempt=1,
            status=Status.FINISHED,
            vm_name=vm_name or f"bvm-{job_id}",
            zone=self.zone,
            exit_code=0,
        )
        data, attributes = message.to_pubsub()
        t = time.time()
        return t, self.publisher.publish(self.topic(topic), data, **attributes)

    # --- the Compute stand-in ------------------------------------------------------------

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.compute_url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def _post(self, path: str, body: dict | None = None) -> Any:
        request = urllib.request.Request(
            self.compute_url + path,
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())

    def operations(self) -> list[dict]:
        out: list[dict] = []
        token = ""
        while True:
            page = self._get(
                f"/compute/v1/projects/{self.project}/zones/{self.zone}/operations?maxResults=500"
                + (f"&pageToken={token}" if token else "")
            )
            out += page.get("items", [])
            token = page.get("nextPageToken", "")
            if not token:
                return out

    def vm_ops(self) -> dict[str, dict[str, dict]]:
        """``{vm name: {"insert": op, "delete": op}}`` (the first of each)."""
        out: dict[str, dict[str, dict]] = {}
        for op in self.operations():
            name = op.get("targetLink", "").rsplit("/", 1)[-1]
            out.setdefault(name, {}).setdefault(op.get("operationType", ""), op)
        return out

    def local_vms(self) -> list[dict]:
        return self._get("/_local/vms")["vms"]

    def instance(self, name: str) -> dict | None:
        try:
            return self._get(f"/compute/v1/projects/{self.project}/zones/{self.zone}/instances/{name}")
        except urllib.error.HTTPError:
            return None

    def stats(self) -> dict:
        return self._get("/_local/stats")

    def insert_vm(self, name: str, metadata: dict[str, str], labels: dict[str, str] | None = None) -> dict:
        body = {
            "name": name,
            "metadata": {"items": [{"key": k, "value": v} for k, v in metadata.items()]},
            "labels": labels or {},
        }
        return self._post(
            f"/compute/v1/projects/{self.project}/zones/{self.zone}/instances"
            f"?sourceInstanceTemplate=projects/{self.project}/global/instanceTemplates/{self.stack_template}",
            body,
        )

    @property
    def stack_template(self) -> str:
        return self.stack.env()["BATCHVM_INSTANCE_TEMPLATE"]

    def wait_status(self, names: list[str], status: str, timeout: float = 60) -> list[str]:
        """Wait until every VM in ``names`` has ``status``; returns those that did not."""
        deadline = time.monotonic() + timeout
        while True:
            states = {v["name"]: v["status"] for v in self.local_vms()}
            missing = [n for n in names if states.get(n) != status]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.3)

    def delete_vm(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.compute_url}/compute/v1/projects/{self.project}/zones/{self.zone}/instances/{name}",
            method="DELETE",
        )
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def delete_all_vms(self) -> dict:
        return self._post("/_local/reset", {"deleteInstances": True})
