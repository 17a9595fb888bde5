"""``batchvm setup``: the plan, idempotence, and --dry-run creating nothing."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Gcp, invoke, new_project

pytestmark = pytest.mark.integration

SA = "batchvm-worker@example-project.iam.gserviceaccount.com"


def test_dry_run_prints_what_it_would_create_and_creates_nothing(local_stack):
    gcp = Gcp(new_project())
    args = ["setup", "--project", gcp.project, "--template", "dry", "--service-account", SA,
            "--registry", "europe-docker.pkg.dev/example-project/jobs", "--max-run-duration", "6h", "--dry-run"]  # fmt: skip

    text = invoke(*args).stdout
    assert text.count("would create") == 4
    for name in ("topics/batch_jobs ", "topics/batch_jobs_status", "subscriptions/batchvm-monitor",
                 "instanceTemplates/dry"):  # fmt: skip
        assert name in text
    assert '"maxRunDuration"' in text and '"21600"' in text  # 6 h, the safety net
    assert '"instanceTerminationAction": "DELETE"' in text

    plan = json.loads(invoke(*args, "--output", "json").stdout)
    assert plan["dry_run"] is True
    assert [r["state"] for r in plan["resources"]] == ["create"] * 4
    template = plan["resources"][3]["body"]["properties"]
    metadata = {i["key"]: i["value"] for i in template["metadata"]["items"]}
    assert metadata == {
        "batchvm-container-cli": "docker",
        "batchvm-image-registry": "europe-docker.pkg.dev/example-project/jobs",
        "serial-port-logging-enable": "TRUE",
    }
    assert template["serviceAccounts"] == [
        {"email": SA, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
    ]
    boot_image = template["disks"][0]["initializeParams"]["sourceImage"]
    assert boot_image == f"projects/{gcp.project}/global/images/family/batchvm-worker"  # worker_image/image/
    assert template["scheduling"] == {
        "maxRunDuration": {"seconds": "21600"},
        "instanceTerminationAction": "DELETE",
    }

    assert gcp.topics() == []
    assert gcp.subscriptions() == []
    assert gcp.template("dry") is None


def test_setup_twice_is_idempotent_and_a_different_template_is_refused(local_stack):
    gcp = Gcp(new_project())
    args = ["setup", "--project", gcp.project, "--template", "twice", "--service-account", SA,
            "--scope", "pubsub", "--scope", "logging.write", "--heartbeat-seconds", "15", "--spot",
            "--image-allowlist", "europe-docker.pkg.dev/p/jobs/", "--image-allowlist", "gcr.io/p/",
            "--metadata", "extra-key=extra value"]  # fmt: skip

    first = invoke(*args).stdout
    assert first.count("created") == 4

    assert gcp.topics() == ["batch_jobs", "batch_jobs_status"]
    assert gcp.subscriptions() == ["batchvm-monitor"]
    monitor = gcp.subscriber.get_subscription(subscription=gcp.subscription("batchvm-monitor"))
    assert monitor.topic == gcp.topic("batch_jobs_status")
    template = gcp.template("twice")
    assert template is not None
    props = template.properties
    assert {i.key: i.value for i in props.metadata.items} == {
        "batchvm-container-cli": "docker",
        "batchvm-heartbeat-seconds": "15",
        "batchvm-image-allowlist": "europe-docker.pkg.dev/p/jobs/ gcr.io/p/",
        "serial-port-logging-enable": "TRUE",
        "extra-key": "extra value",
    }
    assert list(props.service_accounts[0].scopes) == [
        "https://www.googleapis.com/auth/pubsub",
        "https://www.googleapis.com/auth/logging.write",
    ]
    assert props.scheduling.max_run_duration.seconds == 24 * 3600
    assert props.scheduling.instance_termination_action == "DELETE"
    assert props.scheduling.provisioning_model == "SPOT"

    second = invoke(*args).stdout
    assert "created" not in second
    assert second.count("exists") == 4
    assert gcp.topics() == ["batch_jobs", "batch_jobs_status"]
    assert gcp.subscriptions() == ["batchvm-monitor"]

    changed = invoke(*args, "--machine-type", "n2-standard-8", code=1).output
    assert "exists, differs" in changed
    assert "machineType is 'e2-standard-2'" in changed
    assert gcp.template("twice").properties.machine_type == "e2-standard-2"  # untouched
