"""The triggers as measured: the shipped trigger classes, wrapped only to record when they start and
when they yield (``bench.instrument.emit``).

:class:`TimedTrigger` wraps whatever trigger an operator defers with: it stores the inner trigger's
own ``serialize()`` output and, in the triggerer, rebuilds the inner trigger from it exactly as the
triggerer would, then re-yields its events. So the waiting logic measured is always the shipped
class's own ``run()``, whatever its constructor looks like today.

The P3 triggers start straight in the triggerer (``start_from_trigger``) so that 1,000 waits need
no 1,000 worker processes: :class:`P3Trigger` fills its inner trigger's kwargs from the task's map
index, and ends the task from the triggerer (``TaskSuccessEvent``) once the inner trigger yields.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Hashable
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TaskSuccessEvent, TriggerEvent

from bench.instrument import emit


def _class(classpath: str) -> type[BaseTrigger]:
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build(classpath: str, kwargs: dict[str, Any], outer: BaseTrigger) -> BaseTrigger:
    inner = _class(classpath)(**kwargs)
    for attr in ("task_instance", "trigger_id", "triggerer_job_id", "timeout_after"):
        if hasattr(outer, attr):
            setattr(inner, attr, getattr(outer, attr))
    return inner


class _Delegating(BaseEventTrigger):
    """Lets the triggerer run the inner trigger as it would run it unwrapped: through Airflow's shared
    trigger stream when the inner trigger has one (the shipped trigger's one status pull per process),
    else through its ``run()``. ``shared_pull=False`` forces ``run()`` (a long poll per job: the
    design before the shared pull, measured beside it)."""

    supports_triggerer_queue = True  # BaseEventTrigger turns it off for asset watchers
    inner: str
    inner_kwargs: dict[str, Any]
    shared_pull: bool = True

    def shared_stream_key(self) -> Hashable | None:
        if not self.shared_pull:
            return None
        inner = _class(self.inner)(**self.inner_kwargs)
        return inner.shared_stream_key() if isinstance(inner, BaseEventTrigger) else None

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        async for raw in _class(kwargs["inner"]).open_shared_stream(kwargs["inner_kwargs"]):
            yield raw

    def _events(self, inner: BaseTrigger, shared_stream: AsyncIterator[Any] | None) -> AsyncIterator[TriggerEvent]:
        return inner.run() if shared_stream is None else inner.filter_shared_stream(shared_stream)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async for event in self._wait(None):
            yield event

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        async for event in self._wait(shared_stream):
            yield event

    def _wait(self, shared_stream: AsyncIterator[Any] | None) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError


class TimedTrigger(_Delegating):
    """Runs the trigger ``inner`` (a classpath) built from ``inner_kwargs``; records start and yields."""

    def __init__(self, *, inner: str, inner_kwargs: dict[str, Any], variant: str, key: str) -> None:
        super().__init__()
        self.inner = inner
        self.inner_kwargs = inner_kwargs
        self.variant = variant
        self.key = key
        self._built: BaseTrigger | None = None

    @classmethod
    def wrap(cls, trigger: BaseTrigger, variant: str) -> TimedTrigger:
        classpath, kwargs = trigger.serialize()
        key = getattr(trigger, "job_id", None) or getattr(trigger, "subscription", "") or ""
        return cls(inner=classpath, inner_kwargs=kwargs, variant=variant, key=str(key))

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "inner": self.inner,
                "inner_kwargs": self.inner_kwargs,
                "variant": self.variant,
                "key": self.key,
            },
        )

    async def _wait(self, shared_stream: AsyncIterator[Any] | None) -> AsyncIterator[TriggerEvent]:
        self._built = inner = _build(self.inner, self.inner_kwargs, self)
        emit("trig_start", v=self.variant, key=self.key)
        async for event in self._events(inner, shared_stream):
            payload = event.payload if isinstance(event.payload, dict) else {}
            emit("trig_yield", v=self.variant, key=self.key, status=payload.get("status"))
            yield event

    async def on_kill(self) -> None:
        if self._built is not None:
            await self._built.on_kill()

    async def cleanup(self) -> None:
        if self._built is not None:
            await self._built.cleanup()


# --- P3: many waits started directly in the triggerer --------------------------------------------


def map_index_of(trigger: BaseTrigger) -> int:
    index = getattr(getattr(trigger, "task_instance", None), "map_index", None)
    if index is None or index < 0:
        raise RuntimeError("a P3 trigger must run for a mapped task instance")
    return int(index)


def fill(kwargs: dict[str, Any], index: int, vm_pool: int) -> dict[str, Any]:
    """``{i}`` in string values becomes the map index; ``{vm}`` the index of a VM of the pool."""
    vm = index % vm_pool if vm_pool else index
    return {k: v.format(i=index, vm=vm) if isinstance(v, str) else v for k, v in kwargs.items()}


class P3Trigger(_Delegating):
    """One of the P3 waits: the inner trigger for job ``{i}``; ends the task once it yields."""

    def __init__(
        self, *, inner: str, inner_kwargs: dict[str, Any], variant: str, vm_pool: int = 0, shared_pull: bool = True
    ) -> None:
        super().__init__()
        self.inner = inner
        self.inner_kwargs = inner_kwargs
        self.variant = variant
        self.vm_pool = vm_pool
        self.shared_pull = shared_pull

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "inner": self.inner,
                "inner_kwargs": self.inner_kwargs,
                "variant": self.variant,
                "vm_pool": self.vm_pool,
                "shared_pull": self.shared_pull,
            },
        )

    async def _wait(self, shared_stream: AsyncIterator[Any] | None) -> AsyncIterator[TriggerEvent]:
        index = map_index_of(self)
        kwargs = fill(self.inner_kwargs, index, self.vm_pool)
        inner = _build(self.inner, kwargs, self)
        key = str(kwargs.get("job_id") or kwargs.get("subscription") or index)
        emit("trig_start", v=self.variant, key=key)
        async for event in self._events(inner, shared_stream):
            payload = event.payload if isinstance(event.payload, dict) else {}
            emit("trig_yield", v=self.variant, key=key, status=payload.get("status"))
            yield TaskSuccessEvent()
            return

    async def on_kill(self) -> None:  # the harness removes what the benchmark created
        return None


class SleepTrigger(BaseTrigger):
    """The floor for P3: a wait that does nothing (what Airflow itself costs per deferred task)."""

    def __init__(self, *, job_id: str = "", **_: Any) -> None:
        super().__init__()
        self.job_id = job_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"job_id": self.job_id}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.Event().wait()
        yield TriggerEvent({"status": "never"})  # pragma: no cover - cancelled by the harness
