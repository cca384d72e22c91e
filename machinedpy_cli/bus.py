"""The system bus, as the client sees it: method calls that return tuples
and raise BusError (name, message), property reads, and signal matches.

Built on sdbus's low-level SdBus object: it is asyncio-native, honours
``$DBUS_SYSTEM_BUS_ADDRESS``, and lets us pass and receive file descriptors
and match signals on any object path of a sender."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from sdbus import DbusFailedError
from sdbus.sd_bus_internals import (
    SdBus,
    SdBusBaseError,
    SdBusMessage,
    SdBusSlot,
    SdBusUnmappedMessageError,
    sd_bus_open_system,
)

MACHINE1 = "org.freedesktop.machine1"
MACHINE1_PATH = "/org/freedesktop/machine1"
# machined-py's own additions (machined/dbus/extras.py)
EXTRAS_PATH = "/org/machined_py/machine1"
EXTRAS_INTERFACE = "org.machined_py.Images1"
MACHINE1_MANAGER = "org.freedesktop.machine1.Manager"
MACHINE1_MACHINE = "org.freedesktop.machine1.Machine"
IMPORT1 = "org.freedesktop.import1"
IMPORT1_PATH = "/org/freedesktop/import1"
IMPORT1_MANAGER = "org.freedesktop.import1.Manager"
IMPORT1_TRANSFER = "org.freedesktop.import1.Transfer"
PROPERTIES = "org.freedesktop.DBus.Properties"

UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
INFINITE_USEC = 2**64 - 1


class BusError(Exception):
    """An error reply (or a failure to talk to the bus at all)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name, message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return self.message or self.name


def _bus_error(exc: BaseException) -> BusError:
    if isinstance(exc, SdBusUnmappedMessageError) and len(exc.args) >= 2:
        return BusError(str(exc.args[0]), str(exc.args[1]))
    if isinstance(exc, DbusFailedError):
        name = getattr(type(exc), "dbus_error_name", "org.freedesktop.DBus.Error.Failed")
        return BusError(str(name), str(exc.args[0]) if exc.args else "")
    return BusError("org.freedesktop.DBus.Error.Failed", str(exc))


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (SdBusBaseError, DbusFailedError) as e:
        raise _bus_error(e) from None


class Bus:
    def __init__(self) -> None:
        with _translated():
            self.sd: SdBus = sd_bus_open_system()
        self._slots: list[SdBusSlot] = []

    async def call(self, dest: str, path: str, interface: str, member: str, signature: str = "", *args: Any,
                   timeout_usec: int | None = None) -> tuple[Any, ...]:
        with _translated():
            message = self.sd.new_method_call_message(dest, path, interface, member)
            if signature:
                message.append_data(signature, *args)
            saved = self.sd.method_call_timeout_usec
            if timeout_usec is not None:
                self.sd.method_call_timeout_usec = timeout_usec
            try:
                future = self.sd.call_async(message)
            finally:
                self.sd.method_call_timeout_usec = saved
            reply = await future
            return reply.parse_to_tuple()

    async def machine1(self, member: str, signature: str = "", *args: Any,
                       timeout_usec: int | None = None) -> tuple[Any, ...]:
        return await self.call(MACHINE1, MACHINE1_PATH, MACHINE1_MANAGER, member, signature, *args,
                               timeout_usec=timeout_usec)

    async def import1(self, member: str, signature: str = "", *args: Any) -> tuple[Any, ...]:
        return await self.call(IMPORT1, IMPORT1_PATH, IMPORT1_MANAGER, member, signature, *args)

    async def get_all(self, dest: str, path: str, interface: str = "") -> dict[str, tuple[str, Any]]:
        (props,) = await self.call(dest, path, PROPERTIES, "GetAll", "s", interface)
        return dict(props)

    async def get(self, dest: str, path: str, interface: str, name: str) -> Any:
        (variant,) = await self.call(dest, path, PROPERTIES, "Get", "ss", interface, name)
        return variant[1]

    async def match(self, sender: str | None, path: str | None, interface: str | None, member: str | None,
                    callback: Callable[[SdBusMessage], None]) -> None:
        """Call CALLBACK with every matching signal, until close()."""
        with _translated():
            slot = await self.sd.match_signal_async(sender, path, interface, member, callback)
        self._slots.append(slot)

    def close(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots.clear()
        self.sd.close()
