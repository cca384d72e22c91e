"""An unpacked layer made into an overlayfs layer, as mount stacks use them.

GNU tar unpacks a layer as it is; then, walking the new tree through
directory file descriptors (symlinks are never followed):

- ``.wh.NAME`` (OCI's whiteout) becomes what overlayfs understands: a
  character device 0:0 ``NAME`` (or nothing, if NAME itself is in the same
  layer: the spec hides only what lower layers have);
- ``.wh..wh..opq`` (an opaque directory) becomes the xattr
  ``user.overlay.opaque=y`` on its directory (systemd 262 mounts stacks with
  overlayfs' ``userxattr``);
- a directory the archive does not list (tar made it for a member below
  it; tar runs with umask 0777, so such directories are mode 0 and owned by
  root) gets the owner, mode and times of the same directory in the layers
  below, or 0755 when none has it: what Docker and umoci make of such a
  layer.  systemd 262 leaves the markers as plain files (deleted files then
  show through) and such directories at 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from importd.context import JobContext, TransferError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | int) -> bool:
    try:
        if isinstance(path, int):
            return os.getxattr(path, OPAQUE_XATTR) == b"y"
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def convert(ctx: JobContext, root: str) -> list[str]:
    """Turn the OCI markers below ROOT into overlayfs ones; returns the
    directories (relative paths) that the archive did not list."""
    implicit: list[str] = []
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root):
        ctx.check()
        rel = os.path.relpath(dirpath, root)
        names = set(dirnames) | set(filenames)
        for name in sorted(names):
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise TransferError(f"Whiteout '{os.path.join(rel, name)}' is a directory, refusing.")
            os.unlink(name, dir_fd=dir_fd)
            if name == OPAQUE_MARKER:
                os.setxattr(dir_fd, OPAQUE_XATTR, b"y")
                continue
            target = name[len(WHITEOUT_PREFIX):]
            if target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX):
                raise TransferError(f"Bad whiteout '{os.path.join(rel, name)}', refusing.")
            if target in names:
                continue
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        dirnames[:] = [d for d in dirnames if not d.startswith(WHITEOUT_PREFIX)]
        if rel != ".":
            st = os.stat(dir_fd)
            if stat.S_IMODE(st.st_mode) == 0 and st.st_uid == 0 and st.st_gid == 0:
                implicit.append(rel)
    return implicit


def fix_implicit(root: str, implicit: list[str], lowers: list[str]) -> None:
    """Give the directories IMPLICIT of the layer at ROOT the attributes of
    the same directory in the topmost of LOWERS (bottom first) that has it."""
    for rel in implicit:
        source = None
        for lower in reversed(lowers):
            try:
                st = _lstat_below(lower, rel)
            except OSError:
                continue
            if st is None:
                break  # a whiteout or a non-directory hides what is further down
            source = st
            break
        fd = _open_below(root, rel)
        try:
            if source is None:
                os.fchmod(fd, 0o755)
                continue
            os.fchown(fd, source.st_uid, source.st_gid)
            os.fchmod(fd, stat.S_IMODE(source.st_mode))
            os.utime(fd, ns=(source.st_atime_ns, source.st_mtime_ns))
        finally:
            os.close(fd)


def _open_below(root: str, rel: str) -> int:
    """An fd of the directory REL below ROOT, never through a symlink."""
    fd = os.open(root, _OPEN_DIR)
    try:
        for part in rel.split("/"):
            nfd = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat_below(lower: str, rel: str) -> os.stat_result | None:
    """The stat of directory REL in the layer LOWER; None when the layer
    hides it (a whiteout or a non-directory there, or an opaque parent
    without it); OSError when the layer doesn't have it (look further down)."""
    parts = rel.split("/")
    fd = os.open(lower, _OPEN_DIR)
    try:
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if is_opaque(fd):
                    return None
                raise
            if not stat.S_ISDIR(st.st_mode):
                return None
            nfd = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if i == len(parts) - 1:
                return st
        raise OSError(errno.ENOENT, rel)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
