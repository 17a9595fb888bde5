"""``batchvm submit`` runs a job on its own VM to its end; ``batchvm monitor`` is the status logger."""

from __future__ import annotations

import json

import pytest

from airflow_batchvm.wire import Status, StatusMessage
from tests.cli.conftest import TEMPLATE, ZONE, invoke, setup_args
from tests.helpers import IMAGE

pytestmark = pytest.mark.integration


def submit(gcp, *args: str, code: int = 0) -> str:
    common = [
        "submit",
        "--project",
        gcp.project,
        "--zone",
        ZONE,
        "--template",
        TEMPLATE,
        "--liveness-check-seconds",
        "2",
    ]
    return invoke(*common, *args, code=code).output


def test_submit_runs_the_job_to_finished_and_monitor_logs_it(worker_project, tmp_path):
    gcp = worker_project
    text = submit(
        gcp, "--process-type", "sleep_test", "--sleep-time", "1", "--job-id", "cli-sleep-1", "--wait"
    )

    assert "submitted job cli-sleep-1 attempt 1: VM bvm-cli-sleep-1" in text
    assert "FINISHED" in text
    # The earlier publish script's job: the image from the template's registry, the message as JOB_DATA.
    assert (
        'Starting Job: {"job_id":"cli-sleep-1","process_type":"sleep_test","sleep_time":1,"vm_count":1}'
        in text
    )
    assert "Job finished." in text
    gcp.wait_no_vm("bvm-cli-sleep-1")
    assert gcp.job_subscriptions() == []

    log = tmp_path / "status.log"
    shown = invoke("monitor", "--project", gcp.project, "--job-id", "cli-sleep-1", "--max-messages", "2",
                   "--timeout", "30s", "--log-file", str(log)).output  # fmt: skip
    assert "STARTED   job=cli-sleep-1 attempt=1 vm=bvm-cli-sleep-1 zone=us-central1-a" in shown
    assert "FINISHED  job=cli-sleep-1 attempt=1 vm=bvm-cli-sleep-1 zone=us-central1-a exit_code=0" in shown
    lines = log.read_text().splitlines()
    assert [line.split()[1] for line in lines if not line.startswith(" ")] == ["STARTED", "FINISHED"]
    assert "    | Job finished." in lines


def test_submit_a_failing_image_job_passes_the_payload_verbatim_and_exits_1(worker_project):
    payload = json.dumps({"q": "$(touch /tmp/pwned) `id` \"quoted\" 'single'"})
    text = submit(
        worker_project, "--image", IMAGE, "--env", "EXIT_CODE=3", "--payload", payload, "--wait", code=1
    )

    assert "FAILED" in text
    assert "exit_code  │ 3" in text
    assert f"Starting Job: {json.dumps(json.loads(payload), separators=(',', ':'))}" in text
    assert worker_project.job_subscriptions() == []


def test_submit_in_the_earlier_message_format_is_run_by_the_agent(worker_project):
    text = submit(worker_project, "--process-type", "sleep_test", "--legacy-format", "--job-id", "cli-legacy-1",
                  "--wait")  # fmt: skip
    assert "FINISHED" in text
    assert (
        'Starting Job: {"job_id":"cli-legacy-1","process_type":"sleep_test","sleep_time":0,"vm_count":1}'
        in text
    )
    worker_project.wait_no_vm("bvm-cli-legacy-1")


def test_submit_refuses_a_bad_job_before_creating_anything(worker_project):
    text = submit(worker_project, "--image", "bad image", "--job-id", "cli-bad-1", code=1)
    assert "invalid job: image: Value error, must be an image reference without whitespace" in text
    assert "bvm-cli-bad-1" not in worker_project.vms()
    assert worker_project.job_subscriptions() == []


def test_monitor_shows_earlier_statuses_drops_malformed_ones_and_acks_them(worker_project, tmp_path):
    gcp = worker_project
    invoke(*setup_args(gcp.project, "--skip-template", "--monitor-subscription", "mon-formats"))
    topic = gcp.topic("batch_jobs_status")
    # The earlier design's VMs published this, without attributes.
    gcp.publisher.publish(
        topic, b'{"job_id": "old-job", "status": "FINISHED", "vm_name": "mig-vm-1"}'
    ).result()
    gcp.publisher.publish(topic, b"not json").result()
    gcp.publisher.publish(topic, b'{"schema_version": 99, "job_id": "j", "status": "STARTED"}').result()

    log = tmp_path / "status.jsonl"
    args = ["monitor", "--project", gcp.project, "--monitor-subscription", "mon-formats", "--log-file", str(log),
            "--jsonl"]  # fmt: skip
    shown = invoke(*args, "--max-messages", "3", "--timeout", "30s").output
    assert "FINISHED  job=old-job attempt=1 vm=mig-vm-1" in shown
    assert shown.count("dropped") == 2
    assert "schema_version 99 is newer than the supported 1" in shown

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3
    old = next(r for r in records if r.get("job_id") == "old-job")
    assert StatusMessage.model_validate(old).status is Status.FINISHED
    assert sum("dropped" in r for r in records) == 2

    again = invoke(*args, "--timeout", "2s").output
    assert "0 message(s) shown" in again  # acked: not delivered twice
    gcp.subscriber.delete_subscription(subscription=gcp.subscription("mon-formats"))
