"""The shared status pull of a triggerer process (triggers/status_hub.py), one unit at a time.

The hook is a fake; the last tests drive the triggers through Airflow's own
``SharedStreamManager``, the part of the triggerer that runs shared streams.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from airflow.triggers.shared_stream import SharedStreamManager
from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from airflow_batchvm.triggers import status_hub as hub_module
from airflow_batchvm.triggers.batchvm import BatchVmJobTrigger, BatchVmTasksTrigger
from airflow_batchvm.triggers.status_hub import CATCH_UP, StatusHub, hub_key, status_hub
from airflow_batchvm.wire import Status
from tests.unit.test_trigger import make_tasks_trigger, make_trigger, received, status, task_status

KEY = hub_key("google_cloud_default", "p", None)


@pytest.fixture(autouse=True)
def no_hold(monkeypatch):
    monkeypatch.setattr(BatchVmJobTrigger, "earliest_event_seconds", 0.0)
    monkeypatch.setattr(BatchVmTasksTrigger, "earliest_event_seconds", 0.0)


class FakeHubPubSub:
    """The hub's Pub/Sub calls: pulls hand out what a test puts in ``published``, else wait."""

    def __init__(self):
        self.published: asyncio.Queue = asyncio.Queue()
        self.created: list[str] = []
        self.acked: list[str] = []
        self.deleted: list[str] = []
        self.pull_errors: list[Exception] = []

    async def create_hub_subscription(self, name, project_id):
        self.created.append(name)

    async def pull(self, subscription, timeout, max_messages=100):
        if self.pull_errors:
            raise self.pull_errors.pop(0)
        try:
            first = await asyncio.wait_for(self.published.get(), timeout=min(timeout, 0.2))
        except TimeoutError:
            return []
        batch = [first]
        while not self.published.empty():
            batch.append(self.published.get_nowait())
        return batch

    async def acknowledge_on(self, subscription, ack_ids):
        self.acked += ack_ids

    async def delete_subscription(self, name):
        self.deleted.append(name)


@pytest.fixture
def hook():
    """The waits' hook: their own subscriptions are empty unless a test says otherwise."""
    with mock.patch("airflow_batchvm.triggers.batchvm.BatchVmAsyncHook", autospec=True) as cls:
        instance = cls.return_value
        instance.pull_statuses.return_value = []
        instance.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="RUNNING")
        instance.list_managed_vms.return_value = [compute_v1.Instance(name="bvm-job-1", status="RUNNING")]
        yield instance


def ready_hub() -> StatusHub:
    hub = status_hub(KEY)
    hub.ready.set()
    return hub


async def until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_hub_routes_each_status_to_its_own_wait_only():
    hub = StatusHub(KEY)
    mine, other_task, other_job = hub.register("job-1", 0), hub.register("job-1", 1), hub.register("job-2", 0)
    for mailbox in (mine, other_task, other_job):
        assert mailbox.get_nowait() is CATCH_UP  # a new wait first reads its own subscription
    delivered = hub.dispatch([
        received(status(Status.FINISHED, exit_code=0), "h1"),
        received(task_status(1, Status.STARTED), "h2"),
        received(status(Status.FINISHED, job_id="job-9"), "h3", job_id="job-9"),  # another process's job
        received(b"{}", "h4", job_id="job-1", task_index="not a number"),
    ])
    assert delivered == 2
    got = mine.get_nowait()
    assert got.message.attributes["status"] == "FINISHED"
    assert got.ack_id == ""  # the hub's ack id never reaches a wait, which acks on its own subscription
    assert other_task.get_nowait().message.attributes["task_index"] == "1"
    assert mine.empty() and other_task.empty() and other_job.empty()
    hub.unregister("job-1", 0, mine)
    assert hub.dispatch([received(status(Status.FINISHED, exit_code=0), "h5")]) == 0


def test_waits_of_one_connection_and_project_share_a_key_and_the_switch_turns_it_off(monkeypatch):
    assert make_trigger().shared_stream_key() == make_tasks_trigger().shared_stream_key() == KEY
    assert make_trigger(project_id="q").shared_stream_key() != KEY
    assert make_trigger(impersonation_chain=["a@b"]).shared_stream_key() == hub_key("google_cloud_default", "p", ("a@b",))
    monkeypatch.setenv("AIRFLOW__BATCHVM__SHARED_STATUS_PULL", "False")
    assert make_trigger().shared_stream_key() is None


async def test_a_wait_on_the_hub_takes_its_status_from_its_mailbox(hook):
    hub = ready_hub()
    waiting = asyncio.ensure_future(make_trigger().filter_shared_stream(None).__anext__())
    await until(lambda: hook.pull_statuses.await_count == 1)  # the catch-up: its own subscription, empty
    hub.dispatch([received(status(Status.STARTED), "h1"), received(status(Status.FINISHED, exit_code=0), "h2")])
    event = await asyncio.wait_for(waiting, 5)
    assert event.payload["status"] == "FINISHED"
    assert hook.pull_statuses.await_count == 1  # no pull of its own while it waited
    assert all(call.args[1] == [] for call in hook.acknowledge.await_args_list)  # nothing of the hub's acked
    assert hub.mailboxes == {}


async def test_a_status_from_before_the_hub_is_found_on_the_jobs_own_subscription(hook):
    ready_hub()
    hook.pull_statuses.side_effect = [
        [received(status(Status.STARTED), "own-1"), received(status(Status.FINISHED, exit_code=0), "own-2")],
        [],
    ]
    event = await asyncio.wait_for(make_trigger().filter_shared_stream(None).__anext__(), 5)
    assert event.payload["status"] == "FINISHED"
    acked = [ack for call in hook.acknowledge.await_args_list for ack in call.args[1]]
    assert acked == ["own-1"]  # the terminal status stays on the subscription for a restarted triggerer


async def test_a_wait_with_no_hub_up_reads_its_own_subscription(hook, monkeypatch):
    monkeypatch.setattr("airflow_batchvm.triggers.batchvm.HUB_READY_SECONDS", 0.1)
    hook.pull_statuses.return_value = [received(status(Status.FINISHED, exit_code=0), "own")]
    event = await asyncio.wait_for(make_trigger().filter_shared_stream(None).__anext__(), 5)
    assert event.payload["status"] == "FINISHED"
    assert status_hub(KEY).mailboxes == {}  # it left the hub, which would otherwise fill its mailbox


async def test_a_down_vm_takes_its_last_status_from_the_mailbox(hook):
    hub = ready_hub()
    hook.list_managed_vms.return_value = []
    hook.get_vm.return_value = compute_v1.Instance(name="bvm-job-1", status="TERMINATED")
    trigger = make_trigger(liveness_check_seconds=0.3)
    waiting = asyncio.ensure_future(trigger.filter_shared_stream(None).__anext__())
    await until(lambda: hub.mailboxes)
    hub.dispatch([received(status(Status.FAILED, exit_code=3, reason="exit 3"), "h")])
    event = await asyncio.wait_for(waiting, 5)
    assert (event.payload["status"], event.payload["exit_code"]) == ("FAILED", 3)


async def test_the_hub_pulls_acks_and_dispatches_and_makes_a_lost_subscription_again(monkeypatch):
    monkeypatch.setattr(hub_module, "HUB_RETRY_SECONDS", 0.01)
    pubsub = FakeHubPubSub()
    hub = StatusHub(KEY)
    mailbox = hub.register("job-1", 0)
    running = asyncio.ensure_future(hub.run(pubsub, mock.Mock()))
    await until(hub.ready.is_set)
    pubsub.published.put_nowait(received(status(Status.STARTED), "h1"))
    await until(lambda: mailbox.qsize() == 3)
    assert [mailbox.get_nowait() for _ in range(2)] == [CATCH_UP, CATCH_UP]  # registered; hub up
    assert mailbox.get_nowait().message.attributes["status"] == "STARTED"
    assert pubsub.acked == ["h1"]
    # Pub/Sub lost the hub's subscription (an emulator restart): it is made again, and the wait
    # reads its own subscription for what went by meanwhile.
    pubsub.pull_errors.append(gexc.NotFound("gone"))
    await until(lambda: len(pubsub.created) == 2)
    await until(lambda: not mailbox.empty())
    assert mailbox.get_nowait() is CATCH_UP
    # An outage is waited out; the hub keeps going.
    pubsub.pull_errors.append(gexc.ServiceUnavailable("down"))
    pubsub.published.put_nowait(received(status(Status.FINISHED, exit_code=0), "h2"))
    await until(lambda: not mailbox.empty())
    assert mailbox.get_nowait().message.attributes["status"] == "FINISHED"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(0)
    assert pubsub.deleted == [pubsub.created[0]] and not hub.ready.is_set()


async def test_the_triggerer_runs_one_pull_for_all_its_waits(hook):
    """Through Airflow's own SharedStreamManager: two jobs and a two-task job share one subscription."""
    pubsub = FakeHubPubSub()
    for method in ("create_hub_subscription", "pull", "acknowledge_on", "delete_subscription"):
        getattr(hook, method).side_effect = getattr(pubsub, method)
    manager = SharedStreamManager()
    triggers = {
        1: make_trigger(job_id="job-3", vm_name="bvm-job-3"),
        2: make_trigger(job_id="job-2", vm_name="bvm-job-2"),
        3: make_tasks_trigger(),
    }
    waits = {}
    for trigger_id, trigger in triggers.items():
        key = trigger.shared_stream_key()
        stream = manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
        waits[trigger_id] = asyncio.ensure_future(trigger.filter_shared_stream(stream).__anext__())
    await until(lambda: len(status_hub(KEY).mailboxes) == 4)
    for item in (
        received(status(Status.FINISHED, job_id="job-2", vm_name="bvm-job-2", exit_code=0), "a", job_id="job-2"),
        received(status(Status.FAILED, job_id="job-3", vm_name="bvm-job-3", exit_code=5), "b", job_id="job-3"),
        received(task_status(0, Status.FINISHED, exit_code=0), "c"),
        received(task_status(1, Status.FINISHED, exit_code=0), "d"),
    ):
        pubsub.published.put_nowait(item)
    events = {trigger_id: (await asyncio.wait_for(wait, 10)).payload for trigger_id, wait in waits.items()}
    assert (events[1]["status"], events[1]["exit_code"]) == ("FAILED", 5)
    assert (events[2]["job_id"], events[2]["status"]) == ("job-2", "FINISHED")
    assert sorted(events[3]["tasks"]) == ["0", "1"]
    assert len(pubsub.created) == 1  # one subscription for the process, not one pull per wait
    assert sorted(pubsub.acked) == ["a", "b", "c", "d"]
    # The own-subscription reads: one catch-up per wait (four: two jobs, two tasks), nothing more.
    assert hook.pull_statuses.await_count == 4
    for trigger_id, trigger in triggers.items():
        await manager.unsubscribe(trigger_id, trigger.shared_stream_key())
    await until(lambda: pubsub.deleted == pubsub.created)  # the last wait gone, the hub's subscription too
