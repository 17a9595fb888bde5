"""``batchvm setup``: the topics, the monitoring subscription and the worker instance template.

Idempotent: what exists is left alone (and checked against what was asked); ``--dry-run`` looks but
creates nothing, and prints every resource with the exact body it would send.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import SpinnerColumn, TextColumn
from rich.table import Table

from airflow_batchvm.cli.common import (
    DEFAULT_CONN_ID,
    DEFAULT_MONITOR_SUBSCRIPTION,
    DEFAULT_TEMPLATE,
    Cloud,
    ConnIdOpt,
    MonitorSubOpt,
    ProjectOpt,
    err,
    fail,
    format_seconds,
    open_cloud,
    out,
    parse_duration,
    parse_pairs,
    progress,
)
from airflow_batchvm.wire import JOB_TOPIC, STATUS_TOPIC

SCOPE_PREFIX = "https://www.googleapis.com/auth/"
# The image family worker_image/image/ builds, in the project itself.
WORKER_IMAGE_FAMILY = "batchvm-worker"
STOCK_IMAGE_PROJECTS = ("debian-cloud", "ubuntu-os-cloud")
MONITOR_ACK_DEADLINE_SECONDS = 60

# VM metadata keys the agent reads that the template sets (docs/ARCHITECTURE.md).
ATTR_IMAGE_REGISTRY = "batchvm-image-registry"
ATTR_CONTAINER_CLI = "batchvm-container-cli"
ATTR_CONTAINER_RUN_ARGS = "batchvm-container-run-args"
ATTR_HEARTBEAT_SECONDS = "batchvm-heartbeat-seconds"
ATTR_IMAGE_ALLOWLIST = "batchvm-image-allowlist"


class State(StrEnum):
    CREATE = "create"
    CREATED = "created"
    EXISTS = "exists"
    DIFFERS = "exists, differs"
    UNKNOWN = "unknown"


class Output(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass
class Resource:
    kind: str
    name: str  # full resource path
    body: dict[str, Any]
    state: State = State.UNKNOWN
    note: str = ""
    differences: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "state": self.state.value,
            "note": self.note,
            "differences": self.differences,
            "body": self.body,
        }


def full_scope(scope: str) -> str:
    return scope if scope.startswith("https://") else SCOPE_PREFIX + scope


def template_body(
    name: str,
    *,
    machine_type: str = "e2-standard-2",
    vm_image: str = f"global/images/family/{WORKER_IMAGE_FAMILY}",
    boot_disk_gb: int = 50,
    service_account: str = "default",
    scopes: list[str] | None = None,
    registry: str = "",
    container_cli: str = "docker",
    container_run_args: str = "",
    heartbeat_seconds: float | None = None,
    image_allowlist: list[str] | None = None,
    max_run_seconds: int = 24 * 3600,
    spot: bool = False,
    network: str = "global/networks/default",
    subnetwork: str = "",
    external_ip: bool = True,
    startup_script: str = "",
    serial_port_logging: bool = True,
    metadata: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The instance template, in the Compute REST API's JSON (what ``instanceTemplates.insert`` takes)."""
    items = {ATTR_CONTAINER_CLI: container_cli}
    if registry:
        items[ATTR_IMAGE_REGISTRY] = registry
    if container_run_args:
        items[ATTR_CONTAINER_RUN_ARGS] = container_run_args
    if heartbeat_seconds:
        items[ATTR_HEARTBEAT_SECONDS] = f"{heartbeat_seconds:g}"
    if image_allowlist:
        # The agent runs only images starting with one of these (a job cannot change it).
        items[ATTR_IMAGE_ALLOWLIST] = " ".join(image_allowlist)
    if startup_script:
        items["startup-script"] = startup_script
    if serial_port_logging:
        # The serial console (the agent's and the container's output) kept in Cloud Logging, where
        # the operators' "Batch VM logs" link looks, also after the VM is deleted.
        items["serial-port-logging-enable"] = "TRUE"
    items.update(metadata or {})

    scheduling: dict[str, Any] = {}
    if spot:
        scheduling.update(provisioningModel="SPOT", automaticRestart=False, onHostMaintenance="TERMINATE")
    if max_run_seconds > 0:
        # The safety net: Compute Engine deletes the VM after this long even if Airflow is gone.
        scheduling["maxRunDuration"] = {"seconds": str(max_run_seconds)}
    if spot or max_run_seconds > 0:
        scheduling["instanceTerminationAction"] = "DELETE"

    interface: dict[str, Any] = {"network": network}
    if subnetwork:
        interface["subnetwork"] = subnetwork
    if external_ip:
        interface["accessConfigs"] = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]

    properties: dict[str, Any] = {
        "machineType": machine_type,
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "initializeParams": {"sourceImage": vm_image, "diskSizeGb": str(boot_disk_gb)},
            }
        ],
        "networkInterfaces": [interface],
        "serviceAccounts": [
            {
                "email": service_account or "default",
                "scopes": [full_scope(s) for s in scopes or ["cloud-platform"]],
            }
        ],
        "metadata": {"items": [{"key": k, "value": v} for k, v in items.items()]},
        "scheduling": scheduling,
    }
    if labels:
        properties["labels"] = dict(labels)
    return {
        "name": name,
        "description": "airflow-batchvm worker: one VM per batch job (created by `batchvm setup`)",
        "properties": properties,
    }


def plan(project: str, monitor_subscription: str, template: dict[str, Any] | None) -> list[Resource]:
    topics = [f"projects/{project}/topics/{topic}" for topic in (JOB_TOPIC, STATUS_TOPIC)]
    resources = [Resource("topic", path, {"name": path}) for path in topics]
    subscription = f"projects/{project}/subscriptions/{monitor_subscription}"
    resources.append(
        Resource(
            "subscription",
            subscription,
            {"name": subscription, "topic": topics[1], "ack_deadline_seconds": MONITOR_ACK_DEADLINE_SECONDS},
        )
    )
    if template is not None:
        path = f"projects/{project}/global/instanceTemplates/{template['name']}"
        resources.append(Resource("instance template", path, template))
    return resources


# --- looking and creating ---------------------------------------------------------------------


class Applier:
    def __init__(self, cloud: Cloud):
        self.cloud = cloud

    def _compute(self, client_class: Any) -> Any:
        from google.api_core.client_options import ClientOptions

        endpoint = self.cloud.hook.compute_api_endpoint
        return client_class(
            credentials=self.cloud.hook.get_credentials(),
            client_options=ClientOptions(api_endpoint=endpoint) if endpoint else None,
        )

    def inspect(self, resource: Resource) -> None:
        """Set ``resource.state``: read-only, safe for --dry-run."""
        from google.api_core import exceptions as gexc

        hook = self.cloud.hook
        try:
            if resource.kind == "topic":
                hook.publisher.get_topic(request={"topic": resource.name})
            elif resource.kind == "subscription":
                existing = hook.subscriber.get_subscription(request={"subscription": resource.name})
                if existing.topic != resource.body["topic"]:
                    resource.differences = [f"topic is {existing.topic}"]
            else:
                from google.cloud import compute_v1

                client = self._compute(compute_v1.InstanceTemplatesClient)
                existing = client.get(project=self.cloud.project, instance_template=resource.body["name"])
                resource.differences = template_differences(
                    resource.body, json.loads(type(existing).to_json(existing))
                )
        except gexc.NotFound:
            resource.state = State.CREATE
            return
        except gexc.GoogleAPICallError as exc:
            resource.state, resource.note = State.UNKNOWN, f"could not check: {exc.message}"
            return
        except Exception as exc:  # no credentials, no network: a dry run still shows the plan
            resource.state, resource.note = State.UNKNOWN, f"could not check: {exc}"
            return
        resource.state = State.DIFFERS if resource.differences else State.EXISTS

    def create(self, resource: Resource) -> None:
        from google.api_core import exceptions as gexc

        from airflow_batchvm.hooks.batchvm import API_RETRY

        hook = self.cloud.hook
        try:
            if resource.kind == "topic":
                hook.publisher.create_topic(request=resource.body, retry=API_RETRY)
            elif resource.kind == "subscription":
                hook.subscriber.create_subscription(request=resource.body, retry=API_RETRY)
            else:
                self._create_template(resource.body)
        except gexc.AlreadyExists:  # made by someone else since we looked
            self.inspect(resource)
            return
        resource.state = State.CREATED

    def _create_template(self, body: dict[str, Any]) -> None:
        from google.cloud import compute_v1

        from airflow_batchvm.hooks.batchvm import API_RETRY

        client = self._compute(compute_v1.InstanceTemplatesClient)
        operations = self._compute(compute_v1.GlobalOperationsClient)
        operation = client.insert_unary(
            project=self.cloud.project,
            instance_template_resource=compute_v1.InstanceTemplate.from_json(json.dumps(body)),
            retry=API_RETRY,
        )
        while operation.status != compute_v1.Operation.Status.DONE:
            operation = operations.wait(project=self.cloud.project, operation=operation.name, retry=API_RETRY)
        if operation.error and operation.error.errors:
            first = operation.error.errors[0]
            raise RuntimeError(
                f"Compute Engine could not create template {body['name']}: {first.code}: {first.message}"
            )


def template_differences(wanted: dict[str, Any], existing: dict[str, Any]) -> list[str]:
    """What an existing template does differently from the one asked for (templates are immutable)."""
    want, have = wanted["properties"], existing.get("properties", {})

    def meta(props: dict) -> dict[str, str]:
        return {i["key"]: i.get("value", "") for i in (props.get("metadata") or {}).get("items") or []}

    def accounts(props: dict) -> list[tuple[str, list[str]]]:
        return [(a.get("email", ""), sorted(a.get("scopes", []))) for a in props.get("serviceAccounts") or []]

    def sched(props: dict) -> dict[str, str]:
        s = props.get("scheduling") or {}
        return {
            "maxRunDuration": str((s.get("maxRunDuration") or {}).get("seconds", "")),
            "instanceTerminationAction": s.get("instanceTerminationAction", ""),
            "provisioningModel": s.get("provisioningModel", "")
            if s.get("provisioningModel") == "SPOT"
            else "",
        }

    def boot(props: dict) -> tuple[str, str]:
        for disk in props.get("disks") or []:
            if disk.get("boot"):
                params = disk.get("initializeParams") or {}
                image = params.get("sourceImage", "")
                image = image[image.find("projects/") :] if "projects/" in image else image
                return image, str(params.get("diskSizeGb", ""))
        return "", ""

    found = []
    if want.get("machineType", "").rsplit("/", 1)[-1] != have.get("machineType", "").rsplit("/", 1)[-1]:
        found.append(f"machineType is {have.get('machineType')!r}")
    wanted_meta, have_meta = meta(want), meta(have)
    for key in sorted(wanted_meta.keys() | have_meta.keys()):
        if wanted_meta.get(key) != have_meta.get(key):
            found.append(f"metadata {key} is {have_meta.get(key)!r}")
    if accounts(want) != accounts(have):
        found.append(f"serviceAccounts are {accounts(have)}")
    for key, value in sched(have).items():
        if sched(want)[key] != value:
            found.append(f"scheduling.{key} is {value!r}")
    if boot(want) != boot(have):
        found.append(f"boot disk (image, GB) is {boot(have)}")
    return found


# --- the command ------------------------------------------------------------------------------


def setup(
    project: ProjectOpt = None,
    gcp_conn_id: ConnIdOpt = DEFAULT_CONN_ID,
    monitor_subscription: MonitorSubOpt = DEFAULT_MONITOR_SUBSCRIPTION,
    template: Annotated[
        str,
        typer.Option("--template", envvar="BATCHVM_INSTANCE_TEMPLATE", help="Instance template to create."),
    ] = DEFAULT_TEMPLATE,
    skip_template: Annotated[
        bool, typer.Option("--skip-template", help="Create only the topics and the monitoring subscription.")
    ] = False,
    machine_type: Annotated[str, typer.Option(help="Machine type of the worker VMs.")] = "e2-standard-2",
    vm_image: Annotated[
        str | None,
        typer.Option(
            help="Boot image. Default: the project's batchvm-worker family (built by worker_image/image/). "
            "A stock image needs --startup-script worker_image/startup.sh.",
            show_default=False,
        ),
    ] = None,
    boot_disk_gb: Annotated[int, typer.Option(help="Boot disk size (GB); room for the job's images.")] = 50,
    service_account: Annotated[
        str, typer.Option(help="Service account email of the worker VMs ('default': the Compute default).")
    ] = "default",
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="OAuth scope (repeatable; short names allowed).")
    ] = None,
    registry: Annotated[
        str, typer.Option(help="batchvm-image-registry: where process_type jobs' images live.")
    ] = "",
    container_cli: Annotated[
        str, typer.Option(help="batchvm-container-cli: a docker-compatible CLI.")
    ] = "docker",
    container_run_args: Annotated[
        str, typer.Option(help="batchvm-container-run-args: extra `run` flags.")
    ] = "",
    heartbeat_seconds: Annotated[
        float | None, typer.Option(help="batchvm-heartbeat-seconds (agent default 60).", show_default=False)
    ] = None,
    image_allowlist: Annotated[
        list[str] | None,
        typer.Option(
            "--image-allowlist",
            help="batchvm-image-allowlist: image prefix the VMs may run (repeatable; default: any image).",
        ),
    ] = None,
    max_run_duration: Annotated[
        str, typer.Option(help="Compute Engine deletes a VM after this long (safety net); 0 disables.")
    ] = "24h",
    spot: Annotated[
        bool, typer.Option("--spot/--no-spot", help="Spot VMs (deleted when preempted).")
    ] = False,
    network: Annotated[str, typer.Option(help="VPC network.")] = "global/networks/default",
    subnetwork: Annotated[str, typer.Option(help="Subnetwork (regions/R/subnetworks/S).")] = "",
    external_ip: Annotated[
        bool,
        typer.Option(
            "--external-ip/--no-external-ip", help="Without one, the subnet needs Private Google Access."
        ),
    ] = True,
    startup_script: Annotated[
        Path | None,
        typer.Option(
            help="File for the startup-script key (a stock image: worker_image/startup.sh).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    serial_port_logging: Annotated[
        bool,
        typer.Option(
            "--serial-port-logging/--no-serial-port-logging",
            help="Keep the VMs' serial console (job output) in Cloud Logging.",
        ),
    ] = True,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="Extra KEY=VALUE (repeatable).")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Template label KEY=VALUE (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Look, print what would be created, create nothing.")
    ] = False,
    output: Annotated[Output, typer.Option(help="text, or json (the plan with each body).")] = Output.TEXT,
) -> None:
    """Create the topics, the monitoring subscription and the worker instance template (idempotent)."""
    cloud = open_cloud(project, gcp_conn_id)
    cloud.announce()
    body = None
    if not skip_template:
        vm_image = vm_image or f"projects/{cloud.project}/global/images/family/{WORKER_IMAGE_FAMILY}"
        if any(f"projects/{p}/" in vm_image for p in STOCK_IMAGE_PROJECTS) and not startup_script:
            err().print(
                f"[yellow]warning:[/] {vm_image} is a stock image without the agent: VMs from it run no job "
                "unless you also pass --startup-script worker_image/startup.sh"
            )
        max_run_seconds = int(parse_duration(max_run_duration))
        body = template_body(
            template,
            machine_type=machine_type,
            vm_image=vm_image,
            boot_disk_gb=boot_disk_gb,
            service_account=service_account,
            scopes=scope,
            registry=registry,
            container_cli=container_cli,
            container_run_args=container_run_args,
            heartbeat_seconds=heartbeat_seconds,
            image_allowlist=image_allowlist,
            max_run_seconds=max_run_seconds,
            spot=spot,
            network=network,
            subnetwork=subnetwork,
            external_ip=external_ip,
            startup_script=startup_script.read_text() if startup_script else "",
            serial_port_logging=serial_port_logging,
            metadata=parse_pairs(metadata, "--metadata"),
            labels=parse_pairs(label, "--label"),
        )
    resources = plan(cloud.project, monitor_subscription, body)
    applier = Applier(cloud)

    with progress(SpinnerColumn(), TextColumn("{task.description}")) as bar:
        for resource in resources:
            task = bar.add_task(f"checking {resource.kind} {resource.name}")
            applier.inspect(resource)
            if resource.state is State.CREATE and not dry_run:
                bar.update(task, description=f"creating {resource.kind} {resource.name}")
                try:
                    applier.create(resource)
                except Exception as exc:
                    bar.stop()
                    _report(resources, dry_run, output)
                    raise fail(f"creating {resource.kind} {resource.name} failed: {exc}") from None
            bar.remove_task(task)

    _report(resources, dry_run, output)
    if unknown := [r for r in resources if r.state is State.UNKNOWN and not dry_run]:
        raise fail(f"could not check {unknown[0].kind} {unknown[0].name}: {unknown[0].note}")
    if differing := [r for r in resources if r.state is State.DIFFERS]:
        names = ", ".join(f"{r.kind} {r.name.rsplit('/', 1)[-1]}" for r in differing)
        raise fail(
            f"{names}: exists but differs from what was asked (see above). Instance templates cannot be "
            "changed: pass a new --template name (and point your DAGs at it), or delete the old one first."
        )


def _report(resources: list[Resource], dry_run: bool, output: Output) -> None:
    if output is Output.JSON:
        typer.echo(json.dumps({"dry_run": dry_run, "resources": [r.as_dict() for r in resources]}, indent=2))
        return
    console = out()
    table = Table(title="batchvm setup (dry run: nothing created)" if dry_run else "batchvm setup")
    for column in ("kind", "name", "state", "note"):
        table.add_column(column, overflow="fold")
    styles = {State.CREATED: "green", State.CREATE: "yellow", State.DIFFERS: "red", State.UNKNOWN: "magenta"}
    for r in resources:
        state = "would create" if dry_run and r.state is State.CREATE else r.state.value
        note = r.note or "; ".join(r.differences)
        table.add_row(r.kind, r.name, f"[{styles.get(r.state, 'dim')}]{state}[/]", note)
    console.print(table)
    if dry_run:
        for r in resources:
            if r.state in (State.CREATE, State.UNKNOWN):
                console.print(f"[bold]{r.kind}[/] {r.name}:")
                console.print_json(json.dumps(r.body))
    template = next((r for r in resources if r.kind == "instance template"), None)
    if template is not None:
        scheduling = template.body["properties"].get("scheduling", {})
        if seconds := (scheduling.get("maxRunDuration") or {}).get("seconds"):
            console.print(
                f"[dim]VMs from {template.body['name']} are deleted by Compute Engine after "
                f"{format_seconds(int(seconds))} at most.[/]"
            )
