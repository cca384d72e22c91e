"""importd.channel (bytes from the download thread to the unpacking one):
order and joining, the writer held at the limit, the end, the reader
leaving, timeouts, the eventfd for poll() loops, and decompression through
a channel as through a pipe (the xz child's feeder included)."""

from __future__ import annotations

import gzip
import lzma
import os
import select
import threading
import time

import pytest

from importd import compress
from importd.channel import Channel
from importd.context import Canceled, JobContext, TransferError


def _writer(channel: Channel, chunks: list[bytes], close: bool = True) -> threading.Thread:
    def run() -> None:
        for c in chunks:
            channel.write(c)
        if close:
            channel.close_writer()

    t = threading.Thread(target=run, name="test-channel-writer")
    t.start()
    return t


def test_bytes_come_out_in_order_joined_up_to_what_is_asked() -> None:
    chunks = [os.urandom(n) for n in (1, 70000, 3, 65536, 1 << 20, 17, 300000)] * 5
    ch = Channel(limit=256 << 10, gather=64 << 10)
    t = _writer(ch, chunks)
    got, sizes = bytearray(), []
    while data := ch.read(100000, timeout=10):
        assert isinstance(data, bytes)
        got += data
        sizes.append(len(data))
    t.join()
    assert bytes(got) == b"".join(chunks)
    assert max(sizes) == 100000
    assert ch.read(10, timeout=0) == b""  # the end stays the end


def test_the_writer_waits_at_the_limit_until_the_reader_takes() -> None:
    ch = Channel(limit=100, gather=10)
    t = _writer(ch, [b"a" * 60, b"b" * 60, b"c" * 60], close=False)
    time.sleep(0.2)
    assert t.is_alive()  # 120 bytes wait: the third write waits
    assert ch.read(60, timeout=1) == b"a" * 60
    t.join(5)
    assert not t.is_alive()
    assert ch.read(1000, timeout=1) == b"b" * 60 + b"c" * 60
    assert ch.read(1000, timeout=0.05) is None  # nothing, and not the end


def test_a_waiting_reader_wakes_for_gather_bytes_or_the_end_not_each_chunk() -> None:
    ch = Channel(limit=1 << 20, gather=1000)
    ch.write(b"x" * 10)
    t0 = time.monotonic()
    assert ch.read(5000, timeout=0.2) == b"x" * 10  # timed out, then takes what is there
    assert time.monotonic() - t0 >= 0.15
    ch.write(b"y" * 10)
    assert ch.read(5, timeout=0) == b"yyyyy"  # asking for less than gather: at once
    ch.close_writer()
    assert ch.read(5000, timeout=10) == b"yyyyy"
    assert ch.read(5000, timeout=10) == b""


def test_the_writer_gets_epipe_once_the_reader_is_gone_even_while_waiting() -> None:
    ch = Channel(limit=10, gather=1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while True:
                ch.write(b"z" * 8)
        except BrokenPipeError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    ch.close_reader()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    with pytest.raises(BrokenPipeError):
        ch.write(b"more")


def test_a_failed_writer_drops_what_waits() -> None:
    ch = Channel()
    ch.write(b"partial")
    ch.close_writer(drop=True)
    assert ch.read(100, timeout=1) == b""


def test_a_buffer_is_copied_once_written_so_the_producer_may_reuse_it() -> None:
    ch = Channel(gather=1)
    buf = bytearray(b"first")
    ch.write(buf)
    buf[:] = b"XXXXX"
    ch.close_writer()
    assert ch.read(100) == b"first"


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_fileno_is_readable_exactly_while_a_read_returns_at_once() -> None:
    ch = Channel(limit=1 << 20, gather=100)
    fd = ch.fileno()
    assert ch.fileno() == fd
    assert not _readable(fd)
    ch.write(b"a" * 50)
    assert not _readable(fd)  # less than gather
    ch.write(b"b" * 60)
    assert _readable(fd)
    assert ch.read(100, timeout=0) == b"a" * 50 + b"b" * 50
    assert not _readable(fd)  # 10 bytes left
    ch.close_writer()
    assert _readable(fd)
    assert ch.read(100, timeout=0) == b"b" * 10
    assert _readable(fd)  # the end is readable too
    assert ch.read(100, timeout=0) == b""
    ch.close_reader()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the channel


def _decompress_through_channel(data: bytes, chunk: int = 65536) -> bytes:
    ch = Channel()
    t = _writer(ch, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    try:
        return b"".join(compress.decompressed_chunks(ch, JobContext()))
    finally:
        ch.close_reader()
        t.join()


def test_gzip_and_zstd_decompress_through_a_channel() -> None:
    import zstandard

    payload = os.urandom(300000) + bytes(2 << 20) + b"end" * 1000
    assert _decompress_through_channel(gzip.compress(payload)) == payload
    assert _decompress_through_channel(zstandard.ZstdCompressor().compress(payload)) == payload
    assert _decompress_through_channel(payload) == payload  # uncompressed


def test_multi_block_xz_goes_to_the_xz_child_through_the_channels_eventfd() -> None:
    from importd.compress import xz

    payload = os.urandom(200000) * 20
    blocks = xz.binary()
    assert blocks is not None
    import subprocess

    packed = subprocess.run([blocks, "-T2", "--block-size=1MiB", "-c"], input=payload, capture_output=True,
                            check=True).stdout
    assert xz.parallel(packed[:14])
    assert _decompress_through_channel(packed) == payload
    with pytest.raises(TransferError, match="trailing garbage|Trailing garbage"):
        _decompress_through_channel(packed + b"garbage!")
    assert _decompress_through_channel(lzma.compress(payload[:100000])) == payload[:100000]


def test_a_canceled_job_stops_waiting_on_a_stalled_channel() -> None:
    ch = Channel()
    ch.write(b"\x1f\x8b")  # the start of gzip, then nothing
    ctx = JobContext()
    threading.Timer(0.3, ctx.request_cancel).start()
    t0 = time.monotonic()
    with pytest.raises(Canceled):
        for _ in compress.decompressed_chunks(ch, ctx):
            pass
    assert time.monotonic() - t0 < 5
    ch.close_reader()
