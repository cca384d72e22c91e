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
import os
import threading
from collections.abc import Callable
from typing import Protocol

from imagepool import tree
from importd import compress
from importd.compress import decompressed_chunks
from importd.context import JobContext, TransferError
from importd.oci import manifest as mf
from importd.oci import whiteouts
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
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    compress.source.grow_pipe(write_fd)
    lock = threading.Lock()
    state: dict[str, object] = {}  # "error": the download's; "abandoned": we stopped reading
    head = bytearray()

    def sink(chunk: bytes) -> None:
        if len(head) < compress.MAGIC_MAX:
            head.extend(chunk[: compress.MAGIC_MAX - len(head)])
        view = memoryview(chunk)
        while view:
            view = view[os.write(write_fd, view):]

    def downloader() -> None:
        try:
            source.stream(lctx, desc, sink, progress)
        except BaseException as e:  # handed to the unpacking side, unless it caused this
            with lock:
                if "abandoned" not in state:
                    state["error"] = e
        finally:
            os.close(write_fd)

    thread = threading.Thread(target=downloader, name=f"layer-{desc.hex[:12]}", daemon=True)
    thread.start()
    uncompressed = hashlib.sha256()
    try:
        with TarUnpacker(tmp, lctx, umask=0o777) as unpacker:
            for chunk in decompressed_chunks(read_fd, lctx, max_output=max_size):
                uncompressed.update(chunk)
                unpacker.write(chunk)
            thread.join()
            error = state.get("error")
            if isinstance(error, BaseException):
                raise error
            unpacker.finish()
    except BaseException:
        with lock:
            state["abandoned"] = True
            error = state.get("error")
        lctx.request_cancel()
        os.close(read_fd)
        read_fd = -1
        thread.join()
        if isinstance(error, BaseException):  # the download failed first: that explains the rest
            raise error from None
        raise
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        thread.join()
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
