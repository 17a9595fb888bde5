"""The watcher, one unit: the hook is replaced by a fake whose pulls return scripted messages."""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import pytest
from airflow.triggers.base import TriggerEvent
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from google.pubsub_v1.types import PubsubMessage, ReceivedMessage

from airflow_batchvm.timeline import log_timeline
from airflow_batchvm.triggers.batchvm import VM_LOST, BatchVmJobTrigger, BatchVmTasksTrigger, vm_board
from airflow_batchvm.wire import Status, StatusMessage

CLASSPATH = "airflow_batchvm.triggers.batchvm.BatchVmJobTrigger"


def make_trigger(**overrides):
    kwargs = {"job_id": "job-1", "attempt": 2, "project_id": "p", "zone": "z", "vm_name": "bvm-job-1",
              "liveness_check_seconds": 60.0}
    return BatchVmJobTrigger(**{**kwargs, **overrides})


def received(status: StatusMessage | bytes, ack_id: str, **attributes) -> ReceivedMessage:
    if isinstance(status, StatusMessage):
        data, attrs = status.to_pubsub()
    else:
        data, attrs = status, {}
    return ReceivedMessage(ack_id=ack_id, message=PubsubMessage(data=data, attributes={**attrs, **attributes}))


def status(kind: Status, job_id="job-1", attempt=2, vm_name="bvm-job-1", **fields) -> StatusMessage:
    return StatusMessage(job_id=job_id, attempt=attempt, status=kind, vm_name=vm_name, zone="z", **fields)


@pytest.fixture(autouse=True)
def short_final_look(monkeypatch):
    """The fake pulls return at once; a real long poll would wait out the final look."""
    monkeypatch.setattr("airflow_batchvm.triggers.batchvm.FINAL_LOOK_SECONDS", 0.2)


@pytest.fixture(autouse=True)
def no_hold(monkeypatch):
    """The hold guards a race of Airflow's scheduler (none here); one test below checks it."""
    monkeypatch.setattr(BatchVmJobTrigger, "earliest_event_seconds", 0.0)
    monkeypatch.setattr(BatchVmTasksTrigger, "earliest_event_seconds", 0.0)


@pytest.fixture
def hook():
    with mock.patch("airflow_batchvm.triggers.batchvm.BatchVmAsyncHook", autospec=True) as cls:
        instance = cls.return_value
        instance.pull_statuses.return_value = []
        instance.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="RUNNING")
        yield instance


def test_serialize_is_exact():
    trigger = make_trigger(
        gcp_conn_id="conn", impersonation_chain=["sa@p.iam.gserviceaccount.com"], submitted_at=1764777600.5
    )
    assert trigger.serialize() == (
        CLASSPATH,
        {
            "job_id": "job-1",
            "attempt": 2,
            "project_id": "p",
            "zone": "z",
            "vm_name": "bvm-job-1",
            "gcp_conn_id": "conn",
            "impersonation_chain": ["sa@p.iam.gserviceaccount.com"],
            "liveness_check_seconds": 60.0,
            "startup_timeout_seconds": 900.0,
            "heartbeat_timeout_seconds": 300.0,
            "submitted_at": 1764777600.5,
            "task_index": None,
        },
    )
    _, kwargs = trigger.serialize()
    assert BatchVmJobTrigger(**kwargs).serialize() == trigger.serialize()


async def test_finished_yields_the_status_and_acks_only_the_rest(hook):
    finished = status(Status.FINISHED, exit_code=0, log_tail="done\n")
    hook.pull_statuses.side_effect = [
        [received(status(Status.STARTED), "a1")],
        [received(finished, "a2"), received(status(Status.RUNNING), "a3")],
    ]
    event = await make_trigger().run().asend(None)
    assert isinstance(event, TriggerEvent)
    assert event.payload["status"] == "FINISHED"
    assert event.payload["exit_code"] == 0
    assert event.payload["log_tail"] == "done\n"
    assert event.payload["project_id"] == "p"
    assert event.payload["started_at"] is not None
    acked = [call.args[1] for call in hook.acknowledge.await_args_list]
    assert acked == [["a1"], ["a3"]]  # the terminal status stays unacked for a restarted triggerer


async def test_failed_carries_exit_code_reason_and_tail(hook):
    hook.pull_statuses.return_value = [
        received(status(Status.FAILED, exit_code=3, reason="container exited with code 3", log_tail="boom"), "a")
    ]
    event = await make_trigger().run().asend(None)
    assert (event.payload["status"], event.payload["exit_code"], event.payload["reason"], event.payload["log_tail"]) == (
        "FAILED", 3, "container exited with code 3", "boom",
    )


async def test_other_jobs_older_attempts_and_malformed_messages_are_acked_and_ignored(hook):
    hook.pull_statuses.side_effect = [
        [
            received(status(Status.FINISHED, job_id="other-job"), "other", job_id="other-job"),
            received(status(Status.FINISHED, attempt=1), "stale"),
            received(b"{not json", "garbage"),
            received(b'{"schema_version": 9, "job_id": "job-1", "status": "FINISHED"}', "future"),
        ],
        [received(status(Status.FAILED, exit_code=1), "mine")],
    ]
    event = await make_trigger().run().asend(None)
    assert event.payload["status"] == "FAILED"
    assert hook.acknowledge.await_args_list[0].args[1] == ["other", "stale", "garbage", "future"]


async def test_finished_before_started_is_still_a_success(hook):
    hook.pull_statuses.return_value = [
        received(status(Status.FINISHED, exit_code=0), "f"),
        received(status(Status.STARTED), "s"),
        received(status(Status.FINISHED, exit_code=0), "dup"),
    ]
    event = await make_trigger().run().asend(None)
    assert event.payload["status"] == "FINISHED"


async def test_vm_gone_without_a_status_ends_the_wait(hook):
    hook.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="TERMINATED")
    event = await make_trigger(liveness_check_seconds=0).run().asend(None)
    assert event.payload["status"] == VM_LOST
    assert "TERMINATED" in event.payload["reason"]
    hook.get_vm.return_value = None
    event = await make_trigger(liveness_check_seconds=0).run().asend(None)
    assert "DELETED" in event.payload["reason"]


async def test_vm_down_but_final_status_arrived_wins_over_lost(hook):
    hook.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="TERMINATED")
    hook.pull_statuses.side_effect = [[], [received(status(Status.FINISHED, exit_code=0), "late")]]
    event = await make_trigger(liveness_check_seconds=0).run().asend(None)
    assert event.payload["status"] == "FINISHED"


async def test_running_vm_keeps_the_wait_going(hook):
    hook.pull_statuses.side_effect = [[], [], [received(status(Status.FINISHED, exit_code=0), "f")]]
    event = await make_trigger(liveness_check_seconds=0).run().asend(None)
    assert event.payload["status"] == "FINISHED"
    assert hook.get_vm.await_count == 2


async def test_pubsub_outage_is_retried(hook, monkeypatch):
    sleeps = []

    async def fake_sleep(seconds):
        sleeps.append(seconds)

    monkeypatch.setattr("airflow_batchvm.triggers.batchvm.asyncio.sleep", fake_sleep)
    hook.pull_statuses.side_effect = [
        gexc.ServiceUnavailable("down"),
        gexc.ServiceUnavailable("down"),
        [received(status(Status.FINISHED, exit_code=0), "f")],
    ]
    event = await make_trigger().run().asend(None)
    assert event.payload["status"] == "FINISHED"
    assert sleeps == [1.0, 2.0]


async def test_on_kill_deletes_the_vm_and_subscriptions(hook):
    await make_trigger().on_kill()
    names, zone, vm_name = hook.delete_job.await_args.args
    assert (vm_name, names.job_subscription, zone) == ("bvm-job-1", "projects/p/subscriptions/batchvm-job-job-1", "z")


async def test_a_replaced_vms_last_words_do_not_end_its_successors_wait(hook):
    hook.pull_statuses.side_effect = [
        [received(status(Status.PREEMPTED), "old")],  # from bvm-job-1, the VM that was preempted
        [received(StatusMessage(job_id="job-1", attempt=2, status=Status.FINISHED, vm_name="bvm-job-1-r2",
                                exit_code=0), "new")],
    ]
    event = await make_trigger(vm_name="bvm-job-1-r2").run().asend(None)
    assert (event.payload["status"], event.payload["vm_name"]) == ("FINISHED", "bvm-job-1-r2")
    assert hook.acknowledge.await_args_list[0].args[1] == ["old"]


async def test_a_job_that_never_starts_ends_the_wait(hook):
    hook.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="PROVISIONING")
    event = await make_trigger(startup_timeout_seconds=0.0, submitted_at=time.time() - 5).run().asend(None)
    assert event.payload["status"] == VM_LOST
    assert "did not start within 0 s" in event.payload["reason"]


async def test_a_restarted_watcher_gives_a_long_running_job_time_to_speak(hook):
    # Submitted two hours ago, STARTED long acked: a heartbeat within the grace keeps it alive.
    hook.pull_statuses.side_effect = [
        [received(status(Status.RUNNING), "hb")],
        [received(status(Status.FINISHED, exit_code=0), "f")],
    ]
    event = await make_trigger(startup_timeout_seconds=900.0, submitted_at=time.time() - 7200).run().asend(None)
    assert event.payload["status"] == "FINISHED"


async def test_a_started_job_that_falls_silent_ends_the_wait(hook):
    hook.pull_statuses.side_effect = [[received(status(Status.STARTED), "s")], [], [], []]
    event = await make_trigger(heartbeat_timeout_seconds=0.0).run().asend(None)
    assert event.payload["status"] == VM_LOST
    assert "no word from the job" in event.payload["reason"]


async def test_on_kill_finishes_its_cleanup_even_when_airflow_cancels_it(hook):
    done = []

    async def slow_delete(names, zone, vm_name):
        await asyncio.sleep(0.3)
        done.append(vm_name)

    hook.delete_job.side_effect = slow_delete
    killing = asyncio.ensure_future(make_trigger().on_kill())
    await asyncio.sleep(0.05)
    killing.cancel()  # the Airflow 3.3 triggerer can cancel on_kill itself
    with pytest.raises(asyncio.CancelledError):
        await killing
    await asyncio.sleep(0.5)
    assert done == ["bvm-job-1"]


async def test_an_event_is_held_until_the_wait_is_a_few_seconds_old(hook, monkeypatch):
    monkeypatch.setattr(BatchVmJobTrigger, "earliest_event_seconds", 0.5)
    hook.pull_statuses.return_value = [received(status(Status.FINISHED, exit_code=0), "f")]
    started = time.monotonic()
    event = await make_trigger().run().asend(None)
    assert event.payload["status"] == "FINISHED"
    assert time.monotonic() - started >= 0.5


async def test_the_timeline_shows_the_vm_up_before_a_start_reported_before_it_was_looked_at(hook):
    hook.get_vm.return_value = compute_v1.Instance(
        name="bvm-job-1", status="RUNNING", last_start_timestamp="2026-12-03T10:00:01+00:00"
    )
    hook.pull_statuses.side_effect = [
        [received(status(Status.STARTED), "s")],
        [received(status(Status.FINISHED, exit_code=0), "f")],
    ]
    trigger = make_trigger(liveness_check_seconds=600.0)
    trigger._log = mock.Mock()
    event = await trigger.run().asend(None)
    steps = [c.args[3].strip() for c in trigger.log.info.call_args_list if c.args[0].startswith("batchvm |")]
    assert steps == ["VM running", "STARTED"]
    # The last step travels in the event, for the resumed task to log: the triggerer does not block on it.
    assert [step for step, _, _ in event.payload["timeline"]["steps"]] == ["FINISHED"]
    log = mock.Mock()
    log_timeline(log, event.payload["timeline"])
    assert [c.args[3].strip() for c in log.info.call_args_list] == ["FINISHED"]


def task_status(index: int, kind: Status, **fields) -> StatusMessage:
    return StatusMessage(job_id="job-1", attempt=2, task_index=index, status=kind, vm_name=f"bvm-job-1-t{index}",
                         zone="z", **fields)


def make_tasks_trigger(**overrides):
    kwargs = {
        "job_id": "job-1", "attempt": 2, "project_id": "p", "task_count": 3, "wake_on_finish": False,
        "tasks": [{"task_index": i, "zone": "z", "vm_name": f"bvm-job-1-t{i}"} for i in (0, 1)],
    }
    return BatchVmTasksTrigger(**{**kwargs, **overrides})


def scripted_by_task(hook, script: dict[int, list]):
    """Each task's subscription gets its own scripted pulls (then nothing, slowly)."""

    async def pull(names, timeout):
        queue = script.get(names.task_index, [])
        if queue:
            return queue.pop(0)
        await asyncio.sleep(0.05)
        return []

    hook.pull_statuses.side_effect = pull
    hook.get_vm.side_effect = lambda **kw: compute_v1.Instance(name=kw["vm_name"], status="RUNNING")


def test_tasks_serialize_is_exact():
    assert make_tasks_trigger(submitted_at=1.5, progress={"done": {}}).serialize() == (
        "airflow_batchvm.triggers.batchvm.BatchVmTasksTrigger",
        {
            "job_id": "job-1",
            "attempt": 2,
            "project_id": "p",
            "tasks": [{"task_index": 0, "zone": "z", "vm_name": "bvm-job-1-t0"},
                      {"task_index": 1, "zone": "z", "vm_name": "bvm-job-1-t1"}],
            "task_count": 3,
            "wake_on_finish": False,
            "progress": {"done": {}},
            "gcp_conn_id": "google_cloud_default",
            "impersonation_chain": None,
            "liveness_check_seconds": 60.0,
            "startup_timeout_seconds": 900.0,
            "heartbeat_timeout_seconds": 300.0,
            "submitted_at": 1.5,
        },
    )


async def test_tasks_that_finish_are_collected_until_all_ended(hook):
    scripted_by_task(hook, {
        0: [[received(task_status(0, Status.FINISHED, exit_code=0), "a")]],
        1: [[], [], [received(task_status(1, Status.FINISHED, exit_code=0), "b")]],
    })
    event = await make_tasks_trigger(progress={"pending": []}).run().asend(None)
    assert sorted(event.payload["tasks"]) == ["0", "1"]
    assert event.payload["progress"] == {"pending": []}  # handed back for the task to go on from
    assert {e["task_index"] for e in event.payload["tasks"].values()} == {0, 1}


async def test_a_finished_task_wakes_the_task_when_others_wait_for_a_slot(hook):
    scripted_by_task(hook, {0: [[received(task_status(0, Status.FINISHED, exit_code=0), "a")]]})
    event = await make_tasks_trigger(wake_on_finish=True).run().asend(None)
    assert list(event.payload["tasks"]) == ["0"]


async def test_a_failed_task_ends_the_wait_at_once_and_another_tasks_status_is_not_taken_for_its_own(hook):
    scripted_by_task(hook, {
        # index 0's subscription also sees index 1's status (the emulator does not filter)
        0: [[received(task_status(1, Status.FAILED, exit_code=3), "x")]],
        1: [[received(task_status(1, Status.FAILED, exit_code=3), "b")]],
    })
    event = await make_tasks_trigger().run().asend(None)
    assert list(event.payload["tasks"]) == ["1"]
    assert event.payload["tasks"]["1"]["exit_code"] == 3


async def test_tasks_on_kill_deletes_running_vms_and_every_tasks_subscriptions(hook):
    await make_tasks_trigger().on_kill()
    assert sorted(c.args[1] for c in hook.delete_vm.await_args_list) == ["bvm-job-1-t0", "bvm-job-1-t1"]
    assert sorted(c.args[0].status_subscription for c in hook.delete_subscriptions.await_args_list) == [
        f"projects/p/subscriptions/batchvm-status-job-1-t{i}" for i in range(3)
    ]


async def test_the_waits_of_a_process_share_one_vm_list_per_zone(hook):
    hook.list_managed_vms.return_value = [
        compute_v1.Instance(name=f"bvm-job-{i}", status="RUNNING") for i in range(50)
    ]
    hook.get_vm.return_value = None
    board = vm_board("google_cloud_default", "p", "z")
    states = [(await board.vm(hook, "p", "z", f"bvm-job-{i}", max_age=30)).status for i in range(50)]
    assert states == ["RUNNING"] * 50
    assert hook.list_managed_vms.await_count == 1 and hook.get_vm.await_count == 0
    assert await board.vm(hook, "p", "z", "bvm-created-since", max_age=30) is None  # asked for alone
    assert hook.get_vm.await_count == 1
    assert vm_board("google_cloud_default", "p", "other-zone") is not board
