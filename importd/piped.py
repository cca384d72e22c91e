"""A download in a thread of its own, handing its bytes through a Channel
(importd.channel) to the thread that unpacks them, so that both overlap
(pulls, OCI layers).

    piped = Piped("download", produce, interrupt)   # produce() writes with piped.write()
    with piped:                                     # (the thread starts here)
        consume(piped.reader)                       # read with compress.Source
        info = piped.result()                       # what produce() returned, or its error

Leaving the block on an error interrupts the download (INTERRUPT), closes
the channel and waits for the thread; if the download had failed first, its
error is raised instead, since it explains the rest.  An error the download
runs into only because nobody reads any more is not kept."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from importd.channel import Channel

T = TypeVar("T")


class Piped(Generic[T]):
    def __init__(self, name: str, produce: Callable[[], T], interrupt: Callable[[], None]) -> None:
        self.reader = Channel()
        self._produce = produce
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._abandoned = False
        self._value: T | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()  # the download ended (either way)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def write(self, chunk: bytes) -> None:
        """CHUNK (bytes, kept as they are) for the reader."""
        self.reader.write(chunk)

    def _run(self) -> None:
        try:
            self._value = self._produce()
        except BaseException as e:  # handed to the reading side, unless it caused this
            with self._lock:
                if not self._abandoned:
                    self.error = e
        finally:
            # The end of the data; after a failure the reader gets none of what waits.
            self.reader.close_writer(drop=self.error is not None)
            self.finished.set()

    def __enter__(self) -> Piped[T]:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> T:
        """What the download returned (after waiting for it), or its error."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self._value is not None
        return self._value

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            with self._lock:
                self._abandoned = True
                error = self.error
            self._interrupt()
            self._close_reader()
            self._thread.join()
            if error is not None and error is not exc:
                raise error from None
        self._close_reader()
        self._thread.join()

    def _close_reader(self) -> None:
        self.reader.close_reader()
