"""What a running job (one transfer's blocking work, in a worker thread) gets
from the engine: cancellation, log lines and progress, all thread-safe."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from imagepool.errors import ReportedFailure, TransferError

__all__ = ["Canceled", "JobContext", "ReportedFailure", "TransferError", "exiting_on_failure"]


class Canceled(Exception):
    """The transfer was canceled; the job cleans up and re-raises."""


@contextlib.contextmanager
def exiting_on_failure(ctx: JobContext) -> Iterator[None]:
    """Once a job has started its real work, a failure is logged followed by
    "Exiting.", as systemd's worker tools print it."""
    try:
        yield
    except ReportedFailure:
        raise
    except (TransferError, OSError) as e:
        message = str(e) if isinstance(e, TransferError) else f"Transfer failed: {e.strerror or e}"
        ctx.log(message)
        ctx.log("Exiting.")
        raise ReportedFailure(message) from e


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
