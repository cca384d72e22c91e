"""How a transfer talks about its progress: systemd's byte and time
formats, and the "Imported N%." log lines."""

from __future__ import annotations

import time

from importd.context import JobContext


def format_bytes(n: int) -> str:
    """systemd 262's FORMAT_BYTES: 1024-based, truncated to one digit below
    the point (from the next smaller unit, as systemd computes it), which is
    left out when it is 0 ("80K", "8.5M", "512B")."""
    for i, suffix in enumerate("EPTGMK"):
        factor = 1 << (10 * (6 - i))
        if n >= factor:
            digit = (n * 10 // factor) % 10 if suffix == "K" else (n // (factor >> 10) * 10 // 1024) % 10
            return f"{n // factor}.{digit}{suffix}" if digit else f"{n // factor}{suffix}"
    return f"{n}B"


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
