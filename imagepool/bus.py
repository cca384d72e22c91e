"""D-Bus plumbing shared by the services: the one place where domain errors
become D-Bus errors, and caller credentials for authorization."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import sdbus
from sdbus import DbusFailedError, DbusInterfaceCommonAsync, dbus_method_async
from sdbus.dbus_exceptions import DbusUnknownObjectError
from sdbus.dbus_proxy_async_method import DbusMethodAsync
from sdbus.dbus_proxy_async_property import DbusPropertyAsync
from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION, SdBusInterface, SdBusMessage

from imagepool.errors import AccessDenied, Errno, PoolError, errno_dbus_name

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


_blocking_bus: sdbus.SdBus | None = None
# Unique names are never reused and a connection's PID never changes: the
# answers can be kept (a GetAll asks once per property).
_peer_pids: dict[str, int] = {}
_PEER_PIDS_MAX = 256


def peer_pid_blocking(name: str) -> int:
    """GetConnectionUnixProcessID for code that can't await (property getters),
    over a connection of its own; 0 when the peer is gone."""
    global _blocking_bus
    pid = _peer_pids.get(name)
    if pid is not None:
        return pid
    if _blocking_bus is None:
        _blocking_bus = sdbus.sd_bus_open_system()
        # The bus daemon answers this at once; never hold up the loop long.
        _blocking_bus.method_call_timeout_usec = 1_000_000
    message = _blocking_bus.new_method_call_message(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetConnectionUnixProcessID")
    message.append_data("s", name)
    try:
        pid = int(_blocking_bus.call(message).get_contents())
    except DbusFailedError:
        return 0
    if len(_peer_pids) >= _PEER_PIDS_MAX:
        del _peer_pids[next(iter(_peer_pids))]
    _peer_pids[name] = pid
    return pid


def export_per_caller(path: str, interface_name: str, cls: type[DbusInterfaceCommonAsync],
                      find: Callable[[int], DbusInterfaceCommonAsync | None]) -> SdBusInterface:
    """Serve PATH as whichever exported CLS object FIND(caller's PID) returns.

    This is sd-bus's object-find callback (machined's ``machine/self``), which
    sdbus does not offer: the interface is built from CLS's members, property
    getters learn the caller from the reply's destination and method calls are
    handed to the found object. A caller FIND has no object for gets systemd's
    UnknownObject error. Keep the returned interface: dropping it unexports PATH."""
    bus = sdbus.get_default_bus()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def unknown() -> DbusUnknownObjectError:
        return DbusUnknownObjectError(f"Unknown object '{path}'.")

    def property_getter(prop: DbusPropertyAsync) -> Callable[[SdBusMessage], None]:
        def get(reply: SdBusMessage) -> None:
            target = find(peer_pid_blocking(reply.destination or ""))
            if target is None:
                # sdbus replies with the exception's error name but then stops
                # processing the queue: start it again, and keep the log quiet.
                loop.call_soon(bus.process)
                raise unknown()
            reply.append_data(prop.property_signature, prop.property_getter(target))
        return get

    def method_call(attr: str) -> Callable[[SdBusMessage], None]:
        async def dispatch(message: SdBusMessage) -> None:
            try:
                pid = await _daemon().get_connection_unix_process_id(message.sender or "")
            except DbusFailedError:
                pid = 0
            target = find(pid)
            if target is not None:
                getattr(target, attr)._dbus_reply_call(message)
            elif message.expect_reply:
                error = unknown()
                message.create_error_reply(error.dbus_error_name, str(error)).send()

        def call(message: SdBusMessage) -> None:
            task = loop.create_task(dispatch(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return call

    interface = SdBusInterface()
    members = {}
    for klass in reversed(cls.__mro__):
        members.update(vars(klass))
    for attr, member in members.items():
        if isinstance(member, DbusPropertyAsync):
            interface.add_property(member.property_name, member.property_signature, property_getter(member), None,
                                   member.flags)
        elif isinstance(member, DbusMethodAsync):
            interface.add_method(member.method_name, member.input_signature, member.input_args_names,
                                 member.result_signature, member.result_args_names, member.flags, method_call(attr))
    bus.add_interface(interface, path, interface_name)

    default_handler = loop.get_exception_handler()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), DbusUnknownObjectError):
            return
        if default_handler:
            default_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    return interface


async def require_root(method: str | None = None) -> None:
    """Privileged operations: only root, until polkit is wired up; refused
    as polkit's check refuses them ("Permission denied").  METHOD names a
    method that systemd leaves to sd-bus to keep from unprivileged callers
    (no SD_BUS_VTABLE_UNPRIVILEGED), whose refusal reads differently."""
    if await caller_uid() != 0:
        if method:
            raise AccessDenied(f"Access to {method}() not permitted.")
        raise Errno(errno.EACCES)
