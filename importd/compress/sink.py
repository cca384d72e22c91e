"""The output of a compression: writing all of it to a file, pipe or
socket, with the job's cancellation in view; and what a writer offers."""

from __future__ import annotations

import errno
import os
import select
from typing import Any

from importd.compress.source import PIPE_SIZE, POLL_MS
from importd.context import JobContext, TransferError


def write_error(e: OSError) -> TransferError:
    return TransferError(f"Failed to write: {e.strerror or os.strerror(e.errno or errno.EIO)}")


def write_all(fd: int, data: Any, ctx: JobContext) -> None:
    """Write all of DATA to FD, which may be a pipe or socket (even a
    non-blocking one)."""
    view = memoryview(data).cast("B")
    poller: select.poll | None = None
    while view:
        try:
            n = os.write(fd, view[:PIPE_SIZE * 8])
        except (BlockingIOError, InterruptedError):
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            while not poller.poll(POLL_MS):
                ctx.check()
            continue
        except OSError as e:
            raise write_error(e) from None
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


