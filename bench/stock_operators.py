"""The stock chain's operators, as shipped except for the smallest change that lets them be measured
or reach the local stand-in (in a file of their own, so that a task of ours never imports them).

- ``StockPublish``: ``PubSubPublishMessageOperator``, recording when its ``execute`` starts.
- ``TimedPubSubPullSensor``: ``PubSubPullSensor``; its trigger is wrapped in ``TimedTrigger``.
- ``StockInsertFromTemplate`` / ``StockDeleteInstance``: the stock Compute operators, whose
  ``ComputeEngineHook`` is given the stand-in's endpoint. The stock hook has no endpoint setting
  (see the shared notes); this subclass sets only ``client_options`` on the two clients it builds.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import airflow.providers.google.cloud.operators.compute as stock_compute
from airflow.providers.google.cloud.hooks.compute import ComputeEngineHook
from airflow.providers.google.cloud.operators.compute import (
    ComputeEngineDeleteInstanceOperator,
    ComputeEngineInsertInstanceFromTemplateOperator,
)
from airflow.providers.google.cloud.operators.pubsub import PubSubPublishMessageOperator
from airflow.providers.google.cloud.sensors.pubsub import PubSubPullSensor
from google.api_core.client_options import ClientOptions
from google.cloud.compute_v1 import InstancesClient

from bench.instrument import emit, process_start_time
from bench.operators import TimedDeferMixin

COMPUTE_ENDPOINT_ENV = "BATCHVM_COMPUTE_API_ENDPOINT"


class StockPublish(PubSubPublishMessageOperator):
    def execute(self, context: Any) -> Any:
        emit(
            "task_start",
            proc_start=process_start_time(),
            task=self.task_id,
            messages=len(self.messages or []),
            attrs=[m.get("attributes", {}) for m in self.messages or []],
        )
        return super().execute(context)


class TimedPubSubPullSensor(TimedDeferMixin, PubSubPullSensor):
    def bench_variant(self) -> str:
        return f"stock{self.poke_interval:g}"


class LocalEndpointComputeEngineHook(ComputeEngineHook):
    """The stock hook with the stand-in's endpoint on both of its clients (and nothing else changed)."""

    @property
    def _endpoint(self) -> str:
        return os.environ[COMPUTE_ENDPOINT_ENV].rstrip("/")

    def get_conn(self):
        if not self._conn:
            from googleapiclient.discovery import build

            self._conn = build(
                "compute",
                self.api_version,
                http=self._authorize(),
                cache_discovery=False,
                client_options=ClientOptions(api_endpoint=f"{self._endpoint}/compute/v1/"),
            )
        return self._conn

    def get_compute_instance_client(self):
        from airflow.providers.google.common.consts import CLIENT_INFO

        return InstancesClient(
            credentials=self.get_credentials(),
            client_info=CLIENT_INFO,
            client_options=ClientOptions(api_endpoint=self._endpoint),
        )


class StockInsertFromTemplate(ComputeEngineInsertInstanceFromTemplateOperator):
    def execute(self, context: Any) -> dict:
        with mock.patch.object(stock_compute, "ComputeEngineHook", LocalEndpointComputeEngineHook):
            return super().execute(context)


class StockDeleteInstance(ComputeEngineDeleteInstanceOperator):
    def execute(self, context: Any) -> None:
        with mock.patch.object(stock_compute, "ComputeEngineHook", LocalEndpointComputeEngineHook):
            return super().execute(context)
