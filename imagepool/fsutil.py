"""Small file-system helpers: statx (with birth time, immutable attribute,
mount id), statfs, systemd's EROFS test, the immutable attribute, block
device size and read-only flag."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import threading
from typing import NamedTuple

AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EACCESS = 0x200
_STATX_BASIC_STATS = 0x7FF
_STATX_BTIME = 0x800
_STATX_MNT_ID = 0x1000
_STATX_ATTR_IMMUTABLE = 0x10

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
_BLKGETSIZE64 = 0x80081272
_BLKROGET = 0x125E
_BLKROSET = 0x125D

_libc = ctypes.CDLL(None, use_errno=True)


# struct statx is 256 bytes.  Of it, Statx keeps in order: mask, attributes
# (skipping blksize), mode (skipping nlink, uid, gid), ino, size, blocks,
# attributes_mask, btime sec and nsec (skipping atime), mtime sec and nsec
# (skipping ctime), mnt_id (skipping the device numbers).
_STATX_SIZE = 256
_STATX_FIELDS = struct.Struct("=I4xQ12xH2xQQQQ16xqI4x16xqI4x16xQ")


class Statx(NamedTuple):
    """What image discovery needs of statx(2), from one call."""

    mask: int
    attributes: int
    mode: int
    ino: int
    size: int
    blocks: int
    attributes_mask: int
    btime_sec: int
    btime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    mnt_id: int

    @property
    def btime_usec(self) -> int:
        """Birth time in µs since the epoch, 0 when the file system has none."""
        if not self.mask & _STATX_BTIME:
            return 0
        return self.btime_sec * 1_000_000 + self.btime_nsec // 1000

    @property
    def mtime_usec(self) -> int:
        return self.mtime_sec * 1_000_000 + self.mtime_nsec // 1000

    @property
    def immutable(self) -> bool | None:
        """The immutable attribute; None when the file system does not report it."""
        if not self.attributes_mask & _STATX_ATTR_IMMUTABLE:
            return None
        return bool(self.attributes & _STATX_ATTR_IMMUTABLE)

    @property
    def mount_id(self) -> int | None:
        """The mount the file is on (Linux 5.8 and later), None when unknown."""
        return self.mnt_id if self.mask & _STATX_MNT_ID else None


_FS_ENCODING = sys.getfilesystemencoding()
_statx = _libc.statx
_STATX_MASK = _STATX_BASIC_STATS | _STATX_BTIME | _STATX_MNT_ID
_buffers = threading.local()  # image discovery calls statx a thousand times in a row


def statx(path: str, dir_fd: int = AT_FDCWD, follow: bool = True) -> Statx:
    """statx(2) of PATH (relative to DIR_FD); raises OSError like os.stat."""
    buf = getattr(_buffers, "statx", None)
    if buf is None:
        buf = _buffers.statx = ctypes.create_string_buffer(_STATX_SIZE)
    flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
    if _statx(dir_fd, path.encode(_FS_ENCODING, "surrogateescape"), flags, _STATX_MASK, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return Statx._make(_STATX_FIELDS.unpack_from(buf))


def _get_flags(fd: int) -> int:
    flags: int = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8))[0]
    return flags


def get_immutable(path: str, dir_fd: int = AT_FDCWD, follow: bool = False) -> bool:
    """The immutable attribute of PATH; False when the file system has none."""
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | nofollow, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return bool(_get_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def set_immutable(path: str, immutable: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        flags = _get_flags(fd)
        new = flags | FS_IMMUTABLE_FL if immutable else flags & ~FS_IMMUTABLE_FL
        if new != flags:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", new))
    finally:
        os.close(fd)


def block_device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size: int = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
        return size
    finally:
        os.close(fd)


def block_device_read_only(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return bool(struct.unpack("i", fcntl.ioctl(fd, _BLKROGET, b"\0" * 4))[0])
    finally:
        os.close(fd)


def set_block_device_read_only(path: str, read_only: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _BLKROSET, struct.pack("i", 1 if read_only else 0))
    finally:
        os.close(fd)


def refuses_writes(path: str, dir_fd: int = AT_FDCWD) -> bool:
    """Whether writing PATH would fail with EROFS, systemd's test of a
    read-only image: a read-only mount or file system, a read-only btrfs
    subvolume (for files and directories in it), whatever else the file
    system decides; symlinks are followed."""
    if _libc.faccessat(dir_fd, os.fsencode(path), os.W_OK, _AT_EACCESS) == 0:
        return False
    return ctypes.get_errno() == errno.EROFS


class _StatfsBuf(ctypes.Structure):
    # struct statfs as glibc's statfs() fills it (__fsword_t is a long).
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


class Statfs(NamedTuple):
    magic: int
    read_only: bool  # ST_RDONLY: the mount or the file system is read-only


_SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): have the kernel start writing
    that range out now (it does not wait for it)."""
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def syncfs(path: str) -> None:
    """syncfs(2) of the file system PATH is on: everything written to it is
    on disk when this returns."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"Failed to synchronize file to disk: {os.strerror(code)}", path)
    finally:
        os.close(fd)


def statfs(path: str | int) -> Statfs:
    """statfs(2) of PATH (symlinks followed), or fstatfs(2) of an fd."""
    buf = _StatfsBuf()
    if isinstance(path, int):
        rc = _libc.fstatfs(path, ctypes.byref(buf))
    else:
        rc = _libc.statfs(os.fsencode(path), ctypes.byref(buf))
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), None if isinstance(path, int) else path)
    return Statfs(buf.f_type & 0xFFFFFFFF, bool(buf.f_flags & os.ST_RDONLY))
