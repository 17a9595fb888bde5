#!/usr/bin/env bash
# Startup script for a stock Debian/Ubuntu image (metadata key `startup-script`): installs Docker
# and the worker agent when missing, then runs the agent, which runs this VM's one job and powers
# the VM off. A custom image instead bakes all this in and enables batchvm-agent.service.
#
# The agent's Python packages are installed by name with pip; `batchvm-agent-packages` in the VM's
# metadata can name others (for example wheel files copied onto the image, or pinned versions).
# airflow-batchvm is installed with --no-deps: the agent only uses its wire format, never Airflow.
# Never set BATCHVM_AGENT_TEST_HOOKS here: it is for tests only.
set -euo pipefail

venv=/opt/batchvm-agent
md="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes"

log() { echo "batchvm-startup: $*"; }

attribute() {
    curl -sf -H "Metadata-Flavor: Google" "$md/$1" || true
}

install_docker() {
    command -v docker >/dev/null && return 0
    log "installing docker"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
    systemctl enable --now docker
}

install_agent() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import batchvm_agent, airflow_batchvm.wire" 2>/dev/null \
        && return 0
    log "installing the worker agent into $venv"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    fi
    python3 -m venv "$venv"
    local packages
    packages="$(attribute batchvm-agent-packages)"
    [ -n "$packages" ] || packages="airflow-batchvm batchvm-agent"
    # Word splitting is wanted: the attribute is a space-separated list of pip requirements.
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --no-deps $packages
    "$venv/bin/pip" install -q "google-cloud-pubsub>=2.40" "pydantic>=2.10"
}

main() {
    install_docker
    install_agent
    log "starting the worker agent"
    PYTHONUNBUFFERED=1 exec "$venv/bin/python" -m batchvm_agent --poweroff-command "systemctl poweroff"
}

main "$@"
