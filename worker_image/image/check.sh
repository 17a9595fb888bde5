#!/usr/bin/env bash
# Validates the worker image recipe with everything that runs without a GCP project:
#   1. shellcheck on the provisioning scripts (and the stock-image startup.sh);
#   2. the agent step of provision.sh, for real, into a temporary venv: the wheels install, the
#      agent imports and starts, and Airflow is not there;
#   3. systemd-analyze verify on batchvm-agent.service (its ExecStart pointed at that venv);
#   4. docker-credential-gce against a stand-in metadata server;
#   5. packer fmt and packer validate on batchvm-worker.pkr.hcl (Debian's packer 1.6.6 has the
#      googlecompute builder built in; plugins.pkr.hcl is for Packer >= 1.7 and is not checked).
# Needs: uv, shellcheck, systemd (systemd-analyze), packer, python3, curl.
# Installs nothing system-wide; builds the wheels into dist/ beside this file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

step() { echo "== $*"; }

step "shellcheck"
shellcheck "$here/provision.sh" "$here/docker-credential-gce" "$here/check.sh" "$repo/worker_image/startup.sh"

step "wheels (uv build)"
(cd "$repo" && uv build -q --wheel -o "$here/dist" && uv build -q --wheel --package batchvm-agent -o "$here/dist")

step "provision.sh agent (into a temporary venv)"
WHEELS_DIR="$here/dist" BATCHVM_AGENT_VENV="$work/venv" bash "$here/provision.sh" agent

step "systemd-analyze verify batchvm-agent.service"
sed "s#/opt/batchvm-agent/bin/python#$work/venv/bin/python#g" "$repo/worker_image/batchvm-agent.service" \
    >"$work/batchvm-agent.service"
systemd-analyze verify "$work/batchvm-agent.service"

step "docker-credential-gce (against a stand-in metadata server)"
cat >"$work/metadata.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Metadata-Flavor") == "Google" and self.path.endswith("/service-accounts/default/token")
        body = b'{"access_token":"ya29.stand-in","expires_in":3599,"token_type":"Bearer"}' if ok else b"no"
        self.send_response(200 if ok else 403); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", 0), H)
print(server.server_port, flush=True)
server.serve_forever()
PY
python3 "$work/metadata.py" >"$work/port" &
server_pid=$!
for _ in $(seq 50); do [ -s "$work/port" ] && break; sleep 0.1; done
got="$(echo europe-docker.pkg.dev | GCE_METADATA_HOST="127.0.0.1:$(cat "$work/port")" "$here/docker-credential-gce" get)"
[ "$got" = '{"ServerURL":"","Username":"oauth2accesstoken","Secret":"ya29.stand-in"}' ] \
    || { echo "unexpected credential helper output: $got" >&2; exit 1; }

step "packer fmt -check, packer validate"
packer fmt -check "$here/batchvm-worker.pkr.hcl"
packer validate -var project_id=example-project "$here/batchvm-worker.pkr.hcl"

echo "check.sh: the worker image recipe is valid"
