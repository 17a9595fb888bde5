"""One line per step of a job in the task log, with its time (UTC) and the time since submission.

    batchvm | 17:00:12.301 | +0.0 s    | submitted   | job extract-4c47 attempt 1
    batchvm | 17:00:12.512 | +0.2 s    | VM created  | bvm-extract-4c47 in us-central1-a
    batchvm | 17:00:13.020 | +0.7 s    | VM running  | bvm-extract-4c47
    batchvm | 17:00:13.711 | +1.4 s    | STARTED     | on bvm-extract-4c47
    batchvm | 17:00:15.933 | +3.6 s    | FINISHED    | exit code 0 after 2.2 s
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def log_timeline(log, timeline: dict | None) -> None:
    """The steps a watcher handed over in its event (see ``StatusFilter.timeline``)."""
    for step, detail, at in (timeline or {}).get("steps", []):
        log_step(log, step, detail, timeline.get("submitted_at"), at)


def log_step(log, step: str, detail: str, submitted_at: float | None, at: float | None = None) -> None:
    at = time.time() if at is None else at
    since = f"+{at - submitted_at:.1f} s" if submitted_at else ""
    clock = datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]
    log.info("batchvm | %s | %-9s | %-11s | %s", clock, since, step, detail)
