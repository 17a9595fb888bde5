"""The fault matrix (docs/RELIABILITY.md): each fault caused for real where it can be, on the real
Pub/Sub emulator, the Compute stand-in whose VMs run the real agent, and real containers.

Each test checks what the user sees (the task's outcome and message) and that no VM or per-job
subscription is left behind (the ``cloud`` fixture checks that after every test).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator
from airflow_batchvm.sensors.batchvm import BatchVmJobFailed
from tests.helpers import IMAGE, first_event, run_deferred, task_context

pytestmark = pytest.mark.integration


def run_op(cloud, task_id: str, **kwargs) -> BatchVmRunJobOperator:
    defaults = {"image": IMAGE, "instance_template": cloud.template, "zone": cloud.zone,
                "liveness_check_seconds": 1, "max_vm_attempts": 1}
    return BatchVmRunJobOperator(task_id=task_id, **{**defaults, **kwargs})


async def timed(coro):
    start = time.monotonic()
    try:
        return await coro, time.monotonic() - start
    except Exception as exc:
        return exc, time.monotonic() - start


# F1 is test_jobs.py::test_a_job_exiting_3_fails_the_task_with_code_and_tail.


async def test_f2_missing_image_fails_with_the_runtimes_reason(cloud):
    op = run_op(cloud, "f2", image="localhost/no-such-image:latest")
    with pytest.raises(BatchVmJobFailed, match="FAILED") as failure:
        await run_deferred(op, task_context("f2"))
    assert "no-such-image" in str(failure.value) or "runtime" in str(failure.value)


async def test_f3_a_vm_whose_agent_never_starts_is_detected_and_deleted(cloud):
    cloud.arm("boot-failure")
    op = run_op(cloud, "f3")
    failure, seconds = await timed(run_deferred(op, task_context("f3")))
    assert isinstance(failure, BatchVmJobFailed)
    assert "was lost" in str(failure) and "TERMINATED" in str(failure)
    assert seconds < 40  # liveness check (1 s here) + the final look (15 s) + boot


async def test_f3_a_vm_stuck_provisioning_hits_the_startup_timeout(cloud):
    cloud.arm("stuck-provisioning")
    op = run_op(cloud, "f3-stuck", startup_timeout_seconds=3)
    failure, seconds = await timed(run_deferred(op, task_context("f3-stuck")))
    assert isinstance(failure, AirflowException)
    assert "within 3 s" in str(failure)
    assert seconds < 15


async def test_f4_a_preempted_vm_is_replaced_and_the_job_completes_once(cloud, status_log):
    op = run_op(cloud, "f4", spot=True, max_vm_attempts=2, command=["sh", "-c", "echo begin; sleep 6; echo end"])
    context = task_context("f4")

    async def preempt_once_started():
        job_id = await asyncio.to_thread(lambda: op.build_spec(context).job_id)
        first = f"bvm-{job_id}"
        await cloud.wait_for_output(first, "begin")  # the container is running
        await asyncio.to_thread(cloud.preempt, first, 30)  # as GCE: 30 s notice; the agent powers off sooner

    result, _ = await asyncio.gather(run_deferred(op, context), preempt_once_started())
    assert result["status"] == "FINISHED"
    assert result["vm_name"].endswith("-r2")
    statuses = [(s["status"], s["vm_name"]) for s in status_log(result["job_id"])]
    assert [s for s in statuses if s[0] in ("FINISHED", "FAILED")] == [("FINISHED", result["vm_name"])], statuses
    assert ("PREEMPTED", result["vm_name"].removesuffix("-r2")) in statuses, statuses


async def test_f4_a_vm_killed_without_warning_is_replaced_without_waiting_for_its_lease(cloud, status_log):
    """A VM that dies at once (no notice, no release) still holds its job's lease, 10 minutes by
    default: the operator frees the job with a seek, so the replacement starts it right away."""
    op = run_op(cloud, "f4kill", max_vm_attempts=2, command=["sh", "-c", "echo begin; sleep 4; echo end"])
    context = task_context("f4kill")

    async def kill_once_started():
        job_id = await asyncio.to_thread(lambda: op.build_spec(context).job_id)
        await cloud.wait_for_output(f"bvm-{job_id}", "begin")
        await asyncio.to_thread(cloud.kill, f"bvm-{job_id}")

    (result, seconds), _ = await asyncio.gather(timed(run_deferred(op, context)), kill_once_started())
    assert result["status"] == "FINISHED"
    assert result["vm_name"].endswith("-r2")
    assert seconds < 120, seconds  # the lease the killed agent held has 600 s to run
    statuses = [(s["status"], s["vm_name"]) for s in status_log(result["job_id"])]
    assert [s for s in statuses if s[0] in ("FINISHED", "FAILED")] == [("FINISHED", result["vm_name"])], statuses


async def test_f5_an_agent_crash_after_started_ends_the_wait(cloud):
    op = run_op(cloud, "f5", vm_metadata={"batchvm-test-crash-after-started": "1"},
                command=["sh", "-c", "sleep 30"])
    failure, seconds = await timed(run_deferred(op, task_context("f5")))
    assert isinstance(failure, BatchVmJobFailed)
    assert "was lost" in str(failure)
    assert seconds < 40  # liveness check (1 s here) + the final look (15 s) + boot; see RELIABILITY.md


@pytest.mark.slow
async def test_f8_pubsub_down_for_30_s_mid_job_loses_nothing(cloud, local_stack):
    op = run_op(cloud, "f8", heartbeat_timeout_seconds=None, command=["sh", "-c", "echo sleeping; sleep 4; echo survived"])
    context = task_context("f8")

    async def outage():
        job_id = await asyncio.to_thread(lambda: op.build_spec(context).job_id)
        await cloud.wait_for_output(f"bvm-{job_id}", "sleeping")  # STARTED is out, the container runs
        local_stack.pubsub.pause()
        try:
            await asyncio.sleep(30)
        finally:
            local_stack.pubsub.resume()

    result, _ = await asyncio.gather(run_deferred(op, context), outage())
    assert result["status"] == "FINISHED"


def _hubs(cloud) -> set[str]:
    return {name for name in cloud.job_subscriptions() if name.startswith("batchvm-hub-")}


async def test_the_shared_status_pull_outlives_losing_its_subscription(cloud, caplog):
    """Pub/Sub drops the triggerer's shared subscription mid-job (an expiry, an emulator reset): the
    pull makes a new one and the wait still sees FINISHED, which went by while there was none. No
    liveness check can end the wait here (the next is 10 minutes away): only the shared pull can."""
    op = run_op(cloud, "hubgone", liveness_check_seconds=600, heartbeat_timeout_seconds=None,
                command=["sh", "-c", "echo sleeping; sleep 6; echo done"])
    context = task_context("hubgone")

    async def drop_the_shared_subscription():
        job_id = await asyncio.to_thread(lambda: op.build_spec(context).job_id)
        await cloud.wait_for_output(f"bvm-{job_id}", "sleeping")
        hubs = await asyncio.to_thread(_hubs, cloud)
        assert len(hubs) == 1, hubs
        await asyncio.to_thread(
            cloud.subscriber.delete_subscription, subscription=f"projects/{cloud.project}/subscriptions/{hubs.pop()}"
        )

    with caplog.at_level(logging.WARNING, logger="airflow_batchvm"):
        result, _ = await asyncio.wait_for(
            asyncio.gather(run_deferred(op, context), drop_the_shared_subscription()), timeout=150
        )
    assert result["status"] == "FINISHED"
    assert "is gone; making it again" in caplog.text
    cloud.assert_nothing_left()


async def test_f9_a_status_published_while_the_triggerer_is_down_is_not_lost(cloud):
    op = run_op(cloud, "f9", command=["sh", "-c", "sleep 3; echo done"])
    context = task_context("f9")
    with pytest.raises(TaskDeferred) as deferred:
        await asyncio.to_thread(op.execute, context)
    _, kwargs = deferred.value.trigger.serialize()
    # The first triggerer watches, then dies mid-wait (its task is cancelled, as on shutdown).
    first = asyncio.ensure_future(first_event(deferred.value.trigger))
    await asyncio.sleep(1.5)
    first.cancel()
    # While no triggerer runs, the job finishes and its VM powers off.
    await cloud.wait_for_vm(kwargs["vm_name"], "TERMINATED", timeout=30)
    # A new triggerer process rebuilds the trigger from its serialized form and still sees FINISHED.
    revived = type(deferred.value.trigger)(**kwargs)
    event = await asyncio.wait_for(first_event(revived), timeout=30)
    assert event.payload["status"] == "FINISHED"
    await asyncio.to_thread(op.execute_complete, context, event.payload, **deferred.value.kwargs)


async def test_f10_killing_the_deferred_task_deletes_vm_and_subscriptions(cloud):
    op = run_op(cloud, "f10", command=["sh", "-c", "sleep 60"])
    with pytest.raises(TaskDeferred) as deferred:
        await asyncio.to_thread(op.execute, task_context("f10"))
    trigger = deferred.value.trigger
    waiting = asyncio.ensure_future(first_event(trigger))
    await cloud.wait_for_vm(trigger.vm_name, "RUNNING")
    waiting.cancel()  # the triggerer cancels the trigger, then calls on_kill (Airflow 3.3)
    await trigger.on_kill()
    cloud.assert_nothing_left(trigger.job_id)


async def test_f11_a_zone_stockout_falls_back_to_the_next_zone(cloud):
    cloud.zones = ("us-central1-b", "us-central1-c")
    cloud.arm("zone-exhausted", zone=cloud.zone, count=None)
    op = run_op(cloud, "f11", fallback_zones=list(cloud.zones))
    result = await run_deferred(op, task_context("f11"))
    assert (result["status"], result["zone"]) == ("FINISHED", "us-central1-b")


async def test_f11_all_zones_out_is_a_clear_error(cloud):
    cloud.zones = ("us-central1-b",)
    cloud.arm("zone-exhausted", count=None)
    op = run_op(cloud, "f11-all", fallback_zones=["us-central1-b"])
    with pytest.raises(AirflowException, match="no capacity in any of the zones us-central1-a, us-central1-b"):
        await run_deferred(op, task_context("f11-all"))


async def test_f12_a_job_over_its_timeout_is_killed_and_its_vm_had_a_max_run_duration(cloud):
    op = run_op(cloud, "f12", timeout_seconds=2, command=["sh", "-c", "sleep 60"])
    context = task_context("f12")

    async def vm_scheduling():
        job_id = await asyncio.to_thread(lambda: op.build_spec(context).job_id)
        vm = await cloud.wait_for_vm(f"bvm-{job_id}", "RUNNING")
        return vm.scheduling

    failure, scheduling = await asyncio.gather(run_deferred(op, context), vm_scheduling(), return_exceptions=True)
    assert isinstance(failure, BatchVmJobFailed)
    assert "timed out after 2 s" in str(failure)
    assert scheduling.max_run_duration.seconds == 2 + 1800
    assert scheduling.instance_termination_action == "DELETE"


async def test_f13_a_retry_reattaches_to_the_running_vm(cloud):
    first = run_op(cloud, "f13", command=["sh", "-c", "sleep 4; echo once"])
    context = task_context("f13", try_number=1)
    with pytest.raises(TaskDeferred):
        await asyncio.to_thread(first.execute, context)
    inserts = cloud.calls("instances.insert")
    # The worker died; the same task instance is retried while the VM still runs its job.
    retry = run_op(cloud, "f13", command=["sh", "-c", "sleep 4; echo once"])
    second = task_context("f13", try_number=2)
    second["ti"].run_id = context["ti"].run_id
    result = await run_deferred(retry, second)
    assert result["status"] == "FINISHED"
    assert result["attempt"] == 1  # the first try's job, watched again
    assert result["vm_name"] == first.submitted.vm_name
    assert cloud.calls("instances.insert") == inserts  # no second VM


async def test_f13_an_earlier_attempts_finished_never_satisfies_a_new_attempt(cloud):
    first = run_op(cloud, "f13b", command=["sh", "-c", "echo first try"])
    context = task_context("f13b", try_number=1)
    with pytest.raises(TaskDeferred) as deferred:
        await asyncio.to_thread(first.execute, context)
    # Try 1's job runs to FINISHED, but the task never learns (its worker died before resuming).
    await cloud.wait_for_vm(deferred.value.trigger.vm_name, "TERMINATED", timeout=30)
    retry = run_op(cloud, "f13b", command=["sh", "-c", "echo second try; exit 5"])
    second = task_context("f13b", try_number=2)
    second["ti"].run_id = context["ti"].run_id
    with pytest.raises(BatchVmJobFailed, match="exit code 5"):
        await run_deferred(retry, second)


async def test_f13_a_rerun_of_the_same_try_after_its_job_ended_takes_that_result(cloud, status_log):
    """A task instance re-run with the same try (e.g. Airflow rescheduled it) must not run its job twice."""
    first = run_op(cloud, "f13c", command=["sh", "-c", "echo ran"])
    context = task_context("f13c", try_number=1)
    with pytest.raises(TaskDeferred) as deferred:
        await asyncio.to_thread(first.execute, context)
    await cloud.wait_for_vm(deferred.value.trigger.vm_name, "TERMINATED", timeout=30)
    inserts = cloud.calls("instances.insert")
    again = run_op(cloud, "f13c", command=["sh", "-c", "echo ran"])
    rerun = task_context("f13c", try_number=1)
    rerun["ti"].run_id = context["ti"].run_id
    result = await run_deferred(again, rerun)
    assert result["status"] == "FINISHED"
    assert cloud.calls("instances.insert") == inserts  # no new VM, no second run
    assert [s["status"] for s in status_log(result["job_id"])].count("STARTED") == 1


@pytest.mark.parametrize(("fault", "cause"), [("quota-exceeded", "QUOTA_EXCEEDED"), ("permission-denied", "forbidden")])
async def test_f14_quota_or_permission_errors_name_the_cause(cloud, fault, cause):
    cloud.arm(fault)
    op = run_op(cloud, f"f14-{fault}")
    with pytest.raises(AirflowException, match="Could not create the VM") as failure:
        await run_deferred(op, task_context(f"f14-{fault}"))
    assert cause in str(failure.value)


async def test_f16_job_data_with_shell_metacharacters_arrives_byte_for_byte(cloud, capfd):
    nasty = "$(touch /tmp/pwned) `id` 'single' \"double\" ; rm -rf / \n second line \\ $HOME"
    op = run_op(cloud, "f16", payload={"text": nasty}, env={"NASTY": nasty},
                command=["sh", "-c", 'echo "JOB_DATA=$JOB_DATA"; echo "NASTY=$NASTY"'])
    result = await run_deferred(op, task_context("f16"))
    assert result["status"] == "FINISHED"
    log = capfd.readouterr().out
    assert "JOB_DATA=" + json.dumps({"text": nasty}, separators=(",", ":")) in log
    assert "NASTY=" + nasty.split("\n")[0] in log and nasty.split("\n")[1] in log


async def test_the_templates_image_allowlist_is_enforced_by_the_agent(cloud):
    template = "batchvm-local-allowlisted"
    body = cloud.templates.get(project=cloud.project, instance_template=cloud.template)
    body.name = template
    body.properties.metadata.items.append(
        compute_v1.Items(key="batchvm-image-allowlist", value="europe-docker.pkg.dev/trusted/ localhost/approved-")
    )
    try:
        cloud.templates.insert(project=cloud.project, instance_template_resource=body)
    except gexc.Conflict:
        pass
    op = run_op(cloud, "allowlist", instance_template=template)
    with pytest.raises(BatchVmJobFailed, match="is not allowed on this VM") as failure:
        await run_deferred(op, task_context("allowlist"))
    assert "localhost/sleep_test:latest" in str(failure.value)
