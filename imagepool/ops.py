"""Image operations: remove, rename, clone, read-only, limits, cleaning.

Each function is blocking (callers run it in a worker thread), takes the image
locks that nspawn honours, and raises PoolError/OSError.  New images are
built under a hidden ``.#`` name and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import subprocess

from imagepool import btrfs, fsutil
from imagepool.errors import Errno, InvalidArgs, NotSupported, PoolError
from imagepool.image import UINT64_MAX, Image, ImageType, Pool, pool_target
from imagepool.locks import image_name_lock, image_path_lock
from imagepool.names import image_name_is_valid

SETTINGS_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")
SIDECAR_SUFFIXES = (".roothash", ".roothash.p7s", ".usrhash", ".usrhash.p7s", ".verity")

log = logging.getLogger(__name__)

_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _raise_errno(code: int, path: str | None = None) -> None:
    raise OSError(code, os.strerror(code), path)


def rename_noreplace(old: str, new: str) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), _RENAME_NOREPLACE) != 0:
        _raise_errno(ctypes.get_errno(), new)


def temp_name(directory: str, name: str) -> str:
    """A hidden temporary path next to the final one (".#<name><16 hex>")."""
    return os.path.join(directory, f".#{name}{secrets.token_hex(8)}")


def settings_paths(image: Image, name: str | None = None) -> list[str]:
    """Where the .nspawn settings of an image may live."""
    name = name or image.name
    local = os.path.join(os.path.dirname(image.path), f"{name}.nspawn")
    return [os.path.join(d, f"{name}.nspawn") for d in SETTINGS_DIRS] + [local]


def sidecar_paths(image: Image, name: str | None = None) -> list[str]:
    name = name or image.name
    directory = os.path.dirname(image.path)
    return [os.path.join(directory, name + suffix) for suffix in SIDECAR_SUFFIXES]


def _companions(image: Image, new_name: str | None = None) -> list[tuple[str, str | None]]:
    old = settings_paths(image) + sidecar_paths(image)
    if new_name is None:
        return [(p, None) for p in old]
    new = settings_paths(image, new_name) + sidecar_paths(image, new_name)
    return list(zip(old, new))


def _refuse_immutable(image: Image) -> None:
    if image.immutable:
        raise Errno(errno.EROFS)


# --- removal ------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """Remove a directory tree: immutable files, nested subvolumes and all."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    if btrfs.is_subvolume(path):
        with contextlib.suppress(OSError):
            fsutil.set_immutable(path, False)
        btrfs.delete_subvolume(path)
        return
    with contextlib.suppress(OSError):
        fsutil.set_immutable(path, False)
    if _rm_rf(path):
        return
    # Something refused: immutable or append-only files, or nested
    # subvolumes that rmdir can't take.  Clear the flags, delete the
    # subvolumes one by one, then try again.
    subprocess.run(["chattr", "-R", "-f", "-i", "-a", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p) and btrfs.is_subvolume(p):
                btrfs.delete_subvolume(p)
    if not _rm_rf(path):
        r = subprocess.run(["rm", "-rf", "--", path], capture_output=True, text=True)
        raise PoolError(f"Failed to remove '{path}': {r.stderr.strip()}")


def _rm_rf(path: str) -> bool:
    r = subprocess.run(["rm", "-rf", "--", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0 and not os.path.lexists(path)


def remove_image(image: Image) -> None:
    _refuse_immutable(image)
    with image_path_lock(image.path):
        if image.type in (ImageType.SUBVOLUME, ImageType.DIRECTORY):
            remove_tree(image.path)
        elif image.type == ImageType.RAW:
            os.unlink(image.path)
        elif image.type == ImageType.BLOCK:
            if image.path.startswith("/dev/"):
                raise Errno(errno.EROFS)
            os.unlink(image.path)
        for path, _ in _companions(image):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# --- rename -------------------------------------------------------------------


def rename_image(pool: Pool, image: Image, new_name: str) -> None:
    if not image_name_is_valid(new_name):
        raise InvalidArgs(f"Image name '{new_name}' is invalid.")
    _refuse_immutable(image)
    if image.type == ImageType.BLOCK and image.path.startswith("/dev/"):
        raise Errno(errno.EROFS)
    with image_path_lock(image.path), image_name_lock(new_name):
        if pool.exists(new_name):
            raise Errno(errno.EEXIST)
        directory = os.path.dirname(image.path)
        suffix = ".raw" if image.type == ImageType.RAW else ""
        new_path = os.path.join(directory, new_name + suffix)
        immutable = image.type == ImageType.DIRECTORY and fsutil.get_immutable(image.path)
        if immutable:
            fsutil.set_immutable(image.path, False)
        try:
            rename_noreplace(image.path, new_path)
        finally:
            if immutable:
                fsutil.set_immutable(new_path if os.path.lexists(new_path) else image.path, True)
        # Settings and side-car files follow as far as they can; an
        # obstacle there doesn't undo the rename (systemd only logs it).
        for old, new in _companions(image, new_name):
            assert new is not None
            try:
                rename_noreplace(old, new)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("Failed to rename %s, ignoring: %s", old, e.strerror)


# --- clone --------------------------------------------------------------------


def copy_tree(src: str, dst: str) -> None:
    """Copy the contents of SRC into the existing directory DST: reflinks where
    the file system can, else full copies keeping owners, modes, xattrs, ACLs,
    hardlinks, symlinks, device nodes and timestamps."""
    r = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", src + "/.", dst],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise PoolError(f"Failed to copy '{src}': {r.stderr.strip().splitlines()[-1] if r.stderr else 'cp failed'}")


def copy_file_sparse(src: str, dst: str) -> None:
    r = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", "--preserve=timestamps,xattr", "--", src, dst],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise PoolError(f"Failed to copy '{src}': {r.stderr.strip()}")


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


def clone_image(pool: Pool, image: Image, new_name: str, read_only: bool) -> None:
    if not image_name_is_valid(new_name):
        raise InvalidArgs(f"Image name '{new_name}' is invalid.")
    if image.type == ImageType.BLOCK:
        raise Errno(errno.EOPNOTSUPP)
    with image_name_lock(new_name):
        if pool.exists(new_name):
            raise Errno(errno.EEXIST)
        os.makedirs(pool.path, mode=0o700, exist_ok=True)
        final = pool_target(pool, new_name, image.type)
        tmp = temp_name(pool.path, new_name + (".raw" if image.type == ImageType.RAW else ""))
        try:
            if image.type == ImageType.RAW:
                copy_file_sparse(image.path, tmp)
                os.chmod(tmp, 0o444 if read_only else 0o644)
                rename_noreplace(tmp, final)
            else:
                done = make_tree_copy(image.path, tmp, read_only)
                rename_noreplace(tmp, final)
                # An immutable directory can't be renamed: mark it in place.
                if read_only and not done:
                    apply_read_only(final)
        except BaseException:
            remove_tree(tmp)
            raise
        for old, new in _companions(image, new_name):
            assert new is not None
            if os.path.isfile(old) and not os.path.lexists(new):
                if os.path.dirname(old) == os.path.dirname(image.path):
                    new = os.path.join(pool.path, os.path.basename(new))
                try:
                    _copy_small_file(old, new)
                except OSError as e:
                    log.warning("Failed to copy %s, ignoring: %s", old, e.strerror)


def _copy_small_file(src: str, dst: str) -> None:
    tmp = temp_name(os.path.dirname(dst), os.path.basename(dst))
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o664)
        rename_noreplace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- read-only, limits ----------------------------------------------------------


def mark_read_only(image: Image, read_only: bool) -> None:
    _refuse_immutable(image)
    with image_path_lock(image.path):
        if image.type == ImageType.SUBVOLUME:
            btrfs.set_read_only(image.path, read_only)
        elif image.type == ImageType.DIRECTORY:
            fsutil.set_immutable(image.path, read_only)
        elif image.type == ImageType.RAW:
            mode = os.stat(image.path).st_mode & 0o7777
            os.chmod(image.path, mode & ~0o222 if read_only else mode | 0o200)
        elif image.type == ImageType.BLOCK:
            fsutil.set_block_device_read_only(image.path, read_only)


def set_image_limit(image: Image, limit: int) -> None:
    _refuse_immutable(image)
    if image.type != ImageType.SUBVOLUME:
        raise Errno(errno.EOPNOTSUPP)
    btrfs.set_limit(image.path, limit)


def set_pool_limit(pool: Pool, limit: int) -> None:
    os.makedirs(pool.path, mode=0o700, exist_ok=True)
    if not btrfs.is_btrfs(pool.path):
        raise NotSupported("Quota is only supported on btrfs.")
    if not btrfs.is_subvolume(pool.path):
        raise NotSupported("Quota is only supported on btrfs subvolumes.")
    btrfs.set_limit(pool.path, limit)


def pool_usage(pool: Pool) -> int:
    if not btrfs.is_subvolume(pool.path):
        return UINT64_MAX
    return btrfs.qgroup_of(pool.path).referenced


def pool_limit(pool: Pool) -> int:
    if not btrfs.is_subvolume(pool.path):
        return UINT64_MAX
    return btrfs.qgroup_of(pool.path).max_referenced


def clean_pool(pool: Pool, mode: str) -> list[tuple[str, int]]:
    """Remove hidden images (mode "hidden") or all images ("all"); images in
    use are skipped.  Returns (name, exclusive usage) of each one removed."""
    if mode not in ("hidden", "all"):
        raise InvalidArgs(f"Unknown mode '{mode}'.")
    removed: list[tuple[str, int]] = []
    for name, image in sorted(pool.discover().items()):
        if image.immutable or (mode == "hidden" and not image.hidden):
            continue
        try:
            remove_image(image)
        except OSError as e:
            if e.errno == errno.EBUSY:
                continue
            raise PoolError(f"Failed to remove image '{name}': {e.strerror}") from e
        except PoolError as e:
            if isinstance(e, Errno) and e.errno == errno.EBUSY:
                continue
            raise PoolError(f"Failed to remove image '{name}': {e}") from e
        removed.append((name, image.usage_exclusive))
    return removed


# --- installing new images (importd) ---------------------------------------------

_RENAME_EXCHANGE = 2


def rename_exchange(a: str, b: str) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        _raise_errno(ctypes.get_errno(), b)


def setup_pool(pool: Pool) -> None:
    """Create the pool directory if it is missing: a btrfs subvolume when
    the parent is on btrfs (so it can carry a quota), else a directory."""
    if os.path.isdir(pool.path):
        return
    parent = os.path.dirname(pool.path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        if btrfs.is_btrfs(parent):
            btrfs.create_subvolume(pool.path)
            os.chmod(pool.path, 0o700)
            return
    except OSError:
        pass
    os.makedirs(pool.path, mode=0o700, exist_ok=True)


def make_tree_dir(path: str) -> None:
    """A new, empty directory image: a subvolume on btrfs, else a directory."""
    try:
        btrfs.create_subvolume(path)
    except OSError:
        os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def remove_path(path: str) -> None:
    """Remove whatever is at PATH (an image or a temporary), if anything."""
    if os.path.isdir(path) and not os.path.islink(path):
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
