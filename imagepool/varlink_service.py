"""The services' Varlink front ends: interfaces defined by their IDL text
(imagepool.varlink_idl), each method a handler of ours, served on
imagepool.varlink's server.

A handler gets a Call and returns the reply's parameters (a dict, or a
Reply when file descriptors go with it), or is an async generator of them
for calls with "more": each one but the last is sent with "continues".
Domain errors become Varlink errors by the one table (imagepool.errors):
InvalidParameter names the parameter, an errno is io.systemd.System.
org.varlink.service (GetInfo, GetInterfaceDescription) and io.systemd
(its errors) come with every service; io.systemd.service (Ping,
SetLogLevel, GetLogLevel, GetEnvironment) with ``add_service_interface``.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import logging
import os
import socket
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources

from asyncvarlink import GenericVarlinkErrorReply, VarlinkInterfaceRegistry, VarlinkMethodCall, VarlinkMethodReply

from imagepool import varlink, varlink_idl
from imagepool.authz import Caller
from imagepool.errors import (
    Errno,
    InvalidArgs,
    MetadataError,
    PermissionDenied,
    PolkitFailure,
    PoolError,
    TransferInProgress,
    varlink_name,
)

log = logging.getLogger(__name__)

SERVICE_IDL = "org.varlink.service"
SYSTEMD_IDL = "io.systemd"
SERVICE_INTERFACE = "io.systemd.service"


class Error(Exception):
    """A Varlink error reply: NAME and PARAMETERS."""

    def __init__(self, name: str, parameters: dict[str, typing.Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}


def expected_more() -> Error:
    return Error("org.varlink.service.ExpectedMore")


def invalid_parameter(parameter: str) -> Error:
    return Error("org.varlink.service.InvalidParameter", {"parameter": parameter})


@dataclass
class Call:
    interface: str
    method: str
    parameters: dict[str, typing.Any]
    more: bool
    oneway: bool
    peercred: tuple[int, int, int]  # pid, uid, gid
    fds: list[int] = field(default_factory=list)  # received with the call, valid while it runs
    sock: socket.socket | None = None  # the connection's (polkit names the caller by its peer's pidfd)

    def __getitem__(self, name: str) -> typing.Any:
        return self.parameters[name]

    @property
    def caller(self) -> Caller:
        pid, uid, _gid = self.peercred
        # A non-boolean allowInteractiveAuthentication is ignored, as systemd ignores it.
        return Caller(uid=uid, pid=pid, interactive=self.parameters.get("allowInteractiveAuthentication") is True,
                      socket=self.sock)


@dataclass
class Reply:
    """Reply parameters with file descriptors of ours, sent and closed."""

    parameters: dict[str, typing.Any]
    fds: list[int] = field(default_factory=list)


@dataclass
class Partial:
    """A reply of a stream that is known not to be the last: sent at once
    (a stream's other replies wait until it is known whether more follow)."""

    parameters: dict[str, typing.Any]


Result = dict[str, typing.Any] | Reply
Handler = Callable[[Call], Awaitable[Result] | AsyncIterator[Result | Partial]]


def load_idl(package: str, name: str) -> str:
    """The text of NAME.varlink, shipped in PACKAGE."""
    return resources.files(package).joinpath(f"{name}.varlink").read_text()


def to_error(exc: BaseException, interface: str) -> Error:
    """The Varlink error a domain error (or any exception) is sent as."""
    if isinstance(exc, Error):
        return exc
    if isinstance(exc, varlink_idl.BadParameter):
        return invalid_parameter(exc.parameter)
    if isinstance(exc, (PermissionDenied, PolkitFailure)) and varlink_name(exc, interface) != "io.systemd.System":
        return Error(varlink_name(exc, interface))  # an errno on D-Bus, a name of its own here
    if isinstance(exc, (Errno, OSError, MetadataError)) or not isinstance(exc, PoolError):
        code = exc.errno if isinstance(exc, (Errno, OSError, MetadataError)) and exc.errno else errno.EIO
        if not isinstance(exc, (Errno, OSError, MetadataError)):
            log.error("Varlink call failed", exc_info=exc)
        return Error("io.systemd.System", {"origin": "linux", "errnoName": errno.errorcode.get(code, ""),
                                           "errno": code})
    name = varlink_name(exc, interface)
    if isinstance(exc, InvalidArgs):
        return Error(name, {"parameter": exc.parameter} if exc.parameter else {})
    if isinstance(exc, TransferInProgress):
        return Error(name, {"remote": exc.remote})
    return Error(name)


class Service:
    """The interfaces one server (one or more sockets) serves."""

    def __init__(self, product: str) -> None:
        self.product = product
        self.interfaces: dict[str, tuple[varlink_idl.Interface, dict[str, Handler]]] = {}
        self.add(load_idl("imagepool", SYSTEMD_IDL), {})
        self.servers: list[varlink.Server] = []

    def add(self, text: str, handlers: dict[str, Handler]) -> varlink_idl.Interface:
        iface = varlink_idl.parse(text)
        missing = set(handlers) - set(iface.methods)
        if missing:
            raise ValueError(f"handlers for methods {iface.name} lacks: {sorted(missing)}")
        self.interfaces[iface.name] = (iface, handlers)
        return iface

    def add_service_interface(self, get_level: Callable[[], int], set_level: Callable[[int], None]) -> None:
        """io.systemd.service, with the log level through the two functions."""

        async def ping(call: Call) -> Result:
            return {}

        async def set_log_level(call: Call) -> Result:
            level = call["level"]
            if level is None or not 0 <= level <= 7:
                raise invalid_parameter("level")
            set_level(level)
            return {}

        async def get_log_level(call: Call) -> Result:
            return {"level": get_level()}

        async def get_environment(call: Call) -> Result:
            return {"environment": [f"{k}={v}" for k, v in os.environ.items()]}

        # Reload is declared but not there, as in systemd 262's machined and
        # importd (MethodNotFound): nothing of ours is read from files.
        self.add(load_idl("imagepool", SERVICE_INTERFACE),
                 {"Ping": ping, "SetLogLevel": set_log_level, "GetLogLevel": get_log_level,
                  "GetEnvironment": get_environment})

    async def listen(self, path: str, fd: int | None = None) -> varlink.Server:
        """Serve on PATH (a socket passed as FD, when socket-activated)."""
        server = varlink.Server(VarlinkInterfaceRegistry(), lambda srv, cred: _Connection(srv, cred, self))
        await server.start(path, fd=fd)
        self.servers.append(server)
        return server

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        self.servers.clear()

    def describe(self, interface: str) -> str:
        return self.interfaces[interface][0].text

    def info(self) -> dict[str, typing.Any]:
        try:
            version = importlib.metadata.version("machined-py")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {"vendor": "machined-py", "product": self.product, "version": version,
                "url": "https://github.com/", "interfaces": sorted([SERVICE_IDL, *self.interfaces])}


class _Connection(varlink.Connection):
    """One client of a Service."""

    empty_error_parameters = False  # systemd 26x leaves "parameters" out of errors that have none

    def __init__(self, server: varlink.Server, peercred: tuple[int, int, int], service: Service) -> None:
        super().__init__(server, peercred)
        self.service = service
        self._streams: set[asyncio.Future[None]] = set()  # calls with "more" in flight
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._hung_up = False

    # Streams end with their client (a Pull's transfer is canceled); single
    # calls finish what they started.  asyncvarlink reads nothing while a
    # call runs, so a client's hang-up shows as a failed send, or to a look
    # at the socket every HANGUP_CHECK seconds.
    HANGUP_CHECK = 1.0

    def _end_streams(self) -> None:
        self._hung_up = True  # (the calls then end without an error for asyncvarlink)
        for future in list(self._streams):
            future.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_streams()
        super().connection_lost(exc)

    def _watch_hangup(self) -> None:
        if not self._streams:
            self._hangup_timer = None
            return
        if self._peer_gone():
            log.debug("Varlink client hung up during a stream.")
            self._end_streams()
            self._hangup_timer = None
            return
        self._hangup_timer = asyncio.get_running_loop().call_later(self.HANGUP_CHECK, self._watch_hangup)

    def _peer_gone(self) -> bool:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None or sock.fileno() < 0:
            return True
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
        except BlockingIOError:
            return False
        except OSError:
            return True

    def call_received(self, call: VarlinkMethodCall, fds: typing.Any) -> asyncio.Future[None] | None:
        log.debug("Varlink call %s from PID %d (UID %d)%s", call.method, self.peercred[0], self.peercred[1],
                  " with more" if call.more else "")
        received = [fd.fileno() for fd in fds] if fds else []
        if call.method_interface == SERVICE_IDL:
            return asyncio.ensure_future(self._builtin(call))
        entry = self.service.interfaces.get(call.method_interface)
        if entry is None or call.method_name not in entry[0].methods or call.method_name not in entry[1]:
            raise GenericVarlinkErrorReply("org.varlink.service.MethodNotFound", {"method": call.method})
        iface, handlers = entry
        try:
            params = varlink_idl.check_call(iface, call.method_name, dict(call.parameters))
        except varlink_idl.BadParameter as e:
            raise GenericVarlinkErrorReply("org.varlink.service.InvalidParameter", {"parameter": e.parameter}) from None
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        request = Call(iface.name, call.method_name, params, call.more, call.oneway, self.peercred, received, sock)
        future = asyncio.ensure_future(self._run(handlers[call.method_name], request))
        if call.more:
            self._streams.add(future)
            future.add_done_callback(self._streams.discard)
            if self._hangup_timer is None:
                self._hangup_timer = asyncio.get_running_loop().call_later(self.HANGUP_CHECK, self._watch_hangup)
        if fds is not None:
            fds.reference_until_done(future)
        return future

    async def _builtin(self, call: VarlinkMethodCall) -> None:
        if call.method_name == "GetInfo":
            self._send(self.service.info())
        elif call.method_name == "GetInterfaceDescription":
            name = call.parameters.get("interface")
            if name == SERVICE_IDL:
                self._send({"description": load_idl("imagepool", SERVICE_IDL)})
            elif isinstance(name, str) and name in self.service.interfaces:
                self._send({"description": self.service.describe(name)})
            else:
                raise GenericVarlinkErrorReply("org.varlink.service.InterfaceNotFound", {"interface": name})
        else:
            raise GenericVarlinkErrorReply("org.varlink.service.MethodNotFound", {"method": call.method})

    def _send(self, result: Result, continues: bool = False) -> None:
        if isinstance(result, Reply):
            sent = self.send_reply(VarlinkMethodReply(result.parameters, continues=continues), list(result.fds))
        else:
            sent = self.send_reply(VarlinkMethodReply(result, continues=continues))
        if continues:
            sent.add_done_callback(self._sent)

    def _sent(self, sent: asyncio.Future[None]) -> None:
        if not sent.cancelled() and sent.exception() is not None:  # the client is gone
            self._end_streams()

    async def _run(self, handler: Handler, call: Call) -> None:
        pending: Result | None = None  # a reply of a stream, sent once it is known whether more follow
        try:
            outcome = handler(call)
            if isinstance(outcome, AsyncIterator):
                async for result in outcome:
                    if isinstance(result, Partial):
                        if call.more:
                            if pending is not None:
                                self._send(pending, continues=True)
                                pending = None
                            self._send(result.parameters, continues=True)
                            continue
                        result = result.parameters
                    if pending is not None:
                        self._send(pending, continues=True)
                    pending = result
                    if not call.more:
                        break
                stream = typing.cast(AsyncGenerator[Result | Partial, None], outcome)
                await stream.aclose()
                if pending is None:
                    pending = {}
            else:
                pending = await outcome
            if call.oneway:
                _close(pending)
            elif pending is not None:
                self._send(pending)
        except asyncio.CancelledError:
            _close(pending)
            if self._hung_up:
                return  # nobody to answer
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is the client's reply
            error = to_error(exc, call.interface)
            if call.oneway:
                _close(pending)
                return
            if pending is not None:  # the replies before the failure go out first
                self._send(pending, continues=True)
            self.send_reply(VarlinkMethodReply(error.parameters, error=error.name))


def _close(result: Result | None) -> None:
    if isinstance(result, Reply):
        for fd in result.fds:
            os.close(fd)
