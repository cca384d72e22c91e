"""How a transfer talks about its progress: systemd's byte and time
formats, and the "Imported N%." log lines."""

from __future__ import annotations

import time

from imagepool.fmt import format_bytes as format_bytes  # re-exported: importd's log lines use it
from importd.context import JobContext


class ProgressLogger:
    """Reports progress, and logs "<verb> N%." at most once a second."""

    def __init__(self, ctx: JobContext, verb: str) -> None:
        self.ctx = ctx
        self.verb = verb
        self.last_logged = -1
        self.last_time = 0.0

    def __call__(self, fraction: float) -> None:
        self.ctx.progress(fraction)
        percent = int(min(max(fraction, 0.0), 1.0) * 100)
        now = time.monotonic()
        if percent != self.last_logged and now - self.last_time >= 1.0:
            self.last_logged = percent
            self.last_time = now
            self.ctx.log(f"{self.verb} {percent}%.")


def format_timespan(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 60:
        return f"{seconds // 60}min {seconds % 60}s"
    return f"{seconds}s"
