"""polkit's CheckAuthorization, asked the way systemd's bus-polkit.c asks it
(systemd 262): the subject, the action with its details, the flags, on the
services' system bus, with sd-bus's default method call timeout.

Subjects: a D-Bus caller is its unique bus name ("system-bus-name"); a
Varlink caller is its process ("unix-process") by PID, start time and UID,
which every polkit takes, and by the pidfd of the connection's peer too
(SO_PEERPIDFD) where the kernel has one (Linux >= 6.5); systemd 262 sends
the pidfd only, which polkitd 122 refuses.

Nothing is cached: every call asks polkitd (systemd keeps an answer only for
the method call being handled).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sdbus
from sdbus import DbusFailedError, sd_bus_internals
from sdbus.sd_bus_internals import SdBusUnmappedMessageError

BUS_NAME = "org.freedesktop.PolicyKit1"
PATH = "/org/freedesktop/PolicyKit1/Authority"
INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 1

# sd-bus's default method call timeout, which systemd's polkit queries use (0: the default).
TIMEOUT = 25.0
TIMEOUT_ERROR = ("org.freedesktop.DBus.Error.NoReply", "Method call timed out")

# polkit is not there (bus_error_is_unknown_service()): systemd then refuses.
ABSENT = frozenset({"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
                    "org.freedesktop.systemd1.NoSuchUnit"})
# polkit's own errors that systemd 262 takes for "no".
REFUSALS = frozenset({"org.freedesktop.PolicyKit1.Error.Failed", "org.freedesktop.PolicyKit1.Error.Cancelled",
                      "org.freedesktop.PolicyKit1.Error.NotAuthorized"})

SO_PEERPIDFD = 77

Subject = tuple[str, dict[str, tuple[str, Any]]]


@dataclass(frozen=True)
class Answer:
    authorized: bool
    challenge: bool


class Absent(Exception):
    """polkit is not on the bus."""


class Failed(Exception):
    """polkit answered an error (NAME, MESSAGE) or nothing in time."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def bus_name_subject(sender: str) -> Subject:
    return ("system-bus-name", {"name": ("s", sender)})


def _start_time(pid: int) -> int:
    """The start time of PID in clock ticks since boot (/proc/PID/stat field 22), as polkit wants it."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of SOCK's peer (the caller closes it), None where the kernel has none to give."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def process_subject(pid: int, uid: int, pidfd: int | None) -> Subject:
    """The process by PID, start time and UID, which every polkit takes
    (polkitd 122, Debian 12's and sid's, refuses a subject without "pid"),
    and by PIDFD too, which the newer polkit prefers (race-free)."""
    subject: dict[str, tuple[str, Any]] = {"pid": ("u", pid), "start-time": ("t", _start_time(pid)), "uid": ("i", uid)}
    if pidfd is not None:
        subject["pidfd"] = ("h", pidfd)
    return ("unix-process", subject)


_sdbus_library = ctypes.CDLL(sd_bus_internals.__file__)
_get_allow_interactive = _sdbus_library.sd_bus_message_get_allow_interactive_authorization
_get_allow_interactive.argtypes = [ctypes.c_void_p]
_get_allow_interactive.restype = ctypes.c_int


def allows_interactive(message: sd_bus_internals.SdBusMessage) -> bool:
    """Whether MESSAGE carries ALLOW_INTERACTIVE_AUTHORIZATION.  sdbus has no
    accessor for the header flag: ask the sd-bus linked into sdbus itself,
    with the sd_bus_message its SdBusMessage object holds (the field after
    the object header, sd_bus_internals.h: SdBusMessageObject)."""
    pointer = ctypes.c_void_p.from_address(id(message) + object.__basicsize__).value
    return pointer is not None and _get_allow_interactive(pointer) > 0


async def check(subject: Subject, action: str, details: Mapping[str, str], interactive: bool) -> Answer:
    """Ask polkitd whether SUBJECT may do ACTION.  Raises Absent or Failed."""
    bus = sdbus.get_default_bus()
    message = bus.new_method_call_message(BUS_NAME, PATH, INTERFACE, "CheckAuthorization")
    message.append_data("(sa{sv})sa{ss}us", subject, action, dict(details),
                        ALLOW_USER_INTERACTION if interactive else 0, "")
    error: tuple[str, str]
    try:
        reply = await asyncio.wait_for(bus.call_async(message), TIMEOUT)
    except TimeoutError:
        error = TIMEOUT_ERROR
    except DbusFailedError as e:  # an error name sdbus has a class for
        error = (e.dbus_error_name, str(e.args[0]) if e.args else "")
        # sdbus keeps the call's future (and so this exception) alive: its traceback would keep our
        # callers' frames, and the method call being handled with its file descriptors.
        e.__traceback__ = None
    except SdBusUnmappedMessageError as e:  # any other: (name, message)
        error = (str(e.args[0]), str(e.args[1])) if len(e.args) == 2 else ("org.freedesktop.DBus.Error.Failed", str(e))
        e.__traceback__ = None
    else:
        contents: Any = reply.get_contents()  # the (bba{ss}) struct
        authorized, challenge, _ = contents[0] if len(contents) == 1 else contents
        return Answer(bool(authorized), bool(challenge))
    if error[0] in ABSENT:
        raise Absent()
    raise Failed(*error)


def close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
