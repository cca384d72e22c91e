"""File-system primitives of the pool: trees and files made, copied, marked
read-only, removed and moved into place.

Everything here blocks (callers run it in a worker thread) and raises
PoolError/OSError.  New things are built under a hidden ``.#`` name and
renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets

from imagepool import btrfs, fsutil, spawn, temporaries
from imagepool.errors import PoolError
from imagepool.syscalls import rename_exchange, rename_noreplace

log = logging.getLogger(__name__)

TEMP_PREFIX = temporaries.TEMP_PREFIX


def temp_name(directory: str, name: str) -> str:
    """A hidden temporary path next to the final one (".#<name><16 hex>"),
    registered as this service's (see imagepool.temporaries)."""
    path = os.path.join(directory, f"{TEMP_PREFIX}{name}{secrets.token_hex(8)}")
    temporaries.register(path)
    return path


def clean_temporaries(directories: list[str]) -> list[str]:
    """Remove the temporaries in DIRECTORIES that no live process is making
    (a crash left them); returns their paths."""
    live = temporaries.live_paths()
    removed = []
    for directory in directories:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if not entry.startswith(TEMP_PREFIX) or temporaries.in_use(path, live):
                continue
            if entry.endswith(".lck") and temporaries.held_lock_file(path):
                continue
            try:
                remove_path(path)
            except Exception as e:  # noqa: BLE001 - one that won't go must not stop the rest
                log.warning("Failed to remove left-over temporary %s: %s", path, e)
                continue
            log.info("Removed left-over temporary %s.", path)
            removed.append(path)
    return removed


def _last_words(result: spawn.Completed, default: str) -> str:
    return result.stderr[-1].strip() if result.stderr else default


# --- removal --------------------------------------------------------------------


def _rm_rf(path: str) -> spawn.Completed:
    return spawn.run(["rm", "-rf", "--", path], stderr_log=lambda line: None)


def remove_tree(path: str) -> None:
    """Remove a directory tree: immutable files, nested subvolumes and all."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with contextlib.suppress(OSError):
        fsutil.set_immutable(path, False)
    if btrfs.is_subvolume(path):
        btrfs.delete_subvolume(path)
        return
    if _rm_rf(path).returncode == 0 and not os.path.lexists(path):
        return
    # Something refused: immutable or append-only files, or nested
    # subvolumes that rmdir can't take.  Clear the flags, delete the
    # subvolumes one by one, then try again.
    spawn.run(["chattr", "-R", "-f", "-i", "-a", path], stderr_log=lambda line: None)
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p) and btrfs.is_subvolume(p):
                btrfs.delete_subvolume(p)
    result = _rm_rf(path)
    if result.returncode != 0 or os.path.lexists(path):
        raise PoolError(f"Failed to remove '{path}': {_last_words(result, 'rm failed')}")


def remove_path(path: str) -> None:
    """Remove whatever is at PATH (an image or a temporary), if anything."""
    if os.path.isdir(path) and not os.path.islink(path):
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- copies -----------------------------------------------------------------------


def copy_tree(src: str, dst: str) -> None:
    """Copy the contents of SRC into the existing directory DST: reflinks where
    the file system can, else full copies keeping owners, modes, xattrs, ACLs,
    hardlinks, symlinks, device nodes and timestamps."""
    result = spawn.run(["cp", "-a", "--reflink=auto", "--no-target-directory", "--", src + "/.", dst])
    if result.returncode != 0:
        raise PoolError(f"Failed to copy '{src}': {_last_words(result, 'cp failed')}")


def copy_file_sparse(src: str, dst: str) -> None:
    result = spawn.run(["cp", "--reflink=auto", "--sparse=always", "--preserve=timestamps,xattr", "--", src, dst])
    if result.returncode != 0:
        raise PoolError(f"Failed to copy '{src}': {_last_words(result, 'cp failed')}")


def make_tree_dir(path: str) -> None:
    """A new, empty directory image: a subvolume on btrfs, else a directory."""
    try:
        btrfs.create_subvolume(path)
    except OSError:
        os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def make_tree_copy(src: str, dst: str, read_only: bool) -> bool:
    """Build DST (which must not exist) as a copy of SRC: a btrfs snapshot
    where possible (read-only at once if asked; returns True), else a new
    subvolume (or a directory off btrfs) filled by copy_tree (returns False:
    the caller makes it read-only once it is in place)."""
    if btrfs.is_subvolume(src) and btrfs.is_btrfs(os.path.dirname(dst)):
        try:
            btrfs.snapshot(src, dst, read_only=read_only)
            return True
        except OSError as e:
            # Another btrfs file system: copy instead.
            if e.errno != errno.EXDEV:
                raise
    try:
        btrfs.create_subvolume(dst)
    except OSError:
        os.mkdir(dst, 0o755)
    try:
        copy_tree(src, dst)
    except BaseException:
        remove_tree(dst)
        raise
    return False


def apply_read_only(path: str) -> None:
    if btrfs.is_subvolume(path):
        btrfs.set_read_only(path, True)
    else:
        fsutil.set_immutable(path, True)


# --- into place ----------------------------------------------------------------------


def setup_pool(path: str) -> None:
    """Create the pool directory PATH if it is missing: a btrfs subvolume when
    the parent is on btrfs (so it can carry a quota), else a directory."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        if btrfs.is_btrfs(parent):
            btrfs.create_subvolume(path)
            os.chmod(path, 0o700)
            return
    except OSError:
        pass
    os.makedirs(path, mode=0o700, exist_ok=True)


def install_image(tmp: str, final: str, *, force: bool, read_only: bool, sync: bool = False) -> None:
    """Move the finished temporary TMP into place at FINAL (with SYNC, once
    its file system has it all on disk, so that a crash can't leave a
    partial image under the final name).

    Without FORCE an existing FINAL is an error (EEXIST).  With FORCE the
    old image is swapped out atomically (RENAME_EXCHANGE) and then removed,
    so FINAL never stops existing and never holds a partial image."""
    if read_only and not os.path.isdir(tmp):
        os.chmod(tmp, os.stat(tmp).st_mode & 0o7555)
    if sync:
        fsutil.syncfs(tmp)
    if force and os.path.lexists(final):
        if fsutil.get_immutable(final):
            fsutil.set_immutable(final, False)
        rename_exchange(tmp, final)
        remove_path(tmp)  # now the old image
    else:
        rename_noreplace(tmp, final)
    if read_only and os.path.isdir(final):
        apply_read_only(final)


def write_small_file(path: str, data: bytes, mode: int, *, replace: bool = True) -> None:
    """PATH with DATA, written under a temporary name and renamed into place."""
    tmp = temp_name(os.path.dirname(path), os.path.basename(path))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
