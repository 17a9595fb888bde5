"""The operators of our benchmark DAGs (the stock chain's are in ``bench/stock_operators.py``).

- ``TimedRunJobOperator``: ``BatchVmRunJobOperator`` as shipped; it records when ``execute`` starts,
  and whatever trigger it defers with is wrapped in ``TimedTrigger`` (see ``bench/triggers.py``).
- ``P3WaitOperator``: starts straight in the triggerer with a P3 trigger (no worker needed).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import StartTriggerArgs

from airflow_batchvm.operators.batchvm import BatchVmRunJobOperator
from bench.instrument import emit, process_start_time
from bench.triggers import TimedTrigger


class TimedDeferMixin:
    """Defers with the operator's own trigger, wrapped in :class:`TimedTrigger` (see bench/triggers.py)."""

    def bench_variant(self) -> str:
        return "ours"

    def defer(self, *, trigger: Any, method_name: str, kwargs: Any = None, timeout: Any = None) -> Any:
        return super().defer(  # type: ignore[misc]
            trigger=TimedTrigger.wrap(trigger, self.bench_variant()),
            method_name=method_name,
            kwargs=kwargs,
            timeout=timeout,
        )


class TimedRunJobOperator(TimedDeferMixin, BatchVmRunJobOperator):
    def execute(self, context: Any) -> Any:
        emit("task_start", task=self.task_id, job=self.job_id, proc_start=process_start_time())
        return super().execute(context)


class P3WaitOperator(BaseOperator):
    """Waits in the triggerer from the start (``start_from_trigger``); the trigger ends the task.

    Subclassed per P3 variant by :func:`p3_operator_class`, since the start arguments are read from
    the class by the scheduler.
    """

    start_from_trigger = True
    start_trigger_args: StartTriggerArgs | None = None

    def __init__(self, *, index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index

    def execute(self, context: Any) -> None:  # pragma: no cover - never runs on a worker
        raise RuntimeError("P3WaitOperator starts in the triggerer")

    def execute_complete(self, context: Any, event: Any = None) -> None:
        return None


def p3_operator_class(name: str, trigger_cls: str, trigger_kwargs: dict[str, Any]) -> type[P3WaitOperator]:
    return type(
        name,
        (P3WaitOperator,),
        {
            "start_trigger_args": StartTriggerArgs(
                trigger_cls=trigger_cls, trigger_kwargs=trigger_kwargs, next_method="execute_complete"
            ),
            "__module__": __name__,
        },
    )
