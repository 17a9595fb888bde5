#!/usr/bin/env bash
# Installs everything the demo and the tests need, on a fresh machine of this kind: podman and
# friends (apt), uv, the locked Python environment, and the sample job images. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in gcloud java; do
  command -v "$tool" >/dev/null || { echo "install: $tool is required (the Pub/Sub emulator runs on the Google Cloud SDK and Java)" >&2; exit 1; }
done

if ! command -v uv >/dev/null; then
  python3 -m pip install --quiet uv
fi
uv sync --frozen --quiet

bash worker_image/local/setup.sh
