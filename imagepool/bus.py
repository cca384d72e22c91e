"""D-Bus plumbing shared by the services: the one place where domain errors
become D-Bus errors, and caller credentials for authorization."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import sdbus
from sdbus import DbusFailedError, DbusInterfaceCommonAsync, dbus_method_async
from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION

from imagepool.errors import AccessDenied, PoolError, errno_dbus_name

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# sd-bus itself refuses methods without this flag to callers lacking
# CAP_SYS_ADMIN; like systemd we let everybody in and decide per method.
UNPRIVILEGED = sdbus.DbusUnprivilegedFlag

_error_classes: dict[str, type[DbusFailedError]] = {}


def dbus_error(name: str) -> type[DbusFailedError]:
    """The sdbus exception class that makes a reply with error NAME."""
    cls = _error_classes.get(name)
    if cls is None:
        # sdbus keeps one class per error name; reuse its own where it has one.
        known = DBUS_ERROR_TO_EXCEPTION.get(name)
        if known is not None and issubclass(known, DbusFailedError):
            cls = known
        else:
            cls = type(f"Dbus_{name.replace('.', '_')}", (DbusFailedError,), {"dbus_error_name": name})
        _error_classes[name] = cls
    return cls


def to_dbus_error(exc: BaseException) -> DbusFailedError:
    """Map an exception to the D-Bus error a client should see."""
    if isinstance(exc, PoolError):
        return dbus_error(exc.dbus_name)(exc.message)
    if isinstance(exc, OSError) and exc.errno:
        return dbus_error(errno_dbus_name(exc.errno))(exc.strerror or "")
    log.error("Unexpected error", exc_info=exc)
    return dbus_error("org.freedesktop.DBus.Error.Failed")("Internal error")


def translated(func: F) -> F:
    """Decorate a D-Bus method body: domain errors leave as D-Bus errors."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except DbusFailedError:
            raise
        except Exception as exc:
            raise to_dbus_error(exc) from None

    return wrapper  # type: ignore[return-value]


class _DBusDaemon(DbusInterfaceCommonAsync, interface_name="org.freedesktop.DBus"):
    @dbus_method_async("s", "u", method_name="GetConnectionUnixUser")
    async def get_connection_unix_user(self, name: str) -> int:
        raise NotImplementedError

    @dbus_method_async("s", "u", method_name="GetConnectionUnixProcessID")
    async def get_connection_unix_process_id(self, name: str) -> int:
        raise NotImplementedError


_daemon_proxy: _DBusDaemon | None = None


def _daemon() -> _DBusDaemon:
    global _daemon_proxy
    if _daemon_proxy is None:
        _daemon_proxy = _DBusDaemon.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus")
    return _daemon_proxy


async def caller_uid() -> int:
    """The UID of the peer whose method call is being handled."""
    sender = sdbus.get_current_message().sender
    if sender is None:
        raise AccessDenied("Access denied")
    return await _daemon().get_connection_unix_user(sender)


async def caller_pid() -> int:
    sender = sdbus.get_current_message().sender
    if sender is None:
        raise AccessDenied("Access denied")
    return await _daemon().get_connection_unix_process_id(sender)


async def require_root() -> None:
    """Privileged operations: only root, until polkit is wired up."""
    if await caller_uid() != 0:
        raise AccessDenied("Access denied")
