"""The domain errors of both services, and the one table of their names.

Every error the services raise on purpose derives from PoolError and knows
nothing of buses.  What a client sees is looked up here: ``dbus_name()`` for
the D-Bus front ends (``imagepool.dbus`` turns errors into replies), and
``varlink_name()`` for the Varlink ones.  An errno (Errno, or an OSError that
escapes an operation) is named the way sd-bus names it
(``System.Error.E…``), and reported over Varlink as io.systemd.System.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass


class PoolError(Exception):
    """Base class: a failure with a message meant for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgs(PoolError):
    """An argument is malformed (Varlink: InvalidParameter PARAMETER)."""

    def __init__(self, message: str, parameter: str = "") -> None:
        super().__init__(message)
        self.parameter = parameter


class NotSupported(PoolError):
    pass


class QuotaOff(NotSupported):
    """A limit was asked for where quotas are off (and may not be turned on)."""


class InvalidForMachine(NotSupported):
    """An operation this kind of machine does not have, where systemd's
    D-Bus side calls it an invalid argument (and Varlink NotSupported)."""


class AccessDenied(PoolError):
    pass


class LimitsExceeded(PoolError):
    pass


class MetadataError(PoolError):
    """Metadata of an image could not be read (a raw image that won't mount):
    named by its ERRNO, as systemd 262 does (ENOPKG: nothing to mount)."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = code


class Errno(PoolError):
    """An operation failed with an errno, reported as sd-bus does it."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


class PermissionDenied(Errno):
    """Authorization refused: EACCES ("Permission denied") as systemd's
    polkit check answers it on D-Bus; PermissionDenied over Varlink."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(errno.EACCES, message)


class InteractiveAuthorizationRequired(PoolError):
    """polkit would ask the caller to authenticate, and the caller did not
    allow interactive authorization: systemd 262's words (252 said
    "Interactive authentication required.")."""

    def __init__(self) -> None:
        super().__init__("Access denied as the requested operation requires interactive authentication. However, "
                         "interactive authentication has not been enabled by the calling program.")


class PolkitFailure(Errno):
    """polkit answered CheckAuthorization with an error other than the ones
    systemd takes for "no" (or did not answer in time): passed on under its
    own NAME on D-Bus; over Varlink the errno sd-bus gives that name, as
    io.systemd.System."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(_errno_of_dbus_name(name), message)
        self.name = name


class RemoteError(PoolError):
    """An error another service (systemd, a machine's bus) answered us with:
    passed on to our caller under its own name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


# --- images and machines (machined) ---------------------------------------------


class NoSuchImage(PoolError):
    def __init__(self, name: str) -> None:
        super().__init__(f"No image '{name}' known")
        self.name = name


class NoSuchMachine(PoolError):
    def __init__(self, name: str) -> None:
        super().__init__(f"No machine '{name}' known")
        self.name = name


class MachineExists(PoolError):
    pass


class NoMachineForPID(PoolError):
    pass


class NoPrivateNetworking(PoolError):
    pass


class NoSuchUserMapping(PoolError):
    pass


class NoSuchGroupMapping(PoolError):
    pass


class UserInHostRange(NoSuchUserMapping):
    pass


class GroupInHostRange(NoSuchGroupMapping):
    pass


class NoOSRelease(PoolError):
    """A machine without os-release (D-Bus: Failed, as systemd)."""


class NoUIDShift(NotSupported):
    """A machine whose UID/GID mapping is too complex for a shift."""


class NoIPC(Errno):
    """A machine without a bus to start a unit through."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class JobFailed(PoolError):
    """A job systemd ran for us (a machine's scope) did not end in "done"."""


# --- transfers (importd) -----------------------------------------------------------


class TransferInProgress(PoolError):
    def __init__(self, message: str, remote: str = "") -> None:
        super().__init__(message)
        self.remote = remote


class NoSuchTransfer(PoolError):
    pass


class TransferError(PoolError):
    """A transfer's job failed; the message is logged to the client as is."""


class ReportedFailure(TransferError):
    """A failure whose message the job has already logged (followed by
    "Exiting.", as systemd's workers do once they got going)."""


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """What a client sees of an error: its D-Bus name, and its Varlink name
    (one starting with "." is relative to the interface being served; None:
    the generic errno reply)."""

    dbus: str
    varlink: str | None = None


_FAILED = "org.freedesktop.DBus.Error.Failed"

NAMES: dict[type[PoolError], Names] = {
    PoolError: Names(_FAILED),
    InvalidArgs: Names("org.freedesktop.DBus.Error.InvalidArgs", "org.varlink.service.InvalidParameter"),
    NotSupported: Names("org.freedesktop.DBus.Error.NotSupported", ".NotSupported"),
    InvalidForMachine: Names("org.freedesktop.DBus.Error.InvalidArgs", ".NotSupported"),
    AccessDenied: Names("org.freedesktop.DBus.Error.AccessDenied", "org.varlink.service.PermissionDenied"),
    LimitsExceeded: Names("org.freedesktop.DBus.Error.LimitsExceeded", "io.systemd.MachineImage.TooManyOperations"),
    NoSuchImage: Names("org.freedesktop.machine1.NoSuchImage", "io.systemd.MachineImage.NoSuchImage"),
    NoSuchMachine: Names("org.freedesktop.machine1.NoSuchMachine", "io.systemd.Machine.NoSuchMachine"),
    MachineExists: Names("org.freedesktop.machine1.MachineExists", "io.systemd.Machine.MachineExists"),
    NoMachineForPID: Names("org.freedesktop.machine1.NoMachineForPID", "io.systemd.Machine.NoSuchMachine"),
    NoPrivateNetworking: Names("org.freedesktop.machine1.NoPrivateNetworking",
                               "io.systemd.Machine.NoPrivateNetworking"),
    NoSuchUserMapping: Names("org.freedesktop.machine1.NoSuchUserMapping", "io.systemd.Machine.NoSuchUser"),
    NoSuchGroupMapping: Names("org.freedesktop.machine1.NoSuchGroupMapping", "io.systemd.Machine.NoSuchGroup"),
    UserInHostRange: Names("org.freedesktop.machine1.NoSuchUserMapping", "io.systemd.Machine.UserInHostRange"),
    GroupInHostRange: Names("org.freedesktop.machine1.NoSuchGroupMapping", "io.systemd.Machine.GroupInHostRange"),
    NoOSRelease: Names(_FAILED, "io.systemd.Machine.NoOSReleaseInformation"),
    NoUIDShift: Names("org.freedesktop.DBus.Error.NotSupported", "io.systemd.Machine.NoUIDShift"),
    NoIPC: Names("org.freedesktop.DBus.Error.FileNotFound", "io.systemd.Machine.NoIPC"),
    PermissionDenied: Names("org.freedesktop.DBus.Error.AccessDenied", "org.varlink.service.PermissionDenied"),
    InteractiveAuthorizationRequired: Names("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
                                            "io.systemd.InteractiveAuthenticationRequired"),
    JobFailed: Names("org.freedesktop.systemd1.JobFailed"),
    TransferInProgress: Names("org.freedesktop.import1.TransferInProgress", "io.systemd.Import.AlreadyInProgress"),
    NoSuchTransfer: Names("org.freedesktop.import1.NoSuchTransfer"),
}


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
    if code in _GENERIC_ERRNO_NAMES:
        return _GENERIC_ERRNO_NAMES[code]
    symbol = errno.errorcode.get(code)
    return f"System.Error.{symbol}" if symbol else _FAILED


def _errno_of_dbus_name(name: str) -> int:
    """The errno sd-bus gives a D-Bus error NAME (EIO for names it does not know)."""
    if name.startswith("System.Error."):
        return int(getattr(errno, name.removeprefix("System.Error."), errno.EIO))
    known = {"org.freedesktop.DBus.Error.AccessDenied": errno.EACCES, "org.freedesktop.DBus.Error.Failed": errno.EACCES,
             "org.freedesktop.DBus.Error.NoReply": errno.ETIMEDOUT,
             "org.freedesktop.DBus.Error.UnknownMethod": errno.EBADR,
             "org.freedesktop.DBus.Error.UnknownObject": errno.EBADR}
    if name in known:
        return known[name]
    for code, generic in _GENERIC_ERRNO_NAMES.items():
        if generic == name:
            return code
    return errno.EIO


def _names(exc: PoolError) -> Names:
    """The names of EXC's class, or of the nearest base class in the table."""
    for cls in type(exc).__mro__:
        names = NAMES.get(cls)
        if names is not None:
            return names
    return NAMES[PoolError]


def dbus_name(exc: PoolError) -> str:
    """The D-Bus error name of a domain error."""
    if isinstance(exc, PolkitFailure):
        return exc.name
    if isinstance(exc, (Errno, MetadataError)):
        return errno_dbus_name(exc.errno)
    if isinstance(exc, RemoteError):
        return exc.name
    return _names(exc).dbus


VARLINK_ERRNO = "io.systemd.System"


def varlink_name(exc: PoolError, interface: str) -> str:
    """The Varlink error name of a domain error, served on INTERFACE;
    io.systemd.System (with the errno as parameter) where there is none."""
    names = _names(exc)
    if isinstance(exc, PolkitFailure) and exc.errno in (errno.EACCES, errno.EPERM):
        return NAMES[PermissionDenied].varlink or VARLINK_ERRNO  # as systemd's varlink_verify_polkit_async()
    if isinstance(exc, Errno) and type(exc) not in NAMES:
        return VARLINK_ERRNO
    name = names.varlink
    if name is None:
        return VARLINK_ERRNO
    return interface + name if name.startswith(".") else name
