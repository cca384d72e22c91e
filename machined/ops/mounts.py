"""Bind mounts from the host into a container (machine-dbus.c: BindMount)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import Any

from imagepool.errors import Errno, InvalidArgs, NotSupported
from machined import nsexec
from machined.machine import Machine
from machined.ops.idmap import uid_shift
from machined.ops.leader import add_entry, check_container, oserror, run_helper

log = logging.getLogger(__name__)

PROPAGATE_DIR = "/run/systemd/nspawn/propagate"
INCOMING_DIR = "/run/host/incoming"


def _path_is_normalized(path: str) -> bool:
    if not path.startswith("/") or len(path) >= 4096:
        return False
    if "//" in path:
        return False
    parts = [p for p in path.split("/") if p]
    return not any(p in (".", "..") or len(p) > 255 for p in parts)


def check_bind_mount(m: Machine, src: str, dst: str) -> str:
    """BindMount's checks before polkit's; the destination (SRC if empty)."""
    check_container(m, NotSupported("Bind mounting is only supported on container machines."))
    if not _path_is_normalized(src):
        raise InvalidArgs("Source path must be absolute and normalized.", "source")
    if not dst:
        return src
    if not _path_is_normalized(dst):
        raise InvalidArgs("Destination path must be absolute and normalized.", "destination")
    return dst


def bind_mount(m: Machine, src: str, dst: str, read_only: bool, mkdir: bool) -> None:
    """Bind mount SRC of the host on DST in the machine.

    The mount is cloned from SRC with open_tree() here, made read-only with
    mount_setattr() if asked (before it is attached anywhere), and attached
    by the nsexec helper in the machine's mount namespace and root.  For a
    container of systemd-nspawn, as systemd does, a second clone is attached
    below its propagation directory /run/systemd/nspawn/propagate/<name>/
    and the helper moves it from /run/host/incoming/ inside; if it did not
    propagate there (the host's /run is not a shared mount, as on a host
    without systemd), the helper attaches the first clone directly."""
    dst = check_bind_mount(m, src, dst)
    if uid_shift(m) != 0:
        raise NotSupported("Can't bind mount on container with user namespacing applied.")
    message = f"Failed to mount {src} on {dst} in machine's namespace"

    def clone(src_fd: int) -> int:
        tree = nsexec.open_tree(src_fd, "", nsexec.OPEN_TREE_CLONE | nsexec.OPEN_TREE_CLOEXEC | nsexec.AT_EMPTY_PATH)
        if read_only:
            try:
                nsexec.mount_setattr(tree, "", nsexec.AT_EMPTY_PATH, nsexec.MOUNT_ATTR_RDONLY)
            except BaseException:
                os.close(tree)
                raise
        return tree

    fds: list[int] = []
    outside = ""
    outside_mounted = False
    src_fd = -1
    try:
        try:
            src_fd = os.open(src, os.O_PATH | os.O_CLOEXEC)
            is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
            fds.append(clone(src_fd))
        except OSError as e:
            raise oserror(e, message) from None
        request: dict[str, Any] = {"op": "bind", "ns": {}, "tree": 0, "dest": dst, "mkdir": mkdir, "is_dir": is_dir}
        add_entry(m, request, fds, ("mnt",), message)
        propagate = os.path.join(PROPAGATE_DIR, m.name)
        if os.path.isdir(propagate) and not os.path.islink(propagate):
            try:
                staged = clone(src_fd)
                try:
                    outside = _make_temp(propagate, is_dir)
                    nsexec.move_mount(staged, "", nsexec.AT_FDCWD, outside, nsexec.MOVE_MOUNT_F_EMPTY_PATH)
                    outside_mounted = True
                finally:
                    os.close(staged)
            except OSError as e:
                raise oserror(e, message) from None
            request["source"] = os.path.join(INCOMING_DIR, os.path.basename(outside))
        try:
            reply = run_helper(request, fds)
        except Errno as e:
            raise Errno(e.errno, f"{message}: {e.message}") from None
        log.debug("Mounted %s on %s in machine %s%s.", src, dst, m.name,
                  " through nspawn's propagation directory" if reply.get("propagated") else "")
    finally:
        if src_fd >= 0:
            os.close(src_fd)
        for fd in fds:
            os.close(fd)
        if outside_mounted:
            with contextlib.suppress(OSError):
                nsexec.umount2(outside, nsexec.MNT_DETACH)
        if outside:
            with contextlib.suppress(OSError):
                if is_dir:
                    os.rmdir(outside)
                else:
                    os.unlink(outside)


def _make_temp(directory: str, is_dir: bool) -> str:
    """A new, randomly named directory or empty file in DIRECTORY."""
    for _ in range(100):
        path = os.path.join(directory, os.urandom(6).hex())
        try:
            if is_dir:
                os.mkdir(path, 0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
