"""The compressed input of a decompression: a regular file, a pipe, a
socket or a Channel from another thread of ours (a download), read with the
job's cancellation in view; and pipe helpers."""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import termios

from importd.channel import Channel
from importd.context import JobContext, TransferError

POLL_MS = 250  # how long we wait for input before checking for cancellation
READ_SIZE = 256 * 1024  # compressed bytes read at a time
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def pipe_available(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        available: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        return available
    except OSError:
        return 0


def grow_pipe(fd: int) -> None:
    """Make a pipe hold 1 MiB: fewer, larger reads and writes."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


Input = int | Channel  # what a decompression reads: a file descriptor or a channel


class Source:
    """The compressed input: a regular file (read at its file offset), a pipe
    or a socket (waited on with poll(), so a stalled sender does not keep a
    canceled job alive), or a Channel (waited on likewise).  Counts what was
    consumed and reports progress.  ``fd`` is what a poll() loop watches (a
    channel's eventfd)."""

    def __init__(self, fd: Input, ctx: JobContext, size: int | None) -> None:
        self.channel = fd if isinstance(fd, Channel) else None
        self._fd = fd if isinstance(fd, int) else -1
        self.ctx = ctx
        self.size = size if size and size > 0 else None
        self.regular = self.channel is None and stat.S_ISREG(os.fstat(self._fd).st_mode)
        self.start = os.lseek(self._fd, 0, os.SEEK_CUR) if self.regular else 0
        self.pushed_back = b""  # read ahead while detecting (pipes only)
        self.consumed = 0
        self.eof = False
        self._last_progress = -1.0
        self._poller: select.poll | None = None

    @property
    def fd(self) -> int:
        return self.channel.fileno() if self.channel is not None else self._fd

    def head(self, n: int) -> bytes:
        """The first N bytes (fewer at EOF), left in place for read()."""
        if self.regular:
            data = b""
            while len(data) < n:
                more = os.pread(self._fd, n - len(data), self.start + len(data))
                if not more:
                    break
                data += more
            return data
        while len(self.pushed_back) < n and not self.eof:
            more = self._read_fd(READ_SIZE, wait=True)
            if not more:
                self.eof = True
            self.pushed_back += more
        return self.pushed_back[:n]

    def read(self, n: int = READ_SIZE, wait: bool = True) -> bytes:
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
        if self.channel is not None:
            return self._read_channel(self.channel, n, wait)
        while True:
            if wait and not self.regular:
                self.wait_readable()
            try:
                return os.read(self._fd, n)
            except (BlockingIOError, InterruptedError):
                wait = True
            except OSError as e:
                raise TransferError(f"Failed to read: {e.strerror}") from None

    def _read_channel(self, channel: Channel, n: int, wait: bool) -> bytes:
        while True:
            data = channel.read(n, POLL_MS / 1000 if wait else 0)
            if data is not None:
                return data
            self.ctx.check()
            wait = True

    def wait_readable(self) -> None:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
        while True:
            self.ctx.check()
            if self._poller.poll(POLL_MS):
                return

    def report(self, consumed: int) -> None:
        """ctx.progress(consumed / size), at most about every 1%."""
        if self.size is None:
            return
        fraction = min(consumed / self.size, 1.0)
        if fraction >= self._last_progress + 0.01 or (fraction == 1.0 > self._last_progress):
            self._last_progress = fraction
            self.ctx.progress(fraction)
