"""One layer from its blob to a finished (not yet installed) tree.

The blob streams from the source into a pipe (a thread of its own, hashed
as it comes); this thread decompresses it (importd.compress: gzip, zstd or
none, bounded output per chunk) and feeds GNU tar (importd.tar's
TarUnpacker: confined, the same rules as pull-tar) that unpacks it into a
new ``.#`` tree.  Download, decompression and unpacking overlap.  The tree
is used only once both digests are right: the blob's (while it streamed)
and the uncompressed one (the configuration's diff_id); then the layer's
markers become overlayfs ones (importd.oci.whiteouts).  Any failure or a
cancel removes the tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable
from typing import Protocol

from imagepool import tree
from importd import compress
from importd.compress import decompressed_chunks
from importd.context import JobContext, TransferError
from importd.oci import manifest as mf
from importd.oci import whiteouts
from importd.piped import Piped
from importd.tar import TarUnpacker

_KIND = {"none": compress.Compression.NONE, "gzip": compress.Compression.GZIP,
         "zstd": compress.Compression.ZSTD}


class Source(Protocol):
    def stream(self, ctx: JobContext, desc: mf.Descriptor, sink: Callable[[bytes], None],
               progress: Callable[[float], None]) -> int: ...


def unpack(ctx: JobContext, source: Source, desc: mf.Descriptor, diff_id: str | None, tmp: str,
           progress: Callable[[float], None], max_size: int) -> list[str]:
    """Unpack the layer DESC into the new tree TMP; returns the directories
    the archive did not list (see whiteouts.fix_implicit).  TMP is removed
    on failure."""
    try:
        tree.make_tree_dir(tmp)
        _unpack(ctx, source, desc, diff_id, tmp, progress, max_size)
        return whiteouts.convert(ctx, tmp)
    except BaseException:
        tree.remove_path(tmp)
        raise


def _unpack(ctx: JobContext, source: Source, desc: mf.Descriptor, diff_id: str | None, tmp: str,
            progress: Callable[[float], None], max_size: int) -> None:
    # The layer's own cancellation (a failure here stops its download), set
    # off by the pull's too.
    lctx = JobContext(threading.Event(), ctx.log, ctx.progress, [])
    ctx.cancel_hooks.append(lctx.request_cancel)
    if ctx.cancel.is_set():
        lctx.request_cancel()
    head = bytearray()

    def sink(chunk: bytes) -> None:
        if len(head) < compress.MAGIC_MAX:
            head.extend(chunk[: compress.MAGIC_MAX - len(head)])
        piped.write(chunk)

    uncompressed = hashlib.sha256()
    piped = Piped(f"layer-{desc.hex[:12]}", lambda: source.stream(lctx, desc, sink, progress), lctx.request_cancel)
    try:
        with piped, TarUnpacker(tmp, lctx, umask=0o777) as unpacker:
            for chunk in decompressed_chunks(piped.reader, lctx, max_output=max_size):
                uncompressed.update(chunk)
                unpacker.write(chunk)
            piped.result()
            unpacker.finish()
    finally:
        with contextlib.suppress(ValueError):
            ctx.cancel_hooks.remove(lctx.request_cancel)
    declared = _KIND[mf.LAYERS[desc.media_type]]
    got = compress.detect(bytes(head)) if len(head) >= compress.MAGIC_MAX else compress.Compression.NONE
    if got != declared:
        raise TransferError(f"Layer {desc.digest} is declared {mf.LAYERS[desc.media_type]} but is {got}, refusing.")
    if diff_id and "sha256:" + uncompressed.hexdigest() != diff_id:
        raise TransferError(f"Uncompressed digest of layer {desc.digest} is sha256:{uncompressed.hexdigest()}, "
                            f"the configuration says {diff_id}, refusing.")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        tree.remove_path(path)
