"""Writing raw images sparsely: blocks of zeros become holes.

SparseWriter takes a stream of data (a decompressed download) and writes only
the blocks that are not all zeros; copy_sparse copies a file, reflinking it
whole where the file system can, else copying only its data extents (and
skipping zero blocks within them).  A block is the target file system's
(st_blksize, 4 KiB mostly): every block of zeros stays a hole, as with
systemd's sparse_write().

Both assume that the target reads as zeros where they do not write: the
file is new (SparseWriter appends past its end; copy_sparse truncates it
first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from typing import Any

from imagepool import fsutil
from importd.context import JobContext

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)

_COPY_PIECE = 4 << 20  # bytes read at a time by copy_sparse
WRITEBACK_EVERY = 32 << 20
_DEFAULT_BLOCK = 4096  # where st_blksize says nothing useful
_MIN_BLOCK = 512
_MAX_BLOCK = 64 * 1024
_ZERO_SPAN = 256 * 1024  # zeros skipped at a time
_MAX_IOV = 512

# errnos that mean "this way of copying is not available here"
_NO_REFLINK = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ETXTBSY}
_NO_COPY_RANGE = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF}

_zero_blocks: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _zero_blocks.get(n)
    if z is None:
        z = _zero_blocks[n] = bytes(n)
    return z


def _pwritev_all(fd: int, buffers: list[Any], offset: int) -> None:
    """Write BUFFERS back to back at OFFSET, however short the writes."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        batch = views[:_MAX_IOV]
        n = os.pwritev(fd, batch, offset) if len(batch) > 1 else os.pwrite(fd, batch[0], offset)
        if n <= 0:  # pragma: no cover - a regular file does not do that
            raise OSError(errno.EIO, "short write")
        offset += n
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def block_size_of(fd: int) -> int:
    """The size of the holes to look for in the file FD: its file system's
    block (st_blksize: 4 KiB on ext4, btrfs, XFS, tmpfs), as systemd's
    sparse_write() finds them (it skips zero runs of 64 bytes and more, so
    every all-zero block stays a hole); at least 512 bytes, at most 64 KiB."""
    try:
        size = os.fstat(fd).st_blksize
    except OSError:
        size = 0
    if not size or size & (size - 1):
        return _DEFAULT_BLOCK
    return max(_MIN_BLOCK, min(size, _MAX_BLOCK))


def _nonzero_runs(data: Any, start: int, end: int, block_size: int) -> list[tuple[int, int]]:
    """The [a, b) ranges of DATA[START:END] made of blocks (counted from
    START) that are not all zeros, adjacent blocks merged.  DATA is bytes or a
    bytearray.

    Only a block whose first byte is zero can be all zeros: the first bytes
    of all blocks are taken at once (a strided slice), and just the blocks
    that start with zero are compared (startswith(), in place, at memcmp()
    speed).  So data costs about a byte per block, not a Python loop over
    its blocks; runs of zeros are skipped _ZERO_SPAN at a time."""
    zero = _zeros(block_size)
    span = _zeros(_ZERO_SPAN)
    span_blocks = _ZERO_SPAN // block_size
    count = (end - start) // block_size
    whole = start + count * block_size
    heads = data[start:whole:block_size]
    runs: list[tuple[int, int]] = []
    run = -1  # the first block of the current run of data
    k = 0
    while k < count:
        z = heads.find(0, k)  # the next block that may be all zeros
        if z < 0:
            z = count
        if z > k and run < 0:
            run = k
        if z == count:
            break
        offset = start + z * block_size
        if not data.startswith(zero, offset):
            if run < 0:
                run = z
            k = z + 1
            continue
        if run >= 0:
            runs.append((start + run * block_size, offset))
            run = -1
        k = z + 1
        offset += block_size
        while k + span_blocks <= count and data.startswith(span, offset):
            k += span_blocks
            offset += _ZERO_SPAN
    if run >= 0:
        runs.append((start + run * block_size, whole))
    if whole < end and not data.startswith(_zeros(end - whole), whole):  # a short last block
        if runs and runs[-1][1] == whole:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((whole, end))
    return runs


_ZERO_RUN_MAX = 1 << 20  # the decoders' chunk size


def zero_run(data: Any) -> int | None:
    """len(DATA) if DATA (bytes, at most 1 MiB) is all zeros, else None: one
    memcmp() for such a chunk, a byte or so for most others."""
    n = len(data)
    if n and n <= _ZERO_RUN_MAX and not data[0] and not data[-1] and _zeros(_ZERO_RUN_MAX).startswith(data):
        return n
    return None


class SparseWriter:
    """Appends data to FD from its current offset on; block_size-aligned
    blocks (counted from that offset) that are all zeros are not written and
    stay holes.  Non-zero runs are written with one pwrite each.  The block
    size is the file system's (block_size_of) unless one is given."""

    def __init__(self, fd: int, block_size: int | None = None, writeback: bool = False) -> None:
        """With WRITEBACK the kernel is asked to start writing each
        WRITEBACK_EVERY bytes out as soon as they are written: when the
        file is to be synced at the end anyway, the disk works while we
        decompress, and the final sync has little left to do."""
        if block_size is None:
            block_size = block_size_of(fd)
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.fd = fd
        self.block_size = block_size
        self.offset = os.lseek(fd, 0, os.SEEK_CUR)  # the logical end so far
        self._partial = bytearray()  # the start of a block not yet complete
        self.writeback = writeback
        self._written_back = self.offset

    def write(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # a memoryview cannot compare in place
        n = len(data)
        if not n:
            return
        bs = self.block_size
        pos = 0
        lead: list[Any] = []  # a completed partial block, if not zeros
        if self._partial:
            pos = min(bs - len(self._partial), n)
            self._partial += memoryview(data)[:pos]
            if len(self._partial) < bs:
                return
            block = bytes(self._partial)
            self._partial.clear()
            if block != _zeros(bs):
                lead = [block]
            else:
                self.offset += bs
        whole = pos + (n - pos) // bs * bs
        base = self.offset + (bs if lead else 0) - pos  # file offset of data[0]
        view = memoryview(data)
        for start, end in _nonzero_runs(data, pos, whole, bs):
            if lead:
                if start == pos:  # the completed block and this run are adjacent
                    _pwritev_all(self.fd, [lead[0], view[start:end]], base + start - bs)
                    lead = []
                    continue
                _pwritev_all(self.fd, lead, self.offset)
                lead = []
            _pwritev_all(self.fd, [view[start:end]], base + start)
        if lead:
            _pwritev_all(self.fd, lead, self.offset)
        self.offset = base + whole
        if whole < n:
            self._partial += view[whole:]
        if self.writeback and self.offset - self._written_back >= WRITEBACK_EVERY:
            with contextlib.suppress(OSError):
                fsutil.start_writeback(self.fd, self._written_back, self.offset - self._written_back)
            self._written_back = self.offset

    def skip(self, n: int) -> None:
        """N bytes of zeros, as write() of them would take them: holes, but
        for the end of a block begun with data (or a short last block)."""
        if self._partial:
            k = min(self.block_size - len(self._partial), n)
            self.write(bytes(k))
            n -= k
            if self._partial or not n:
                return
        whole = n // self.block_size * self.block_size
        self.offset += whole
        if whole < n:
            self._partial += bytes(n - whole)

    def finish(self) -> int:
        """Write what is left, set the file size (trailing holes included)
        and return it."""
        if self._partial:
            if bytes(self._partial) != _zeros(len(self._partial)):
                _pwritev_all(self.fd, [self._partial], self.offset)
            self.offset += len(self._partial)
            self._partial = bytearray()
        os.ftruncate(self.fd, self.offset)
        os.lseek(self.fd, self.offset, os.SEEK_SET)
        return self.offset


class _Progress:
    def __init__(self, ctx: JobContext, size: int) -> None:
        self.ctx = ctx
        self.size = size
        self.last = -1.0

    def __call__(self, done: int) -> None:
        if self.size <= 0:
            return
        fraction = min(done / self.size, 1.0)
        if fraction >= self.last + 0.01 or (fraction == 1.0 > self.last):
            self.last = fraction
            self.ctx.progress(fraction)


def _reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in _NO_REFLINK:
            return False
        raise
    return True


def clone_range(src_fd: int, src_offset: int, length: int, dst_fd: int, dst_offset: int) -> bool:
    """Share LENGTH bytes of SRC_FD at SRC_OFFSET as DST_FD's bytes at
    DST_OFFSET (FICLONERANGE; offsets and length aligned to the file system's
    block size).  False when the file system can't, with nothing changed."""
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, src_offset, length, dst_offset))
    except OSError as e:
        if e.errno in _NO_REFLINK:
            return False
        raise
    return True


def copy_sparse(src_fd: int, dst_fd: int, ctx: JobContext, size: int) -> None:
    """Copy the first SIZE bytes of the regular file SRC_FD to DST_FD (made
    SIZE bytes long): a reflink of the whole file if the file system can do
    it; else the data extents (SEEK_DATA/SEEK_HOLE) with copy_file_range()
    (read/write where that is not possible), leaving holes where the source
    has holes or blocks of zeros."""
    progress = _Progress(ctx, size)
    ctx.check()
    if _reflink(src_fd, dst_fd):
        if os.fstat(dst_fd).st_size != size:
            os.ftruncate(dst_fd, size)
        progress(size)
        return

    # Truncating a file with data makes btrfs flush it all on close; ours are
    # new and empty, so only truncate when there is something to drop.
    if os.fstat(dst_fd).st_size:
        os.ftruncate(dst_fd, 0)
    buf = bytearray(_COPY_PIECE)
    view = memoryview(buf)
    block = block_size_of(dst_fd)
    use_copy_range = hasattr(os, "copy_file_range")
    off = 0
    while off < size:
        ctx.check()
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data, end = off, size  # no SEEK_DATA here: all of it is data
        else:
            end = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        if data >= size:
            break
        pos = data
        while pos < end:
            ctx.check()
            got = os.preadv(src_fd, [view[: min(_COPY_PIECE, end - pos)]], pos)
            if got <= 0:  # the file shrank under us
                end = pos
                break
            for a, b in _nonzero_runs(buf, 0, got, block):
                if use_copy_range:
                    try:
                        _copy_range(src_fd, dst_fd, pos + a, b - a)
                        continue
                    except OSError as e:
                        if e.errno not in _NO_COPY_RANGE:
                            raise
                        use_copy_range = False
                _pwritev_all(dst_fd, [view[a:b]], pos + a)
            pos += got
            progress(pos)
        off = end
    os.ftruncate(dst_fd, size)
    progress(size)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    done = 0
    while done < count:
        n = os.copy_file_range(src_fd, dst_fd, count - done, offset + done, offset + done)
        if n <= 0:
            raise OSError(errno.EINVAL, "copy_file_range made no progress")
        done += n
