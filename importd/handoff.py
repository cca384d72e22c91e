"""Writes in a thread of their own, behind the thread that makes the data (a
decompression), so that decoding and writing overlap on two CPUs instead of
taking turns.

    with Handoff(write, ctx, "raw-writer") as handoff:
        for chunk in decoded:
            handoff.put(chunk)      # blocks while BUDGET bytes wait
        handoff.put(n, cost=0)      # an item that holds no buffer (a run of zeros)
        handoff.close()             # all written (or the writer's error)

What waits is bounded by the bytes it holds, not by a count of items: an
item that holds no memory of its own (COST 0: the length of a run of zeros,
which the sparse writer only skips) takes no room, so the decoder runs on
through the holes of an image while the writer is still busy with the data
before them (up to MAX_ITEMS of them).  A chunk is counted until it is
written.  The budget is the process's (Budget: all writers together, so
concurrent jobs hold no more than one does); one chunk per writer may always
wait, however large, so nothing stalls.

The chunks must not be changed after put() (bytes are not).  A failed write
is raised by the next put() or by close(); leaving the block on an error
stops the writer (what waits is dropped) and waits for it.

Measured, import of the bench's 2 GiB gzip image (0.9 GB of data in 72
stretches, holes between): two chunks of 1 MiB waiting, 2.0 s, the writer
idle 0.6 s and the decoder blocked 0.7 s; with the holes taking no room and
8 MiB, 1.6-1.7 s (4 MiB: 1.95 s)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from importd.context import JobContext

BUDGET = 8 << 20  # bytes of chunks waiting or being written, all jobs' writers together
MAX_ITEMS = 1024  # items waiting for one writer, whatever they cost
_POLL = 0.25  # seconds between looks at the job's cancellation while waiting
_END = object()


class Budget:
    """The bytes that the writers of a process may hold: one budget for all
    of them, so that concurrent jobs share it instead of each holding its
    own (one job alone gets all of it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        self.cond = threading.Condition()


_SHARED = Budget(BUDGET)


class Handoff:
    def __init__(self, write: Callable[[Any], None], ctx: JobContext, name: str,
                 budget: Budget | None = None) -> None:
        self._write = write
        self._ctx = ctx
        self._budget = budget or _SHARED
        self._cond = self._budget.cond
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._held = 0  # the cost of what waits for this writer or is being written by it
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._items:
                    cond.wait()
                item, cost = self._items.popleft()
            if item is _END:
                return
            try:
                if not self._stop and self.error is None:
                    self._write(item)
            except BaseException as e:
                self.error = e
            finally:
                with cond:
                    self._held -= cost
                    self._budget.held -= cost
                    cond.notify_all()

    def _room(self, cost: int) -> bool:
        if self._stop or self.error is not None:
            return True  # the writer only drains now
        if len(self._items) >= MAX_ITEMS:
            return False
        return cost == 0 or self._held == 0 or self._budget.held + cost <= self._budget.size

    def _put(self, item: Any, cost: int) -> None:
        with self._cond:
            while not self._room(cost):
                self._cond.wait(_POLL)
                self._ctx.check()
            self._items.append((item, cost))
            self._held += cost
            self._budget.held += cost
            self._cond.notify_all()

    def put(self, chunk: Any, cost: int | None = None) -> None:
        """CHUNK for the writer; COST, the bytes it holds, is its length
        unless given."""
        if self.error is not None:
            raise self.error
        self._put(chunk, len(chunk) if cost is None else cost)

    def close(self) -> None:
        """Wait until everything put is written; the writer's error, if any."""
        if not self._closed:
            self._closed = True
            self._put(_END, 0)
            self._thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Handoff:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._closed:
            self._closed = True
            with self._cond:
                self._stop = True  # the writer drops what waits
                self._items.append((_END, 0))
                self._cond.notify_all()
            self._thread.join()
