"""io.systemd.UserDatabase for user-namespaced containers.

machined answers user and group lookups for the host UIDs/GIDs that a
container's user namespace maps: host UID 201000 of a container "web" whose
uid_map reads "0 200000 65536" is the user "vu-web-1000".  The service
listens on /run/systemd/userdb/io.systemd.Machine, where nss-systemd and
userdbctl find it like every other userdb service.

Like systemd-machined: lookups need the service name "io.systemd.Machine";
only container-class machines qualify; host IDs below 0x10000 never resolve;
enumeration is not supported; nobody has memberships.  Unlike systemd 252, a
lookup by name never yields a host-range ID (systemd maps "vu-web-1000" of a
container without a UID shift to host UID 1000; we say NoRecordFound, which
is what the lookup by UID 1000 says too).
"""

# No "from __future__ import annotations": asyncvarlink reads the method
# annotations at runtime to type the parameters.

import asyncio
import collections
import contextlib
import errno
import importlib.metadata
import inspect
import logging
import os
import select
import socket
import stat
import struct
import typing
from collections.abc import Callable, Iterable

from asyncvarlink import (
    GenericVarlinkErrorReply,
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkMethodReply,
    VarlinkTransport,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import ConversionError
from asyncvarlink.serviceinterface import (
    InterfaceNotFound,
    InvalidParameter,
    MethodNotFound,
    VarlinkServiceInterface,
)

from machined.machine import Machine, MachineClass

log = logging.getLogger(__name__)

SOCKET_PATH = "/run/systemd/userdb/io.systemd.Machine"
SERVICE = "io.systemd.Machine"
INTERFACE = "io.systemd.UserDatabase"

HOST_ID_RANGE = 0x10000          # host UIDs/GIDs below this are never container IDs
NOBODY_GID = 65534
NOLOGIN = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/sbin/nologin"
_INVALID_IDS = (0xFFFF, 0xFFFFFFFF)  # systemd's uid_is_valid(): the 16 and 32 bit "-1"
_ID_MAX = 0xFFFFFFFF

# Connection limits as systemd's varlink servers have them.  Messages: systemd
# allows 16 MiB, but asyncvarlink reassembles a message in 4 KiB reads with
# quadratic copying, and no userdb call comes near 64 KiB.
MESSAGE_SIZE_MAX = 64 * 1024
CONNECTIONS_MAX = 4096
CONNECTIONS_PER_UID_MAX = 1024


# --- errors -------------------------------------------------------------------------


class NoRecordFound(TypedVarlinkErrorReply, interface=INTERFACE):
    class Parameters:
        pass


class BadService(TypedVarlinkErrorReply, interface=INTERFACE):
    class Parameters:
        pass


class ServiceNotAvailable(TypedVarlinkErrorReply, interface=INTERFACE):
    class Parameters:
        pass


class ConflictingRecordFound(TypedVarlinkErrorReply, interface=INTERFACE):
    class Parameters:
        pass


class EnumerationNotSupported(TypedVarlinkErrorReply, interface=INTERFACE):
    class Parameters:
        pass


# --- names and ID maps ----------------------------------------------------------------


def valid_user_group_name(name: str) -> bool:
    """systemd's strict user/group name rule (what it uses for names it
    synthesizes): [A-Za-z_][A-Za-z0-9_-]*, at most 31 characters, not numeric."""
    if not name or len(name) > 31 or name.isdigit():
        return False
    if not (name[0].isascii() and (name[0].isalpha() or name[0] == "_")):
        return False
    return all(c.isascii() and (c.isalnum() or c in "_-") for c in name[1:])


def _valid_gecos(text: str) -> bool:
    return ":" not in text and "\n" not in text


def _parse_id(text: str) -> int | None:
    """A UID/GID written canonically in decimal, or None."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return None
    value = int(text)
    if value > _ID_MAX or value in _INVALID_IDS:
        return None
    return value


def _leader_gone(machine: Machine) -> bool:
    """True when the leader's pidfd says it has exited (its PID may be a
    zombie's or, once reaped, someone else's)."""
    if machine.pidfd < 0:
        return False
    try:
        poller = select.poll()
        poller.register(machine.pidfd, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def read_id_map(machine: Machine, kind: str) -> list[tuple[int, int, int]]:
    """The leader's uid_map or gid_map ("uid"/"gid") as (inside, outside,
    count) triples, leaving out identity lines (no shift: the "user
    namespace" is the host's).  Empty when the leader is gone."""
    try:
        with open(f"/proc/{machine.leader}/{kind}_map") as f:
            text = f.read()
    except OSError:
        return []
    if _leader_gone(machine):
        return []
    result = []
    for line in text.splitlines():
        try:
            inside, outside, count = (int(x) for x in line.split())
        except ValueError:
            continue
        if outside != 0:
            result.append((inside, outside, count))
    return result


class Resolved(typing.NamedTuple):
    machine: Machine
    inner: int   # the ID inside the container
    host: int    # the ID on the host


def _synthesized_name(prefix: str, found: Resolved) -> str:
    return f"{prefix}{found.machine.name}-{found.inner}"


class UserDatabase:
    """io.systemd.UserDatabase for machined, on a unix socket served by the
    running asyncio loop.  MACHINES is called on every lookup."""

    def __init__(self, machines: Callable[[], Iterable[Machine]]) -> None:
        self._machines = machines
        self._registry = VarlinkInterfaceRegistry()
        self._registry.register_interface(_service_interface(self._registry))
        self._interface = UserDatabaseInterface(self)
        self._registry.register_interface(self._interface)
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

    # --- lookups ------------------------------------------------------------------

    def _containers(self) -> Iterable[Machine]:
        return (m for m in self._machines() if m.machine_class == MachineClass.CONTAINER)

    def resolve_host_id(self, host_id: int, kind: str) -> Resolved | None:
        """The container and inner ID for a host UID/GID (kind "uid"/"gid")."""
        if host_id < HOST_ID_RANGE or host_id in _INVALID_IDS:
            return None
        for machine in self._containers():
            for inside, outside, count in read_id_map(machine, kind):
                if outside <= host_id < outside + count:
                    inner = host_id - outside + inside
                    if inner > _ID_MAX or inner in _INVALID_IDS:
                        return None
                    return Resolved(machine, inner, host_id)
        return None

    def resolve_name(self, name: str, prefix: str, kind: str) -> Resolved | None:
        """The container and IDs for "<prefix><machine>-<inner id>"."""
        if not valid_user_group_name(name) or not name.startswith(prefix):
            return None
        machine_name, dash, number = name[len(prefix):].rpartition("-")
        inner = _parse_id(number)
        if not dash or inner is None:
            return None
        machine = next((m for m in self._containers() if m.name == machine_name), None)
        if machine is None:
            return None
        for inside, outside, count in read_id_map(machine, kind):
            if inside <= inner < inside + count:
                host = inner - inside + outside
                if host < HOST_ID_RANGE or host > _ID_MAX or host in _INVALID_IDS:
                    return None
                return Resolved(machine, inner, host)
        return None

    def _lookup(self, id_: int | None, name: str | None, service: str, kind: str) -> Resolved:
        """Checks and lookup shared by GetUserRecord (kind "uid") and
        GetGroupRecord ("gid"), in systemd's order."""
        if id_ is not None and (isinstance(id_, bool) or not 0 <= id_ <= _ID_MAX or id_ in _INVALID_IDS):
            raise InvalidParameter(parameter=kind)
        if service != SERVICE:
            raise BadService()
        prefix = "vu-" if kind == "uid" else "vg-"
        if id_ is not None:
            found = self.resolve_host_id(id_, kind)
            if found is not None and not valid_user_group_name(_synthesized_name(prefix, found)):
                found = None   # e.g. the machine name is too long for a user name
        elif name is not None:
            found = self.resolve_name(name, prefix, kind)
        else:
            raise EnumerationNotSupported()
        if found is None:
            raise NoRecordFound()
        if (id_ is not None and found.host != id_) or (name is not None and _synthesized_name(prefix, found) != name):
            raise ConflictingRecordFound()
        return found

    def user_record(self, uid: int | None, user_name: str | None, service: str) -> dict[str, typing.Any]:
        found = self._lookup(uid, user_name, service, "uid")
        record: dict[str, typing.Any] = {
            "userName": _synthesized_name("vu-", found),
            "uid": found.host,
            "gid": NOBODY_GID,
        }
        real_name = f"UID {found.inner} of Container {found.machine.name}"
        if _valid_gecos(real_name):
            record["realName"] = real_name
        record.update({
            "homeDirectory": "/",
            "shell": NOLOGIN,
            "locked": True,
            "service": SERVICE,
            "disposition": "container",
        })
        return {"record": record, "incomplete": False}

    def group_record(self, gid: int | None, group_name: str | None, service: str) -> dict[str, typing.Any]:
        found = self._lookup(gid, group_name, service, "gid")
        record: dict[str, typing.Any] = {
            "groupName": _synthesized_name("vg-", found),
            "gid": found.host,
        }
        description = f"GID {found.inner} of Container {found.machine.name}"
        if _valid_gecos(description):
            record["description"] = description
        record.update({"service": SERVICE, "disposition": "container"})
        return {"record": record, "incomplete": False}

    def memberships(self, service: str) -> typing.NoReturn:
        if service != SERVICE:
            raise BadService()
        raise NoRecordFound()

    # --- serving ------------------------------------------------------------------

    async def start(self, path: str = SOCKET_PATH) -> None:
        """Listen on PATH (mode 0666; its directory is made 0755 if missing)."""
        if self._sock is not None:
            raise RuntimeError("UserDatabase already started")
        loop = asyncio.get_running_loop()
        self._sock, self._inode = _listen(path)
        self._path, self._loop = path, loop
        loop.add_reader(self._sock, self._accept)
        log.debug("Serving %s on %s.", INTERFACE, path)

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
                    log.warning("Cannot accept userdb connection: %s; pausing.", e)
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
            log.warning("Too many userdb connections (UID %d), refusing.", uid)
            conn.close()
            return
        conn.setblocking(False)
        transport = VarlinkTransport(self._loop, conn, conn, _Connection(self),
                                     {"peercred": (pid, uid, gid)})
        self._connections[transport] = uid
        self._per_uid[uid] += 1
        transport.closed_future.add_done_callback(lambda _: self._forget(transport))

    def _forget(self, transport: VarlinkTransport) -> None:
        uid = self._connections.pop(transport, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
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


# --- the Varlink interface --------------------------------------------------------------


class _RecordReply(typing.TypedDict):
    record: typing.Any
    incomplete: bool


class _MembershipReply(typing.TypedDict):
    userName: str
    groupName: str


class UserDatabaseInterface(VarlinkInterface, name=INTERFACE):
    """User and group records of user-namespaced containers."""

    errors = (NoRecordFound, BadService, ServiceNotAvailable, ConflictingRecordFound, EnumerationNotSupported)

    def __init__(self, db: UserDatabase) -> None:
        self._db = db

    @varlinkmethod(allow_foreign=True)
    def GetUserRecord(self, *, uid: int | None = None, userName: str | None = None,
                      service: str) -> _RecordReply:
        """The user "vu-<machine>-<inner UID>" by host UID or name."""
        return typing.cast(_RecordReply, self._db.user_record(uid, userName, service))

    @varlinkmethod(allow_foreign=True)
    def GetGroupRecord(self, *, gid: int | None = None, groupName: str | None = None,
                       service: str) -> _RecordReply:
        """The group "vg-<machine>-<inner GID>" by host GID or name."""
        return typing.cast(_RecordReply, self._db.group_record(gid, groupName, service))

    @varlinkmethod
    def GetMemberships(self, *, userName: str | None = None, groupName: str | None = None,
                       service: str) -> _MembershipReply:
        """Container users have no memberships: always NoRecordFound."""
        self._db.memberships(service)


_KNOWN_PARAMETERS = {
    name: frozenset(inspect.signature(getattr(UserDatabaseInterface, name)).parameters) - {"self"}
    for name in ("GetUserRecord", "GetGroupRecord", "GetMemberships")
}


def _service_interface(registry: VarlinkInterfaceRegistry) -> VarlinkServiceInterface:
    try:
        version = importlib.metadata.version("machined-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return VarlinkServiceInterface("machined-py", "systemd-machined (Python)", version, "", registry)


class _Connection(VarlinkInterfaceServerProtocol):
    """One client.  Beyond asyncvarlink's protocol: UserDatabase methods take
    "more" calls (answered with one final reply), ignore parameters they do
    not know (newer clients send filters) and get a missing service reported
    as BadService.  Garbage on the wire (bad JSON, no valid call object, an
    oversized message) ends the connection, as with systemd, after the calls
    received before it are answered; so does the client's EOF, after every
    call it sent (asyncvarlink alone closes at EOF with pipelined calls still
    queued, and stumbles over JSON errors other than JSONDecodeError)."""

    def __init__(self, db: UserDatabase) -> None:
        super().__init__(db._registry)
        self._db = db
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
            return super().request_received(obj, fds)
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
        log.debug("userdb client sent %s, disconnecting.", what)
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

    def send_reply(self, reply: VarlinkMethodReply, fds: list[int] | None = None,
                   autoclose: bool = True) -> asyncio.Future[None]:
        if reply.error is not None and not reply.parameters:
            reply.extensions.setdefault("parameters", {})   # as systemd: "parameters":{} on every error
        return super().send_reply(reply, fds, autoclose)

    def call_received(self, call: VarlinkMethodCall, fds: typing.Any) -> asyncio.Future[None] | None:
        if call.method_interface != INTERFACE:
            # Unknown interfaces too get MethodNotFound with the full method
            # name, as from systemd (asyncvarlink: InterfaceNotFound).
            try:
                self._db._registry.lookup_method(call)
            except (MethodNotFound, InterfaceNotFound):
                raise MethodNotFound(method=call.method) from None
            return super().call_received(call, fds)
        known = _KNOWN_PARAMETERS.get(call.method_name)
        if known is None:
            raise MethodNotFound(method=call.method)
        method = getattr(self._db._interface, call.method_name)
        signature = varlinksignature(method)
        assert signature is not None
        params = {k: v for k, v in call.parameters.items() if k in known and v is not None}
        params.setdefault("service", "")
        try:
            pyparams = signature.parameter_type.fromjson(params)
        except ConversionError as e:
            raise InvalidParameter(parameter=str(e.location[0]) if e.location else "") from None
        result = method(**pyparams)
        if not call.oneway:
            self.send_reply(VarlinkMethodReply(signature.return_type.tojson(result.parameters)))
        return None

    def handle_call_exception(self, exc: BaseException, oneway: bool) -> None:
        log.error("userdb call failed", exc_info=exc)
        if not oneway:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            self.send_error(GenericVarlinkErrorReply(
                "io.systemd.System", {"errno": code, "errnoName": errno.errorcode.get(code, "")}))
