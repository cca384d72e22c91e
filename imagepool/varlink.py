"""Varlink servers of the services, on unix sockets served by the running
asyncio loop: systemd's connection limits, and the protocol fixes both
services need on top of asyncvarlink (see Connection)."""

# No "from __future__ import annotations": asyncvarlink reads annotations at runtime.

import asyncio
import collections
import contextlib
import errno
import importlib.metadata
import logging
import os
import socket
import stat
import struct
import typing
from collections.abc import Callable

from asyncvarlink import (
    GenericVarlinkErrorReply,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkMethodReply,
    VarlinkTransport,
)
from asyncvarlink.serviceinterface import InterfaceNotFound, MethodNotFound, VarlinkServiceInterface

log = logging.getLogger(__name__)

# Connection limits as systemd's varlink servers have them.  Messages: systemd
# allows 16 MiB, but asyncvarlink reassembles a message in 4 KiB reads with
# quadratic copying, and no call of ours comes near 64 KiB.
MESSAGE_SIZE_MAX = 64 * 1024
CONNECTIONS_MAX = 4096
CONNECTIONS_PER_UID_MAX = 1024


def service_interface(registry: VarlinkInterfaceRegistry, product: str) -> VarlinkServiceInterface:
    """org.varlink.service for REGISTRY (GetInfo, GetInterfaceDescription)."""
    try:
        version = importlib.metadata.version("machined-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return VarlinkServiceInterface("machined-py", product, version, "", registry)


class Server:
    """One listening socket; CONNECTION makes the protocol of each client."""

    def __init__(self, registry: VarlinkInterfaceRegistry,
                 connection: "Callable[[Server, tuple[int, int, int]], Connection] | None" = None) -> None:
        self.registry = registry
        self.connection = connection or Connection
        self._sock: socket.socket | None = None
        self._path = ""
        self._inode: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume_accept: asyncio.TimerHandle | None = None
        self._connections: dict[VarlinkTransport, int] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()

    @property
    def path(self) -> str:
        return self._path

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self, path: str, fd: int | None = None) -> None:
        """Listen on PATH (mode 0666; its directory is made 0755 if missing),
        or on the listening socket FD that socket activation passed (left in
        place when we stop: it is systemd's)."""
        if self._sock is not None:
            raise RuntimeError("Varlink server already started")
        loop = asyncio.get_running_loop()
        if fd is not None:
            self._sock = socket.socket(fileno=fd)
            self._sock.setblocking(False)
            self._inode = None
        else:
            self._sock, self._inode = listen(path)
        self._path, self._loop = path, loop
        loop.add_reader(self._sock, self._accept)
        log.debug("Serving Varlink on %s.", path)

    async def stop(self) -> None:
        """Stop listening, drop every connection and remove the socket."""
        if self._sock is None:
            return
        assert self._loop is not None
        if self._resume_accept is not None:
            self._resume_accept.cancel()
            self._resume_accept = None
        self._loop.remove_reader(self._sock)
        self._sock.close()
        self._sock = None
        with contextlib.suppress(OSError):
            st = os.stat(self._path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self._path)
        transports = list(self._connections)
        for transport in transports:
            transport.abort()
        if transports:
            await asyncio.wait([t.closed_future for t in transports], timeout=5)
        self._connections.clear()
        self._per_uid.clear()

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(64):
            if self._sock is None:
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("Cannot accept Varlink connection: %s; pausing.", e)
                    self._loop.remove_reader(self._sock)
                    self._resume_accept = self._loop.call_later(0.1, self._resume)
                    return
                log.debug("accept() on %s failed: %s", self._path, e)
                continue
            self._adopt(conn)

    def _resume(self) -> None:
        self._resume_accept = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._accept)

    def _adopt(self, conn: socket.socket) -> None:
        try:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            conn.close()
            return
        if len(self._connections) >= CONNECTIONS_MAX or self._per_uid[uid] >= CONNECTIONS_PER_UID_MAX:
            log.warning("Too many Varlink connections on %s (UID %d), refusing.", self._path, uid)
            conn.close()
            return
        conn.setblocking(False)
        assert self._loop is not None
        transport = VarlinkTransport(self._loop, conn, conn, self.connection(self, (pid, uid, gid)),
                                     {"peercred": (pid, uid, gid), "socket": conn})
        self._connections[transport] = uid
        self._per_uid[uid] += 1
        transport.closed_future.add_done_callback(lambda _: self._forget(transport))

    def _forget(self, transport: VarlinkTransport) -> None:
        uid = self._connections.pop(transport, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]


def listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at PATH, mode 0666, replacing a stale socket;
    returns it and the (device, inode) of its file."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
        os.chmod(parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)   # stale, from an earlier instance
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, 0o666)  # before listen(): nobody can connect yet
        st = os.stat(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock, (st.st_dev, st.st_ino)


class Connection(VarlinkInterfaceServerProtocol):
    """One client.  Beyond asyncvarlink's protocol: garbage on the wire (bad
    JSON, no valid call object, an oversized message) ends the connection,
    as with systemd, after the calls received before it are answered; so
    does the client's EOF, after every call it sent (asyncvarlink alone
    closes at EOF with pipelined calls still queued, and stumbles over JSON
    errors other than JSONDecodeError).  Every error reply carries
    "parameters", and a call of an unknown interface is MethodNotFound (with
    the full method name), as from systemd."""

    def __init__(self, server: Server, peercred: tuple[int, int, int]) -> None:
        super().__init__(server.registry)
        self.server = server
        self.peercred = peercred  # (pid, uid, gid) of the client
        self._partial = 0        # bytes of the message being received
        self._received = 0       # complete messages queued for handling
        self._handled = 0        # of those, handled or dropped
        self._limit: int | None = None   # garbage seen: handle only this many messages
        self._draining = False   # close once every queued message is handled
        self._finished = False   # closing: handle nothing more
        self._gone = False       # connection lost

    def message_received(self, data: bytes, fds: typing.Any) -> None:
        if self._limit is not None or self._finished or self._gone:
            return
        end = data.rfind(b"\0")
        self._partial = len(data) - end - 1 if end >= 0 else self._partial + len(data)
        if self._partial > MESSAGE_SIZE_MAX:
            self._reject("an oversized message", self._received)
            return
        # One message at a time, so that we know which ones got queued.
        *messages, tail = data.split(b"\0")
        for message in messages:
            try:
                super().message_received(message + b"\0", fds)
            except (ValueError, RecursionError) as e:
                # json.loads() raises more than the JSONDecodeError that
                # asyncvarlink handles: bad UTF-8, nesting too deep.
                self._reject(f"undecodable JSON ({type(e).__name__})", self._received)
                return
            fds = None
            self._received += 1
        if tail:
            super().message_received(tail, fds)

    def error_received(self, err: Exception, data: bytes, fds: typing.Any) -> None:
        if not self._dropped():
            self._reject(f"invalid JSON ({err})", self._handled)
        self._done_one()

    def request_received(self, obj: typing.Any, fds: typing.Any) -> asyncio.Future[None] | None:
        try:
            if self._dropped():
                return None
            try:
                VarlinkMethodCall.fromjson(obj)
            except (TypeError, ValueError) as e:
                self._reject(f"an invalid call ({e})", self._handled)
                return None
            future: asyncio.Future[None] | None = super().request_received(obj, fds)
            return future
        finally:
            self._done_one()

    def eof_received(self) -> None:
        self._draining = True
        self._maybe_finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        super().connection_lost(exc)

    def _dropped(self) -> bool:
        """Whether the message about to be handled comes too late."""
        return self._gone or self._finished or (self._limit is not None and self._handled >= self._limit)

    def _reject(self, what: str, limit: int) -> None:
        """Garbage after LIMIT good messages: answer those, then close."""
        log.debug("Varlink client sent %s, disconnecting.", what)
        self._limit = limit
        self._draining = True
        self._maybe_finish()

    def _done_one(self) -> None:
        self._handled += 1
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._draining and not self._finished and self._handled >= self._received:
            self._finished = True
            # asyncvarlink's EOF handling: close once calls in flight are done.
            super().eof_received()

    # systemd 252's varlink servers send "parameters":{} with every error.
    empty_error_parameters = True

    def send_reply(self, reply: VarlinkMethodReply, fds: list[int] | None = None,
                   autoclose: bool = True) -> asyncio.Future[None]:
        if self.empty_error_parameters and reply.error is not None and not reply.parameters:
            reply.extensions.setdefault("parameters", {})   # as systemd: "parameters":{} on every error
        return super().send_reply(reply, fds, autoclose)

    def handle_call_exception(self, exc: BaseException, oneway: bool) -> None:
        log.error("Varlink call failed", exc_info=exc)
        if not oneway:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            self.send_error(GenericVarlinkErrorReply(
                "io.systemd.System", {"errno": code, "errnoName": errno.errorcode.get(code, "")}))

    def call_received(self, call: VarlinkMethodCall, fds: typing.Any) -> asyncio.Future[None] | None:
        try:
            self.server.registry.lookup_method(call)
        except (MethodNotFound, InterfaceNotFound):
            raise MethodNotFound(method=call.method) from None
        future: asyncio.Future[None] | None = super().call_received(call, fds)
        return future
