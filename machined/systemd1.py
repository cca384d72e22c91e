"""A small asynchronous client of systemd's manager (org.freedesktop.systemd1).

machined asks systemd for a transient scope per created machine
(CreateMachine*), stops it on TerminateMachine and signals it on
KillMachine whom=all (machined-core.c: manager_start_scope,
manager_stop_unit, manager_kill_unit).  A scope's start job is finished when
systemd emits JobRemoved for it; systemd only emits that signal to
subscribed clients, so we call Subscribe() (once per owner of the name) and
add the match before starting anything.

Every call is awaited with a timeout; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_signal_async
from sdbus.exceptions import SdBusUnmappedMessageError

from imagepool.errors import Errno, RemoteError

log = logging.getLogger(__name__)

SERVICE = "org.freedesktop.systemd1"
PATH = "/org/freedesktop/systemd1"
INTERFACE = "org.freedesktop.systemd1.Manager"

CALL_TIMEOUT = 30.0
JOB_TIMEOUT = 30.0
# JobRemoved of a unit we are starting may arrive before the reply to
# StartTransientUnit has been handled; at most this many are kept meanwhile.
EARLY_JOBS_MAX = 256

T = TypeVar("T")


class _Manager(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    @dbus_method_async("", "", method_name="Subscribe")
    async def subscribe(self) -> None:
        raise NotImplementedError

    @dbus_method_async("ssa(sv)a(sa(sv))", "o", method_name="StartTransientUnit")
    async def start_transient_unit(self, name: str, mode: str, properties: list[tuple[str, tuple[str, Any]]],
                                   aux: list[tuple[str, list[tuple[str, tuple[str, Any]]]]]) -> str:
        raise NotImplementedError

    @dbus_method_async("ss", "o", method_name="StartUnit")
    async def start_unit(self, name: str, mode: str) -> str:
        raise NotImplementedError

    @dbus_method_async("s", "", method_name="UnrefUnit")
    async def unref_unit(self, name: str) -> None:
        raise NotImplementedError

    @dbus_method_async("ss", "o", method_name="StopUnit")
    async def stop_unit(self, name: str, mode: str) -> str:
        raise NotImplementedError

    @dbus_method_async("ssi", "", method_name="KillUnit")
    async def kill_unit(self, name: str, whom: str, signo: int) -> None:
        raise NotImplementedError

    @dbus_signal_async("uoss", signal_name="JobRemoved", signal_args_names=["id", "job", "unit", "result"])
    def job_removed(self) -> tuple[int, str, str, str]:
        raise NotImplementedError


class Job:
    """A job systemd queued for us; wait() returns its result ("done", "failed", …)."""

    def __init__(self, client: Systemd, path: str, unit: str, future: asyncio.Future[str]) -> None:
        self.client = client
        self.path = path
        self.unit = unit
        self._future = future

    async def wait(self) -> str:
        try:
            return await asyncio.wait_for(self._future, JOB_TIMEOUT)
        except TimeoutError:
            raise Errno(errno.ETIMEDOUT, f"Timed out waiting for job {self.path} of unit {self.unit}") from None
        finally:
            self.forget()

    def forget(self) -> None:
        """Nobody is going to wait for this job any more."""
        self.client._jobs.pop(self.path, None)


class Systemd:
    """The client; proxies and the JobRemoved match are made on first use, on
    the default bus unless BUS is given."""

    def __init__(self, bus: sdbus.SdBus | None = None) -> None:
        self._bus = bus
        self._manager: _Manager | None = None
        self._match: Any = None
        self._match_lock = asyncio.Lock()
        self._subscribed_owner: str | None = None
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._starting: dict[str, int] = {}
        self._early: dict[str, tuple[str, str]] = {}

    def _get_bus(self) -> sdbus.SdBus:
        if self._bus is None:
            self._bus = sdbus.get_default_bus()
        return self._bus

    def _proxy(self) -> _Manager:
        if self._manager is None:
            self._manager = _Manager.new_proxy(SERVICE, PATH, self._get_bus())
        return self._manager

    # --- the name ----------------------------------------------------------------

    async def owner(self) -> str | None:
        """The unique name owning org.freedesktop.systemd1, or None."""
        # (A plain message: sdbus allows one interface class per name, and
        # imagepool.dbus has the one for org.freedesktop.DBus.)
        bus = self._get_bus()
        message = bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                              "org.freedesktop.DBus", "GetNameOwner")
        message.append_data("s", SERVICE)
        try:
            reply = await _call(bus.call_async(message))
        except RemoteError as e:
            if e.name == "org.freedesktop.DBus.Error.NameHasNoOwner":
                return None
            raise
        owner = reply.get_contents()  # one value: not in a tuple
        return owner if isinstance(owner, str) else str(owner[0])

    async def has_owner(self) -> bool:
        return await self.owner() is not None

    async def subscribe(self) -> None:
        """Match JobRemoved and Subscribe() to the current owner of the name
        (again when systemd was restarted, since it forgets subscribers)."""
        async with self._match_lock:
            if self._match is None:
                self._match = await _call(self._get_bus().match_signal_async(
                    SERVICE, PATH, INTERFACE, "JobRemoved", self._job_removed))
            owner = await self.owner()
            if owner is None:
                raise Errno(errno.ENXIO, "systemd is not on the bus")
            if owner != self._subscribed_owner:
                try:
                    await _call(self._proxy().subscribe())
                except RemoteError as e:
                    if e.name != "org.freedesktop.systemd1.AlreadySubscribed":
                        raise
                self._subscribed_owner = owner

    def _job_removed(self, message: Any) -> None:
        try:
            _id, job, unit, result = message.get_contents()
        except Exception:  # a malformed signal is nobody's business here
            log.debug("Ignoring malformed JobRemoved signal", exc_info=True)
            return
        future = self._jobs.get(job)
        if future is not None:
            if not future.done():
                future.set_result(result)
        elif unit in self._starting and len(self._early) < EARLY_JOBS_MAX:
            self._early[job] = (unit, result)

    # --- units -------------------------------------------------------------------

    async def start_transient_scope(self, unit: str, properties: list[tuple[str, tuple[str, Any]]]) -> Job:
        """StartTransientUnit(UNIT, "fail", PROPERTIES, []): the returned job's
        wait() gives the result from JobRemoved."""
        await self.subscribe()
        self._starting[unit] = self._starting.get(unit, 0) + 1
        try:
            path = await _call(self._proxy().start_transient_unit(unit, "fail", properties, []))
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._jobs[path] = future
            early = self._early.pop(path, None)
            if early is not None:
                future.set_result(early[1])
            return Job(self, path, unit, future)
        finally:
            self._starting[unit] -= 1
            if not self._starting[unit]:
                del self._starting[unit]
                for job in [j for j, (u, _) in self._early.items() if u == unit]:
                    del self._early[job]

    async def start_unit(self, unit: str, mode: str) -> str:
        """StartUnit; the job is not waited for."""
        return await _call(self._proxy().start_unit(unit, mode))

    async def start_transient_unit(self, unit: str, mode: str, properties: list[tuple[str, tuple[str, Any]]]) -> str:
        """StartTransientUnit of a unit whose job nobody waits for."""
        return await _call(self._proxy().start_transient_unit(unit, mode, properties, []))

    async def unref_unit(self, unit: str) -> None:
        await _call(self._proxy().unref_unit(unit))

    async def stop_unit(self, unit: str, mode: str = "fail") -> str:
        return await _call(self._proxy().stop_unit(unit, mode))

    async def kill_unit(self, unit: str, whom: str, signo: int) -> None:
        await _call(self._proxy().kill_unit(unit, whom, signo))


async def _call(awaitable: Awaitable[T]) -> T:
    """Await a call to the bus with a timeout; an error systemd replied with
    goes back to our own caller under the same name."""
    try:
        return await asyncio.wait_for(awaitable, CALL_TIMEOUT)
    except TimeoutError:
        raise Errno(errno.ETIMEDOUT, "Timed out waiting for systemd") from None
    except SdBusUnmappedMessageError as e:
        name, message = (list(e.args) + ["org.freedesktop.DBus.Error.Failed", ""])[:2]
        raise RemoteError(str(name), str(message)) from None
    except sdbus.DbusFailedError as e:
        raise RemoteError(e.dbus_error_name, str(e.args[0]) if e.args else "") from None
