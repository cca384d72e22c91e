"""Convert a qcow2 image to a raw disk image, as importd does with a
downloaded ``.qcow2`` file.

Modelled on systemd's qcow2-util: parse the header, walk the active L1 table
and its L2 tables, copy (or decompress) every allocated cluster to its place
in the virtual disk.  Versions 2 and 3 are read, zlib and zstd compressed
clusters included, and the v3 "reads as zero" flag is honoured.  Images that
need more than the file itself are refused: a backing file, encryption, an
external data file; so are extended L2 entries and any incompatible feature
we don't know.  Snapshots are ignored: only the active L1 table is converted.

The input is hostile.  Every header field is checked against the
specification (qemu's docs/interop/qcow2.txt), qemu's own limits and the
file: the L1, refcount and snapshot tables must be cluster-aligned, no larger
than qemu allows, within the file and clear of the header cluster (and the
L1 and refcount tables of each other); no L2 table or guest cluster may lie
in the header, the L1 or the refcount table.  The L1 table is read only as
far as the virtual size needs, no cluster decompresses to more than one
cluster, the work is bounded by the virtual size (itself capped)
and memory by a few batches of at most ``_CHUNK`` of the disk (one L2 table
and one small read-ahead window besides).  Any malformed image gives a
``Qcow2Error``.  The output is written sparsely: unallocated, zero-flagged
and all-zero clusters are never written, and the file is truncated to the
virtual size at the end.  Where the file system can share blocks between the
two files (btrfs, XFS; a download and its image are in the same pool), the
uncompressed clusters are cloned (FICLONERANGE) instead of copied.

Blocking code: importd runs ``convert_to_raw`` in a worker thread.  It uses a
few threads of its own for zero detection, decompression and writing, and
waits for them before it returns or raises.
"""

from __future__ import annotations

import collections
import errno
import os
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from isal import isal_zlib as _inflate_module  # ISA-L's inflate: zlib's results, about twice as fast

from imagepool.errors import PoolError
from importd.sparse import clone_range

_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _inflate_module.error)  # type: ignore[assignment]

MAGIC = b"QFI\xfb"

# The header: the version 2 part, then the version 3 additions.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 32 bytes, up to offset 104
_HEADER_V3_LENGTH = _HEADER_V2.size + _HEADER_V3.size

_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTL2 = 1 << 4

_COMPRESSION_ZLIB = 0
_COMPRESSION_ZSTD = 1

_OFLAG_COPIED = 1 << 63  # refcount is 1: irrelevant when reading, masked off
_OFLAG_COMPRESSED = 1 << 62
_OFLAG_ZERO = 1 << 0
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55 of L1 and standard L2 entries

_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21  # qemu's limit (2 MiB clusters), as systemd's qcow2-util
_MAX_REFCOUNT_ORDER = 6  # 64-bit refcounts
_MAX_L1_ENTRIES = (32 << 20) // 8  # qemu's QCOW_MAX_L1_SIZE, 32 MiB of entries
_MAX_REFCOUNT_TABLE = 8 << 20  # qemu's QCOW_MAX_REFTABLE_SIZE
_MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
_SNAPSHOT_HEADER = 40  # the fixed part of a snapshot table entry
_SECTOR = 512

_CHUNK = 2 << 20  # the virtual disk handled per worker task
_L1_BATCH = 8192  # L1 entries read at a time
_WINDOW = 1 << 20  # read-ahead for compressed clusters (packed back to back)
_IOV_MAX = 1024
_MAX_WORKERS = 4
_CANCEL_EVERY = 4 << 20
_PROGRESS_EVERY = 16 << 20
_ZSTD_MAX_WINDOW = 8 << 20

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE_MAGIC = 0x184D2A50


class Qcow2Error(PoolError):
    """The file is not a qcow2 image we can (or may) convert."""


class Canceled(Exception):
    """The conversion stopped because its cancel event was set."""

    def __init__(self) -> None:
        super().__init__("Transfer canceled")


def is_qcow2(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a qcow2 image."""
    return bytes(head[:4]) == MAGIC


class _Header:
    __slots__ = ("version", "cluster_bits", "size", "l1_size", "l1_offset", "compression", "metadata")

    def __init__(self, version: int, cluster_bits: int, size: int, l1_size: int, l1_offset: int,
                 compression: int, metadata: tuple[tuple[int, int, str], ...]) -> None:
        self.version = version
        self.cluster_bits = cluster_bits
        self.size = size
        self.l1_size = l1_size  # the entries the virtual size needs (the table may have more)
        self.l1_offset = l1_offset
        self.compression = compression
        # (start, end, name) of the header cluster, the L1 table and the
        # refcount table: no L2 table or guest data may be there.
        self.metadata = metadata


def _pread_header(fd: int, file_size: int) -> bytes:
    want = min(file_size, _HEADER_V3_LENGTH + 8)
    data = os.pread(fd, want, 0)
    if len(data) < 4 or not is_qcow2(data):
        raise Qcow2Error("not a qcow2 image")
    return data


def _overlap(start: int, end: int, a: int, b: int) -> bool:
    return start < b and a < end


def _parse_header(fd: int, file_size: int, max_size: int) -> _Header:
    """Every field of the header, checked against the specification
    (docs/interop/qcow2.txt), qemu's limits and the file: whatever we would
    read through it lies within the file and clear of the header."""
    data = _pread_header(fd, file_size)
    if len(data) < _HEADER_V2.size:
        raise Qcow2Error("qcow2 header truncated")
    (
        _magic,
        version,
        backing_file_offset,
        _backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise Qcow2Error(f"qcow2 version {version} not supported")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise Qcow2Error(f"qcow2 cluster_bits {cluster_bits} not supported")
    cluster_size = 1 << cluster_bits

    compression = _COMPRESSION_ZLIB
    if version == 3:
        if len(data) < _HEADER_V3_LENGTH:
            raise Qcow2Error("qcow2 header truncated")
        incompatible, _compatible, _autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            data, _HEADER_V2.size)
        if header_length < _HEADER_V3_LENGTH:
            raise Qcow2Error(f"qcow2 header length {header_length} invalid (at least {_HEADER_V3_LENGTH})")
        if header_length % 8:
            raise Qcow2Error(f"qcow2 header length {header_length} invalid (not a multiple of 8)")
        if header_length > cluster_size:
            raise Qcow2Error(f"qcow2 header length {header_length} exceeds the cluster size {cluster_size}")
        if refcount_order > _MAX_REFCOUNT_ORDER:
            raise Qcow2Error(f"qcow2 refcount_order {refcount_order} invalid (at most {_MAX_REFCOUNT_ORDER})")
        if header_length > _HEADER_V3_LENGTH:
            if len(data) <= _HEADER_V3_LENGTH:
                raise Qcow2Error("qcow2 header truncated")
            compression = data[_HEADER_V3_LENGTH]
    else:
        incompatible = 0

    if backing_file_offset != 0:
        raise Qcow2Error("qcow2 image has a backing file, refusing")
    if crypt_method != 0:
        raise Qcow2Error("qcow2 image is encrypted, refusing")
    if incompatible & _INCOMPAT_DATA_FILE:
        raise Qcow2Error("qcow2 image has an external data file, refusing")
    if incompatible & _INCOMPAT_EXTL2:
        raise Qcow2Error("qcow2 image uses extended L2 entries, refusing")
    if incompatible & _INCOMPAT_CORRUPT:
        raise Qcow2Error("qcow2 image is marked corrupt, refusing")
    known = _INCOMPAT_DIRTY | _INCOMPAT_CORRUPT | _INCOMPAT_DATA_FILE | _INCOMPAT_COMPRESSION | _INCOMPAT_EXTL2
    unknown = incompatible & ~known
    if unknown:
        raise Qcow2Error(f"qcow2 image has unknown incompatible features {unknown:#x}, refusing")
    if compression not in (_COMPRESSION_ZLIB, _COMPRESSION_ZSTD):
        raise Qcow2Error(f"qcow2 compression type {compression} not supported")
    if bool(incompatible & _INCOMPAT_COMPRESSION) != (compression != _COMPRESSION_ZLIB):
        raise Qcow2Error("qcow2 compression type and its feature bit disagree")

    if size > max_size:
        raise Qcow2Error(f"qcow2 virtual size {size} exceeds the limit of {max_size} bytes")
    header_cluster = (0, cluster_size, "the header")

    # The active L1 table.  It may have more entries than the virtual size
    # needs (qemu leaves them after shrinking an image, or after saving VM
    # state); only those needed are read, but all must be in the file, as
    # qemu writes them.
    l2_cover = cluster_size * (cluster_size // 8)
    l1_needed = -(-size // l2_cover)
    if l1_size > _MAX_L1_ENTRIES:
        raise Qcow2Error(f"qcow2 L1 table too large ({l1_size} entries, at most {_MAX_L1_ENTRIES})")
    if l1_size < l1_needed:
        raise Qcow2Error("qcow2 L1 table too small for the virtual size")
    if l1_offset & (cluster_size - 1):
        raise Qcow2Error("qcow2 L1 table offset not cluster-aligned")
    l1_end = l1_offset + l1_size * 8
    if l1_size:
        if l1_offset == 0:
            raise Qcow2Error("qcow2 L1 table overlaps the header")
        if l1_end > file_size:
            raise Qcow2Error("qcow2 L1 table offset beyond end of file")
    l1_table = (l1_offset, -(-l1_end // cluster_size) * cluster_size, "the L1 table")

    # The refcount table: never read, but qemu won't open an image without
    # a sound one, and no L1, L2 table or data may be inside it.
    if refcount_table_clusters == 0:
        raise Qcow2Error("qcow2 image has no refcount table")
    if refcount_table_offset & (cluster_size - 1):
        raise Qcow2Error("qcow2 refcount table offset not cluster-aligned")
    if refcount_table_clusters * cluster_size > _MAX_REFCOUNT_TABLE:
        raise Qcow2Error(f"qcow2 refcount table too large ({refcount_table_clusters} clusters)")
    if refcount_table_offset == 0:
        raise Qcow2Error("qcow2 refcount table overlaps the header")
    refcount_end = refcount_table_offset + refcount_table_clusters * cluster_size
    if refcount_end > file_size:
        raise Qcow2Error("qcow2 refcount table beyond end of file")
    if l1_size and _overlap(l1_offset, l1_end, refcount_table_offset, refcount_end):
        raise Qcow2Error("qcow2 L1 table overlaps the refcount table")
    refcount_table = (refcount_table_offset, refcount_end, "the refcount table")

    # Snapshots are not converted, but their table must be sound too.
    if nb_snapshots > _MAX_SNAPSHOTS:
        raise Qcow2Error(f"qcow2 image has too many snapshots ({nb_snapshots})")
    if snapshots_offset & (cluster_size - 1):
        raise Qcow2Error("qcow2 snapshot table offset not cluster-aligned")
    if nb_snapshots:
        if snapshots_offset == 0:
            raise Qcow2Error("qcow2 snapshot table overlaps the header")
        if snapshots_offset + nb_snapshots * _SNAPSHOT_HEADER > file_size:
            raise Qcow2Error("qcow2 snapshot table beyond end of file")

    return _Header(version, cluster_bits, size, l1_needed, l1_offset, compression,
                   (header_cluster, l1_table, refcount_table) if l1_size else (header_cluster, refcount_table))


def _be64_array(data: bytes | bytearray) -> array[int]:
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _zstd_frame_length(frame: memoryview) -> int:
    """The length of the zstd frame at the start of ``frame`` (whose magic is
    checked), found by walking its block headers."""
    n = len(frame)
    if n < 6:
        raise Qcow2Error("qcow2 compressed cluster is corrupt")
    descriptor = frame[4]
    fcs_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    pos = 5
    pos += 0 if single_segment else 1
    pos += (0, 1, 2, 4)[descriptor & 3]
    pos += ((1 if single_segment else 0), 2, 4, 8)[fcs_flag]
    while True:
        if pos + 3 > n:
            raise Qcow2Error("qcow2 compressed cluster is corrupt")
        header = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        pos += 3
        block_type = (header >> 1) & 3
        if block_type == 3:
            raise Qcow2Error("qcow2 compressed cluster is corrupt")
        pos += 1 if block_type == 1 else header >> 3
        if header & 1:
            break
    if descriptor & 4:
        pos += 4
    if pos > n:
        raise Qcow2Error("qcow2 compressed cluster is corrupt")
    return pos


def _write_all(fd: int, parts: list[Any], offset: int) -> None:
    """pwritev() ``parts`` at ``offset``, finishing short writes."""
    while parts:
        batch = parts[:_IOV_MAX]
        parts = parts[_IOV_MAX:]
        want = sum(len(p) for p in batch)
        n = os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
        if n < want:
            rest = []
            for p in batch:
                if n >= len(p):
                    n -= len(p)
                else:
                    rest.append(memoryview(p)[n:])
                    n = 0
            parts = rest + parts


class _Converter:
    """Walks the tables in the calling thread, which also does all reading of
    the image (and all checks of its offsets).  Zero detection,
    decompression and writing happen in a few worker threads, one batch of
    clusters (up to ``_CHUNK`` of the virtual disk) per task, so that reading,
    decompressing and writing overlap; pread, pwrite, zlib and zstd all
    release the GIL."""

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        file_size: int,
        header: _Header,
        cancel: threading.Event | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.fd = src_fd
        self.dst_fd = dst_fd
        self.file_size = file_size
        self.h = header
        self.size = header.size
        self.cancel = cancel
        self.progress = progress

        bits = header.cluster_bits
        cs = self.cs = 1 << bits
        self.l2_entries = cs // 8
        self.l2_cover = cs * self.l2_entries
        self.zero_cluster = bytes(cs)
        self.chunk_size = max(_CHUNK, cs)
        self.clone_block = _clone_block(src_fd, dst_fd, cs)
        # Non-compressed entries extend a run only when these bits are exactly
        # the next host offset: not compressed, not zero-flagged.
        self.run_mask = _OFFSET_MASK | _OFLAG_COMPRESSED | _OFLAG_ZERO
        # Past this, nothing of the image can overlap its metadata.
        self.metadata_end = max(end for _start, end, _name in header.metadata)

        # Compressed cluster descriptor: offset bits, then sector count.
        self.csize_shift = 62 - (bits - 8)
        self.csize_mask = (1 << (bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.window = b""
        self.window_offset = 0
        if header.compression == _COMPRESSION_ZSTD:
            try:
                import zstandard
            except ImportError:  # pragma: no cover - a packaging problem
                raise Qcow2Error("qcow2 image is zstd compressed, but zstd support is not available") from None
            self.zstandard = zstandard
            self.local = threading.local()
            self.decompress = self.unzstd
        else:
            self.decompress = self.inflate

        # The batch being filled: clusters read into a buffer (as segments
        # (position in buffer, virtual offset, length, offset in the image)),
        # or compressed data.
        self.buf: bytearray | None = None
        self.used = 0
        self.segments: list[tuple[int, int, int, int]] = []
        self.compressed: list[tuple[int, memoryview]] = []
        self.compressed_max = self.chunk_size // cs

        workers = max(1, min(_MAX_WORKERS, len(os.sched_getaffinity(0))))
        self.max_inflight = 2 * workers
        self.max_buffers = self.max_inflight + 1
        self.allocated = 0
        self.free: list[bytearray] = []
        self.inflight: collections.deque[Future[Any]] = collections.deque()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcow2")

        self.checked = 0
        self.reported = 0

    # -- bookkeeping ---------------------------------------------------------

    def tick(self, position: int) -> None:
        """Called as the walk passes virtual offset ``position``."""
        if position - self.checked >= _CANCEL_EVERY:
            self.checked = position
            if self.cancel is not None and self.cancel.is_set():
                raise Canceled()
        if self.progress is not None and position - self.reported >= _PROGRESS_EVERY:
            self.reported = position
            self.progress(position, self.size)

    def submit(self, fn: Callable[..., Any], *args: object) -> None:
        inflight = self.inflight
        while inflight and (len(inflight) >= self.max_inflight or inflight[0].done()):
            inflight.popleft().result()
        inflight.append(self.pool.submit(fn, *args))

    def get_buffer(self) -> bytearray:
        while True:
            if self.free:
                return self.free.pop()
            if self.allocated < self.max_buffers or not self.inflight:
                self.allocated += 1
                return bytearray(self.chunk_size)
            self.inflight.popleft().result()

    def flush_data(self) -> None:
        if self.buf is not None:
            buf, segments = self.buf, self.segments
            self.buf, self.used, self.segments = None, 0, []
            if segments:
                self.submit(self.write_data, buf, segments)
            else:
                self.free.append(buf)

    def flush_compressed(self) -> None:
        if self.compressed:
            items, self.compressed = self.compressed, []
            self.submit(self.write_compressed, items)

    def close(self) -> None:
        """Wait for every task; after this nothing writes to the output."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- the walk ------------------------------------------------------------

    def run(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Canceled()
        h = self.h
        for first in range(0, h.l1_size, _L1_BATCH):
            count = min(_L1_BATCH, h.l1_size - first)
            raw = os.pread(self.fd, count * 8, h.l1_offset + first * 8)
            if len(raw) != count * 8:
                raise Qcow2Error("qcow2 L1 table offset beyond end of file")
            for i, entry in enumerate(_be64_array(raw)):
                start = (first + i) * self.l2_cover
                l2_offset = entry & _OFFSET_MASK
                if l2_offset:
                    if l2_offset & (self.cs - 1):
                        raise Qcow2Error("qcow2 L2 table offset not cluster-aligned")
                    if l2_offset + self.cs > self.file_size:
                        raise Qcow2Error("qcow2 L2 table offset beyond end of file")
                    if l2_offset < self.metadata_end:
                        self.check_clear(l2_offset, l2_offset + self.cs, "L2 table")
                    self.convert_l2(start, l2_offset)
                self.tick(min(start + self.l2_cover, self.size))
        self.flush_data()
        self.flush_compressed()
        while self.inflight:
            self.inflight.popleft().result()
        os.ftruncate(self.dst_fd, self.size)
        if self.progress is not None and self.reported != self.size:
            self.reported = self.size
            self.progress(self.size, self.size)

    def convert_l2(self, start: int, l2_offset: int) -> None:
        cs = self.cs
        table = os.pread(self.fd, cs, l2_offset)
        if len(table) != cs:
            raise Qcow2Error("qcow2 L2 table offset beyond end of file")
        if table == self.zero_cluster:
            return
        entries = _be64_array(table)
        n = min(self.l2_entries, -(-(self.size - start) // cs))
        file_size = self.file_size
        run_mask = self.run_mask
        v2 = self.h.version < 3
        k = 0
        while k < n:
            entry = entries[k]
            if entry & _OFLAG_COMPRESSED:
                self.add_compressed(start + k * cs, entry)
                k += 1
                self.tick(start + k * cs)
                continue
            if entry & _OFLAG_ZERO:
                if v2:
                    raise Qcow2Error("qcow2 zero cluster in a version 2 image")
                k += 1
                continue
            offset = entry & _OFFSET_MASK
            if not offset:
                k += 1
                continue
            if offset & (cs - 1):
                raise Qcow2Error("qcow2 data cluster offset not cluster-aligned")
            if offset >= file_size:
                raise Qcow2Error("qcow2 data cluster offset beyond end of file")
            if self.buf is None:
                self.buf = self.get_buffer()
            j = k + 1
            limit = min(n, k + (self.chunk_size - self.used) // cs)
            following = offset + cs
            while j < limit and following < file_size and entries[j] & run_mask == following:
                j += 1
                following += cs
            if offset < self.metadata_end:
                self.check_clear(offset, following, "data cluster")
            self.add_data(start + k * cs, offset, j - k)
            k = j
            self.tick(start + k * cs)

    def check_clear(self, start: int, end: int, what: str) -> None:
        """[start, end) of the image, an L2 table or guest data, must not be
        in the header, the L1 table or the refcount table."""
        for a, b, name in self.h.metadata:
            if start < b and a < end:
                raise Qcow2Error(f"qcow2 {what} overlaps {name}")

    def add_data(self, virtual: int, offset: int, count: int) -> None:
        """Read ``count`` clusters, contiguous in the image, into the batch."""
        buf = self.buf
        assert buf is not None
        length = count * self.cs
        used = self.used
        view = memoryview(buf)[used : used + length]
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                break
            got += n
        if got < length:
            if offset + got < self.file_size:
                # Shorter than the file was: it changed under us (as qemu's
                # and systemd's readers, an I/O error, not zeros).
                raise OSError(errno.EIO, "qcow2 image changed while it was being converted")
            # The last cluster runs past the end of the file (each one of the
            # run starts inside it): there it reads as zeros.
            view[got:] = bytes(length - got)
        view.release()
        segments = self.segments
        if segments:
            pos, start, seg_length, source = segments[-1]
            if pos + seg_length == used and start + seg_length == virtual and source + seg_length == offset:
                segments[-1] = (pos, start, seg_length + length, source)
            else:
                segments.append((used, virtual, length, offset))
        else:
            segments.append((used, virtual, length, offset))
        self.used = used + length
        if self.used + self.cs > len(buf):
            self.flush_data()

    def read_compressed(self, offset: int, length: int) -> memoryview:
        if offset >= self.file_size:
            raise Qcow2Error("qcow2 compressed cluster offset beyond end of file")
        # The sector count is rounded up: the last cluster may end before it.
        end = min(offset + length, self.file_size)
        start = self.window_offset
        window_end = start + len(self.window)
        if not (start <= offset and end <= window_end):
            # Read ahead only while the clusters come in file order, as qemu
            # packs them; after a jump read just the cluster.  So a hostile
            # table can neither make us read nor keep (every cluster of a
            # batch holds on to its window) a window per cluster.
            sequential = start <= offset <= window_end
            want = min(max(end - offset, _WINDOW if sequential else 0), self.file_size - offset)
            self.window = os.pread(self.fd, want, offset)
            self.window_offset = start = offset
            end = min(end, offset + len(self.window))
        return memoryview(self.window)[offset - start : end - start]

    def add_compressed(self, virtual: int, entry: int) -> None:
        offset = entry & self.coffset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        length = sectors * _SECTOR - (offset & (_SECTOR - 1))
        if offset < self.metadata_end:
            self.check_clear(offset, offset + length, "compressed cluster")
        self.compressed.append((virtual, self.read_compressed(offset, length)))
        if len(self.compressed) >= self.compressed_max:
            self.flush_compressed()

    # -- the workers ---------------------------------------------------------

    def emit(self, virtual: int, parts: list[Any]) -> None:
        """Write ``parts`` at ``virtual``, cut at the end of the virtual disk."""
        room = self.size - virtual
        total = sum(len(p) for p in parts)
        if total > room:
            kept = []
            for p in parts:
                if room <= 0:
                    break
                kept.append(memoryview(p)[:room])
                room -= len(p)
            parts = kept
        _write_all(self.dst_fd, parts, virtual)

    def write_data(self, buf: bytearray, segments: list[tuple[int, int, int, int]]) -> None:
        """Write (or clone) the non-zero clusters of a batch of read clusters."""
        try:
            cs = self.cs
            zero = self.zero_cluster
            view = memoryview(buf)
            for pos, virtual, length, source in segments:
                end = pos + length
                a = pos
                while a < end:
                    while a < end and buf.startswith(zero, a):
                        a += cs
                    if a >= end:
                        break
                    b = a + cs
                    while b < end and not buf.startswith(zero, b):
                        b += cs
                    self.put(virtual + (a - pos), view[a:b], source + (a - pos))
                    a = b
            view.release()
        finally:
            self.free.append(buf)

    def put(self, virtual: int, data: memoryview, source: int) -> None:
        """Clusters read from ``source`` in the image go to ``virtual``."""
        block = self.clone_block
        if block:
            length = min(len(data), self.size - virtual)
            if length % block == 0 and source + length <= self.file_size:
                if clone_range(self.fd, source, length, self.dst_fd, virtual):
                    return
                self.clone_block = 0  # not on this file system after all
        self.emit(virtual, [data])

    def write_compressed(self, items: list[tuple[int, memoryview]]) -> None:
        """Decompress a batch of compressed clusters, write the non-zero ones."""
        cs = self.cs
        zero = self.zero_cluster
        decompress = self.decompress
        group: list[bytes] = []
        group_start = group_end = 0
        for virtual, data in items:
            cluster = decompress(data)
            if cluster == zero:
                continue
            if group and virtual == group_end:
                group.append(cluster)
            else:
                if group:
                    self.emit(group_start, group)
                group = [cluster]
                group_start = virtual
            group_end = virtual + cs
        if group:
            self.emit(group_start, group)

    def inflate(self, data: memoryview) -> bytes:
        """Raw deflate with a 4 KiB window, as qemu writes it; like qemu, a
        stream is good once it has filled the cluster."""
        try:
            cluster = _inflate_module.decompressobj(-12).decompress(data, self.cs)
        except _INFLATE_ERRORS:
            raise Qcow2Error("qcow2 compressed cluster is corrupt") from None
        if len(cluster) != self.cs:
            raise Qcow2Error("qcow2 compressed cluster decompresses to the wrong size")
        return cluster

    def unzstd(self, data: memoryview) -> bytes:
        """Decode zstd frames until one cluster is complete; the last frame
        must end exactly there.  Anything after it is ignored (the sector
        count is rounded up, so it is usually the next compressed cluster)."""
        zstandard = self.zstandard
        dctx = getattr(self.local, "dctx", None)
        if dctx is None:
            dctx = self.local.dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        remaining = self.cs
        pieces: list[bytes] = []
        pos = 0
        while remaining:
            frame = data[pos:]
            if len(frame) < 8:
                raise Qcow2Error("qcow2 compressed cluster is corrupt")
            magic = int.from_bytes(frame[:4], "little")
            if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_MAGIC:
                pos += 8 + int.from_bytes(frame[4:8], "little")
                continue
            if magic != _ZSTD_MAGIC:
                raise Qcow2Error("qcow2 compressed cluster is corrupt")
            try:
                content_size = zstandard.get_frame_parameters(frame).content_size
                if content_size != zstandard.CONTENTSIZE_UNKNOWN and content_size > remaining:
                    raise Qcow2Error("qcow2 compressed cluster decompresses to the wrong size")
                piece = dctx.decompress(frame, max_output_size=remaining)
            except zstandard.ZstdError:
                raise Qcow2Error("qcow2 compressed cluster is corrupt") from None
            if len(piece) > remaining:
                raise Qcow2Error("qcow2 compressed cluster decompresses to the wrong size")
            pieces.append(piece)
            remaining -= len(piece)
            if remaining:
                pos += _zstd_frame_length(frame)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _clone_block(src_fd: int, dst_fd: int, cluster_size: int) -> int:
    """The block size clones between the two files must be aligned to, or 0
    when they can't be shared (different file systems, small clusters)."""
    if os.fstat(src_fd).st_dev != os.fstat(dst_fd).st_dev:
        return 0
    block = os.fstatvfs(dst_fd).f_bsize
    return block if block and cluster_size % block == 0 else 0


def convert_to_raw(
    src_fd: int,
    dst_fd: int,
    *,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_size: int = 64 << 30,
) -> int:
    """Write the virtual disk of the qcow2 image in ``src_fd`` to ``dst_fd``
    (an empty regular file), sparsely, and return its size.

    Both are read and written at explicit offsets; file positions are left
    alone.  ``progress(done, total)`` is called from the calling thread every
    16 MiB or so of the virtual disk and at the end; ``cancel`` is polled
    every few MiB and stops the conversion with ``Canceled``.  Raises
    ``Qcow2Error`` for anything malformed or refused, OSError for I/O errors.
    When it returns or raises, nothing writes to ``dst_fd`` any more."""
    file_size = os.fstat(src_fd).st_size
    header = _parse_header(src_fd, file_size, max_size)
    converter = _Converter(src_fd, dst_fd, file_size, header, cancel, progress)
    try:
        converter.run()
    finally:
        converter.close()
    return header.size
