"""Compression for transfers: detecting the format of an image, decompressing
it as it streams in, and compressing an export as it streams out.

Everything here is blocking code meant for a transfer's worker thread; it
calls ``ctx.check()`` between chunks, so a canceled transfer stops within a
chunk (or within a quarter of a second while waiting for input), and every
child process it starts is killed and reaped on every way out.

xz is decompressed (and compressed, in ``compressed_writer``) by an ``xz``
child process, which is multi-threaded and about twice as fast as liblzma
through the ``lzma`` module; the module is the fallback when there is no
``xz`` binary.  gzip uses python-isal (about twice as fast as zlib) when it is
installed, bzip2 the ``bz2`` module, zstd python-zstandard.  All of them
release the GIL while they work.
"""

from __future__ import annotations

import bz2
import enum
import errno
import fcntl
import lzma
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import termios
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from importd.context import JobContext, TransferError

try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency
    isal_zlib = None

try:
    import zstandard
except ImportError:  # pragma: no cover - zstandard is a dependency
    zstandard = None


class Compression(enum.StrEnum):
    NONE = "uncompressed"
    XZ = "xz"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    ZSTD = "zstd"


_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZIP2),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)

#: Bytes detect() wants to see; shorter input is taken as uncompressed.
MAGIC_MAX = 6

_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".xz", Compression.XZ),
    (".gz", Compression.GZIP),
    (".bz2", Compression.BZIP2),
    (".zst", Compression.ZSTD),
)

_TAR_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".txz", Compression.XZ),
    (".tgz", Compression.GZIP),
    (".tbz2", Compression.BZIP2),
    (".tzst", Compression.ZSTD),
)


def detect(head: bytes) -> Compression:
    """The compression whose magic number HEAD starts with, else NONE."""
    head = bytes(head[:MAGIC_MAX])
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return Compression.NONE


def from_suffix(filename: str, tar: bool) -> Compression:
    """The compression a file name's suffix stands for (``.xz``, ``.gz``,
    ``.bz2``, ``.zst``; for tarballs also ``.txz``, ``.tgz``, ``.tbz2``,
    ``.tzst``), else NONE."""
    table = _SUFFIXES + _TAR_SUFFIXES if tar else _SUFFIXES
    for suffix, kind in table:
        if filename.endswith(suffix):
            return kind
    return Compression.NONE


def parse_format(fmt: str) -> Compression:
    """The Format argument of the export calls: "" is the same as
    "uncompressed"."""
    if fmt == "":
        return Compression.NONE
    try:
        return Compression(fmt)
    except ValueError:
        raise TransferError(f"Unknown format '{fmt}'") from None


# ---------------------------------------------------------------------------
# Input


_POLL_MS = 250  # how long we wait for input before checking for cancellation
_READ_SIZE = 256 * 1024  # compressed bytes read at a time
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


_BATCH = 256 << 10
_BATCH_WAIT = 0.002


def _pipe_available(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _grow_pipe(fd: int) -> None:
    """Make a pipe hold 1 MiB: fewer, larger reads and writes."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass


class _Source:
    """The compressed input: a regular file (read at its file offset), a pipe
    or a socket (waited on with poll(), so a stalled sender does not keep a
    canceled job alive).  Counts what was consumed and reports progress."""

    def __init__(self, fd: int, ctx: JobContext, size: int | None) -> None:
        self.fd = fd
        self.ctx = ctx
        self.size = size if size and size > 0 else None
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.start = os.lseek(fd, 0, os.SEEK_CUR) if self.regular else 0
        self.pushed_back = b""  # read ahead while detecting (pipes only)
        self.consumed = 0
        self.eof = False
        self._last_progress = -1.0
        self._poller: select.poll | None = None

    def head(self, n: int) -> bytes:
        """The first N bytes (fewer at EOF), left in place for read()."""
        if self.regular:
            data = b""
            while len(data) < n:
                more = os.pread(self.fd, n - len(data), self.start + len(data))
                if not more:
                    break
                data += more
            return data
        while len(self.pushed_back) < n and not self.eof:
            more = self._read_fd(_READ_SIZE, wait=True)
            if not more:
                self.eof = True
            self.pushed_back += more
        return self.pushed_back[:n]

    def read(self, n: int = _READ_SIZE, wait: bool = True) -> bytes:
        """Up to N bytes; b"" at EOF.  With wait=False, the caller knows that
        the fd is readable."""
        if self.pushed_back:
            data, self.pushed_back = self.pushed_back[:n], self.pushed_back[n:]
        elif self.eof:
            return b""
        else:
            data = self._read_fd(n, wait)
            if not data:
                self.eof = True
        self.consumed += len(data)
        self.report(self.consumed)
        return data

    def _read_fd(self, n: int, wait: bool) -> bytes:
        while True:
            if wait and not self.regular:
                self.wait_readable()
            try:
                return os.read(self.fd, n)
            except (BlockingIOError, InterruptedError):
                wait = True
            except OSError as e:
                raise TransferError(f"Failed to read: {e.strerror}") from None

    def wait_readable(self) -> None:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        while True:
            self.ctx.check()
            if self._poller.poll(_POLL_MS):
                return

    def report(self, consumed: int) -> None:
        """ctx.progress(consumed / size), at most about every 1%."""
        if self.size is None:
            return
        fraction = min(consumed / self.size, 1.0)
        if fraction >= self._last_progress + 0.01 or (fraction == 1.0 > self._last_progress):
            self._last_progress = fraction
            self.ctx.progress(fraction)


# ---------------------------------------------------------------------------
# In-process decoders.  Each member decoder turns one gzip member, bzip2
# stream, or xz stream into output chunks of at most `limit` bytes, whatever
# the compression ratio (a decompression bomb must not be inflated in memory).


def _decode_error(kind: Compression, e: BaseException) -> TransferError:
    return TransferError(f"Failed to decompress {kind} data: {e}")


class _Member:
    """One member's decoder; subclasses differ in how the object reports
    that it wants more input."""

    def __init__(self, obj: Any, kind: Compression, errors: tuple[type[BaseException], ...]) -> None:
        self.obj = obj
        self.kind = kind
        self.errors = errors
        self.eof = False
        self.unused_data = b""


class _ZlibMember(_Member):
    """zlib-style objects: decompress(data, max_length), unconsumed_tail."""

    def feed(self, data: bytes, limit: int) -> Iterator[bytes]:
        obj = self.obj
        while True:
            try:
                out = obj.decompress(data, limit)
            except self.errors as e:
                raise _decode_error(self.kind, e) from None
            if out:
                yield out
            if obj.eof:
                self.eof = True
                self.unused_data = obj.unused_data
                return
            data = obj.unconsumed_tail
            # A full output buffer may leave output pending inside the
            # decoder even when all input was taken: ask again.
            if not data and len(out) < limit:
                return


class _NeedsInputMember(_Member):
    """bz2/lzma-style objects: decompress(data, max_length), needs_input."""

    def feed(self, data: bytes, limit: int) -> Iterator[bytes]:
        obj = self.obj
        while True:
            try:
                out = obj.decompress(data, limit)
            except self.errors as e:
                raise _decode_error(self.kind, e) from None
            data = b""
            if out:
                yield out
            if obj.eof:
                self.eof = True
                self.unused_data = obj.unused_data
                return
            if obj.needs_input:
                return


def _gzip_member() -> _ZlibMember:
    if isal_zlib is not None:
        return _ZlibMember(isal_zlib.decompressobj(31), Compression.GZIP, (isal_zlib.error, zlib.error))
    return _ZlibMember(zlib.decompressobj(31), Compression.GZIP, (zlib.error,))


def _bzip2_member() -> _NeedsInputMember:
    return _NeedsInputMember(bz2.BZ2Decompressor(), Compression.BZIP2, (OSError, ValueError, EOFError))


def _xz_member() -> _NeedsInputMember:
    return _NeedsInputMember(
        lzma.LZMADecompressor(format=lzma.FORMAT_XZ), Compression.XZ, (lzma.LZMAError, EOFError)
    )


def _members(src: _Source, new_member: Callable[[], Any], limit: int) -> Iterator[bytes]:
    """Decode a concatenation of members (pigz and parallel bzip2/xz write
    several).  Zero bytes between and after members are skipped, the way
    gzip and xz (stream padding) treat them; input that ends inside a member
    is an error."""
    pending = src.read()
    member = None
    while True:
        if member is None:
            pending = pending.lstrip(b"\0")
            if not pending:
                pending = src.read()
                if not pending:
                    return
                continue
            member = new_member()
        yield from member.feed(pending, limit)
        if member.eof:
            pending = member.unused_data
            member = None
            continue
        pending = src.read()
        if not pending:
            raise TransferError("Compressed stream ended prematurely")


class _ZstdFrames:
    """Follows the frame and block headers of a zstd stream (RFC 8878) as it
    passes by, to tell a stream that ends between frames from one that was
    cut short: the streaming reader of python-zstandard does not."""

    _FCS_SIZE = (0, 2, 4, 8)
    _DID_SIZE = (0, 1, 2, 4)

    def __init__(self) -> None:
        self.state = "magic"
        self.need = 4
        self.header = bytearray()
        self.skip = 0
        self.after_skip = ("magic", 4)
        self.last_block = False
        self.checksum = False

    @property
    def complete(self) -> bool:
        return self.state == "magic" and not self.header and not self.skip

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self.state != "unknown":
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                if not self.skip:
                    self.state, self.need = self.after_skip
                continue
            k = min(self.need - len(self.header), n - i)
            self.header += data[i : i + k]
            i += k
            if len(self.header) == self.need:
                header = bytes(self.header)
                self.header.clear()
                self._parse(header)

    def _skip(self, count: int, then: tuple[str, int]) -> None:
        if count:
            self.skip = count
            self.after_skip = then
            self.state = "skip"
        else:
            self.state, self.need = then

    def _parse(self, h: bytes) -> None:
        state = self.state
        if state == "magic":
            if h == b"\x28\xb5\x2f\xfd":
                self.state, self.need = "descriptor", 1
            elif h[0] & 0xF0 == 0x50 and h[1:] == b"\x2a\x4d\x18":
                self.state, self.need = "skippable", 4
            else:
                self.state = "unknown"  # the decoder reports it
        elif state == "descriptor":
            d = h[0]
            single_segment = bool(d & 0x20)
            self.checksum = bool(d & 0x04)
            fcs = self._FCS_SIZE[d >> 6] or (1 if single_segment else 0)
            rest = (0 if single_segment else 1) + self._DID_SIZE[d & 3] + fcs
            self._skip(rest, ("block", 3))
        elif state == "block":
            v = int.from_bytes(h, "little")
            last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3:
                self.state = "unknown"
                return
            after = (("checksum", 4) if self.checksum else ("magic", 4)) if last else ("block", 3)
            self._skip(1 if btype == 1 else bsize, after)
        elif state == "checksum":
            self.state, self.need = "magic", 4
        elif state == "skippable":
            self._skip(int.from_bytes(h, "little"), ("magic", 4))


def _zstd_frames(src: _Source, limit: int) -> Iterator[bytes]:
    if zstandard is None:  # pragma: no cover
        raise TransferError("zstd decompression is not supported (python-zstandard is missing)")
    frames = _ZstdFrames()

    class _Feed:
        def read(self, n: int = _READ_SIZE) -> bytes:
            data = src.read(min(n, _READ_SIZE) if n > 0 else _READ_SIZE)
            frames.feed(data)
            return data

    reader = zstandard.ZstdDecompressor().stream_reader(_Feed(), read_size=_READ_SIZE, read_across_frames=True)
    while True:
        try:
            out = reader.read(limit)
        except zstandard.ZstdError as e:
            raise _decode_error(Compression.ZSTD, e) from None
        if not out:
            break
        yield out
    if src.read():  # the reader stopped before the end of the input
        raise TransferError("Failed to decompress zstd data: trailing data after the last frame")
    if not frames.complete:
        raise TransferError("Compressed stream ended prematurely")


def _uncompressed(src: _Source, limit: int) -> Iterator[bytes]:
    while data := src.read(limit):
        yield data


# ---------------------------------------------------------------------------
# xz in a child process


_XZ_ENV_DROP = ("XZ_OPT", "XZ_DEFAULTS")


def _xz_binary() -> str | None:
    return shutil.which("xz")


def _xz_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _XZ_ENV_DROP}
    env["LC_ALL"] = "C"
    return env


def _child_message(err: bytes) -> str:
    """The last thing xz said, without its "xz: (stdin): " prefix."""
    lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    return re.sub(r"^[^:]*xz: (\((stdin|stdout)\): )?", "", lines[-1])


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _reap(proc: subprocess.Popen) -> None:
    """Kill a child that still runs and wait for it: no zombie is left."""
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:  # pragma: no cover
            pass
        proc.wait()


def _wait(proc: subprocess.Popen, ctx: JobContext) -> int:
    while True:
        ctx.check()
        try:
            return proc.wait(timeout=_POLL_MS / 1000)
        except subprocess.TimeoutExpired:
            pass


def _xz_child(src: _Source, xz: str, ctx: JobContext, limit: int) -> Iterator[bytes]:
    """Run ``xz -dc -T0`` and read its output.  A regular file is the child's
    stdin itself (the shared file offset tells our progress); a pipe or socket
    is copied to the child's stdin by the same poll() loop that reads its
    stdout, so there is no helper thread to stop."""
    err_fd = os.memfd_create("xz-stderr", os.MFD_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    in_r = in_w = -1
    proc: subprocess.Popen | None = None
    try:
        _grow_pipe(out_r)
        if src.regular:
            child_stdin = src.fd
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            _grow_pipe(in_w)
            os.set_blocking(in_w, False)
            child_stdin = in_r
        try:
            proc = subprocess.Popen(
                ["xz", "--decompress", "--stdout", "--threads=0"], executable=xz,
                stdin=child_stdin, stdout=out_w, stderr=err_fd, close_fds=True, env=_xz_env(),
            )
        except OSError as e:
            raise TransferError(f"Failed to start xz: {e.strerror}") from None
        os.close(out_w)
        out_w = -1
        if in_r >= 0:
            os.close(in_r)
            in_r = -1

        poller = select.poll()
        poller.register(out_r, select.POLLIN)
        feeding = in_w >= 0  # still copying input to the child
        # What detect() read ahead goes first.
        pending = memoryview(src.read(_PIPE_SIZE) if feeding else b"")
        fed_everything = not feeding
        watching: int | None = None  # the fd registered besides out_r
        while True:
            ctx.check()
            if feeding:
                want = in_w if pending else src.fd
                if want != watching:
                    if watching is not None:
                        poller.unregister(watching)
                    poller.register(want, select.POLLOUT if want == in_w else select.POLLIN)
                    watching = want
            elif watching is not None:
                poller.unregister(watching)
                watching = None

            out = b""
            for fd, _ in poller.poll(_POLL_MS):
                if fd == out_r:
                    # xz writes 8 KiB at a time: waking for each costs more
                    # CPU than the decoding.  Let a batch accumulate first.
                    if 0 < _pipe_available(out_r) < _BATCH:
                        time.sleep(_BATCH_WAIT)
                    out = os.read(out_r, limit)
                    if not out:
                        break
                elif fd == src.fd and feeding:
                    data = src.read(_PIPE_SIZE, wait=False)
                    if data:
                        pending = memoryview(data)
                    else:
                        feeding = False
                        fed_everything = True
                        os.close(in_w)
                        in_w = -1
                elif fd == in_w and feeding:
                    try:
                        n = os.write(in_w, pending)
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        # xz is gone; its exit status says why.
                        feeding = False
                        os.close(in_w)
                        in_w = -1
                        continue
                    pending = pending[n:]
            else:
                if out:
                    if src.regular:
                        src.report(os.lseek(src.fd, 0, os.SEEK_CUR) - src.start)
                    yield out
                continue
            break  # EOF on xz's stdout

        if in_w >= 0:
            os.close(in_w)
            in_w = -1
        rc = _wait(proc, ctx)
        if rc != 0:
            if rc < 0:
                raise TransferError(f"xz was killed by signal {signal.Signals(-rc).name}")
            msg = _child_message(_read_all(err_fd)) or f"xz exited with status {rc}"
            raise TransferError(f"Failed to decompress xz data: {msg}")
        if not fed_everything:
            raise TransferError("Failed to decompress xz data: xz stopped reading its input")
        if src.regular:
            src.report(os.lseek(src.fd, 0, os.SEEK_CUR) - src.start)
    finally:
        for fd in (in_r, in_w, out_r, out_w, err_fd):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            _reap(proc)


# ---------------------------------------------------------------------------


def decompressed_chunks(
    fd: int,
    ctx: JobContext,
    *,
    size: int | None = None,
    max_output: int | None = None,
    chunk_size: int = 1 << 20,
) -> Iterator[bytes]:
    """Read FD to its end and yield its contents decompressed, in chunks of
    at most CHUNK_SIZE bytes.  The compression is detected from the first
    bytes.  SIZE, the compressed size if known, drives ctx.progress().  More
    than MAX_OUTPUT bytes of output is an error, raised before they are
    yielded.  Corrupt or truncated input raises TransferError, cancellation
    Canceled; closing the generator early is fine."""
    src = _Source(fd, ctx, size)
    head = src.head(MAGIC_MAX)
    kind = detect(head) if len(head) >= MAGIC_MAX else Compression.NONE

    if kind == Compression.XZ and (xz := _xz_binary()) is not None:
        inner = _xz_child(src, xz, ctx, chunk_size)
    elif kind == Compression.XZ:
        inner = _members(src, _xz_member, chunk_size)
    elif kind == Compression.GZIP:
        inner = _members(src, _gzip_member, chunk_size)
    elif kind == Compression.BZIP2:
        inner = _members(src, _bzip2_member, chunk_size)
    elif kind == Compression.ZSTD:
        inner = _zstd_frames(src, chunk_size)
    else:
        inner = _uncompressed(src, chunk_size)

    total = 0
    try:
        for chunk in inner:
            ctx.check()
            total += len(chunk)
            if max_output is not None and total > max_output:
                raise TransferError(f"Decompressed image exceeds the size limit of {max_output} bytes")
            yield chunk
    finally:
        inner.close()


# ---------------------------------------------------------------------------
# Compression


class _Codec(Protocol):
    def compress(self, data: Any) -> bytes: ...
    def flush(self) -> bytes: ...


class Compressor:
    """compress() what comes, finish() once at the end."""

    def __init__(self, codec: _Codec | None = None) -> None:
        self._codec = codec

    def compress(self, data: Any) -> bytes:
        if self._codec is None:
            return data if isinstance(data, bytes) else bytes(data)
        return self._codec.compress(data)

    def finish(self) -> bytes:
        if self._codec is None:
            return b""
        return self._codec.flush()


def compressor(kind: Compression, level: int | None = None) -> Compressor:
    if kind == Compression.XZ:
        preset = lzma.PRESET_DEFAULT if level is None else level
        return Compressor(lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset))
    if kind == Compression.GZIP:
        if isal_zlib is not None:
            isal_level = isal_zlib.ISAL_DEFAULT_COMPRESSION if level is None else max(0, min(level, 3))
            return Compressor(isal_zlib.compressobj(isal_level, isal_zlib.DEFLATED, 31))
        return Compressor(zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31))
    if kind == Compression.BZIP2:
        return Compressor(bz2.BZ2Compressor(9 if level is None else level))
    if kind == Compression.ZSTD:
        if zstandard is None:  # pragma: no cover
            raise TransferError("zstd compression is not supported (python-zstandard is missing)")
        zc = zstandard.ZstdCompressor(level=3 if level is None else level, write_checksum=True, threads=-1)
        return Compressor(zc.compressobj())
    return Compressor(None)


def _write_error(e: OSError) -> TransferError:
    return TransferError(f"Failed to write: {e.strerror or os.strerror(e.errno or errno.EIO)}")


def _write_all(fd: int, data: Any, ctx: JobContext) -> None:
    """Write all of DATA to FD, which may be a pipe or socket (even a
    non-blocking one)."""
    view = memoryview(data).cast("B")
    poller: select.poll | None = None
    while view:
        try:
            n = os.write(fd, view[:_PIPE_SIZE * 8])
        except (BlockingIOError, InterruptedError):
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            while not poller.poll(_POLL_MS):
                ctx.check()
            continue
        except OSError as e:
            raise _write_error(e) from None
        view = view[n:]


class Writer:
    """What compressed_writer() returns: write() the data, then close();
    abort() (or leaving a ``with`` block with an exception) stops without
    finishing the output."""

    def write(self, data: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _InProcessWriter(Writer):
    def __init__(self, out_fd: int, comp: Compressor, ctx: JobContext) -> None:
        self.out_fd = out_fd
        self.comp = comp
        self.ctx = ctx
        self.closed = False

    def write(self, data: Any) -> None:
        self.ctx.check()
        out = self.comp.compress(data)
        if out:
            _write_all(self.out_fd, out, self.ctx)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        out = self.comp.finish()
        if out:
            _write_all(self.out_fd, out, self.ctx)

    def abort(self) -> None:
        self.closed = True


class _XzChildWriter(Writer):
    """``xz -T0 -c`` writing to the output fd itself; we only feed it."""

    def __init__(self, out_fd: int, xz: str, ctx: JobContext) -> None:
        self.ctx = ctx
        self.proc: subprocess.Popen | None = None
        self.in_w = self.err_fd = -1
        self.err_fd = os.memfd_create("xz-stderr", os.MFD_CLOEXEC)
        try:
            in_r, self.in_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self._cleanup()
            raise
        try:
            _grow_pipe(self.in_w)
            os.set_blocking(self.in_w, False)
            self.proc = subprocess.Popen(
                ["xz", "--compress", "--stdout", "--threads=0", "--check=crc64"], executable=xz,
                stdin=in_r, stdout=out_fd, stderr=self.err_fd, close_fds=True, env=_xz_env(),
            )
        except OSError as e:
            self._cleanup()
            raise TransferError(f"Failed to start xz: {e.strerror}") from None
        except BaseException:
            self._cleanup()
            raise
        finally:
            os.close(in_r)
        self.poller = select.poll()
        self.poller.register(self.in_w, select.POLLOUT)

    def write(self, data: Any) -> None:
        if self.in_w < 0:
            raise TransferError("Failed to write: the writer is closed")
        view = memoryview(data).cast("B")
        try:
            while view:
                self.ctx.check()
                try:
                    n = os.write(self.in_w, view)
                except BlockingIOError:
                    self.poller.poll(_POLL_MS)
                    continue
                except BrokenPipeError:
                    self._finish()  # raises xz's complaint
                    raise TransferError("Failed to write: xz exited early") from None
                view = view[n:]
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1
        assert self.proc is not None
        try:
            rc = _wait(self.proc, self.ctx)
            if rc == -signal.SIGPIPE:
                raise TransferError("Failed to write: Broken pipe")
            if rc < 0:
                raise TransferError(f"xz was killed by signal {signal.Signals(-rc).name}")
            if rc != 0:
                msg = _child_message(_read_all(self.err_fd)) or f"xz exited with status {rc}"
                if "Broken pipe" in msg:
                    raise TransferError("Failed to write: Broken pipe")
                raise TransferError(f"Failed to compress: {msg}")
        finally:
            self._cleanup()

    def close(self) -> None:
        if self.proc is None:
            return
        self._finish()

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1
        if self.err_fd >= 0:
            os.close(self.err_fd)
            self.err_fd = -1
        if self.proc is not None:
            _reap(self.proc)
            self.proc = None

    def __del__(self) -> None:
        self._cleanup()


def compressed_writer(out_fd: int, kind: Compression, ctx: JobContext) -> Writer:
    """A writer that compresses what it is given with KIND (default level)
    and writes it all to OUT_FD."""
    if kind == Compression.XZ and (xz := _xz_binary()) is not None:
        return _XzChildWriter(out_fd, xz, ctx)
    return _InProcessWriter(out_fd, compressor(kind), ctx)
