"""Medians, p99 and spread, the same way for every figure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (so p99 of fewer than 100 samples is their maximum)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Iterable[float | None], digits: int = 3) -> dict:
    """n, median, p99, and the spread: min, p25, p75, max."""
    data = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not data:
        return {"n": 0}
    out = {
        "n": len(data),
        "p50": statistics.median(data),
        "p99": percentile(data, 99),
        "min": min(data),
        "p25": percentile(data, 25),
        "p75": percentile(data, 75),
        "max": max(data),
        "mean": statistics.fmean(data),
    }
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in out.items()}


def ratio(stock: float | None, ours: float | None, digits: int = 1) -> float | None:
    """How many times ``ours`` is better (smaller) than ``stock``."""
    if stock is None or ours is None or ours <= 0:
        return None
    value = stock / ours
    if value < 1:
        return float(f"{value:.2g}")
    return round(value, digits)
