"""Image operations: remove, rename, clone, read-only, limits, cleaning.

Each function is blocking (callers run it in a worker thread), takes the image
locks that nspawn honours, and raises PoolError/OSError.  New images are
built under a hidden ``.#`` name and renamed into place only when complete
(the primitives are in ``imagepool.tree``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil

from imagepool import btrfs, fsutil, mstack
from imagepool.errors import Errno, InvalidArgs, NotSupported, PoolError, QuotaOff
from imagepool.image import UINT64_MAX, Image, ImageType, Pool, pool_target
from imagepool.locks import image_name_lock, image_path_lock
from imagepool.names import image_name_is_valid
from imagepool.syscalls import rename_noreplace
from imagepool.tree import apply_read_only, copy_file_sparse, make_tree_copy, remove_tree, temp_name

SETTINGS_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")
SIDECAR_SUFFIXES = (".roothash", ".roothash.p7s", ".usrhash", ".usrhash.p7s", ".verity")

log = logging.getLogger(__name__)

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
    if image.type == ImageType.MSTACK:  # NAME.oci-config goes with the stack (systemd 262)
        old.append(os.path.join(os.path.dirname(image.path), image.name + ".oci-config"))
    if new_name is None:
        return [(p, None) for p in old]
    new = settings_paths(image, new_name) + sidecar_paths(image, new_name)
    return list(zip(old, new, strict=True))


def _refuse_immutable(image: Image) -> None:
    if image.immutable:
        raise Errno(errno.EROFS)


# --- removal ------------------------------------------------------------------


def remove_image(image: Image) -> None:
    _refuse_immutable(image)
    with image_path_lock(image.path):
        if image.type in (ImageType.SUBVOLUME, ImageType.DIRECTORY, ImageType.MSTACK):
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


def _refuse_mstack(image: Image, message: str | None = None) -> None:
    """What systemd 262 does with a mount stack for all but removal."""
    if image.type == ImageType.MSTACK:
        raise Errno(errno.EOPNOTSUPP, message)


def rename_image(pool: Pool, image: Image, new_name: str) -> None:
    """Rename IMAGE (and its settings and side files); errnos are told as
    systemd 262 tells them ("Failed to rename image: ...")."""
    if not image_name_is_valid(new_name):
        raise InvalidArgs(f"Image name '{new_name}' is invalid.")
    try:
        _rename_image(pool, image, new_name)
    except (Errno, OSError) as e:
        code = e.errno or errno.EIO
        raise Errno(code, f"Failed to rename image: {os.strerror(code)}") from None


def _rename_image(pool: Pool, image: Image, new_name: str) -> None:
    _refuse_immutable(image)
    _refuse_mstack(image)
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


def clone_image(pool: Pool, image: Image, new_name: str, read_only: bool) -> None:
    if not image_name_is_valid(new_name):
        raise InvalidArgs(f"Image name '{new_name}' is invalid.")
    if image.type in (ImageType.BLOCK, ImageType.MSTACK):
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
    _refuse_mstack(image)
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


QUOTAS_OFF = ("Quotas are off on this btrfs file system: start the services with --quota=simple "
              "to use simple quotas, or turn quotas on yourself")


def quotas_ready(pool: Pool, path: str) -> None:
    """Quotas on for the btrfs at PATH, or a clear refusal.  Unlike systemd,
    full qgroups are never turned on implicitly (a whole file system slows
    down with them); simple quotas are, where the pool says so."""
    if btrfs.quota_mode(path) != "off":
        return
    if pool.quota != "simple":
        raise QuotaOff(QUOTAS_OFF)
    log.info("Turning on btrfs simple quotas for %s.", path)
    btrfs.quota_enable(path, simple=True)


def set_image_limit(pool: Pool, image: Image, limit: int) -> None:
    _refuse_immutable(image)
    _refuse_mstack(image)
    if image.type != ImageType.SUBVOLUME:
        raise Errno(errno.EOPNOTSUPP)
    quotas_ready(pool, image.path)
    btrfs.set_limit(image.path, limit)


def set_pool_limit(pool: Pool, limit: int) -> None:
    os.makedirs(pool.path, mode=0o700, exist_ok=True)
    if not btrfs.is_btrfs(pool.path):
        raise NotSupported("Quota is only supported on btrfs.")
    if not btrfs.is_subvolume(pool.path):
        raise NotSupported("Quota is only supported on btrfs subvolumes.")
    quotas_ready(pool, pool.path)
    btrfs.set_limit(pool.path, limit)


def usage_status(pool: Pool, image: Image) -> str:
    """Why IMAGE's usage is unknown, or which limit it has reached ("" when
    neither), for a client to show next to the numbers."""
    if image.type in (ImageType.RAW, ImageType.BLOCK):
        return ""
    if image.type == ImageType.MSTACK:
        return "a mount stack: its usage is that of its layers"
    if image.type == ImageType.DIRECTORY:
        return "not a btrfs subvolume: the usage of a plain directory is not counted"
    try:
        mode = btrfs.quota_mode(image.path)
        if mode == "off":
            return "btrfs quotas are off" + ("" if pool.quota == "simple" else
                                             " (start the services with --quota=simple, or turn them on)")
        if image.usage == UINT64_MAX:
            if btrfs.quota_rescanning(image.path):
                return "btrfs is counting the quotas anew"
            return "the subvolume has no qgroup"
    except OSError as e:
        return f"usage unknown: {e.strerror or e}"
    reached = []
    if _at(image.usage, image.limit):
        reached.append("its limit")
    if _at(image.usage_exclusive, image.limit_exclusive):
        reached.append("its exclusive limit")
    with contextlib.suppress(OSError):
        pool_q = btrfs.qgroup_of(pool.path) if btrfs.is_subvolume(pool.path) else None
        if pool_q is not None and _at(pool_q.referenced, pool_q.max_referenced):
            reached.append("the pool's limit")
    return "reached " + " and ".join(reached) if reached else ""


def _at(usage: int, limit: int) -> bool:
    """Whether USAGE is at LIMIT: btrfs refuses writes a little before (the
    next extent would not fit), so within 1% or 1 MiB of it."""
    if limit == UINT64_MAX or usage == UINT64_MAX:
        return False
    return limit - usage <= max(limit // 100, 1 << 20)


def prepare_quotas(pool: Pool) -> None:
    """At a service's start: simple quotas on for a btrfs pool that should
    have them (its imported trees then show their usage)."""
    if pool.quota != "simple" or not os.path.isdir(pool.path) or not btrfs.is_btrfs(pool.path):
        return
    try:
        if btrfs.quota_mode(pool.path) == "off":
            log.info("Turning on btrfs simple quotas for the pool %s.", pool.path)
            btrfs.quota_enable(pool.path, simple=True)
    except OSError as e:  # a kernel before 6.7 says EINVAL
        log.warning("Could not turn on btrfs simple quotas for %s: %s", pool.path, e.strerror or e)


def pool_usage(pool: Pool) -> int:
    if not btrfs.is_subvolume(pool.path):
        return UINT64_MAX
    return btrfs.qgroup_of(pool.path).referenced


def pool_limit(pool: Pool) -> int:
    if not btrfs.is_subvolume(pool.path):
        return UINT64_MAX
    return btrfs.qgroup_of(pool.path).max_referenced


def clean_pool(pool: Pool, mode: str) -> list[tuple[str, int]]:
    """Remove hidden images (mode "hidden") or all images ("all"), or only
    the OCI layers no mount stack refers to ("layers"); images in use are
    skipped.  Layers come last, and one a mount stack still refers to is in
    use (systemd 262 removes those too, breaking the stacks).  Returns (name,
    exclusive usage) of each one removed."""
    if mode not in ("hidden", "all", "layers"):
        raise InvalidArgs(f"Unknown mode '{mode}'.")
    removed: list[tuple[str, int]] = []
    images = sorted(pool.discover().items())
    layers = [(n, i) for n, i in images if mstack.is_layer_name(n) and os.path.dirname(i.path) == pool.path]
    others = [(n, i) for n, i in images if (n, i) not in layers]
    if mode != "layers":
        for name, image in others:
            if image.immutable or (mode == "hidden" and not image.hidden):
                continue
            if _remove_for_clean(name, image):
                removed.append((name, image.usage_exclusive))
    used = mstack.referenced_layers(pool.path)
    for name, image in layers:
        if name not in used and _remove_for_clean(name, image):
            removed.append((name, image.usage_exclusive))
    return removed


def _remove_for_clean(name: str, image: Image) -> bool:
    """Remove IMAGE; False when it is in use (EBUSY)."""
    try:
        remove_image(image)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise PoolError(f"Failed to remove image '{name}': {e.strerror}") from e
    except PoolError as e:
        if isinstance(e, Errno) and e.errno == errno.EBUSY:
            return False
        raise PoolError(f"Failed to remove image '{name}': {e}") from e
    return True
