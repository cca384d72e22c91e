"""btrfs subvolumes, snapshots and quota groups, as the image pool needs them.

Subvolume work goes through libbtrfsutil (the ``btrfsutil`` binding).  It has
no quota calls, so qgroups are done with the btrfs ioctls directly, reading the
quota tree with BTRFS_IOC_TREE_SEARCH as ``btrfs qgroup show`` does.

Everything here blocks; callers run it in a thread.  Every failure is an
OSError with an errno: ENOTTY when the file system is not btrfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import btrfsutil

UINT64_MAX = 2**64 - 1

BTRFS_SUPER_MAGIC = 0x9123683E
_SUBVOLUME_ROOT_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: the root directory of every subvolume
_FS_TREE_ID = 5  # the top-level subvolume


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_TREE_SEARCH = _ioc(_IOC_READ | _IOC_WRITE, 17, 4096)
_QUOTA_CTL = _ioc(_IOC_READ | _IOC_WRITE, 40, 16)
_QGROUP_CREATE = _ioc(_IOC_WRITE, 42, 16)
_QGROUP_LIMIT = _ioc(_IOC_READ, 43, 48)
_QUOTA_RESCAN_STATUS = _ioc(_IOC_READ, 45, 64)
_QUOTA_RESCAN_WAIT = _ioc(_IOC_NONE, 46, 0)
_SUBVOL_INFO_SIZE = 504  # struct btrfs_ioctl_get_subvol_info_args
_GET_SUBVOL_INFO = _ioc(_IOC_READ, 60, _SUBVOL_INFO_SIZE)

_QUOTA_CTL_ENABLE = 1
_QUOTA_CTL_ENABLE_SIMPLE = 4  # Linux 6.7: simple quotas (owner accounting, no backref walks)
_QUOTA_TREE = 8
_QGROUP_STATUS_KEY = 240
_QGROUP_INFO_KEY = 242
_QGROUP_LIMIT_KEY = 244
_STATUS_FLAG_ON = 1 << 0
_STATUS_FLAG_RESCAN = 1 << 1
_STATUS_FLAG_SIMPLE_MODE = 1 << 3
_LIMIT_MAX_RFER = 1 << 0
_LIMIT_MAX_EXCL = 1 << 1
_ROOT_SUBVOL_RDONLY = 1 << 0  # in the flags of a root item
_LEVEL0_MAX = (1 << 48) - 1  # qgroup ids of level 0 are the subvolume ids

# struct btrfs_ioctl_search_key and _header (host order); items are little-endian.
_SEARCH_KEY = struct.Struct("=7Q4I4Q")
_SEARCH_HEADER = struct.Struct("=3Q2I")
_SEARCH_BUF = 4096
_NR_ITEMS_OFFSET = 7 * 8 + 2 * 4
# Of struct btrfs_ioctl_get_subvol_info_args: treeid; flags (after the name,
# parent_id, dirid, generation); otime sec and nsec (after the uuids,
# transids and ctime).
# btrfs_ioctl_get_subvol_info_args: treeid, (name, parent, dirid, generation),
# flags, (uuids, transids), ctime and otime (struct btrfs_ioctl_timespec: 16 bytes).
_SUBVOL_INFO = struct.Struct("=Q280xQ80xQI4xQI")
_SUBVOL_INFO_ARGS = bytes(_SUBVOL_INFO_SIZE)  # fcntl.ioctl copies it

_libc = ctypes.CDLL(None, use_errno=True)

# libbtrfsutil leaves errno at 0 for the checks it makes itself.
_UTIL_ERRNO = {
    btrfsutil.ERROR_NOT_BTRFS: errno.ENOTTY,
    btrfsutil.ERROR_NOT_SUBVOLUME: errno.EINVAL,
    btrfsutil.ERROR_INVALID_ARGUMENT: errno.EINVAL,
    btrfsutil.ERROR_NO_MEMORY: errno.ENOMEM,
}


@contextlib.contextmanager
def _util_errors(path: str) -> Iterator[None]:
    """Turn a BtrfsUtilError into a plain OSError (FileNotFoundError, ...)."""
    try:
        yield
    except btrfsutil.BtrfsUtilError as e:
        code = e.errno or _UTIL_ERRNO.get(e.btrfsutilerror, errno.EIO)
        raise OSError(code, os.strerror(code), path) from None


@contextlib.contextmanager
def _open(path: str) -> Iterator[int]:
    # O_NONBLOCK so that a FIFO does not hang us; ioctls need a real fd, not O_PATH.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        yield fd
    finally:
        os.close(fd)


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _require_btrfs(fd: int, path: str) -> None:
    if _fs_magic(fd) != BTRFS_SUPER_MAGIC:
        raise OSError(errno.ENOTTY, "Not a btrfs file system", path)


def is_btrfs(path: str) -> bool:
    with _open(path) as fd:
        return _fs_magic(fd) == BTRFS_SUPER_MAGIC


class SubvolumeInfo(NamedTuple):
    id: int
    read_only: bool
    otime: int  # creation, in µs since the epoch: the root item's, which systemd reports
    ctime: int  # the root item's last change (every transaction that touched the subvolume): 262's mtime


def subvolume_info_fd(fd: int) -> SubvolumeInfo:
    """The subvolume containing the inode of FD, from one ioctl (Linux 4.18)."""
    buf = fcntl.ioctl(fd, _GET_SUBVOL_INFO, _SUBVOL_INFO_ARGS)
    treeid, flags, csec, cnsec, osec, onsec = _SUBVOL_INFO.unpack_from(buf)
    return SubvolumeInfo(treeid, bool(flags & _ROOT_SUBVOL_RDONLY), osec * 1_000_000 + onsec // 1000,
                         csec * 1_000_000 + cnsec // 1000)


def is_subvolume(path: str) -> bool:
    try:
        st = os.stat(path)
        return st.st_ino == _SUBVOLUME_ROOT_INO and stat.S_ISDIR(st.st_mode) and is_btrfs(path)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _require_subvolume(path: str) -> None:
    if not is_subvolume(path):
        with _open(path) as fd:
            _require_btrfs(fd, path)
        raise OSError(errno.EINVAL, "Not a btrfs subvolume", path)


def subvolume_id(path: str) -> int:
    with _util_errors(path):
        return int(btrfsutil.subvolume_id(path))


def create_subvolume(path: str) -> None:
    with _util_errors(path):
        btrfsutil.create_subvolume(path)


def get_read_only(path: str) -> bool:
    _require_subvolume(path)
    with _util_errors(path):
        return bool(btrfsutil.get_subvolume_read_only(path))


def set_read_only(path: str, read_only: bool) -> None:
    # The flag belongs to the subvolume containing the inode: refuse a plain
    # directory, or we would flip the flag of the whole subvolume around it.
    _require_subvolume(path)
    with _util_errors(path):
        btrfsutil.set_subvolume_read_only(path, read_only)


def _nested(path: str) -> list[tuple[str, int]]:
    """Subvolumes below PATH, (relative path, id), children after parents."""
    with _util_errors(path):
        return [(os.fsdecode(p), int(i)) for p, i in btrfsutil.SubvolumeIterator(path)]


def snapshot(src: str, dst: str, *, read_only: bool = False) -> None:
    # libbtrfsutil refuses recursive together with read-only (it has to place
    # the nested snapshots inside the new one), so the flag is set afterwards.
    with _util_errors(dst):
        btrfsutil.create_snapshot(src, dst, recursive=True)
    nested = _nested(dst)
    with _open(dst) as fd:
        quota = _quota_status(fd) is not None
    if quota:
        for rel in ["", *(r for r, _ in nested)]:
            with contextlib.suppress(OSError):
                _copy_limits(os.path.join(src, rel), os.path.join(dst, rel))
    if read_only:
        for rel, _ in reversed(nested):
            set_read_only(os.path.join(dst, rel), True)
        set_read_only(dst, True)


def delete_subvolume(path: str) -> None:
    _require_subvolume(path)
    top = subvolume_id(path)
    if top == _FS_TREE_ID:
        raise OSError(errno.EBUSY, "The top-level subvolume cannot be deleted", path)
    nested = _nested(path)
    if nested:
        # Removing a nested subvolume unlinks it from its parent, which must
        # therefore be writable; a read-only leaf itself may be destroyed as is.
        for rel, _ in [("", top), *nested]:
            set_read_only(os.path.join(path, rel), False)
    with _open(os.path.dirname(os.path.abspath(path))) as parent:
        with _util_errors(path):
            btrfsutil.delete_subvolume(path, recursive=True)
        if _quota_status(parent) is None:
            return
        busy = False
        for subvol in [top, *(i for _, i in nested)]:
            try:
                fcntl.ioctl(parent, _QGROUP_CREATE, struct.pack("=2Q", 0, subvol))
            except OSError as e:
                busy |= e.errno == errno.EBUSY
        if busy:
            # Newer kernels refuse while the cleaner has not dropped the
            # subvolume yet, and remove its emptied qgroup themselves once it
            # has; a commit wakes the cleaner now rather than in 30 s.
            with contextlib.suppress(OSError):
                btrfsutil.sync(parent)


def _tree_search(fd: int, tree: int, item_type: int, min_offset: int, max_offset: int) -> Iterator[tuple[int, bytes]]:
    """Items (0, ITEM_TYPE, offset) of TREE with offset in the range, as (offset, data)."""
    while True:
        buf = bytearray(_SEARCH_BUF)
        _SEARCH_KEY.pack_into(
            buf, 0, tree, 0, 0, min_offset, max_offset, 0, UINT64_MAX,
            item_type, item_type, _SEARCH_BUF, 0, 0, 0, 0, 0,
        )
        fcntl.ioctl(fd, _TREE_SEARCH, buf)
        (count,) = struct.unpack_from("=I", buf, _NR_ITEMS_OFFSET)
        if count == 0:
            return
        pos = _SEARCH_KEY.size
        offset = min_offset
        for _ in range(count):
            _, _, offset, _, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size
            yield offset, bytes(buf[pos : pos + length])
            pos += length
        if offset >= max_offset:
            return
        min_offset = offset + 1


def _quota_item(fd: int, item_type: int, offset: int) -> bytes | None:
    for _, data in _tree_search(fd, _QUOTA_TREE, item_type, offset, offset):
        return data
    return None


def _quota_status(fd: int) -> int | None:
    """The flags of the quota status item, None when quota is off."""
    try:
        data = _quota_item(fd, _QGROUP_STATUS_KEY, 0)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTTY):  # no quota tree; not btrfs
            return None
        raise
    if data is None:
        return None
    (flags,) = struct.unpack_from("<Q", data, 16)  # version, generation, flags, rescan
    return flags if flags & _STATUS_FLAG_ON else None


def _read_limits(fd: int, qgroupid: int) -> tuple[int, int, int]:
    """(flags, max_rfer, max_excl) of the qgroup; no flags when unlimited."""
    data = _quota_item(fd, _QGROUP_LIMIT_KEY, qgroupid)
    if data is None:
        return 0, 0, 0
    flags, max_rfer, max_excl = struct.unpack_from("<3Q", data)
    return flags, max_rfer, max_excl


def _set_limits(fd: int, qgroupid: int, flags: int, max_rfer: int, max_excl: int) -> None:
    fcntl.ioctl(fd, _QGROUP_LIMIT, struct.pack("=6Q", qgroupid, flags, max_rfer, max_excl, 0, 0))


def _copy_limits(src: str, dst: str) -> None:
    # As systemd's snapshot with quota inheritance: the clone gets the
    # source's limits (the kernel created its level-0 qgroup already).
    with _open(src) as sfd, _open(dst) as dfd:
        flags, max_rfer, max_excl = _read_limits(sfd, subvolume_id(src))
        flags &= _LIMIT_MAX_RFER | _LIMIT_MAX_EXCL
        if flags:
            _set_limits(dfd, subvolume_id(dst), flags, max_rfer, max_excl)


def quota_enabled(path: str) -> bool:
    with _open(path) as fd:
        return _quota_status(fd) is not None


def quota_mode(path: str) -> str:
    """The quota accounting of the btrfs at PATH: "off", "full" (qgroups)
    or "simple" (simple quotas)."""
    with _open(path) as fd:
        _require_btrfs(fd, path)
        status = _quota_status(fd)
    if status is None:
        return "off"
    return "simple" if status & _STATUS_FLAG_SIMPLE_MODE else "full"


def quota_enable(path: str, simple: bool = False) -> None:
    """Turn quota accounting on (full qgroups, or SIMPLE quotas), if off."""
    with _open(path) as fd:
        _require_btrfs(fd, path)
        if _quota_status(fd) is None:
            # Full qgroups: the kernel then starts a rescan of its own.
            command = _QUOTA_CTL_ENABLE_SIMPLE if simple else _QUOTA_CTL_ENABLE
            fcntl.ioctl(fd, _QUOTA_CTL, struct.pack("=2Q", command, 0))


def quota_rescan_wait(path: str) -> None:
    with _open(path) as fd:
        _require_btrfs(fd, path)
        fcntl.ioctl(fd, _QUOTA_RESCAN_WAIT)


def _rescanning(fd: int, status: int) -> bool:
    # The status item on disk lags behind: right after enabling quota it may
    # not carry the RESCAN flag yet, while the kernel's own state does.
    if status & _STATUS_FLAG_RESCAN:
        return True
    buf = bytearray(64)
    fcntl.ioctl(fd, _QUOTA_RESCAN_STATUS, buf)
    return bool(struct.unpack_from("=Q", buf)[0])


def quota_rescanning(path: str) -> bool:
    """Whether the kernel is (re)counting the quotas of the btrfs at PATH."""
    with _open(path) as fd:
        status = _quota_status(fd)
        return status is not None and _rescanning(fd, status)


@dataclass(frozen=True)
class Qgroup:
    """Usage and limits of a qgroup, in bytes; UINT64_MAX: unknown, or no limit."""

    referenced: int = UINT64_MAX
    exclusive: int = UINT64_MAX
    max_referenced: int = UINT64_MAX
    max_exclusive: int = UINT64_MAX


def _limits(data: bytes | None) -> tuple[int, int]:
    """(max_referenced, max_exclusive) of a qgroup limit item."""
    if data is None:
        return UINT64_MAX, UINT64_MAX
    flags, max_rfer, max_excl = struct.unpack_from("<3Q", data)
    return (
        max_rfer if flags & _LIMIT_MAX_RFER else UINT64_MAX,
        max_excl if flags & _LIMIT_MAX_EXCL else UINT64_MAX,
    )


def _qgroup(info: bytes | None, limit: bytes | None, rescanning: bool) -> Qgroup:
    if info is None:
        return Qgroup()
    if rescanning:
        return Qgroup(UINT64_MAX, UINT64_MAX, *_limits(limit))
    _, rfer, _, excl = struct.unpack_from("<4Q", info)  # generation, rfer, rfer_cmpr, excl
    return Qgroup(rfer, excl, *_limits(limit))


def qgroup_of(path: str) -> Qgroup:
    """The level-0 qgroup of the subvolume containing PATH."""
    with _open(path) as fd:
        if _fs_magic(fd) != BTRFS_SUPER_MAGIC:
            return Qgroup()
        status = _quota_status(fd)
        if status is None:
            return Qgroup()
        # Asked before the usage is read (as systemd does), so that usage
        # read once no rescan runs any more is final.
        rescanning = _rescanning(fd, status)
        qgroupid = subvolume_id(path)
        info = _quota_item(fd, _QGROUP_INFO_KEY, qgroupid)
        return _qgroup(info, _quota_item(fd, _QGROUP_LIMIT_KEY, qgroupid), rescanning)


def qgroups(fd: int) -> dict[int, Qgroup] | None:
    """The level-0 qgroups of the whole file system of FD (a btrfs), by
    subvolume id, read in a few tree searches; None when quota is off."""
    status = _quota_status(fd)
    if status is None:
        return None
    rescanning = _rescanning(fd, status)
    limits = dict(_tree_search(fd, _QUOTA_TREE, _QGROUP_LIMIT_KEY, 0, _LEVEL0_MAX))
    return {
        qgroupid: _qgroup(info, limits.get(qgroupid), rescanning)
        for qgroupid, info in _tree_search(fd, _QUOTA_TREE, _QGROUP_INFO_KEY, 0, _LEVEL0_MAX)
    }


def set_limit(path: str, referenced_max: int) -> None:
    """Limit the referenced bytes of the subvolume containing PATH; UINT64_MAX
    lifts it.  Quotas must be on (ENOTCONN otherwise, as from the kernel)."""
    with _open(path) as fd:
        _require_btrfs(fd, path)
        if _quota_status(fd) is None:
            raise OSError(errno.ENOTCONN, "Quotas are off", path)
        qgroupid = subvolume_id(path)
        try:
            _set_limits(fd, qgroupid, _LIMIT_MAX_RFER, referenced_max, 0)
        except FileNotFoundError:
            # The level-0 qgroup was destroyed by hand: make it anew.
            fcntl.ioctl(fd, _QGROUP_CREATE, struct.pack("=2Q", 1, qgroupid))
            _set_limits(fd, qgroupid, _LIMIT_MAX_RFER, referenced_max, 0)
