"""Small file-system helpers: birth time (statx), the immutable attribute,
block device size and read-only flag."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BTIME = 0x800

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
_BLKGETSIZE64 = 0x80081272
_BLKROGET = 0x125E
_BLKROSET = 0x125D

_libc = ctypes.CDLL(None, use_errno=True)


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_pad", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_pad1", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("_spare", ctypes.c_uint64 * 16),
    ]


def birth_time_usec(path: str, follow: bool = True) -> int:
    """Birth time in µs since the epoch, 0 when the file system has none."""
    buf = _Statx()
    flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
    if _libc.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BTIME, ctypes.byref(buf)) != 0:
        return 0
    if not buf.stx_mask & _STATX_BTIME:
        return 0
    return buf.stx_btime.tv_sec * 1_000_000 + buf.stx_btime.tv_nsec // 1000


def _get_flags(fd: int) -> int:
    return struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8))[0]


def get_immutable(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
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
        return struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
    finally:
        os.close(fd)


def block_device_read_only(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _BLKROGET, b"\0" * 4))[0] != 0
    finally:
        os.close(fd)


def set_block_device_read_only(path: str, read_only: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _BLKROSET, struct.pack("i", 1 if read_only else 0))
    finally:
        os.close(fd)


def fs_read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
