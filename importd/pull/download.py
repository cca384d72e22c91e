"""The download of a pull's image, streamed into the unpacker as it comes:
a tar child for tarballs, the sparse raw writer (and the qcow2 converter)
for raw images."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from imagepool import tree
from imagepool.image import Pool
from importd import compress, qcow2, sparse, verify
from importd.channel import Channel
from importd.context import JobContext, TransferError
from importd.http import Download, Http, HttpError
from importd.local import size_limit, unpack_tar, write_image
from importd.piped import Piped
from importd.progress import format_bytes
from importd.pull.common import PullRequest, cache_base, cached_etags


@dataclass
class Cache:
    """Where the downloaded image is: a temporary or the existing cache entry."""

    path: str
    final: str
    temporary: bool

    def remove(self) -> None:
        if self.temporary:
            tree.remove_path(self.path)



def download(ctx: JobContext, http: Http, req: PullRequest, pool: Pool,
              progress: Callable[[float], None]) -> tuple[Cache, Download]:
    etags = cached_etags(pool, req.kind, req.url)
    limit = size_limit(pool, req.max_size)
    if req.kind == "tar":
        tmp = tree.temp_name(pool.path, "tar")
    else:
        tmp = tree.temp_name(pool.path, "raw")
    try:
        info = _stream_into(ctx, http, req, tmp, etags, limit, progress)
    except BaseException as e:
        tree.remove_path(tmp)
        tree.remove_path(tmp + ".qcow2")
        if isinstance(e, HttpError):
            ctx.log(str(e))
            raise TransferError("Failed to retrieve image file. (Wrong URL?)") from None
        raise
    if info.not_modified:
        tree.remove_path(tmp)
        ctx.log(f"Image already downloaded. Skipping download. ({info.etag})")
        ctx.log(f"Download of {req.url} complete.")
        base = cache_base(pool, req.kind, req.url, info.etag)
        path = base + (".raw" if req.kind == "raw" else "")
        if not os.path.lexists(path):
            raise TransferError(f"Cached image {path} vanished.")
        return Cache(path, path, False), info
    ctx.log(f"Download of {req.url} complete.")
    base = cache_base(pool, req.kind, req.url, info.etag)
    return Cache(tmp, base + (".raw" if req.kind == "raw" else ""), True), info


class _DirectRaw:
    """Uncompressed raw data needs no decoding: the download thread writes it
    straight to the image file (sparse), skipping the hand-over to the
    other thread.  (A qcow2 file goes over like compressed data: written by
    a thread of its own while the download goes on, then converted.)"""

    def __init__(self, tmp: str, writeback: bool) -> None:
        self.out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.writer = sparse.SparseWriter(self.out, writeback=writeback)

    def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)

    def finish(self) -> int:
        try:
            return self.writer.finish()
        finally:
            self.close()

    def close(self) -> None:
        if self.out >= 0:
            os.close(self.out)
            self.out = -1


def _stream_into(ctx: JobContext, http: Http, req: PullRequest, tmp: str, etags: list[str], limit: int,
                 progress: Callable[[float], None]) -> Download:
    """Download in a helper thread; data that needs decoding (and qcow2)
    goes through a channel to this thread, which unpacks it, so both overlap.
    Uncompressed raw data the download thread writes to the image itself."""
    started = threading.Event()  # the first bytes came (or the download ended)
    direct: list[_DirectRaw] = []
    mode: list[str] = []

    def sink(chunk: bytes) -> None:
        if not mode:
            head = bytes(chunk[:6])
            if req.kind == "raw" and len(head) == 6 and compress.detect(head) == compress.Compression.NONE \
                    and not qcow2.is_qcow2(head[:4]):
                direct.append(_DirectRaw(tmp, req.sync))
                mode.append("direct")
            else:
                mode.append("pipe")
            started.set()
        if direct:
            direct[0].write(chunk)
        else:
            piped.write(chunk)

    def download() -> Download:
        try:
            # Hashing costs ~1 CPU-second per GB: only when it will be checked.
            return http.stream(req.url, sink, etags=etags, max_size=limit, progress=progress,
                               hash=req.verify != verify.VerifyMode.NO)
        finally:
            started.set()

    piped = Piped("download", download, http._interrupt)
    try:
        with piped:
            while not started.wait(0.25):
                ctx.check()
            if direct or not mode:  # written by the download itself, or nothing came (a 304, an error)
                while not piped.wait(0.25):
                    ctx.check()
                info = piped.result()
                if direct:
                    direct[0].finish()
                elif not info.not_modified:
                    _unpack(ctx, req, piped.reader, tmp, limit)  # an empty body: the unpacker says what is wrong
            else:
                _unpack(ctx, req, piped.reader, tmp, limit)
                info = piped.result()
            if not info.not_modified:
                ctx.log(f"Acquired {format_bytes(info.size)} for {req.url}.")
            return info
    finally:
        if direct:
            direct[0].close()


def _unpack(ctx: JobContext, req: PullRequest, reader: Channel, tmp: str, limit: int) -> int:
    """Consume the downloaded stream: returns the size of the unpacked data.
    Progress comes from the download, not from here."""
    quiet = ctx.derive(lambda f: None)
    if req.kind == "tar":
        tree.make_tree_dir(tmp)
        return unpack_tar(quiet, reader, tmp, limit)
    return write_image(quiet, reader, tmp, limit, writeback=req.sync)

