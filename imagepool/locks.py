"""Image locks compatible with systemd-nspawn and systemd-machined.

Two BSD locks guard an image: a global one under /run/systemd/nspawn/locks
named after the inode (or the block device), and a local ``.#<name>.lck``
file next to the image.  A running nspawn holds them; so do we while we
change an image.  New names are guarded by ``name-<name>`` locks.

systemd 252 takes these as open-file-description (OFD) record locks on the
whole file, not flock(): the two kinds don't see each other, so we must use
the same kind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

LOCK_DIR = "/run/systemd/nspawn/locks"


def _ofd_lock(fd: int, operation: int) -> None:
    """Lock the whole file: LOCK_EX/LOCK_SH, never waiting (EAGAIN if held)."""
    kind = fcntl.F_WRLCK if operation == fcntl.LOCK_EX else fcntl.F_RDLCK
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))


def _locking_disabled() -> bool:
    return os.environ.get("SYSTEMD_NSPAWN_LOCK", "1").lower() in ("0", "no", "false", "off")


class LockFile:
    def __init__(self, path: str, fd: int, operation: int) -> None:
        self.path = path
        self.fd = fd
        self.operation = operation

    def release(self) -> None:
        if self.fd < 0:
            return
        # Only unlink a lock file nobody else holds: the exclusive owner may,
        # a shared owner only if it can upgrade without waiting.
        remove = self.operation == fcntl.LOCK_EX
        if not remove:
            try:
                _ofd_lock(self.fd, fcntl.LOCK_EX)
                remove = True
            except OSError:
                pass
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def make_lock_file(path: str, operation: int) -> LockFile:
    """Take a non-blocking lock on PATH, creating it; EBUSY when held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
        try:
            _ofd_lock(fd, operation)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path) from None
            raise
        # The previous owner may have unlinked the file after we opened it.
        if os.fstat(fd).st_nlink > 0:
            return LockFile(path, fd, operation)
        os.close(fd)


def _global_lock_path(path: str) -> str:
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return f"{LOCK_DIR}/block-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"{LOCK_DIR}/inode-{st.st_dev}:{st.st_ino}"


def _local_lock_path(path: str) -> str | None:
    if path.startswith("/dev/"):
        return None
    parent, base = os.path.split(path.rstrip("/"))
    return os.path.join(parent or "/", f".#{base}.lck")


@contextlib.contextmanager
def image_path_lock(path: str, operation: int = fcntl.LOCK_EX) -> Iterator[None]:
    """Hold the global and the local lock of the image at PATH."""
    if _locking_disabled():
        yield
        return
    if os.path.abspath(path) == "/":
        if operation == fcntl.LOCK_EX:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        yield
        return
    locks: list[LockFile] = []
    try:
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        locks.append(make_lock_file(_global_lock_path(path), operation))
        local = _local_lock_path(path)
        if local:
            try:
                locks.append(make_lock_file(local, operation))
            except OSError as e:
                if not (e.errno == errno.EROFS and operation == fcntl.LOCK_SH):
                    raise
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


@contextlib.contextmanager
def image_name_lock(name: str, operation: int = fcntl.LOCK_EX) -> Iterator[None]:
    """Guard a name that is about to be created (clone, rename, import)."""
    if _locking_disabled():
        yield
        return
    if name == ".host":
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), name)
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    lock = make_lock_file(f"{LOCK_DIR}/name-{name}", operation)
    try:
        yield
    finally:
        lock.release()
