"""D-Bus plumbing shared by the services' front ends: the one place where
domain errors become D-Bus errors (by the names in ``imagepool.errors``), who
the caller is, and objects served per caller (``machine/self``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import sdbus
from sdbus import DbusFailedError, DbusInterfaceCommonAsync, dbus_method_async, dbus_property_async
from sdbus.dbus_exceptions import DbusUnknownObjectError
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle
from sdbus.dbus_proxy_async_method import DbusMethodAsync
from sdbus.dbus_proxy_async_property import DbusPropertyAsync
from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION, SdBusInterface, SdBusMessage

from imagepool import authz, polkit
from imagepool.authz import Caller
from imagepool.errors import AccessDenied, PoolError, dbus_name, errno_dbus_name

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
        return dbus_error(dbus_name(exc))(exc.message)
    if isinstance(exc, OSError) and exc.errno:
        return dbus_error(errno_dbus_name(exc.errno))(exc.strerror or "")
    log.error("Unexpected error", exc_info=exc)
    return dbus_error("org.freedesktop.DBus.Error.Failed")("Internal error")


def method(input_signature: str, result_signature: str, name: str, input_names: list[str] | None = None,
           result_names: list[str] | None = None, flags: int = UNPRIVILEGED) -> Callable[[F], F]:
    """A D-Bus method (unprivileged unless FLAGS say otherwise, as systemd's
    are) whose domain errors leave as D-Bus errors."""

    def decorate(func: F) -> F:
        exported: F = dbus_method_async(input_signature, result_signature, flags=flags, method_name=name,
                                        input_args_names=input_names, result_args_names=result_names)(translated(func))
        return exported

    return decorate


def properties(target: str, table: Iterable[tuple[str, str, str, int]]) -> dict[str, Any]:
    """D-Bus properties from a TABLE of (name, signature, attribute, flags):
    each reads the attribute of ``self.TARGET``.  For a class body:
    ``locals().update(properties(...))``."""
    out: dict[str, Any] = {}
    for name, signature, attr, flags in table:
        getter: Callable[[Any], Any] = operator.attrgetter(f"{target}.{attr}")

        def get(self: Any, getter: Callable[[Any], Any] = getter) -> Any:
            return getter(self)

        out[f"_property_{name}"] = dbus_property_async(signature, flags=flags, property_name=name)(get)
    return out


K = TypeVar("K")
Obj = TypeVar("Obj", bound=DbusInterfaceCommonAsync)


class Exported(Generic[K, Obj]):
    """Objects of one kind exported on the bus, by key (a name, an id), each
    at PATH(key)."""

    def __init__(self, path: Callable[[K], str]) -> None:
        self.path = path
        self.objects: dict[K, Obj] = {}
        self._handles: dict[K, DbusExportHandle] = {}

    def export(self, key: K, obj: Obj) -> None:
        self.unexport(key)
        self._handles[key] = obj.export_to_dbus(self.path(key))
        self.objects[key] = obj

    def unexport(self, key: K) -> None:
        self.objects.pop(key, None)
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.stop()


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


async def caller() -> Caller:
    """The peer whose method call is being handled."""
    message = sdbus.get_current_message()
    sender = message.sender
    if sender is None:
        raise AccessDenied("Access denied")
    return Caller(uid=await _daemon().get_connection_unix_user(sender), bus_name=sender,
                  interactive=polkit.allows_interactive(message))


def current_method() -> str:
    """The name of the method being handled (its member name)."""
    return sdbus.get_current_message().member or ""


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


def _ask_bus_blocking(member: str, name: str) -> int | None:
    """A GetConnectionUnix* answer of the bus daemon, over a connection of
    our own, for code that can't await; None when the peer is gone."""
    global _blocking_bus
    if _blocking_bus is None:
        _blocking_bus = sdbus.sd_bus_open_system()
        # The bus daemon answers this at once; never hold up the loop long.
        _blocking_bus.method_call_timeout_usec = 1_000_000
    message = _blocking_bus.new_method_call_message(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", member)
    message.append_data("s", name)
    try:
        contents = _blocking_bus.call(message).get_contents()
    except DbusFailedError:
        return None
    return int(contents if isinstance(contents, int) else contents[0])  # type: ignore[arg-type]


def peer_pid_blocking(name: str) -> int:
    """GetConnectionUnixProcessID for code that can't await (property getters);
    0 when the peer is gone."""
    pid = _peer_pids.get(name)
    if pid is not None:
        return pid
    pid = _ask_bus_blocking("GetConnectionUnixProcessID", name)
    if pid is None:
        return 0
    if len(_peer_pids) >= _PEER_PIDS_MAX:
        del _peer_pids[next(iter(_peer_pids))]
    _peer_pids[name] = pid
    return pid


def peer_uid_blocking(name: str) -> int | None:
    """GetConnectionUnixUser likewise (property setters); None when gone."""
    return _ask_bus_blocking("GetConnectionUnixUser", name)


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
    tasks: set[asyncio.Task[None]] = set()

    def unknown() -> DbusUnknownObjectError:
        return DbusUnknownObjectError(f"Unknown object '{path}'.")

    def property_getter(prop: DbusPropertyAsync[Any]) -> Callable[[SdBusMessage], None]:
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
    members: dict[str, Any] = {}
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


async def authorize(action: str, details: Mapping[str, str] | None = None) -> Caller:
    """Ask imagepool.authz whether the caller of the method being handled
    may do ACTION; returns the caller."""
    who = await caller()
    await authz.authorize(who, action, details)
    return who


def require_privileged(who: Caller, method: str) -> None:
    """What sd-bus itself answers a caller that lacks CAP_SYS_ADMIN for a
    method without SD_BUS_VTABLE_UNPRIVILEGED (METHOD: interface.member):
    systemd leaves a few methods to this check instead of polkit's."""
    if who.uid != 0:
        raise AccessDenied(f"Access to {method}() not permitted.")
