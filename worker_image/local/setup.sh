#!/usr/bin/env bash
# Prepares this machine to run the worker's containers locally (no Docker engine, no registry):
#   1. installs podman, runc and a static busybox with apt-get when any is missing;
#   2. builds localhost/sleep_test:latest FROM scratch out of busybox, only when the image is
#      missing or its recipe changed (the recipe's hash is stored as an image label).
# Idempotent: a second run does nothing and takes about a second.
#
# The podman flags and containers.conf are what this sandbox needs (see the containers notes):
# runc (crun refuses the cgroup layout), vfs storage (no overlay mounts), cgroupfs (no systemd),
# and no default ulimits (no CAP_SYS_RESOURCE). Use the same line as the agent's container CLI:
#   batchvm-container-cli = podman --runtime runc --storage-driver=vfs --cgroup-manager=cgroupfs
#   and CONTAINERS_CONF=<this folder>/containers.conf in the agent's environment.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
jobs_dir="$(cd "$here/../jobs" && pwd)"
image="localhost/sleep_test:latest"
label="batchvm.recipe-sha256"
applets=(sh awk printf echo sleep cat env true false ls)
packages=(podman runc busybox-static)

export CONTAINERS_CONF="$here/containers.conf"
podman_cmd=(podman --runtime runc --storage-driver=vfs --cgroup-manager=cgroupfs)

fail() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

install_missing_packages() {
    local missing=() pkg
    command -v dpkg-query >/dev/null || fail "dpkg-query not found: install ${packages[*]} by hand"
    for pkg in "${packages[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "setup.sh: installing ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || fail "need root (or sudo) to install ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" \
        || fail "apt-get install ${missing[*]} failed"
}

find_busybox() {
    local candidate
    for candidate in /bin/busybox /usr/bin/busybox "$(command -v busybox || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    fail "busybox not found after installing busybox-static"
}

recipe_hash() {
    # Everything the image is made of: the Containerfile, the busybox binary, the applet list.
    {
        sha256sum "$jobs_dir/sleep_test/Containerfile.local" | cut -d' ' -f1
        sha256sum "$1" | cut -d' ' -f1
        echo "${applets[*]}"
    } | sha256sum | cut -d' ' -f1
}

ctx=""
cleanup() {
    if [ -n "$ctx" ]; then rm -rf "$ctx"; fi
}
trap cleanup EXIT

build_image() {
    local busybox="$1" want="$2" applet
    ctx="$(mktemp -d)"
    mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp"
    cp "$busybox" "$ctx/rootfs/bin/busybox"
    for applet in "${applets[@]}"; do
        ln -s busybox "$ctx/rootfs/bin/$applet"
    done
    cp "$jobs_dir/sleep_test/Containerfile.local" "$ctx/Containerfile"
    echo "setup.sh: building $image"
    "${podman_cmd[@]}" build -q --label "$label=$want" -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null \
        || fail "podman build of $image failed"
}

pin_storage_driver() {
    # podman records the storage driver on first use; a later run with another driver then fails
    # ("database configuration mismatch"). Pin vfs system-wide, unless storage is configured already,
    # so that a plain `podman images` typed by hand cannot lock the storage to a driver that fails here.
    local conf=/etc/containers/storage.conf
    [ -e "$conf" ] && return 0
    [ -w /etc ] || return 0
    mkdir -p /etc/containers
    printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' >"$conf"
    echo "setup.sh: wrote $conf (storage driver vfs)"
}

podman_or_explain() {
    # Runs podman; on the driver mismatch, says how to recover instead of failing obscurely.
    local err
    if err="$("${podman_cmd[@]}" "$@" 2>&1 >/dev/null)"; then
        return 0
    fi
    if [[ "$err" == *"database configuration mismatch"* ]]; then
        fail "podman's storage was first used with another storage driver ($err). If it holds nothing you need, run: podman system reset -f (or remove /var/lib/containers/storage and /run/containers/storage), then rerun this script"
    fi
    echo "$err" >&2
    return 1
}

main() {
    install_missing_packages
    pin_storage_driver
    command -v podman >/dev/null || fail "podman is not on PATH"
    command -v runc >/dev/null || [ -x /usr/sbin/runc ] || fail "runc is not installed"
    local busybox want have=""
    busybox="$(find_busybox)"
    # Only a static busybox runs in a FROM scratch image (there is no libc in it).
    if command -v ldd >/dev/null && ldd "$busybox" >/dev/null 2>&1; then
        fail "$busybox is dynamically linked; install busybox-static"
    fi
    want="$(recipe_hash "$busybox")"
    if podman_or_explain image exists "$image"; then
        have="$("${podman_cmd[@]}" image inspect --format "{{ index .Labels \"$label\" }}" "$image" 2>/dev/null || true)"
    fi
    if [ "$have" = "$want" ]; then
        echo "setup.sh: $image is up to date"
        return 0
    fi
    build_image "$busybox" "$want"
    have="$("${podman_cmd[@]}" image inspect --format "{{ index .Labels \"$label\" }}" "$image" 2>/dev/null || true)"
    [ "$have" = "$want" ] || fail "$image was built but does not carry the expected recipe label"
    echo "setup.sh: $image built"
}

main "$@"
