"""Compression for transfers: detecting the format of an image
(``formats``), decompressing it as it streams in (``decoders``, with ``xz``
for the xz child and ``xzstream`` to follow its streams), and compressing an export as it streams out
(``encoders``).

Everything here is blocking code meant for a transfer's worker thread; it
calls ``ctx.check()`` between chunks, so a canceled transfer stops within a
chunk (or within a quarter of a second while waiting for input), and every
child process it starts is killed and reaped on every way out.
"""

from importd.compress.decoders import decompressed_chunks
from importd.compress.encoders import Compressor, compressed_writer, compressor
from importd.compress.formats import MAGIC_MAX, Compression, detect, from_suffix, parse_format
from importd.compress.sink import Writer

__all__ = ["MAGIC_MAX", "Compression", "Compressor", "Writer", "compressed_writer", "compressor",
           "decompressed_chunks", "detect", "from_suffix", "parse_format"]
