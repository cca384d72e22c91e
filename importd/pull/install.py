"""The end of a pull: the download kept as the hidden cache entry, and the
local image made from it (a snapshot or reflink) or moved into place."""

from __future__ import annotations

import contextlib
import os

from imagepool import btrfs, fsutil, tree
from imagepool.image import Pool
from importd.context import JobContext, TransferError
from importd.http import Download
from importd.pull.common import PullRequest
from importd.pull.download import Cache


def _set_source_xattrs(path: str, url: str, etag: str | None) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, "user.source_url", url.encode(), follow_symlinks=False)
        if etag:
            os.setxattr(path, "user.source_etag", etag.encode(), follow_symlinks=False)


def install_cache(ctx: JobContext, req: PullRequest, pool: Pool, cache: Cache, info: Download,
                   sidecars: dict[str, bytes]) -> None:
    """Keep the download as the hidden, read-only cache entry."""
    base = cache.final[:-4] if req.kind == "raw" else cache.final
    if cache.temporary:
        _stamp(cache.path, req, info)
        tree.install_image(cache.path, cache.final, force=True, read_only=True, sync=req.sync)
        cache.path, cache.temporary = cache.final, False
    for suffix, data in sidecars.items():
        tree.write_small_file(base + suffix, data, 0o444)


def _stamp(path: str, req: PullRequest, info: Download) -> None:
    """Where a download came from (xattrs) and its Last-Modified (mtime)."""
    _set_source_xattrs(path, req.url, info.etag)
    if info.last_modified:
        with contextlib.suppress(OSError):
            os.utime(path, (info.last_modified, info.last_modified))


def make_local(ctx: JobContext, req: PullRequest, pool: Pool, cache: Cache, sidecars: dict[str, bytes],
                info: Download) -> None:
    name = req.local
    final = os.path.join(pool.path, name + (".raw" if req.kind == "raw" else ""))
    if not req.force and pool.exists(name):
        raise TransferError(f"Image '{name}' already exists.")
    if cache.temporary:
        # Not keeping the download: the download itself becomes the image.
        _stamp(cache.path, req, info)
        tree.install_image(cache.path, final, force=req.force, read_only=req.read_only, sync=req.sync)
        cache.temporary = False
    else:
        tmp = tree.temp_name(pool.path, name + (".raw" if req.kind == "raw" else ""))
        try:
            if req.kind == "raw":
                tree.copy_file_sparse(cache.path, tmp)
                os.chmod(tmp, 0o644)
            else:
                tree.make_tree_copy(cache.path, tmp, False)
                _writable_top(tmp)
            ctx.check()  # a cancel during the copy: no image
            tree.install_image(tmp, final, force=req.force, read_only=req.read_only, sync=req.sync)
        except BaseException:
            tree.remove_path(tmp)
            raise
    ctx.log(f"Created new local image '{name}'.")
    for suffix, data in sidecars.items():
        path = os.path.join(pool.path, name + suffix)
        if os.path.lexists(path) and not req.force:
            ctx.log(f"Settings file {path} already exists, not replacing." if suffix == ".nspawn"
                    else f"{path} already exists, not replacing.")
            continue
        tree.write_small_file(path, data, 0o664 if suffix == ".nspawn" else 0o644)
        if suffix == ".nspawn":
            ctx.log(f"Created new settings file {path}.")


def _writable_top(path: str) -> None:
    """A snapshot of the read-only cache is read-only too: make it writable."""
    if btrfs.is_subvolume(path):
        if btrfs.get_read_only(path):
            btrfs.set_read_only(path, False)
    elif fsutil.get_immutable(path):
        fsutil.set_immutable(path, False)
