"""The domain errors of both services.

Every error the services raise on purpose derives from PoolError.  Each class
names the D-Bus error it becomes; the one place that turns them into D-Bus
errors is ``imagepool.dbus.errors``.  An OSError that escapes an operation is
reported the way sd-bus reports an errno (``System.Error.E…``).
"""

from __future__ import annotations

import errno
import os


class PoolError(Exception):
    """Base class: a failure with a message meant for the client."""

    dbus_name = "org.freedesktop.DBus.Error.Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgs(PoolError):
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class NotSupported(PoolError):
    dbus_name = "org.freedesktop.DBus.Error.NotSupported"


class AccessDenied(PoolError):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class LimitsExceeded(PoolError):
    dbus_name = "org.freedesktop.DBus.Error.LimitsExceeded"


class NoSuchImage(PoolError):
    dbus_name = "org.freedesktop.machine1.NoSuchImage"

    def __init__(self, name: str) -> None:
        super().__init__(f"No image '{name}' known")
        self.name = name


class MetadataError(PoolError):
    """Metadata of an image could not be read (a raw image that won't mount)."""


class Errno(PoolError):
    """An operation failed with an errno, reported as sd-bus does it."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code

    @property
    def dbus_name(self) -> str:  # type: ignore[override]
        return errno_dbus_name(self.errno)


# errnos that sd-bus reports under the generic names (bus-error.c).
_GENERIC_ERRNO_NAMES = {
    errno.ENOMEM: "org.freedesktop.DBus.Error.NoMemory",
    errno.EPERM: "org.freedesktop.DBus.Error.AccessDenied",
    errno.EACCES: "org.freedesktop.DBus.Error.AccessDenied",
    errno.EINVAL: "org.freedesktop.DBus.Error.InvalidArgs",
    errno.ESRCH: "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
    errno.ENOENT: "org.freedesktop.DBus.Error.FileNotFound",
    errno.EEXIST: "org.freedesktop.DBus.Error.FileExists",
    errno.ETIMEDOUT: "org.freedesktop.DBus.Error.Timeout",
    errno.ETIME: "org.freedesktop.DBus.Error.Timeout",
    errno.EIO: "org.freedesktop.DBus.Error.IOError",
    errno.ENETRESET: "org.freedesktop.DBus.Error.Disconnected",
    errno.ECONNABORTED: "org.freedesktop.DBus.Error.Disconnected",
    errno.ECONNRESET: "org.freedesktop.DBus.Error.Disconnected",
    errno.EOPNOTSUPP: "org.freedesktop.DBus.Error.NotSupported",
    errno.EADDRNOTAVAIL: "org.freedesktop.DBus.Error.BadAddress",
    errno.ENOBUFS: "org.freedesktop.DBus.Error.LimitsExceeded",
    errno.EADDRINUSE: "org.freedesktop.DBus.Error.AddressInUse",
    errno.EBADMSG: "org.freedesktop.DBus.Error.InconsistentMessage",
}


def errno_dbus_name(code: int) -> str:
    """The D-Bus error name sd-bus gives an errno: a few map to the generic
    names (bus-error.c), the rest become ``System.Error.<SYMBOL>``."""
    symbol = errno.errorcode.get(code)
    if code in _GENERIC_ERRNO_NAMES:
        return _GENERIC_ERRNO_NAMES[code]
    return f"System.Error.{symbol}" if symbol else "org.freedesktop.DBus.Error.Failed"


def from_oserror(exc: OSError) -> Errno:
    return Errno(exc.errno or errno.EIO)
