"""Following the structure of .xz data as it passes by (the .xz file format,
version 1.1.0: streams made of a header, blocks, an index and a footer, with
stream padding between them), to know where each stream ends and what
comes after the last one: zero padding, another stream, or something else
(trailing garbage); and whether the input ended inside a stream.

Nothing is decoded and little is verified: xz does that.  Block headers
(with their CRC32), LZMA2 chunk headers, index records and stream footers
are read just far enough to step over the data between them.  A block whose
compressed size is neither in its header nor found by walking its LZMA2
chunks (a filter chain that does not end in LZMA2), or anything malformed,
makes the follower give up (``lost``): from then on everything is passed on
and xz says what is wrong.
"""

from __future__ import annotations

import zlib

MAGIC = b"\xfd7zXZ\x00"
_FOOTER_MAGIC = b"YZ"
_CHECK_SIZES = (0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)
_LZMA2 = 0x21
_VARINT_MAX = 9

# What comes next.
_STREAM_HEADER = "stream header"
_BLOCK_START = "block start"
_BLOCK_HEADER = "block header"
_CHUNK = "lzma2 chunk"
_INDEX = "index"
_FOOTER = "stream footer"
_PADDING = "stream padding"
_NEXT_MAGIC = "next stream"
_SKIP = "skip"
_GARBAGE = "garbage"
_LOST = "lost"

# finish() results
COMPLETE = "complete"
TRUNCATED = "truncated"
GARBAGE = "garbage"
LOST = "lost"


def _varints(data: bytes, pos: int, count: int) -> tuple[list[int], int] | None:
    """COUNT multibyte integers from POS on, and the position after them;
    None if they run past DATA or one is longer than 9 bytes."""
    values = []
    for _ in range(count):
        value = 0
        for i in range(_VARINT_MAX + 1):
            if i == _VARINT_MAX or pos >= len(data):
                return None
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        values.append(value)
    return values, pos


class XzStreams:
    """feed() every piece of the input, in order: it returns what of it xz
    should be given -- all of it, but the stream padding after each stream
    (any number of zero bytes is taken as padding; xz itself wants a
    multiple of four) and anything from the start of trailing garbage on.
    The possible start of another stream is held back until its magic
    bytes are complete."""

    def __init__(self) -> None:
        self.offset = 0  # input bytes fed so far
        self.streams = 0  # streams followed to their footer
        self.garbage_at: int | None = None  # input offset where trailing garbage starts
        self.state = _STREAM_HEADER
        self.need = 12  # length of the structure being collected in buf
        self.buf = bytearray()
        self.skip = 0
        self.after_skip = _BLOCK_START
        self.check_size = 0
        self.flags = b""  # the stream flags, from its header
        self.compressed = 0  # compressed bytes of the current block so far
        self.index_size = 0
        self.index_left = -1  # integers of the index still to come; -1: the count is next
        self.integer = 0  # the index integer being read
        self.integer_bytes = 0  # and how many bytes of it were read
        self.candidate = bytearray()  # what may be the magic of another stream
        self.candidate_at = 0

    @property
    def complete(self) -> bool:
        """At the end of a stream, or in the padding after it."""
        return self.state == _PADDING

    def feed(self, data: bytes) -> bytes:
        state = self.state
        if state == _LOST:
            self.offset += len(data)
            return data
        if state == _GARBAGE:
            self.offset += len(data)
            return b""
        out: list[bytes] = []
        keep = 0  # data[keep:i] is still to be passed on
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == _SKIP:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                if not self.skip:
                    self.state = self.after_skip
            elif state == _PADDING:
                if i > keep:
                    out.append(data[keep:i])
                while i < n and data[i] == 0:
                    i += 1
                keep = i  # the padding is dropped
                if i < n:
                    self.state = _NEXT_MAGIC
                    self.candidate.clear()
                    self.candidate_at = self.offset + i
            elif state == _NEXT_MAGIC:
                k = min(len(MAGIC) - len(self.candidate), n - i)
                self.candidate += data[i : i + k]
                i += k
                if not MAGIC.startswith(self.candidate):
                    self.state = _GARBAGE
                    self.garbage_at = self.candidate_at
                    keep = n  # nothing from the candidate on
                    break
                if len(self.candidate) == len(MAGIC):
                    # Another stream: what was held back from earlier pieces
                    # goes out first, the rest of it is in data[keep:i].
                    held = len(self.candidate) - (i - keep)
                    if held:
                        out.append(bytes(self.candidate[:held]))
                    self.state, self.need = _STREAM_HEADER, 12
                    self.buf[:] = self.candidate
            elif state == _LOST:
                break
            else:
                k = min(self.need - len(self.buf), n - i)
                self.buf += data[i : i + k]
                i += k
                if len(self.buf) == self.need:
                    self._parse()
        self.offset += n
        if self.state == _LOST:
            out.append(data[keep:])
        elif self.state != _NEXT_MAGIC and keep < n:
            # (in _NEXT_MAGIC, data[keep:] is the candidate, held back)
            out.append(data[keep:] if keep else data)
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def finish(self) -> str:
        """What the input was, at its end: COMPLETE (streams, maybe with
        padding), TRUNCATED (it ended inside a stream), GARBAGE (something
        after a stream that starts no other stream: see garbage_at) or LOST
        (not followed to the end)."""
        if self.state == _GARBAGE:
            return GARBAGE
        if self.state == _LOST:
            return LOST
        return COMPLETE if self.state == _PADDING else TRUNCATED

    # -- the structures ---------------------------------------------------------

    def _next(self, state: str, need: int, skip: int = 0) -> None:
        """Collect NEED bytes for STATE, after skipping SKIP bytes."""
        self.buf.clear()
        self.need = need
        if skip:
            self.skip, self.after_skip, self.state = skip, state, _SKIP
        else:
            self.state = state

    def _lose(self) -> None:
        self.state = _LOST
        self.buf.clear()

    def _parse(self) -> None:
        h = bytes(self.buf)
        state = self.state
        if state == _STREAM_HEADER:
            flags = h[6:8]
            if (h[:6] != MAGIC or flags[0] != 0 or flags[1] & 0xF0
                    or zlib.crc32(flags) != int.from_bytes(h[8:12], "little")):
                self._lose()
                return
            self.check_size = _CHECK_SIZES[flags[1]]
            self.flags = flags
            self._next(_BLOCK_START, 1)
        elif state == _BLOCK_START:
            if h[0] == 0:  # the index indicator
                self.index_size = 1
                self.index_left = -1
                self.integer = self.integer_bytes = 0
                self._next(_INDEX, 1)
            else:
                self.need = (h[0] + 1) * 4
                self.state = _BLOCK_HEADER
        elif state == _BLOCK_HEADER:
            self._block_header(h)
        elif state == _CHUNK:
            self._chunk(h)
        elif state == _INDEX:
            self._index(h[0])
        elif state == _FOOTER:
            backward = (int.from_bytes(h[4:8], "little") + 1) * 4
            if (h[10:12] != _FOOTER_MAGIC or backward != self.index_size or h[8:10] != self.flags
                    or zlib.crc32(h[4:10]) != int.from_bytes(h[:4], "little")):
                self._lose()
                return
            self.streams += 1
            self.buf.clear()
            self.state = _PADDING

    def _block_header(self, h: bytes) -> None:
        flags = h[1]
        if flags & 0x3C or zlib.crc32(h[:-4]) != int.from_bytes(h[-4:], "little"):
            self._lose()
            return
        sizes = _varints(h, 2, bool(flags & 0x40) + bool(flags & 0x80))
        if sizes is None:
            self._lose()
            return
        values, pos = sizes
        compressed = values[0] if flags & 0x40 else None
        last_filter = -1
        for _ in range((flags & 3) + 1):
            got = _varints(h, pos, 2)  # filter ID, size of its properties
            if got is None:
                self._lose()
                return
            (last_filter, properties), pos = got
            pos += properties
        if pos > len(h) - 4:
            self._lose()
            return
        if compressed is not None:
            self._next(_BLOCK_START, 1, compressed + -compressed % 4 + self.check_size)
        elif last_filter == _LZMA2:
            self.compressed = 0
            self._next(_CHUNK, 1)
        else:
            self._lose()

    def _chunk(self, h: bytes) -> None:
        control = h[0]
        if len(h) == 1:
            if control == 0:  # the end of the LZMA2 data, then block padding and check
                self.compressed += 1
                self._next(_BLOCK_START, 1, -self.compressed % 4 + self.check_size)
            elif control in (1, 2):  # uncompressed chunk: its size follows
                self.need = 3
            elif control >= 0x80:  # LZMA chunk: sizes, maybe properties
                self.need = 6 if control >= 0xC0 else 5
            else:
                self._lose()
            return
        packed = int.from_bytes(h[1:3] if control in (1, 2) else h[3:5], "big") + 1
        self.compressed += len(h) + packed
        self._next(_CHUNK, 1, packed)

    def _index(self, byte: int) -> None:
        """The index, a byte at a time: the number of records and two
        integers per record, then padding and its CRC32."""
        self.index_size += 1
        self.buf.clear()
        self.integer |= (byte & 0x7F) << (7 * self.integer_bytes)
        self.integer_bytes += 1
        if byte & 0x80:
            if self.integer_bytes == _VARINT_MAX:
                self._lose()
            return
        if self.index_left < 0:
            self.index_left = 2 * self.integer  # the number of records
        else:
            self.index_left -= 1
        self.integer = self.integer_bytes = 0
        if self.index_left == 0:
            padding = -self.index_size % 4
            self.index_size += padding + 4
            self._next(_FOOTER, 12, padding + 4)
