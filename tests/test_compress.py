"""importd.compress and importd.sparse against the real tools (xz, gzip,
bzip2, zstd, btrfs): round trips, multi-member streams, pipes, truncation,
decompression bombs, cancellation, sparse writing and reflinks."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from importd import compress, sparse
from importd.compress import Compression
from importd.context import Canceled, JobContext, TransferError

MiB = 1 << 20


# ---------------------------------------------------------------------------
# Test data and helpers


def make_payload(size: int = 20 * MiB, seed: int = 1) -> bytes:
    """Random blocks, runs of zeros and text-like blocks: a bit like a disk
    image, compressible but not trivially."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij \n") for _ in range(1000)) for _ in range(64)]
    parts = []
    for i in range(size // 65536):
        r = i % 8
        if r == 0:
            parts.append(rng.randbytes(65536))
        elif r <= 4:
            parts.append(bytes(65536))
        else:
            parts.append(b"".join(rng.choice(words) for _ in range(66))[:65536])
    return b"".join(parts)


def pigz_like(data: bytes, independent: bool) -> bytes:
    """One gzip member made of blocks ended by a sync flush (an empty stored
    block), like pigz writes them; with independent=True a full flush, like
    ``pigz --independent``."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    mode = zlib.Z_FULL_FLUSH if independent else zlib.Z_SYNC_FLUSH
    out = []
    for i in range(0, len(data), 128 * 1024):
        out.append(c.compress(data[i : i + 128 * 1024]))
        out.append(c.flush(mode))
    out.append(c.flush())
    return b"".join(out)


def zstd_skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A53, len(payload)) + payload


class Feeder:
    """Writes bytes into a pipe (or socket) from a thread; the test reads
    the other end."""

    def __init__(self, data: bytes, kind: str = "pipe", stall_after: int | None = None) -> None:
        if kind == "pipe":
            self.r, self.w = os.pipe()
        else:
            a, b = socket.socketpair()
            self.r, self.w = a.detach(), b.detach()
        self.data = data
        self.stall_after = stall_after
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        view = memoryview(self.data)
        sent = 0
        try:
            while sent < len(view):
                if self.stall_after is not None and sent >= self.stall_after:
                    self.release.wait()
                    return
                end = len(view) if self.stall_after is None else self.stall_after
                sent += os.write(self.w, view[sent : min(end, sent + 65536)])
        except OSError:
            pass
        finally:
            os.close(self.w)

    def close(self) -> None:
        self.release.set()
        os.close(self.r)
        self.thread.join(10)
        assert not self.thread.is_alive()


def decompress_file(path: Path, **kw) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(compress.decompressed_chunks(fd, JobContext(), **kw))
    finally:
        os.close(fd)


def decompress_bytes(data: bytes, mode: str, tmp_path: Path, **kw) -> bytes:
    if mode == "file":
        p = tmp_path / "input"
        p.write_bytes(data)
        return decompress_file(p, **kw)
    feeder = Feeder(data, mode)
    try:
        return b"".join(compress.decompressed_chunks(feeder.r, JobContext(), **kw))
    finally:
        feeder.close()


def children() -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every child process of the test process,
    zombies included."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me:
            found.append((int(entry), comm, fields[0]))
    return found


def xz_children() -> list[tuple[int, str, str]]:
    return [c for c in children() if c[1] == "xz"]


def run(cmd: str, **kw) -> None:
    subprocess.run(cmd, shell=True, check=True, **kw)


# ---------------------------------------------------------------------------
# Fixtures: the payload compressed in every way we care about, made once.


@pytest.fixture(scope="module")
def payload() -> bytes:
    return make_payload()


@pytest.fixture(scope="module")
def small() -> bytes:
    return make_payload(1 * MiB, seed=2)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, payload: bytes, small: bytes) -> dict[str, tuple[Path, bytes]]:
    """name -> (file, what it decompresses to).  The tools run in parallel."""
    d = tmp_path_factory.mktemp("samples")
    (d / "p").write_bytes(payload)
    (d / "s").write_bytes(small)
    commands = [
        "gzip -1 -c p > p.gz", "gzip -1 -c s > s.gz",
        "xz -0 -T1 -c p > p.xz", "xz -0 -T1 -c s > s.xz",
        "xz -0 -T2 --block-size=1MiB -c p > pb.xz",
        "bzip2 -1 -c p > p.bz2", "bzip2 -1 -c s > s.bz2",
        "zstd -q -1 -c p > p.zst", "zstd -q -1 -c s > s.zst",
    ]
    procs = [subprocess.Popen(c, shell=True, cwd=d) for c in commands]
    assert all(p.wait() == 0 for p in procs)

    def cat(name: str, *parts: bytes | str) -> Path:
        out = d / name
        out.write_bytes(b"".join(p if isinstance(p, bytes) else (d / p).read_bytes() for p in parts))
        return out

    zeros4 = bytes(4)
    return {
        "plain": (d / "p", payload),
        "gzip": (d / "p.gz", payload),
        "gzip-multi-member": (cat("m.gz", "p.gz", "s.gz"), payload + small),
        "gzip-trailing-zeros": (cat("z.gz", "s.gz", bytes(1000)), small),
        "gzip-pigz-like": (cat("pigz.gz", pigz_like(payload, False)), payload),
        "gzip-pigz-independent": (cat("pigzi.gz", pigz_like(small, True), "s.gz"), small + small),
        "xz": (d / "p.xz", payload),
        "xz-multi-stream": (cat("m.xz", "p.xz", zeros4, "s.xz"), payload + small),
        "xz-multi-block": (d / "pb.xz", payload),
        "bzip2": (d / "p.bz2", payload),
        "bzip2-multi-stream": (cat("m.bz2", "p.bz2", "s.bz2"), payload + small),
        "zstd": (d / "p.zst", payload),
        "zstd-multi-frame": (cat("m.zst", "p.zst", zstd_skippable(b"hello"), "s.zst"), payload + small),
        # small ones, for the error paths
        "small-gzip": (d / "s.gz", small),
        "small-xz": (d / "s.xz", small),
        "small-bzip2": (d / "s.bz2", small),
        "small-zstd": (d / "s.zst", small),
        "small-gzip-multi": (cat("sm.gz", "s.gz", "s.gz"), small + small),
        "small-xz-multi": (cat("sm.xz", "s.xz", zeros4, "s.xz"), small + small),
        "small-bzip2-multi": (cat("sm.bz2", "s.bz2", "s.bz2"), small + small),
        "small-zstd-multi": (cat("sm.zst", "s.zst", zstd_skippable(b"x"), "s.zst"), small + small),
    }


# ---------------------------------------------------------------------------
# Detection and names


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\xfd7zXZ\x00\x00\x04", Compression.XZ),
        (b"\xfd7zXZ\x00", Compression.XZ),
        (b"\xfd7zXZ", Compression.NONE),
        (b"\x1f\x8b\x08\x00\x00\x00", Compression.GZIP),
        (b"\x1f\x8b", Compression.GZIP),
        (b"\x1f\x9d\x90", Compression.NONE),  # compress(1)
        (b"BZh91AY&SY", Compression.BZIP2),
        (b"BZh", Compression.BZIP2),
        (b"\x28\xb5\x2f\xfd\x04\x58", Compression.ZSTD),
        (b"\x28\xb5\x2f", Compression.NONE),
        (b"\x5d\x00\x00\x80\x00", Compression.NONE),  # legacy .lzma
        (b"", Compression.NONE),
        (bytes(512), Compression.NONE),
        (b"QFI\xfb", Compression.NONE),
    ],
)
def test_detect(head: bytes, kind: Compression) -> None:
    assert compress.detect(head) == kind


@pytest.mark.parametrize(
    "name, tar, kind",
    [
        ("image.raw.xz", False, Compression.XZ),
        ("image.raw.gz", False, Compression.GZIP),
        ("image.raw.bz2", False, Compression.BZIP2),
        ("image.raw.zst", False, Compression.ZSTD),
        ("image.raw", False, Compression.NONE),
        ("image.qcow2", False, Compression.NONE),
        ("image.txz", False, Compression.NONE),
        ("image.tgz", False, Compression.NONE),
        ("tree.tar.xz", True, Compression.XZ),
        ("tree.tar.gz", True, Compression.GZIP),
        ("tree.tar.bz2", True, Compression.BZIP2),
        ("tree.tar.zst", True, Compression.ZSTD),
        ("tree.txz", True, Compression.XZ),
        ("tree.tgz", True, Compression.GZIP),
        ("tree.tbz2", True, Compression.BZIP2),
        ("tree.tzst", True, Compression.ZSTD),
        ("tree.tar", True, Compression.NONE),
        ("xz", True, Compression.NONE),
        ("", False, Compression.NONE),
    ],
)
def test_from_suffix(name: str, tar: bool, kind: Compression) -> None:
    assert compress.from_suffix(name, tar) == kind


@pytest.mark.parametrize(
    "fmt, kind",
    [
        ("", Compression.NONE),
        ("uncompressed", Compression.NONE),
        ("xz", Compression.XZ),
        ("gzip", Compression.GZIP),
        ("bzip2", Compression.BZIP2),
        ("zstd", Compression.ZSTD),
    ],
)
def test_parse_format(fmt: str, kind: Compression) -> None:
    assert compress.parse_format(fmt) == kind
    assert str(kind) == (fmt or "uncompressed")


@pytest.mark.parametrize("fmt", ["gz", "XZ", "zst", "lz4", "none", " xz"])
def test_parse_format_unknown(fmt: str) -> None:
    with pytest.raises(TransferError, match=f"^Unknown format '{fmt}'$"):
        compress.parse_format(fmt)


# ---------------------------------------------------------------------------
# Decompression round trips


SAMPLE_NAMES = [
    "plain", "gzip", "gzip-multi-member", "gzip-trailing-zeros", "gzip-pigz-like", "gzip-pigz-independent",
    "xz", "xz-multi-stream", "xz-multi-block", "bzip2", "bzip2-multi-stream", "zstd", "zstd-multi-frame",
]


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_decompress(samples, name: str, mode: str) -> None:
    path, expected = samples[name]
    if mode == "file":
        fd = os.open(path, os.O_RDONLY)
        feeder = None
    else:
        feeder = Feeder(path.read_bytes())
        fd = feeder.r
    try:
        chunks = list(compress.decompressed_chunks(fd, JobContext(), chunk_size=MiB))
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)
    assert all(0 < len(c) <= MiB for c in chunks)
    assert b"".join(chunks) == expected
    assert xz_children() == []


@pytest.mark.parametrize("name", ["xz", "gzip", "zstd", "plain"])
def test_decompress_socket(samples, name: str, tmp_path: Path) -> None:
    path, expected = samples[name]
    assert decompress_bytes(path.read_bytes(), "socket", tmp_path) == expected


def test_decompress_from_file_offset(samples, tmp_path: Path) -> None:
    """Reading starts at the fd's offset, not at 0 (xz child included)."""
    for name in ("xz", "gzip"):
        path, expected = samples[name]
        p = tmp_path / "prefixed"
        p.write_bytes(b"junk" * 100 + path.read_bytes())
        fd = os.open(p, os.O_RDONLY)
        try:
            os.lseek(fd, 400, os.SEEK_SET)
            assert b"".join(compress.decompressed_chunks(fd, JobContext())) == expected
        finally:
            os.close(fd)


@pytest.mark.parametrize("data", [b"", b"x", b"\x1f\x8b", b"BZh9", b"\xfd7zXZ", b"hello, world"])
@pytest.mark.parametrize("mode", ["file", "pipe"])
def test_short_input_is_uncompressed(data: bytes, mode: str, tmp_path: Path) -> None:
    assert decompress_bytes(data, mode, tmp_path) == data


def test_xz_without_binary(samples, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No xz on $PATH: the lzma module does it, multi-stream and padding too."""
    monkeypatch.setenv("PATH", "/nonexistent")
    for name in ("small-xz-multi", "xz-multi-block"):
        path, expected = samples[name]
        assert decompress_file(path) == expected
    data = samples["small-xz"][0].read_bytes()
    with pytest.raises(TransferError, match=truncated("xz")):
        decompress_bytes(data[:-1], "pipe", tmp_path)
    with pytest.raises(TransferError, match="^Failed to decompress xz data: "):
        decompress_bytes(data[:100] + bytes(1000) + data[1100:], "file", tmp_path)
    # and the writer compresses in-process
    out = tmp_path / "w.xz"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    w = compress.compressed_writer(fd, Compression.XZ, JobContext())
    w.write(b"abc" * 1000)
    w.close()
    os.close(fd)
    monkeypatch.undo()
    assert subprocess.run(["xz", "-dc", str(out)], capture_output=True, check=True).stdout == b"abc" * 1000


def test_progress(samples) -> None:
    for name in ("xz-multi-block", "gzip", "zstd", "plain"):
        path, expected = samples[name]
        seen: list[float] = []
        ctx = JobContext(progress=seen.append)
        fd = os.open(path, os.O_RDONLY)
        try:
            total = sum(len(c) for c in compress.decompressed_chunks(fd, ctx, size=os.path.getsize(path)))
        finally:
            os.close(fd)
        assert total == len(expected)
        assert seen, name
        assert seen == sorted(seen) and 0 <= seen[0] and seen[-1] == 1.0, (name, seen)
        assert len(seen) <= 101, (name, len(seen))
        assert all(b - a >= 0.0099 for a, b in zip(seen, seen[1:-1], strict=False)), name  # but the final 1.0


# ---------------------------------------------------------------------------
# Broken input


KINDS_SAMPLE = {"small-gzip": "gzip", "small-xz": "xz", "small-bzip2": "bzip2", "small-zstd": "zstd",
                "xz-multi-block": "xz"}
MAGICS = {"gzip": b"\x1f\x8b", "xz": b"\xfd7zXZ\x00", "bzip2": b"BZh", "zstd": b"\x28\xb5\x2f\xfd"}


def truncated(kind: str) -> str:
    return "^" + re.escape(f"Failed to decompress {kind} data: Compressed stream is truncated") + "$"


def garbage(kind: str, offset: int) -> str:
    return "^" + re.escape(f"Failed to decompress {kind} data: Trailing garbage after the end of the compressed "
                           f"stream, at offset {offset}") + "$"


def with_lzma(names: list[str]) -> list[tuple[str, str]]:
    """(name, decoder) for NAMES: the xz ones both through the xz child and
    (no xz on $PATH) through the lzma module."""
    return [(n, "default") for n in names] + [(n, "lzma") for n in names if "xz" in n]


def use_decoder(decoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if decoder == "lzma":
        monkeypatch.setenv("PATH", "/nonexistent")


def chunks_until_error(data: bytes, mode: str, tmp_path: Path) -> tuple[bytes, TransferError]:
    """What decompressed_chunks yields, and the error it then raises."""
    got = []
    if mode == "file":
        p = tmp_path / "input"
        p.write_bytes(data)
        fd = os.open(p, os.O_RDONLY)
        feeder = None
    else:
        feeder = Feeder(data, mode)
        fd = feeder.r
    try:
        with pytest.raises(TransferError) as exc:
            for chunk in compress.decompressed_chunks(fd, JobContext()):
                got.append(chunk)
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)
    assert xz_children() == []
    return b"".join(got), exc.value


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("name, decoder", with_lzma(list(KINDS_SAMPLE)))
def test_truncated(samples, name: str, decoder: str, mode: str, monkeypatch: pytest.MonkeyPatch,
                   tmp_path: Path) -> None:
    """Input that ends inside a stream (member, frame), wherever it is cut,
    says so, in every format."""
    use_decoder(decoder, monkeypatch)
    kind = KINDS_SAMPLE[name]
    data = samples[name][0].read_bytes()
    for cut in (6, 7, 12, 13, 100, len(data) // 2, len(data) - 12, len(data) - 1):  # (shorter: uncompressed)
        with pytest.raises(TransferError, match=truncated(kind)):
            decompress_bytes(data[:cut], mode, tmp_path)
        assert xz_children() == []


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("name, decoder", with_lzma(["small-gzip-multi", "small-xz-multi", "small-bzip2-multi",
                                                     "small-zstd-multi"]))
def test_truncated_multi_member(samples, name: str, decoder: str, mode: str, monkeypatch: pytest.MonkeyPatch,
                                tmp_path: Path) -> None:
    """Cut inside the second member/stream/frame, or inside its magic."""
    use_decoder(decoder, monkeypatch)
    kind = name.removeprefix("small-").removesuffix("-multi")
    data = samples[name][0].read_bytes()
    with pytest.raises(TransferError, match=truncated(kind)):
        decompress_bytes(data[:-20], mode, tmp_path)
    single = samples[name.replace("-multi", "")][0].read_bytes()
    for n in range(1, len(MAGICS[kind])):
        with pytest.raises(TransferError, match=truncated(kind)):
            decompress_bytes(single + bytes(4) + MAGICS[kind][:n], mode, tmp_path)


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize(
    "magic, kind",
    [(b"\x1f\x8b", "gzip"), (b"\x1f\x8b\x08\x00", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh9", "bzip2"),
     (b"\x28\xb5\x2f\xfd", "zstd")],
)
def test_garbage_after_magic(magic: bytes, kind: str, mode: str, tmp_path: Path) -> None:
    garbage = magic + random.Random(3).randbytes(200_000)
    expected = f"^Failed to decompress {kind} data: "
    with pytest.raises(TransferError, match=expected):
        decompress_bytes(garbage, mode, tmp_path)
    assert xz_children() == []


TRAILING = {
    "text": (0, b"trailing garbage"),
    "one-byte": (0, b"\x01"),
    "short": (0, b"junk"),  # shorter than an xz stream header
    "after-zeros": (5, b"garbage after five zero bytes"),
    "near-magic": (0, b"\xfd7zXZ\x01" + bytes(20)),
    "megabyte": (8, random.Random(4).randbytes(MiB)),
}


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("garbage_name", list(TRAILING))
@pytest.mark.parametrize("name, decoder", with_lzma(["small-gzip", "small-bzip2", "small-zstd", "small-xz",
                                                     "xz-multi-block", "small-gzip-multi", "small-xz-multi",
                                                     "small-bzip2-multi", "small-zstd-multi"]))
def test_trailing_garbage(samples, name: str, decoder: str, garbage_name: str, mode: str,
                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Data after a complete stream that is neither zero padding nor another
    stream is refused, as systemd-import refuses it, with a message that
    says so and where it starts -- once all that comes before was
    decompressed (and checked: xz is given what comes before only)."""
    use_decoder(decoder, monkeypatch)
    kind = name.removeprefix("small-").split("-")[0]
    path, expected = samples[name]
    data = path.read_bytes()
    zeros, junk = TRAILING[garbage_name]
    got, error = chunks_until_error(data + bytes(zeros) + junk, mode, tmp_path)
    assert re.match(garbage(kind, len(data) + zeros), str(error)), str(error)
    assert got == expected


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("zeros", [1, 3, 1001])
@pytest.mark.parametrize("name", ["small-xz", "small-zstd", "xz-multi-block"])
def test_zero_padding(samples, name: str, zeros: int, mode: str, tmp_path: Path) -> None:
    """Zero bytes after a stream (frame) and between two are padding, however
    many (xz itself wants a multiple of four, systemd-import takes any)."""
    path, expected = samples[name]
    data = path.read_bytes()
    assert decompress_bytes(data + bytes(zeros), mode, tmp_path) == expected
    assert decompress_bytes(data + bytes(zeros) + data + bytes(zeros), mode, tmp_path) == expected + expected
    assert xz_children() == []


def _xz_stdin(path: Path) -> str:
    """What the xz child reads: /proc/PID/fd/0 of the xz decompressing PATH."""
    fd = os.open(path, os.O_RDONLY)
    try:
        gen = compress.decompressed_chunks(fd, JobContext())
        next(gen)
        ((pid, _, _),) = xz_children()
        stdin = os.readlink(f"/proc/{pid}/fd/0")
        gen.close()
    finally:
        os.close(fd)
    return stdin


def test_xz_child_reads_a_clean_file_itself(samples, tmp_path: Path) -> None:
    """A file that ends as a .xz file should (a stream footer, then padding
    of a multiple of four zero bytes) is the xz child's stdin itself: no
    copying through us.  Other files are fed through a pipe, stream by
    stream."""
    path = samples["xz-multi-block"][0]
    padded = tmp_path / "padded.xz"
    padded.write_bytes(path.read_bytes() + bytes(8))
    assert _xz_stdin(path) == str(path)
    assert _xz_stdin(padded) == str(padded)
    odd = tmp_path / "odd.xz"
    odd.write_bytes(path.read_bytes() + bytes(3))
    assert _xz_stdin(odd).startswith("pipe:")
    junk = tmp_path / "junk.xz"
    junk.write_bytes(path.read_bytes() + b"junk")
    assert _xz_stdin(junk).startswith("pipe:")


def _xz_children_while_decoding(path: Path) -> tuple[list[str], bytes]:
    """The argv of the xz child decompressing PATH (none: decoded in-process), and the output."""
    fd = os.open(path, os.O_RDONLY)
    try:
        gen = compress.decompressed_chunks(fd, JobContext())
        first = next(gen)
        argv = [Path(f"/proc/{pid}/cmdline").read_bytes().decode() for pid, _, _ in xz_children()]
        data = first + b"".join(gen)
    finally:
        os.close(fd)
    return argv, data


def test_xz_child_for_several_blocks_only(samples) -> None:
    """xz decodes the blocks of a multi-threaded compressor's file in parallel
    (one thread per CPU, at most 4, under xz's soft memory limit for threaded
    decoding); a single-threaded compressor's one block is decoded in-process
    (xz's 8 KiB writes into a pipe cost more than the decoding)."""
    threads = min(os.cpu_count() or 1, 4)
    for key, child in (("xz", False), ("xz-multi-block", True), ("xz-multi-stream", False)):
        path, payload = samples[key]
        argv, data = _xz_children_while_decoding(path)
        assert data == payload, key
        if child:
            assert len(argv) == 1, (key, argv)
            args = argv[0].split("\0")
            assert f"--threads={threads}" in args and "--memlimit-mt-decompress=320MiB" in args, (key, argv)
        else:
            assert argv == [], (key, argv)


def test_corrupt_gzip_crc(samples, tmp_path: Path) -> None:
    data = bytearray(samples["gzip"][0].read_bytes())
    data[-6] ^= 0xFF  # in the CRC32 of the trailer
    with pytest.raises(TransferError, match="^Failed to decompress gzip data: "):
        decompress_bytes(bytes(data), "file", tmp_path)


def test_xz_error_message(samples, tmp_path: Path) -> None:
    """xz's own complaint about corrupt data is passed on."""
    data = bytearray(samples["xz"][0].read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    for mode in ("file", "pipe"):
        with pytest.raises(TransferError) as exc:
            decompress_bytes(bytes(data), mode, tmp_path)
        assert str(exc.value) == "Failed to decompress xz data: Compressed data is corrupt"


# ---------------------------------------------------------------------------
# Decompression bombs


def _zeros_bomb(kind: str, path: Path) -> None:
    """About 1 GiB of zeros, compressed in a streaming way (gzip and zstd: a
    single member/frame; xz and bzip2: one small stream repeated)."""
    zeros = bytes(16 * MiB)
    with open(path, "wb") as f:
        if kind == "gzip":
            from isal import isal_zlib

            c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
            for _ in range(64):
                f.write(c.compress(zeros))
            f.write(c.flush())
        elif kind == "zstd":
            import zstandard

            c = zstandard.ZstdCompressor(level=1).compressobj()
            for _ in range(64):
                f.write(c.compress(zeros))
            f.write(c.flush())
        elif kind == "xz":
            import lzma

            f.write(lzma.compress(zeros, preset=0) * 64)
        elif kind == "bzip2":
            import bz2

            f.write(bz2.compress(zeros, 1) * 64)


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz", "bzip2"])
def test_bomb(kind: str, mode: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb"
    _zeros_bomb(kind, path)
    limit = 64 * MiB
    chunk = MiB
    produced = 0
    biggest = 0
    feeder = None
    if mode == "file":
        fd = os.open(path, os.O_RDONLY)
    else:
        feeder = Feeder(path.read_bytes())
        fd = feeder.r
    try:
        with pytest.raises(TransferError, match=f"^Decompressed image exceeds the size limit of {limit} bytes$"):
            for c in compress.decompressed_chunks(fd, JobContext(), max_output=limit, chunk_size=chunk):
                produced += len(c)
                biggest = max(biggest, len(c))
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)
    assert limit - chunk <= produced <= limit
    assert biggest <= chunk
    assert xz_children() == []


def test_max_output_exact(samples) -> None:
    path, expected = samples["zstd"]
    assert decompress_file(path, max_output=len(expected)) == expected
    with pytest.raises(TransferError, match="exceeds the size limit"):
        decompress_file(path, max_output=len(expected) - 1)
    path, expected = samples["plain"]
    with pytest.raises(TransferError, match="exceeds the size limit"):
        decompress_file(path, max_output=len(expected) - 1)


# ---------------------------------------------------------------------------
# Cancellation and early exit: no child, no thread, no fd left behind


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["file", "pipe"])
@pytest.mark.parametrize("name", ["xz-multi-block", "gzip", "zstd", "bzip2", "plain"])
def test_cancel(samples, name: str, mode: str) -> None:
    path, _ = samples[name]
    threads = threading.active_count()
    feeder = None
    if mode == "file":
        fd = os.open(path, os.O_RDONLY)
    else:
        feeder = Feeder(path.read_bytes())
        fd = feeder.r
    fds = _fds()
    ctx = JobContext()
    gen = compress.decompressed_chunks(fd, ctx)
    try:
        next(gen)
        if name.startswith("xz"):
            assert len(xz_children()) == 1
        ctx.cancel.set()
        with pytest.raises(Canceled):
            for _ in gen:
                pass
        assert xz_children() == []
        assert _fds() == fds
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)
    assert threading.active_count() == threads


@pytest.mark.parametrize("name", ["xz", "gzip", "zstd"])
def test_cancel_while_input_stalls(samples, name: str) -> None:
    """The sender stops sending: a cancel still ends the job promptly."""
    data = samples[name][0].read_bytes()
    feeder = Feeder(data, stall_after=len(data) // 3)
    ctx = JobContext()
    try:
        gen = compress.decompressed_chunks(feeder.r, ctx)
        got = next(gen)
        assert got
        timer = threading.Timer(0.3, ctx.cancel.set)
        timer.start()
        start = time.monotonic()
        with pytest.raises(Canceled):
            for _ in gen:
                pass
        assert time.monotonic() - start < 3
        timer.join()
        assert xz_children() == []
    finally:
        feeder.close()


@pytest.mark.parametrize("mode", ["file", "pipe"])
def test_early_close_kills_xz(samples, mode: str) -> None:
    path, _ = samples["xz-multi-block"]
    feeder = None
    if mode == "file":
        fd = os.open(path, os.O_RDONLY)
    else:
        feeder = Feeder(path.read_bytes())
        fd = feeder.r
    fds = _fds()
    try:
        gen = compress.decompressed_chunks(fd, JobContext())
        next(gen)
        (child,) = xz_children()
        gen.close()
        assert xz_children() == []
        assert not Path(f"/proc/{child[0]}").exists()
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)

    # a generator dropped without close() goes the same way
    if mode == "file":
        fd = os.open(path, os.O_RDONLY)
    else:
        feeder = Feeder(path.read_bytes())
        fd = feeder.r
    fds = _fds()
    try:
        gen = compress.decompressed_chunks(fd, JobContext())
        next(gen)
        assert len(xz_children()) == 1
        del gen
        assert xz_children() == []
        assert _fds() == fds
    finally:
        if feeder:
            feeder.close()
        else:
            os.close(fd)


def test_consumer_exception_kills_xz(samples) -> None:
    path, _ = samples["xz"]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ZeroDivisionError):
            for _ in compress.decompressed_chunks(fd, JobContext()):
                raise ZeroDivisionError
    finally:
        os.close(fd)
    assert xz_children() == []


# ---------------------------------------------------------------------------
# Compression


TOOLS = {
    Compression.XZ: ["xz", "-dc"],
    Compression.GZIP: ["gzip", "-dc"],
    Compression.BZIP2: ["bzip2", "-dc"],
    Compression.ZSTD: ["zstd", "-dc"],
    Compression.NONE: ["cat"],
}


@pytest.mark.parametrize("kind", list(Compression))
def test_compressor_with_system_tools(kind: Compression, payload: bytes, small: bytes) -> None:
    data = small + payload[: MiB] if kind in (Compression.XZ, Compression.BZIP2) else payload
    c = compress.compressor(kind)
    parts = []
    view = memoryview(data)
    for i in range(0, len(data), 300_001):
        parts.append(c.compress(view[i : i + 300_001]))
    parts.append(c.finish())
    blob = b"".join(parts)
    if kind != Compression.NONE:
        assert compress.detect(blob) == kind
        assert len(blob) < len(data)
    out = subprocess.run(TOOLS[kind], input=blob, capture_output=True, check=True).stdout
    assert out == data


def test_compressor_settings() -> None:
    import lzma

    c = compress.compressor(Compression.XZ)
    blob = c.compress(b"hello" * 1000) + c.finish()
    assert lzma.decompress(blob) == b"hello" * 1000
    info = subprocess.run(["xz", "--robot", "-lv", "-"], input=blob, capture_output=True)
    if info.returncode == 0:  # xz -l can't read stdin in every version
        assert b"CRC64" in info.stdout
    else:
        assert blob[6:8] == b"\x00\x04"  # stream flags: CRC64
    c = compress.compressor(Compression.ZSTD)
    blob = c.compress(b"hello" * 1000) + c.finish()
    assert blob[4] & 0x04  # content checksum flag
    c = compress.compressor(Compression.BZIP2)
    assert (c.compress(b"a") + c.finish()).startswith(b"BZh9")


@pytest.mark.parametrize("kind", list(Compression))
def test_compressed_writer_round_trip(kind: Compression, payload: bytes, tmp_path: Path) -> None:
    data = payload[: 2 * MiB] if kind in (Compression.XZ, Compression.BZIP2) else payload
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with compress.compressed_writer(fd, kind, JobContext()) as w:
            for i in range(0, len(data), MiB):
                w.write(data[i : i + MiB])
    finally:
        os.close(fd)
    assert xz_children() == []
    assert subprocess.run([*TOOLS[kind], str(out)], capture_output=True, check=True).stdout == data
    assert decompress_file(out) == data


@pytest.mark.parametrize("kind", list(Compression))
def test_compressed_writer_to_pipe(kind: Compression, small: bytes) -> None:
    r, w = os.pipe()
    received = []
    reader = threading.Thread(
        target=lambda: received.append(subprocess.run(TOOLS[kind], stdin=r, capture_output=True).stdout))
    reader.start()
    try:
        writer = compress.compressed_writer(w, kind, JobContext())
        for i in range(0, len(small), 100_000):
            writer.write(small[i : i + 100_000])
        writer.close()
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert received == [small]


@pytest.mark.parametrize("kind", list(Compression))
def test_compressed_writer_broken_pipe(kind: Compression, payload: bytes) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(TransferError, match="^Failed to write: Broken pipe$"):
            with compress.compressed_writer(w, kind, JobContext()) as writer:
                for i in range(0, 2 * MiB, MiB):
                    writer.write(payload[i : i + MiB])
    finally:
        os.close(w)
    assert xz_children() == []


def test_compressed_writer_abort_and_cancel(payload: bytes, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out.xz", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        ctx = JobContext()
        writer = compress.compressed_writer(fd, Compression.XZ, ctx)
        writer.write(payload[:MiB])
        assert len(xz_children()) == 1
        writer.abort()
        assert xz_children() == []
        ctx = JobContext()
        with pytest.raises(Canceled):
            with compress.compressed_writer(fd, Compression.XZ, ctx) as writer:
                writer.write(payload[:MiB])
                ctx.cancel.set()
                writer.write(payload[:MiB])
        assert xz_children() == []
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Sparse files


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sparse_payload() -> bytes:
    rng = random.Random(5)
    parts = []
    for i in range(160):  # 10 MiB: data, zero runs, unaligned zeros
        r = i % 5
        if r == 0:
            parts.append(rng.randbytes(65536))
        elif r == 1:
            parts.append(bytes(30000) + rng.randbytes(5536) + bytes(30000))
        else:
            parts.append(bytes(65536))
    parts.append(rng.randbytes(1234))  # an odd tail
    parts.append(bytes(3 * 65536 + 17))  # trailing zeros: a trailing hole
    return b"".join(parts)


@pytest.mark.parametrize("pieces", ["aligned", "odd", "tiny", "memoryview", "zeros-skipped"])
def test_sparse_writer(pieces: str, tmp_path: Path) -> None:
    """The same file whatever the pieces; with zeros-skipped, pieces of
    nothing but zeros go to skip() instead (importd.local does that, the
    writer in another thread), also where they begin or end mid-block."""
    data = sparse_payload()
    path = tmp_path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = sparse.SparseWriter(fd)
        rng = random.Random(7)
        i = skipped = 0
        while i < len(data):
            n = {"aligned": MiB, "odd": rng.randrange(1, 300_000), "tiny": rng.randrange(1, 9000),
                 "memoryview": 123_457, "zeros-skipped": rng.randrange(1, 40_000)}[pieces]
            piece = data[i : i + n]
            if pieces == "zeros-skipped" and (zeros := sparse.zero_run(piece)) is not None:
                w.skip(zeros)
                skipped += 1
            else:
                w.write(memoryview(piece) if pieces == "memoryview" else piece)
            i += n
        assert w.finish() == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert os.path.getsize(path) == len(data)
    assert skipped > 50 or pieces != "zeros-skipped"
    # 32 of 160 blocks are random, 32 partly: about 4 MiB of 10 are data
    assert allocated(path) <= 4.5 * MiB, allocated(path)


def _every_other_block(blocks: int) -> bytes:
    """4 KiB blocks: data, zeros, data, zeros...; the data blocks start with
    a zero byte and end with one, so that each is compared in full."""
    rng = random.Random(8)
    data = [b"\0" + rng.randbytes(4094) + b"\0" if i % 2 == 0 else bytes(4096) for i in range(blocks)]
    return b"".join(data)


@pytest.mark.parametrize("how", ["writer", "copy"])
def test_holes_at_the_file_system_block_size(how: str, tmp_path: Path) -> None:
    """Every 4 KiB block of zeros (the file system's block, st_blksize)
    becomes a hole, as with systemd's sparse_write(): a 4 MiB image of
    alternating data and zero blocks takes 2 MiB."""
    data = _every_other_block(1024)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.fstat(fd).st_blksize == 4096
        assert sparse.block_size_of(fd) == 4096
        if how == "writer":
            w = sparse.SparseWriter(fd)
            for i in range(0, len(data), 100_000):
                w.write(data[i : i + 100_000])
            assert w.finish() == len(data)
        else:
            src = tmp_path / "src"
            src.write_bytes(data)
            with open(src, "rb") as f:
                sparse.copy_sparse(f.fileno(), fd, JobContext(), len(data))
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert allocated(path) == 2 * MiB


@pytest.mark.root
def test_sparse_writer_syscalls(tmp_path: Path) -> None:
    """Adjacent non-zero blocks are written with one call, not one per block
    (counted with strace)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys\n"
        "from importd.sparse import SparseWriter\n"
        "data = os.urandom(4 << 20) + bytes(1 << 20) + os.urandom(1 << 20)\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC)\n"
        "w = SparseWriter(fd)\n"
        "os.write(2, b'START\\n')\n"
        "w.write(data[:100]); w.write(data[100:])\n"
        "w.finish()\n"
    )
    r = subprocess.run(
        ["strace", "-f", "-e", "trace=write,pwrite64,pwritev,pwritev2,ftruncate", sys.executable, str(script),
         str(tmp_path / "f")],
        capture_output=True, text=True, check=True, cwd=Path(compress.__file__).parent.parent.parent,
    )
    trace = r.stderr[r.stderr.index("START"):]
    writes = [line for line in trace.splitlines() if line.startswith(("pwrite", "[pid"))]
    assert len(writes) == 2, trace  # 64 KiB block + rest of the 4 MiB (pwritev), then 1 MiB
    assert os.path.getsize(tmp_path / "f") == 6 * MiB


def test_zero_run() -> None:
    assert sparse.zero_run(bytes(1 << 20)) == 1 << 20
    assert sparse.zero_run(bytes(17)) == 17
    assert sparse.zero_run(b"") is None
    assert sparse.zero_run(bytes(1 << 20) + b"\0") is None  # longer than one chunk: written, not skipped
    for at in (0, 1, 4095, 500_000, (1 << 20) - 1):
        data = bytearray(1 << 20)
        data[at] = 1
        assert sparse.zero_run(bytes(data)) is None, at


def test_sparse_writer_skip_completes_a_block_begun_with_data(tmp_path: Path) -> None:
    """skip() in the middle of a block: the block is written (with its zeros),
    the whole blocks after it are holes, a short last block is kept."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = sparse.SparseWriter(fd, block_size=4096)
        w.write(b"a" * 100)
        w.skip(100)
        w.skip(5 * 4096)
        w.write(b"b")
        w.skip(10)
        assert w.finish() == 100 + 100 + 5 * 4096 + 1 + 10
    finally:
        os.close(fd)
    expected = b"a" * 100 + bytes(100 + 5 * 4096) + b"b" + bytes(10)
    assert path.read_bytes() == expected
    assert allocated(path) <= 3 * 4096  # the first block and the last: the rest a hole


def test_sparse_writer_from_offset(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"header")
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 6, os.SEEK_SET)
        w = sparse.SparseWriter(fd, block_size=4096)
        w.write(b"a" * 5000 + bytes(20000) + b"b")
        assert w.finish() == 6 + 25001
    finally:
        os.close(fd)
    assert path.read_bytes() == b"header" + b"a" * 5000 + bytes(20000) + b"b"


def test_decompress_into_sparse_file(samples, tmp_path: Path) -> None:
    path, expected = samples["xz-multi-block"]
    out = tmp_path / "image.raw"
    src = os.open(path, os.O_RDONLY)
    dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        w = sparse.SparseWriter(dst)
        for chunk in compress.decompressed_chunks(src, JobContext()):
            w.write(chunk)
        assert w.finish() == len(expected)
    finally:
        os.close(src)
        os.close(dst)
    assert out.read_bytes() == expected
    assert allocated(out) < len(expected) * 0.7


def _make_sparse_source(path: Path) -> bytes:
    """A file with holes, data, and zeros written as data."""
    rng = random.Random(9)
    layout = [("hole", 3 * MiB), ("data", MiB + 5), ("zeros", 2 * MiB), ("data", 300_000), ("hole", 4 * MiB),
              ("data", 2 * MiB), ("hole", 2 * MiB)]
    expected = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for what, n in layout:
            if what == "data":
                chunk = rng.randbytes(n)
                os.pwrite(fd, chunk, len(expected))
            else:
                chunk = bytes(n)
                if what == "zeros":
                    os.pwrite(fd, chunk, len(expected))
            expected += chunk
        os.ftruncate(fd, len(expected))
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expected)
    return bytes(expected)


def test_copy_sparse_ext4(tmp_path: Path) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    expected = _make_sparse_source(src_path)
    assert allocated(src_path) >= 5 * MiB  # the zeros were written
    seen: list[float] = []
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        sparse.copy_sparse(src, dst, JobContext(progress=seen.append), len(expected))
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.read_bytes() == expected
    assert allocated(dst_path) <= 3.5 * MiB  # the data only: holes kept, zeros dropped
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_copy_sparse_cancel(tmp_path: Path) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    expected = _make_sparse_source(src_path)
    ctx = JobContext()
    ctx.cancel.set()
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        with pytest.raises(Canceled):
            sparse.copy_sparse(src, dst, ctx, len(expected))
    finally:
        os.close(src)
        os.close(dst)


def test_copy_sparse_btrfs_reflinks(btrfs_mount: Path) -> None:
    src_path, dst_path = btrfs_mount / "src", btrfs_mount / "dst"
    data = os.urandom(16 * MiB)
    src_path.write_bytes(data)
    run(f"sync -f {src_path}")
    before = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(btrfs_mount)],
                            capture_output=True, text=True, check=True).stdout
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        sparse.copy_sparse(src, dst, JobContext(), len(data))
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.read_bytes() == data
    frag = subprocess.run(["filefrag", "-v", str(dst_path)], capture_output=True, text=True, check=True).stdout
    assert "shared" in frag, frag
    after = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(btrfs_mount)],
                           capture_output=True, text=True, check=True).stdout
    # Total, Exclusive, Set shared: all data is shared, none exclusive
    total, exclusive, shared = (int(x) for x in after.splitlines()[1].split()[:3])
    assert total == 2 * len(data) and exclusive == 0 and shared == len(data), (before, after)
