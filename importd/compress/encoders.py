"""Compression of exports: xz through the xz child, gzip with python-isal
(zlib without it), bzip2 and zstd (multi-threaded) in process."""

from __future__ import annotations

import bz2
import lzma
from typing import Any, Protocol

import zstandard
from isal import isal_zlib

from importd.compress import sink, xz
from importd.compress.formats import Compression
from importd.context import JobContext


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
        isal_level = isal_zlib.ISAL_DEFAULT_COMPRESSION if level is None else max(0, min(level, 3))
        return Compressor(isal_zlib.compressobj(isal_level, isal_zlib.DEFLATED, 31))
    if kind == Compression.BZIP2:
        return Compressor(bz2.BZ2Compressor(9 if level is None else level))
    if kind == Compression.ZSTD:
        zc = zstandard.ZstdCompressor(level=3 if level is None else level, write_checksum=True, threads=-1)
        return Compressor(zc.compressobj())
    return Compressor(None)


class _InProcessWriter(sink.Writer):
    def __init__(self, out_fd: int, comp: Compressor, ctx: JobContext) -> None:
        self.out_fd = out_fd
        self.comp = comp
        self.ctx = ctx
        self.closed = False

    def write(self, data: Any) -> None:
        self.ctx.check()
        out = self.comp.compress(data)
        if out:
            sink.write_all(self.out_fd, out, self.ctx)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        out = self.comp.finish()
        if out:
            sink.write_all(self.out_fd, out, self.ctx)

    def abort(self) -> None:
        self.closed = True


def compressed_writer(out_fd: int, kind: Compression, ctx: JobContext) -> sink.Writer:
    """A writer that compresses what it is given with KIND (default level)
    and writes it all to OUT_FD."""
    if kind == Compression.XZ and (binary := xz.binary()) is not None:
        return xz.Writer(out_fd, binary, ctx)
    return _InProcessWriter(out_fd, compressor(kind), ctx)
