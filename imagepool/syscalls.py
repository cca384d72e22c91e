"""The raw system calls that Python's os module lacks, in one place: the libc
handle, openat2(RESOLVE_IN_ROOT), renameat2(NOREPLACE/EXCHANGE), a private
mount namespace (unshare), and glibc's mallopt() for importd's buffers.

Failures raise OSError with the errno, as os functions do."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # the same number on every architecture (new-style syscall)
CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


def raise_errno(what: str | None = None) -> None:
    """Raise the OSError of the errno the last failed libc call left."""
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), what)


def check(ret: int, what: str | None = None) -> int:
    """RET of a libc call; raises its OSError when it is negative."""
    if ret < 0:
        raise_errno(what)
    return ret


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
            mode: int = 0) -> int:
    """openat2(2): with the default RESOLVE, PATH below DIR_FD as if DIR_FD
    were "/" (absolute and ".." symlinks stay inside); O_CLOEXEC always."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how)))
    return check(int(fd), path)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """PATH below ROOT_FD as if ROOT_FD were "/" (absolute symlinks and ".."
    stay below it), no magic links; close-on-exec, and without a
    controlling tty unless the open is O_PATH (which takes no other flags)."""
    if not flags & os.O_PATH:
        flags |= os.O_NOCTTY
    return openat2(root_fd, path, flags, mode=mode)


def renameat2(old: str, new: str, flags: int, old_dir: int = AT_FDCWD, new_dir: int = AT_FDCWD) -> None:
    if libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        raise_errno(new)


def rename_noreplace(old: str, new: str, old_dir: int = AT_FDCWD, new_dir: int = AT_FDCWD) -> None:
    renameat2(old, new, RENAME_NOREPLACE, old_dir, new_dir)


def rename_exchange(a: str, b: str) -> None:
    renameat2(a, b, RENAME_EXCHANGE)


def private_mount_namespace() -> None:
    """Leave the caller's mount namespace for a copy of it in which every
    mount is private: nothing mounted from now on propagates back.  Only a
    single-threaded process can (unshare fails with EINVAL once threads
    share its fs_struct)."""
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "/")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_buffers_mapped(mmap_threshold: int = 4 << 20, trim_threshold: int = 4 << 20, arenas: int = 2) -> None:
    """mallopt(3) for a process that streams through buffers of up to a few
    MiB in several threads (importd: 256 KiB reads, 1 MiB decoded chunks).
    glibc's default lets such buffers be mmap()ed and munmap()ed one by one
    (its threshold adapts only to what the main arena frees) and gives freed
    heap back at 128 KiB: every new buffer is then page-faulted in afresh and
    every unmap shoots down the TLBs of the other threads' CPUs.  Measured on
    a pull-oci of 286 MB in 4 threads: 138,000 page faults and 4.1 s of CPU,
    with these thresholds 3,000 and 2.3 s.  What is kept is bounded by
    TRIM_THRESHOLD per arena, and the arenas by ARENAS (glibc makes up to 8
    per CPU for a process with many threads: with 4 concurrent pulls importd
    peaked at 114 MB; with 2 arenas at 92-98 MB, as before the thresholds,
    82-96 MB)."""
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    libc.mallopt(_M_ARENA_MAX, arenas)
