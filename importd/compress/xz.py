"""xz through an ``xz`` child process, both ways: multi-threaded, about
twice as fast as liblzma through the ``lzma`` module (which is the fallback
when there is no ``xz`` binary).  The child is started through
``imagepool.spawn``: killed and reaped on every way out."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import time
from collections.abc import Generator
from typing import Any

from imagepool import spawn
from importd.compress import sink
from importd.compress.source import PIPE_SIZE, POLL_MS, Source, grow_pipe, pipe_available
from importd.context import JobContext, TransferError

# xz writes 8 KiB at a time: a batch of its output is read at once.
BATCH = 256 << 10
BATCH_WAIT = 0.002

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


def decompress(src: Source, xz: str, ctx: JobContext, limit: int) -> Generator[bytes, None, None]:
    """Run ``xz -dc -T0`` and read its output.  A regular file is the child's
    stdin itself (the shared file offset tells our progress); a pipe or socket
    is copied to the child's stdin by the same poll() loop that reads its
    stdout, so there is no helper thread to stop."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    in_r = in_w = -1
    child: spawn.Child | None = None
    try:
        grow_pipe(out_r)
        if src.regular:
            child_stdin = src.fd
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            grow_pipe(in_w)
            os.set_blocking(in_w, False)
            child_stdin = in_r
        try:
            child = spawn.Child([xz, "--decompress", "--stdout", "--threads=0"], stdin=child_stdin, stdout=out_w,
                                env=_xz_env(), name="xz")
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
        pending = memoryview(src.read(PIPE_SIZE) if feeding else b"")
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
            for fd, _ in poller.poll(POLL_MS):
                if fd == out_r:
                    # xz writes 8 KiB at a time: waking for each costs more
                    # CPU than the decoding.  Let a batch accumulate first.
                    if 0 < pipe_available(out_r) < BATCH:
                        time.sleep(BATCH_WAIT)
                    out = os.read(out_r, limit)
                    if not out:
                        break
                elif fd == src.fd and feeding:
                    data = src.read(PIPE_SIZE, wait=False)
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
        rc = child.wait(ctx.check)
        if rc != 0:
            if rc < 0:
                raise TransferError(f"xz was killed by signal {signal.Signals(-rc).name}")
            msg = _child_message(child.tail) or f"xz exited with status {rc}"
            raise TransferError(f"Failed to decompress xz data: {msg}")
        if not fed_everything:
            raise TransferError("Failed to decompress xz data: xz stopped reading its input")
        if src.regular:
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
