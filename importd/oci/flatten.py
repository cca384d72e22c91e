"""A stack of overlayfs layers merged into one tree: what the mount stack
shows, as a plain directory or subvolume (``PullOci`` with the flatten
flag).

The bottom layer is snapshotted (btrfs) or copied into the new tree; each
layer above is merged in by, first, removing from the tree what the layer
hides (its whiteouts, the contents of its opaque directories, whatever it
replaces by another kind of file: a directory where the tree has a symlink,
say), then ``cp -a --reflink=auto`` of the layer onto the tree (owners,
modes, xattrs, ACLs, hardlinks, device nodes and times kept; reflinks where
the file system can), and last removing the markers the copy brought along.
The tree is ours alone while it is built (a ``.#`` temporary), so nothing
else can put a symlink in its way.
"""

from __future__ import annotations

import contextlib
import os
import stat

from imagepool import fsutil, spawn, tree
from imagepool.errors import PoolError
from importd.context import JobContext
from importd.oci.whiteouts import OPAQUE_XATTR, is_opaque, is_whiteout


def _markers(layer: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(whiteouts, opaque directories, directories, other files) of LAYER,
    as relative paths, parents before children."""
    whiteouts: list[str] = []
    opaque: list[str] = []
    dirs: list[str] = []
    files: list[str] = []
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(layer):
        rel = os.path.relpath(dirpath, layer)
        if rel != "." and is_opaque(dir_fd):
            opaque.append(rel)
        if rel != ".":
            dirs.append(rel)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = name if rel == "." else os.path.join(rel, name)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            (whiteouts if is_whiteout(st) else files).append(path)
    return whiteouts, opaque, dirs, files


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _strip(target: str, whiteouts: list[str], opaque: list[str]) -> None:
    for rel in whiteouts:
        path = os.path.join(target, rel)
        st = _lstat(path)
        if st is not None and is_whiteout(st):
            os.unlink(path)
    for rel in opaque:
        with contextlib.suppress(OSError):
            os.removexattr(os.path.join(target, rel), OPAQUE_XATTR, follow_symlinks=False)


def _copy(layer: str, target: str) -> None:
    result = spawn.run(["cp", "-a", "--reflink=auto", "--no-target-directory", "--", layer + "/.", target])
    if result.returncode != 0:
        raise PoolError(f"Failed to merge layer '{layer}': {result.message}")


def merge(ctx: JobContext, layer: str, target: str) -> None:
    """Apply the overlayfs layer LAYER onto the tree TARGET."""
    whiteouts, opaque, dirs, files = _markers(layer)
    ctx.check()
    for rel in whiteouts:
        tree.remove_path(os.path.join(target, rel))
    for rel in opaque:
        path = os.path.join(target, rel)
        st = _lstat(path)
        if st is not None:
            tree.remove_path(path)
    for rel in dirs:
        path = os.path.join(target, rel)
        st = _lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(path)  # a file or a symlink (to a directory, maybe): the layer's directory replaces it
    for rel in files:
        path = os.path.join(target, rel)
        st = _lstat(path)
        if st is not None:
            tree.remove_path(path)
    ctx.check()
    _copy(layer, target)
    _strip(target, whiteouts, opaque)


def build(ctx: JobContext, layers: list[str], tmp: str) -> None:
    """The merged tree of LAYERS (bottom first) at the new path TMP."""
    tree.make_tree_copy(layers[0], tmp, False)
    if fsutil.get_immutable(tmp):
        fsutil.set_immutable(tmp, False)
    whiteouts, opaque, _dirs, _files = _markers(layers[0])
    _strip(tmp, whiteouts, opaque)
    for layer in layers[1:]:
        ctx.check()
        merge(ctx, layer, tmp)
