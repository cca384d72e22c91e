"""xz through an ``xz`` child process, both ways: multi-threaded, about
twice as fast as liblzma through the ``lzma`` module for a file of several
blocks (``parallel``; one block is decoded in-process, as without an ``xz``
binary).  The child is started through ``imagepool.spawn``: killed and
reaped on every way out.

xz(1) itself fails on trailing garbage (and on stream padding that is not a
multiple of four bytes), in words that do not say so ("Compressed data is
corrupt", "Unexpected end of input"): unless a file ends cleanly, the input
is fed to it through an ``xzstream.XzStreams``, which keeps both from it and
tells where the garbage starts."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import time
import zlib
from collections.abc import Generator
from typing import Any

from imagepool import spawn
from importd.compress import sink, xzstream
from importd.compress.formats import Compression, trailing_garbage, truncated
from importd.compress.source import PIPE_SIZE, POLL_MS, Source, grow_pipe, pipe_available
from importd.compress.xzstream import XzStreams
from importd.context import JobContext, TransferError

# xz writes 8 KiB at a time: a batch of its output is read at once.
BATCH = 256 << 10
BATCH_WAIT = 0.002
_TAIL_READ = 1 << 20  # read at a time when looking for the end of a file's last stream

_XZ_ENV_DROP = ("XZ_OPT", "XZ_DEFAULTS")


def binary() -> str | None:
    return shutil.which("xz")


def _xz_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _XZ_ENV_DROP}
    env["LC_ALL"] = "C"
    return env


def _child_message(tail: list[str]) -> str:
    """The last thing xz said, without its "xz: (stdin): " prefix."""
    lines = [line.strip() for line in tail if line.strip()]
    if not lines:
        return ""
    return re.sub(r"^[^:]*xz: (\((stdin|stdout)\): )?", "", lines[-1])


def _ends_cleanly(src: Source) -> bool:
    """Whether the regular file SRC ends as xz wants a .xz file to end: in a
    stream footer (with its CRC32 right), then stream padding of a multiple
    of four zero bytes.  Read from the end: a few preads."""
    fd = src.fd
    size = os.fstat(fd).st_size
    end = size
    while end > src.start:
        piece = os.pread(fd, min(_TAIL_READ, end - src.start), max(src.start, end - _TAIL_READ))
        stripped = piece.rstrip(b"\0")
        end -= len(piece) - len(stripped)
        if stripped or not piece:
            break
    if (size - end) % 4 or (end - src.start) % 4 or end - src.start < 24:
        return False
    footer = os.pread(fd, 12, end - 12)
    return (len(footer) == 12 and footer[10:] == b"YZ" and footer[8] == 0 and not footer[9] & 0xF0
            and zlib.crc32(footer[4:10]) == int.from_bytes(footer[:4], "little"))


def parallel(head: bytes) -> bool:
    """Whether a file that starts with HEAD is worth the xz child: its first
    block header records its sizes, as xz's multi-threaded compressor writes
    them (one block of several, which the child decodes in parallel).  A
    single-threaded compressor's one block is decoded faster in-process:
    xz(1) writes its output 8 KiB at a time, and into a pipe that costs it
    ~40% more than the decoding (11.2 s instead of 8.1 s for the
    benchmark's 2 GB; liblzma in-process: 9.9 s with the writes)."""
    if len(head) < 14 or head[12] == 0:  # no block header (the index first: an empty stream)
        return True
    return bool(head[13] & 0xC0)


# The decoding child's threads and memory: one thread per CPU, at most
# MAX_THREADS (a download or a disk feeds it; 4 threads decode ~1 GB/s of
# xz -6 output, more than either gives), and xz's soft limit for threaded
# decoding, which makes it use fewer threads for files whose blocks are huge
# (xz -9: 192 MiB each) rather than holding several of them.  xz -6's blocks
# (24 MiB) need ~75 MB a thread: 2 CPUs 155 MB, at most ~300 MB.
MAX_THREADS = 4
MEMLIMIT_MT = "320MiB"


def decompress_argv(xz: str) -> list[str]:
    threads = min(os.cpu_count() or 1, MAX_THREADS)
    return [xz, "--decompress", "--stdout", f"--threads={threads}", f"--memlimit-mt-decompress={MEMLIMIT_MT}"]


def decompress(src: Source, xz: str, ctx: JobContext, limit: int) -> Generator[bytes, None, None]:
    """Run ``xz -dc -TN`` (decompress_argv) and read its output.

    A regular file that ends as a .xz file should is the child's stdin
    itself (the shared file offset tells our progress).  Anything else -- a
    pipe or socket, or a file that ends otherwise -- is copied to the
    child's stdin by the same poll() loop that reads its stdout, so there is
    no helper thread to stop; on the way an XzStreams follows the streams,
    so that the child is given neither trailing garbage (which is refused
    once xz has checked what comes before it) nor stream padding (any number
    of zero bytes is fine, as in systemd-import), and a truncated stream is
    told apart from a corrupt one."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    in_r = in_w = -1
    child: spawn.Child | None = None
    streams = None if src.regular and _ends_cleanly(src) else XzStreams()
    try:
        grow_pipe(out_r)
        if streams is None:
            child_stdin = src.fd
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            grow_pipe(in_w)
            os.set_blocking(in_w, False)
            child_stdin = in_r
        try:
            child = spawn.Child(decompress_argv(xz), stdin=child_stdin, stdout=out_w,
                                env=_xz_env(), name="xz")
        except OSError as e:
            raise TransferError(f"Failed to start xz: {e.strerror}") from None
        os.close(out_w)
        out_w = -1
        if in_r >= 0:
            os.close(in_r)
            in_r = -1

        def next_input(wait: bool) -> bytes | None:
            """What to give xz next (maybe nothing yet); None when there
            is no more: at the end of the input or of its last stream."""
            assert streams is not None
            data = src.read(PIPE_SIZE, wait=wait)
            if not data:
                return None
            data = streams.feed(data)
            if streams.garbage_at is not None and not data:
                return None
            return data

        poller = select.poll()
        poller.register(out_r, select.POLLIN)
        feeding = in_w >= 0  # still copying input to the child
        # What detect() read ahead goes first.
        first = next_input(True) if feeding else b""
        pending = memoryview(first or b"")
        # Nothing more to read after pending:
        last = first is None or (streams is not None and streams.garbage_at is not None)
        watching: int | None = None  # the fd registered besides out_r
        while True:
            ctx.check()
            if feeding and not pending and last:
                feeding = False
                os.close(in_w)
                in_w = -1
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
            for fd, _ in poller.poll(POLL_MS):
                if fd == out_r:
                    # xz writes 8 KiB at a time: waking for each costs more
                    # CPU than the decoding.  Let a batch accumulate first.
                    if 0 < pipe_available(out_r) < BATCH:
                        time.sleep(BATCH_WAIT)
                    out = os.read(out_r, limit)
                    if not out:
                        break
                elif fd == src.fd and feeding and not pending:
                    data = next_input(False)
                    if data is None:
                        last = True
                    else:
                        pending = memoryview(data)
                        last = streams is not None and streams.garbage_at is not None
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
                    if streams is None:
                        src.report(os.lseek(src.fd, 0, os.SEEK_CUR) - src.start)
                    yield out
                continue
            break  # EOF on xz's stdout

        if in_w >= 0:
            os.close(in_w)
            in_w = -1
        rc = child.wait(ctx.check)
        outcome = xzstream.COMPLETE if streams is None else streams.finish()
        if rc < 0:
            raise TransferError(f"xz was killed by signal {signal.Signals(-rc).name}")
        msg = _child_message(child.tail) or f"xz exited with status {rc}"
        if rc != 0:
            # xz saw everything but padding and trailing garbage: it knows.
            if msg == "Unexpected end of input":
                raise truncated(Compression.XZ)
            raise TransferError(f"Failed to decompress xz data: {msg}")
        if outcome == xzstream.TRUNCATED:  # in what was held back: the start of another stream
            raise truncated(Compression.XZ)
        if feeding or pending or (streams is not None and not last):
            raise TransferError("Failed to decompress xz data: xz stopped reading its input")
        if streams is not None and streams.garbage_at is not None:
            raise trailing_garbage(Compression.XZ, streams.garbage_at)
        if streams is None:
            src.report(os.lseek(src.fd, 0, os.SEEK_CUR) - src.start)
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            child.kill()


class Writer(sink.Writer):
    """``xz -T0 -c`` writing to the output fd itself; we only feed it."""

    def __init__(self, out_fd: int, xz: str, ctx: JobContext) -> None:
        self.ctx = ctx
        self.child: spawn.Child | None = None
        in_r, self.in_w = os.pipe2(os.O_CLOEXEC)
        try:
            grow_pipe(self.in_w)
            os.set_blocking(self.in_w, False)
            self.child = spawn.Child([xz, "--compress", "--stdout", "--threads=0", "--check=crc64"], stdin=in_r,
                                     stdout=out_fd, env=_xz_env(), name="xz")
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
                    self.poller.poll(POLL_MS)
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
        assert self.child is not None
        try:
            rc = self.child.wait(self.ctx.check)
            if rc == -signal.SIGPIPE:
                raise TransferError("Failed to write: Broken pipe")
            if rc < 0:
                raise TransferError(f"xz was killed by signal {signal.Signals(-rc).name}")
            if rc != 0:
                msg = _child_message(self.child.tail) or f"xz exited with status {rc}"
                if "Broken pipe" in msg:
                    raise TransferError("Failed to write: Broken pipe")
                raise TransferError(f"Failed to compress: {msg}")
        finally:
            self._cleanup()

    def close(self) -> None:
        if self.child is None:
            return
        self._finish()

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1
        if self.child is not None:
            self.child.kill()
            self.child = None

    def __del__(self) -> None:
        self._cleanup()
