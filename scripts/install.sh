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

# ---------------------------------------------------------------------------------------------
# Headless Chromium (Debian's `chromium`) for the browser check of the end-to-end tests
# (tests/e2e/test_rest.py looks at the task log page of the Airflow UI): only with --with-browser,
# which the test command passes and the demo does not. Installed once; skipped when it is there.
# ---------------------------------------------------------------------------------------------
if [ "${1:-}" = --with-browser ] && ! command -v chromium >/dev/null; then
  echo "install: installing Debian's chromium (headless browser for the UI check)" >&2
  apt_sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install: need root (or sudo) to install chromium" >&2; exit 1; }
    apt_sudo=(sudo)
  fi
  "${apt_sudo[@]}" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive "${apt_sudo[@]}" apt-get install -y -q chromium >/dev/null
  command -v chromium >/dev/null || { echo "install: chromium did not install" >&2; exit 1; }
fi
