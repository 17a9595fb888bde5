#!/usr/bin/env bash
# Turns a Debian 12 VM into a batchvm worker image; run as root by Packer (batchvm-worker.pkr.hcl).
#
#   provision.sh [all | packages | agent | unit | docker-auth | cleanup]
#
# packages     Docker (Debian's docker.io), python3-venv, curl
# agent        the worker agent in a venv ($BATCHVM_AGENT_VENV, default /opt/batchvm-agent) from the
#              wheels in $WHEELS_DIR: batchvm-agent, and airflow-batchvm with --no-deps (the agent
#              uses only its wire format; Airflow is never installed), plus $PIP_REQUIREMENTS
# unit         batchvm-agent.service, enabled: the agent runs at every boot with no login
# docker-auth  the docker credential helper for $REGISTRY_HOSTS (private images, no key, no login)
# cleanup      package caches, the upload folder, the machine id (each VM gets its own)
#
# Never set BATCHVM_AGENT_TEST_HOOKS here: it is for tests only.
set -euo pipefail

UPLOAD_DIR="${UPLOAD_DIR:-/tmp/batchvm}"
WHEELS_DIR="${WHEELS_DIR:-$UPLOAD_DIR/wheels}"
UNIT_FILE="${UNIT_FILE:-$UPLOAD_DIR/batchvm-agent.service}"
CREDENTIAL_HELPER="${CREDENTIAL_HELPER:-$UPLOAD_DIR/docker-credential-gce}"
BATCHVM_AGENT_VENV="${BATCHVM_AGENT_VENV:-/opt/batchvm-agent}"
REGISTRY_HOSTS="${REGISTRY_HOSTS:-gcr.io us-docker.pkg.dev europe-docker.pkg.dev asia-docker.pkg.dev}"
PIP_REQUIREMENTS="${PIP_REQUIREMENTS:-google-cloud-pubsub>=2.40 pydantic>=2.10}"

log() { echo "provision.sh: $*"; }
fail() {
    echo "provision.sh: error: $*" >&2
    exit 1
}

install_packages() {
    log "installing docker.io, python3-venv, curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends docker.io python3-venv ca-certificates curl
    systemctl enable docker.service
}

install_agent() {
    local wheels=()
    shopt -s nullglob
    wheels=("$WHEELS_DIR"/batchvm_agent-*.whl "$WHEELS_DIR"/airflow_batchvm-*.whl)
    shopt -u nullglob
    [ "${#wheels[@]}" -eq 2 ] || fail "expected one batchvm_agent and one airflow_batchvm wheel in $WHEELS_DIR, found: ${wheels[*]:-none}"
    log "installing the worker agent into $BATCHVM_AGENT_VENV"
    python3 -m venv "$BATCHVM_AGENT_VENV"
    "$BATCHVM_AGENT_VENV/bin/pip" install -q --no-deps "${wheels[@]}"
    # Word splitting is wanted: a space-separated list of pip requirements.
    # shellcheck disable=SC2086
    "$BATCHVM_AGENT_VENV/bin/pip" install -q --no-warn-conflicts $PIP_REQUIREMENTS
    "$BATCHVM_AGENT_VENV/bin/python" -c "import batchvm_agent.main, airflow_batchvm.wire" \
        || fail "the agent does not import"
    if "$BATCHVM_AGENT_VENV/bin/python" -c "import airflow" 2>/dev/null; then
        fail "Airflow is installed in the agent's venv; the agent must run without it"
    fi
    "$BATCHVM_AGENT_VENV/bin/python" -m batchvm_agent --help >/dev/null || fail "python -m batchvm_agent --help failed"
}

install_unit() {
    log "installing and enabling batchvm-agent.service"
    install -m 0644 "$UNIT_FILE" /etc/systemd/system/batchvm-agent.service
    systemd-analyze verify /etc/systemd/system/batchvm-agent.service
    systemctl enable batchvm-agent.service
}

configure_docker_auth() {
    log "docker credential helper for: $REGISTRY_HOSTS"
    install -m 0755 "$CREDENTIAL_HELPER" /usr/local/bin/docker-credential-gce
    local host entries=""
    for host in $REGISTRY_HOSTS; do
        entries="${entries:+$entries,}\"$host\": \"gce\""
    done
    # The agent runs as root: docker reads root's config.
    install -d -m 0700 /root/.docker
    printf '{"credHelpers": {%s}}\n' "$entries" >/root/.docker/config.json
    chmod 0600 /root/.docker/config.json
}

cleanup() {
    log "cleaning up"
    apt-get clean
    rm -rf /var/lib/apt/lists/* "$UPLOAD_DIR"
    # An empty machine id: systemd makes a new one on each VM's first boot.
    truncate -s 0 /etc/machine-id
}

main() {
    case "${1:-all}" in
    all)
        install_packages
        install_agent
        install_unit
        configure_docker_auth
        cleanup
        ;;
    packages) install_packages ;;
    agent) install_agent ;;
    unit) install_unit ;;
    docker-auth) configure_docker_auth ;;
    cleanup) cleanup ;;
    *) fail "unknown step ${1}; steps: all packages agent unit docker-auth cleanup" ;;
    esac
}

main "$@"
