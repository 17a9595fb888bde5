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
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from bench.instrument import emit


def _build(classpath: str, kwargs: dict[str, Any], outer: BaseTrigger) -> BaseTrigger:
    module, _, name = classpath.rpartition(".")
    inner = getattr(importlib.import_module(module), name)(**kwargs)
    for attr in ("task_instance", "trigger_id", "triggerer_job_id", "timeout_after"):
        if hasattr(outer, attr):
            setattr(inner, attr, getattr(outer, attr))
    return inner


class TimedTrigger(BaseTrigger):
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

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self._built = inner = _build(self.inner, self.inner_kwargs, self)
        emit("trig_start", v=self.variant, key=self.key)
        async for event in inner.run():
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


class P3Trigger(BaseTrigger):
    """One of the P3 waits: the inner trigger for job ``{i}``; ends the task once it yields."""

    def __init__(self, *, inner: str, inner_kwargs: dict[str, Any], variant: str, vm_pool: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.inner_kwargs = inner_kwargs
        self.variant = variant
        self.vm_pool = vm_pool

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "inner": self.inner,
                "inner_kwargs": self.inner_kwargs,
                "variant": self.variant,
                "vm_pool": self.vm_pool,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        index = map_index_of(self)
        kwargs = fill(self.inner_kwargs, index, self.vm_pool)
        inner = _build(self.inner, kwargs, self)
        key = str(kwargs.get("job_id") or kwargs.get("subscription") or index)
        emit("trig_start", v=self.variant, key=key)
        async for event in inner.run():
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
