"""Fixtures for the jobs run on the local stack."""

from __future__ import annotations

import json
import time

import pytest
from google.api_core import exceptions as gexc


@pytest.fixture
def status_log(cloud):
    """Every status published while the test runs, read from a subscription of its own."""
    name = cloud.subscriber.subscription_path(cloud.project, f"test-status-log-{time.time_ns()}")
    cloud.subscriber.create_subscription(name=name, topic=f"projects/{cloud.project}/topics/batch_jobs_status")

    def read(job_id: str) -> list[dict]:
        seen = []
        while True:
            try:
                response = cloud.subscriber.pull(subscription=name, max_messages=100, timeout=2)
            except gexc.DeadlineExceeded:
                break
            if not response.received_messages:
                break
            cloud.subscriber.acknowledge(subscription=name, ack_ids=[m.ack_id for m in response.received_messages])
            seen += [json.loads(m.message.data) for m in response.received_messages]
        return [s for s in seen if s.get("job_id") == job_id]

    yield read
    cloud.subscriber.delete_subscription(subscription=name)
