"""The conditions of a run, recorded with every figure: machine, cores, load, versions, settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _emulator_version() -> str | None:
    root = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib"
    try:
        jars = [f for f in os.listdir(root) if f.startswith("cloud-pubsub-emulator")]
        return jars[0].removeprefix("cloud-pubsub-emulator-").removesuffix("-all.jar") if jars else None
    except OSError:
        return None


def _command(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def collect(mode: str, settings: dict) -> dict:
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": mode,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_mib": _mem_total_mib(),
            "load_average_at_start": load_average(),
            "note": "shared machine: other work may run at the same time; compare ratios, not absolute times",
        },
        "versions": {
            "python": sys.version.split()[0],
            "apache-airflow": _version("apache-airflow"),
            "apache-airflow-task-sdk": _version("apache-airflow-task-sdk"),
            "apache-airflow-providers-google": _version("apache-airflow-providers-google"),
            "google-cloud-pubsub": _version("google-cloud-pubsub"),
            "google-cloud-compute": _version("google-cloud-compute"),
            "grpcio": _version("grpcio"),
            "airflow-batchvm": _version("airflow-batchvm"),
            "pubsub-emulator": _emulator_version(),
            "podman": _command(["podman", "--version"]),
        },
        "settings": settings,
    }
