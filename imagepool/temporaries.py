"""The pools' hidden temporaries (systemd's ``.#`` names), and what a
service does with the ones a crash left behind.

Every temporary name is made by ``tree.temp_name``, which writes it into the
registry of the running service: a file ``<service>-<pid>`` in REGISTRY_DIR
that the service holds an exclusive flock on for as long as it lives.  When
a service starts, it removes from its pools every ``.#`` entry that no live
registry names (a registry whose lock can be taken belongs to a dead
process: its entries are garbage too).  Lock files ``.#<image>.lck`` are
removed only when nobody holds them (systemd-nspawn does while it runs an
image), as systemd-tmpfiles does at boot (``R! /var/lib/machines/.#*``).
The removal itself is ``tree.clean_temporaries``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import struct

log = logging.getLogger(__name__)

REGISTRY_DIR = "/run/systemd/machined-py/temporaries"
TEMP_PREFIX = ".#"
_REGISTRY_MAX = 1 << 20  # bytes; a longer registry is pruned of names that are gone


class Registry:
    """The temporaries of this process, in a file it holds locked."""

    def __init__(self, service: str, directory: str = REGISTRY_DIR) -> None:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self.path = os.path.join(directory, f"{service}-{os.getpid()}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.size = 0

    def add(self, path: str) -> None:
        line = os.fsencode(path) + b"\n"
        if self.size + len(line) > _REGISTRY_MAX:
            self._prune()
        os.write(self.fd, line)
        self.size += len(line)

    def _prune(self) -> None:
        kept = [p for p in _read(self.fd) if os.path.lexists(p)]
        data = b"".join(os.fsencode(p) + b"\n" for p in kept)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)
        self.size = len(data)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


_registry: Registry | None = None


def start_registry(service: str, directory: str = REGISTRY_DIR) -> Registry:
    """Open this process's registry; temporaries made from now on are in it."""
    global _registry
    _registry = Registry(service, directory)
    atexit.register(_registry.close)
    return _registry


def register(path: str) -> None:
    if _registry is not None:
        _registry.add(os.path.abspath(path))


def _read(fd: int) -> list[str]:
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
    return [os.fsdecode(line) for line in data.splitlines() if line]


def live_paths(directory: str = REGISTRY_DIR) -> set[str]:
    """The temporaries named by registries of live processes; registries of
    dead ones are removed."""
    live: set[str] = set()
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return live
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live.update(_read(fd))  # held: its owner lives
                continue
            if _registry is not None and path == _registry.path:
                live.update(_read(fd))
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # its owner is gone
        finally:
            os.close(fd)
    return live


def in_use(path: str, live: set[str]) -> bool:
    # A temporary's name may carry a suffix of its own ("….qcow2").
    return path in live or any(path.startswith(p + ".") for p in live)


def held_lock_file(path: str) -> bool:
    """Whether a lock file is held (an OFD lock, as systemd-nspawn takes)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
        return False
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def _flock_struct(kind: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
