"""The compression formats: detected by their magic numbers, chosen by a
file name's suffix or by the Format argument of an export."""

from __future__ import annotations

import enum

from importd.context import TransferError


class Compression(enum.StrEnum):
    NONE = "uncompressed"
    XZ = "xz"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    ZSTD = "zstd"


_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZIP2),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)

#: The magic number of each format (zstd: of a frame that is not skippable).
MAGIC: dict[Compression, bytes] = {kind: magic for magic, kind in _MAGIC}

#: Bytes detect() wants to see; shorter input is taken as uncompressed.
MAGIC_MAX = 6

_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".xz", Compression.XZ),
    (".gz", Compression.GZIP),
    (".bz2", Compression.BZIP2),
    (".zst", Compression.ZSTD),
)

_TAR_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".txz", Compression.XZ),
    (".tgz", Compression.GZIP),
    (".tbz2", Compression.BZIP2),
    (".tzst", Compression.ZSTD),
)


def truncated(kind: Compression) -> TransferError:
    """The input ended inside a stream, member or frame."""
    return TransferError(f"Failed to decompress {kind} data: Compressed stream is truncated")


def trailing_garbage(kind: Compression, offset: int) -> TransferError:
    """Data after the end of a complete stream, member or frame that is
    neither padding (zero bytes) nor the start of another one: refused, as
    systemd-import refuses it (liblzma and libbz2 call it bad data there,
    and its gzip decoder never gets past it)."""
    return TransferError(f"Failed to decompress {kind} data: Trailing garbage after the end of the compressed "
                         f"stream, at offset {offset}")


def detect(head: bytes) -> Compression:
    """The compression whose magic number HEAD starts with, else NONE."""
    head = bytes(head[:MAGIC_MAX])
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return Compression.NONE


def from_suffix(filename: str, tar: bool) -> Compression:
    """The compression a file name's suffix stands for (``.xz``, ``.gz``,
    ``.bz2``, ``.zst``; for tarballs also ``.txz``, ``.tgz``, ``.tbz2``,
    ``.tzst``), else NONE."""
    table = _SUFFIXES + _TAR_SUFFIXES if tar else _SUFFIXES
    for suffix, kind in table:
        if filename.endswith(suffix):
            return kind
    return Compression.NONE


def parse_format(fmt: str) -> Compression:
    """The Format argument of the export calls: "" is the same as
    "uncompressed"."""
    if fmt == "":
        return Compression.NONE
    try:
        return Compression(fmt)
    except ValueError:
        raise TransferError(f"Unknown format '{fmt}'") from None
