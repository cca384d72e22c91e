"""Decompression as the data streams in: in-process decoders for gzip
(python-isal, about twice as fast as zlib), bzip2, zstd and xz of one
block (without an xz binary, every xz: see ``xz.parallel``);
``decompressed_chunks`` picks one by the input's magic number.

Each member decoder turns one gzip member, bzip2 stream or xz stream into
output chunks of at most ``limit`` bytes, whatever the compression ratio (a
decompression bomb must not be inflated in memory).  All of them release the
GIL while they work.

What follows a complete stream (member, frame) is treated alike in every
format, the xz child included: zero bytes are padding, skipped; another
stream is decoded; anything else is trailing garbage and refused, with its
offset (systemd-import refuses it too: liblzma and libbz2 call it bad data,
and its gzip loop never gets past it), once all before it has been decoded
and checked.  Input that ends inside a stream is "truncated".
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Generator
from typing import Any

import zstandard
from isal import isal_zlib

from importd.compress import xz
from importd.compress.formats import MAGIC, MAGIC_MAX, Compression, detect, trailing_garbage, truncated
from importd.compress.source import READ_SIZE, Input, Source
from importd.context import JobContext, TransferError

# liblzma's errors as the lzma module words them, and as xz(1) does: the same
# message whether a file was decoded in-process or by the xz child.
_XZ_WORDS = {
    "Corrupt input data": "Compressed data is corrupt",
    "Input format not supported by decoder": "File format not recognized",
    "Invalid or unsupported options": "Unsupported options",
    "Memory usage limit exceeded": "Memory usage limit reached",
}


def _decode_error(kind: Compression, e: BaseException) -> TransferError:
    text = str(e)
    if kind == Compression.XZ:
        text = _XZ_WORDS.get(text, text)
    return TransferError(f"Failed to decompress {kind} data: {text}")


class _Member:
    """One member's decoder.  Both kinds of decoder object take
    decompress(data, max_length); they differ in how they say that they
    want more input: zlib-style ones by an empty unconsumed_tail (a full
    output buffer may still leave output pending inside: then they are asked
    again), bz2/lzma-style ones by needs_input."""

    def __init__(self, obj: Any, kind: Compression, errors: tuple[type[BaseException], ...]) -> None:
        self.obj = obj
        self.kind = kind
        self.errors = errors
        self.eof = False
        self.unused_data = b""
        self.zlib_style = hasattr(obj, "unconsumed_tail")

    def feed(self, data: bytes, limit: int) -> Generator[bytes, None, None]:
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
            if self.zlib_style:
                data = obj.unconsumed_tail
                if not data and len(out) < limit:
                    return
            else:
                data = b""
                if obj.needs_input:
                    return


def _gzip_member() -> _Member:
    errors: tuple[type[BaseException], ...] = (isal_zlib.error, zlib.error)  # type: ignore[assignment]
    return _Member(isal_zlib.decompressobj(31), Compression.GZIP, errors)


def _bzip2_member() -> _Member:
    return _Member(bz2.BZ2Decompressor(), Compression.BZIP2, (OSError, ValueError, EOFError))


def _xz_member() -> _Member:
    return _Member(
        lzma.LZMADecompressor(format=lzma.FORMAT_XZ), Compression.XZ, (lzma.LZMAError, EOFError)
    )


def _members(src: Source, new_member: Callable[[], Any], kind: Compression, magic: bytes,
             limit: int) -> Generator[bytes, None, None]:
    """Decode a concatenation of members (pigz and parallel bzip2/xz write
    several).  Zero bytes between and after members are skipped, the way
    gzip and xz (stream padding) treat them; anything else after a member
    must start another one (its magic number), or it is trailing garbage,
    refused; input that ends inside a member is truncated."""
    pending = src.read()
    member = None
    first = True
    while True:
        if member is None:
            pending = pending.lstrip(b"\0")
            if not pending:
                pending = src.read()
                if not pending:
                    return
                continue
            if not first and not pending.startswith(magic):
                if len(pending) < len(magic) and magic.startswith(pending):
                    more = src.read()
                    if not more:
                        raise truncated(kind)
                    pending += more
                    continue
                raise trailing_garbage(kind, src.consumed - len(pending))
            member = new_member()
            first = False
        yield from member.feed(pending, limit)
        if member.eof:
            pending = member.unused_data
            member = None
            continue
        pending = src.read()
        if not pending:
            raise truncated(kind)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = b"\x2a\x4d\x18"  # after a byte 0x50..0x5f


def _zstd_magic_prefix(head: bytes | bytearray) -> bool:
    """Whether HEAD may be the start of a frame's magic number."""
    if _ZSTD_MAGIC.startswith(head):
        return True
    return head[0] & 0xF0 == 0x50 and _ZSTD_SKIPPABLE.startswith(head[1:])


class _ZstdFrames:
    """Follows the frame and block headers of a zstd stream (RFC 8878) as it
    passes by, to tell a stream that ends between frames from one that was
    cut short: the streaming reader of python-zstandard does not.  feed()
    returns what of the input the decoder is to see: all of it but zero
    bytes between frames (padding, skipped as for the other formats) and
    trailing garbage (anything else after a frame that starts no frame:
    from there on, nothing); the possible start of another frame is held
    back until its magic number is complete."""

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
        self.started = False  # past the first frame's magic number
        self.offset = 0  # input bytes fed so far
        self.candidate_at = 0
        self.garbage_at: int | None = None

    @property
    def complete(self) -> bool:
        return self.state == "magic" and not self.header and not self.skip

    def feed(self, data: bytes) -> bytes:
        if self.garbage_at is not None:
            return b""
        out: list[bytes] = []
        keep = 0  # data[keep:i] is still to be passed on
        i, n = 0, len(data)
        while i < n and self.state != "unknown":
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                if not self.skip:
                    self.state, self.need = self.after_skip
                continue
            if self.state == "magic" and self.started and not self.header:
                # Between frames: padding, then another frame or garbage.
                if i > keep:
                    out.append(data[keep:i])
                while i < n and data[i] == 0:
                    i += 1
                keep = i
                if i == n:
                    break
                self.state = "next"
                self.candidate_at = self.offset + i
            if self.state == "next":
                k = min(4 - len(self.header), n - i)
                self.header += data[i : i + k]
                i += k
                if not _zstd_magic_prefix(self.header):
                    self.garbage_at = self.candidate_at
                    keep = n
                    break
                if len(self.header) == 4:
                    held = 4 - (i - keep)
                    if held > 0:
                        out.append(bytes(self.header[:held]))
                    header = bytes(self.header)
                    self.header.clear()
                    self.state = "magic"
                    self._parse(header)
                continue
            k = min(self.need - len(self.header), n - i)
            self.header += data[i : i + k]
            i += k
            if len(self.header) == self.need:
                header = bytes(self.header)
                self.header.clear()
                self._parse(header)
        self.offset += n
        if self.garbage_at is None and self.state != "next" and keep < n:
            out.append(data[keep:] if keep else data)
        if len(out) == 1:
            return out[0]
        return b"".join(out)

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
            self.started = True
            if h == _ZSTD_MAGIC:
                self.state, self.need = "descriptor", 1
            elif h[0] & 0xF0 == 0x50 and h[1:] == _ZSTD_SKIPPABLE:
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


def _zstd_frames(src: Source, limit: int) -> Generator[bytes, None, None]:
    frames = _ZstdFrames()

    class _Feed:
        def read(self, n: int = READ_SIZE) -> bytes:
            while True:
                data = src.read(min(n, READ_SIZE) if n > 0 else READ_SIZE)
                if not data:
                    return b""
                data = frames.feed(data)
                if data or frames.garbage_at is not None:
                    return data

    reader = zstandard.ZstdDecompressor().stream_reader(_Feed(), read_size=READ_SIZE,  # type: ignore[arg-type]
                                                        read_across_frames=True)
    while True:
        try:
            out = reader.read(limit)
        except zstandard.ZstdError as e:
            raise _decode_error(Compression.ZSTD, e) from None
        if not out:
            break
        yield out
    if frames.garbage_at is not None:
        raise trailing_garbage(Compression.ZSTD, frames.garbage_at)
    if src.read():  # the reader stopped before the end of the input
        raise TransferError("Failed to decompress zstd data: trailing data after the last frame")
    if not frames.complete:
        raise truncated(Compression.ZSTD)


def _uncompressed(src: Source, limit: int) -> Generator[bytes, None, None]:
    while data := src.read(limit):
        yield data


def decompressed_chunks(
    fd: Input,
    ctx: JobContext,
    *,
    size: int | None = None,
    max_output: int | None = None,
    chunk_size: int = 1 << 20,
) -> Generator[bytes, None, None]:
    """Read FD to its end and yield its contents decompressed, in chunks of
    at most CHUNK_SIZE bytes.  The compression is detected from the first
    bytes.  SIZE, the compressed size if known, drives ctx.progress().  More
    than MAX_OUTPUT bytes of output is an error, raised before they are
    yielded.  Corrupt or truncated input raises TransferError, cancellation
    Canceled; closing the generator early is fine."""
    src = Source(fd, ctx, size)
    head = src.head(MAGIC_MAX)
    kind = detect(head) if len(head) >= MAGIC_MAX else Compression.NONE

    inner: Generator[bytes, None, None]
    if kind == Compression.XZ and (binary := xz.binary()) is not None and xz.parallel(src.head(14)):
        inner = xz.decompress(src, binary, ctx, chunk_size)
    elif kind == Compression.XZ:
        inner = _members(src, _xz_member, kind, MAGIC[Compression.XZ], chunk_size)
    elif kind == Compression.GZIP:
        inner = _members(src, _gzip_member, kind, MAGIC[Compression.GZIP], chunk_size)
    elif kind == Compression.BZIP2:
        inner = _members(src, _bzip2_member, kind, MAGIC[Compression.BZIP2], chunk_size)
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
