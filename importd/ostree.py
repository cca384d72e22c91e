"""systemd's import_mangle_os_tree(): a tarball that wraps its OS tree in
one top-level directory gets that directory's contents moved one level up.
Every look at the tree resolves inside it (openat2 RESOLVE_IN_ROOT); every
move is a RENAME_NOREPLACE."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat

from imagepool.syscalls import RESOLVE_IN_ROOT, openat2, rename_noreplace
from importd.context import JobContext, TransferError

log = logging.getLogger(__name__)


def _exists_in_root(root_fd: int, path: str) -> bool:
    """Does PATH exist below ROOT_FD, symlinks resolved as if ROOT_FD were "/"
    (like chase_symlinks(CHASE_PREFIX_ROOT))?  O_PATH: nothing is opened for
    real, so a device node or fifo there has no effect.  ENOENT is False, any
    other error is raised."""
    try:
        fd = openat2(root_fd, path, os.O_PATH, RESOLVE_IN_ROOT)
    except FileNotFoundError:
        return False
    os.close(fd)
    return True


def _is_os_tree_at(root_fd: int) -> bool:
    """systemd's path_is_os_tree(): does /etc/os-release or, failing with
    ENOENT, /usr/lib/os-release exist (of any type)?  Other errors (ENOTDIR
    when etc is a file, ELOOP) are raised, as systemd returns them."""
    return _exists_in_root(root_fd, "/etc/os-release") or _exists_in_root(root_fd, "/usr/lib/os-release")


def _rename_noreplace(old_dir: int, old: str, new_dir: int, new: str) -> None:
    rename_noreplace(old, new, old_dir, new_dir)


def mangle_os_tree(directory: str, ctx: JobContext | None = None) -> bool:
    """Like systemd's import_mangle_os_tree(): some tarballs wrap the OS tree in
    one top-level directory; move its contents one level up.

    Only when DIRECTORY is no OS tree itself, contains exactly one entry
    (besides "." and "..": hidden names count), that entry is a directory (not
    a symlink to one) and that directory is an OS tree.  The inner directory
    is first renamed to an unguessable name, then each entry moved up with
    RENAME_NOREPLACE, the emptied directory removed, and its timestamps, mode
    and ownership given to DIRECTORY.  Returns whether it rearranged."""
    say = ctx.log if ctx is not None else (lambda line: None)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise TransferError(f"Failed to open directory '{directory}': {e.strerror}") from None
    try:
        try:
            if _is_os_tree_at(dfd):
                log.debug("Directory tree '%s' is a valid OS tree.", directory)
                return False
        except OSError as e:
            raise TransferError(f"Failed to determine whether '{directory}' is an OS tree: {e.strerror}") from None
        entries = os.listdir(dfd)
        if len(entries) != 1:
            return False
        child = entries[0]
        joined = os.path.join(directory, child)
        try:
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        try:
            cfd = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise TransferError(f"Can't open directory '{joined}': {e.strerror}") from None
        try:
            try:
                if not _is_os_tree_at(cfd):
                    return False
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    return False
                raise TransferError(f"Failed to determine whether '{joined}' is an OS tree: {e.strerror}") from None
            say(f"Rearranging '{joined}', moving OS tree one directory up.")
            temp = f".#{child}{secrets.token_hex(8)}"
            try:
                _rename_noreplace(dfd, child, dfd, temp)
            except OSError as e:
                raise TransferError(f"Unable to rename '{joined}' to '{directory}/{temp}': {e.strerror}") from None
            for name in os.listdir(cfd):
                try:
                    _rename_noreplace(cfd, name, dfd, name)
                except OSError as e:
                    raise TransferError(
                        f"Unable to move '{directory}/{temp}/{name}' to '{directory}/{name}': {e.strerror}"
                    ) from None
            try:
                os.rmdir(temp, dir_fd=dfd)
            except OSError as e:
                raise TransferError(
                    f"Failed to remove temporary directory '{directory}/{temp}': {e.strerror}") from None
        finally:
            os.close(cfd)
        with contextlib.suppress(OSError):
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            os.chown(dfd, st.st_uid, st.st_gid)
            os.chmod(dfd, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise TransferError(
                f"Failed to adjust top-level directory mode/ownership '{directory}': {e.strerror}") from None
        say("Successfully rearranged OS tree.")
        return True
    finally:
        os.close(dfd)
