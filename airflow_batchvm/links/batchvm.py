"""Operator extra links, persisted before deferring so they work while the job runs."""

from __future__ import annotations

from urllib.parse import quote

from airflow.providers.google.cloud.links.base import BaseGoogleLink


class BatchVmInstanceLink(BaseGoogleLink):
    """The job's VM in the Cloud Console."""

    name = "Batch VM"
    key = "batchvm_instance"
    format_str = "/compute/instancesDetail/zones/{zone}/instances/{vm_name}?project={project_id}"


class BatchVmLogsLink(BaseGoogleLink):
    """Cloud Logging, filtered on the job's VM: the agent's and the container's output."""

    name = "Batch VM logs"
    key = "batchvm_logs"
    format_str = "/logs/query;query={query}?project={project_id}"

    @classmethod
    def persist(cls, context, *, project_id: str, vm_name: str, **kwargs) -> None:
        query = f'resource.type="gce_instance"\nlabels."compute.googleapis.com/resource_name"="{vm_name}"'
        super().persist(context, project_id=project_id, query=quote(query, safe=""), **kwargs)
