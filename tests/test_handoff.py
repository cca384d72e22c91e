"""importd.piped (the download in a thread, through a channel) and importd.handoff (writes
in a thread of their own): order, errors, cancellation, the byte budget
shared by all writers, nothing left running."""

from __future__ import annotations

import os
import threading
import time

import pytest

from importd.channel import GATHER, Channel
from importd.context import Canceled, JobContext
from importd.handoff import Budget, Handoff
from importd.piped import Piped


def test_handoff_writes_everything_in_order_in_another_thread() -> None:
    got: list[bytes] = []
    threads: set[str] = set()

    def write(chunk: bytes) -> None:
        threads.add(threading.current_thread().name)
        got.append(chunk)

    chunks = [os.urandom(n) for n in (1, 4096, 1 << 20, 7, 65536)] * 3
    with Handoff(write, JobContext(), "test-writer", budget=Budget(2)) as h:
        for c in chunks:
            h.put(c)
        h.close()
    assert got == chunks
    assert threads == {"test-writer"}


def test_handoff_raises_the_writers_error_and_stops() -> None:
    calls = []

    def write(chunk: bytes) -> None:
        calls.append(chunk)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with Handoff(write, JobContext(), "test-writer", budget=Budget(2)) as h:
            for i in range(100):
                h.put(b"x%d" % i)
            h.close()
    assert len(calls) == 2  # nothing written after the failure
    assert not any(t.name == "test-writer" for t in threading.enumerate())


def test_handoff_put_waiting_for_a_stuck_writer_sees_the_cancel() -> None:
    release = threading.Event()
    ctx = JobContext()

    def write(chunk: bytes) -> None:
        release.wait(10)

    threading.Timer(0.3, ctx.request_cancel).start()
    t0 = time.monotonic()
    with pytest.raises(Canceled):
        with Handoff(write, ctx, "test-writer", budget=Budget(2)) as h:
            try:
                for _ in range(10):
                    h.put(b"x")
            finally:
                release.set()
    assert time.monotonic() - t0 < 5
    assert not any(t.name == "test-writer" for t in threading.enumerate())


def test_handoff_leaving_on_an_error_drops_what_waits() -> None:
    written = []
    with pytest.raises(RuntimeError):
        with Handoff(written.append, JobContext(), "test-writer", budget=Budget(2)) as h:
            h.put(b"a")
            raise RuntimeError("the decoder failed")
    assert written in ([], [b"a"])
    assert not any(t.name == "test-writer" for t in threading.enumerate())


def _stuck_writer() -> tuple[threading.Event, list[object], object]:
    release = threading.Event()
    written: list[object] = []

    def write(chunk: object) -> None:
        release.wait(10)
        written.append(chunk)

    return release, written, write


_putters: list[threading.Thread] = []


def _puts_until_blocked(h: Handoff, items: list[tuple[object, int | None]]) -> int:
    """How many of ITEMS put() takes before it waits (a thread tries them;
    _finish_puts() waits for the rest)."""
    done: list[int] = []

    def put_all() -> None:
        for item, cost in items:
            h.put(item, cost)
            done.append(1)

    t = threading.Thread(target=put_all, daemon=True)
    t.start()
    t.join(0.5)
    _putters.append(t)
    return len(done)


def _finish_puts() -> None:
    while _putters:
        t = _putters.pop()
        t.join(10)
        assert not t.is_alive()


def test_handoff_waits_when_the_budget_is_held_not_after_a_count() -> None:
    """Chunks wait until their bytes would exceed the budget (the one being
    written counts); items of cost 0 (runs of zeros) always get through."""
    release, written, write = _stuck_writer()
    with Handoff(write, JobContext(), "test-writer", budget=Budget(2500)) as h:
        try:
            assert _puts_until_blocked(h, [(b"a" * 1000, None)] * 5) == 2  # 2000 held, 3000 would exceed
            assert _puts_until_blocked(h, [(4096, 0)] * 10) == 10
        finally:
            release.set()
            _finish_puts()
        h.close()
    assert written[:2] == [b"a" * 1000] * 2
    assert written.count(b"a" * 1000) == 5 and written.count(4096) == 10


def test_handoff_budget_is_shared_but_every_writer_gets_one_chunk() -> None:
    """Two writers on one budget: what one holds, the other cannot take; but
    a writer holding nothing may always have one chunk, however large."""
    budget = Budget(3000)
    release, _, write = _stuck_writer()
    with Handoff(write, JobContext(), "test-writer", budget=budget) as first, \
            Handoff(write, JobContext(), "test-writer-2", budget=budget) as second:
        try:
            assert _puts_until_blocked(first, [(b"x" * 1000, None)] * 4) == 3
            assert budget.held == 3000
            assert _puts_until_blocked(second, [(b"y" * 10_000, None)] * 2) == 1  # one, over the budget
        finally:
            release.set()
            _finish_puts()
        first.close()
        second.close()
    assert budget.held == 0


def test_handoff_leaving_early_gives_the_budget_back() -> None:
    budget = Budget(1 << 20)
    release, _, write = _stuck_writer()
    with pytest.raises(RuntimeError):
        with Handoff(write, JobContext(), "test-writer", budget=budget) as h:
            for _ in range(5):
                h.put(b"z" * 1000)
            release.set()
            raise RuntimeError("the decoder failed")
    assert budget.held == 0
    assert not any(t.name == "test-writer" for t in threading.enumerate())


def _read_all(channel: Channel) -> tuple[bytes, list[int]]:
    data, sizes = bytearray(), []
    while chunk := channel.read(4 << 20, timeout=10):
        data += chunk
        sizes.append(len(chunk))
    return bytes(data), sizes


def test_piped_hands_small_pieces_over_gathered() -> None:
    pieces = [os.urandom(16384) for _ in range(100)] + [b"tail"]

    def produce() -> str:
        for p in pieces:
            piped.write(p)
            time.sleep(0.001)  # a slow download: the reader would see each piece
        return "done"

    piped = Piped("test-download", produce, lambda: None)
    with piped:
        data, sizes = _read_all(piped.reader)
        assert piped.result() == "done"
    assert data == b"".join(pieces)
    assert len(sizes) <= len(data) // GATHER + 2  # gathered, not piece by piece


def test_piped_download_error_is_raised_and_what_waits_is_dropped() -> None:
    wrote = threading.Event()

    def produce() -> None:
        piped.write(b"partial")
        wrote.set()
        time.sleep(0.05)
        raise OSError(104, "Connection reset by peer")

    piped = Piped("test-download", produce, lambda: None)
    with piped:
        wrote.wait(5)
        data, _ = _read_all(piped.reader)  # (7 bytes do not wake the reader: it waits for the end)
        with pytest.raises(OSError, match="reset"):
            piped.result()
    assert data == b""  # the failed download's bytes never reach the reader


def test_piped_reader_leaving_stops_the_download_and_its_epipe_is_not_kept() -> None:
    interrupted = threading.Event()

    def produce() -> None:
        while True:  # a download faster than its reader
            piped.write(os.urandom(65536))

    piped = Piped("test-download", produce, interrupted.set)
    with pytest.raises(RuntimeError, match="unpacker"):
        with piped:
            assert piped.reader.read(1 << 20, timeout=10)
            raise RuntimeError("the unpacker failed")
    assert interrupted.is_set()
    assert piped.finished.is_set() and piped.error is None
    assert not any(t.name == "test-download" for t in threading.enumerate())
