"""What a running job (one transfer's blocking work, in a worker thread) gets
from the engine: cancellation, log lines and progress, all thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from imagepool.errors import PoolError


class Canceled(Exception):
    """The transfer was canceled; the job cleans up and re-raises."""


class TransferError(PoolError):
    """A job failed; the message is logged to the client as is."""


def _ignore_log(line: str) -> None:
    pass


def _ignore_progress(fraction: float) -> None:
    pass


@dataclass
class JobContext:
    cancel: threading.Event = field(default_factory=threading.Event)
    log: Callable[[str], None] = _ignore_log
    progress: Callable[[float], None] = _ignore_progress
    # Called (from another thread) when cancellation is requested, to wake
    # the job from a blocking wait, e.g. by shutting down a socket.
    cancel_hooks: list[Callable[[], None]] = field(default_factory=list)

    def request_cancel(self) -> None:
        self.cancel.set()
        for hook in list(self.cancel_hooks):
            try:
                hook()
            except Exception:  # a hook racing with the job's own cleanup
                pass

    def derive(self, progress: Callable[[float], None]) -> JobContext:
        """The same job with another progress callback (for a sub-step)."""
        return JobContext(self.cancel, self.log, progress, self.cancel_hooks)

    def check(self) -> None:
        """Raise Canceled once cancellation was requested; jobs call this at
        least once per chunk of work."""
        if self.cancel.is_set():
            raise Canceled()
