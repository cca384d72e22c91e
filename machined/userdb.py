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
import inspect
import logging
import os
import typing
from collections.abc import Callable, Iterable

from asyncvarlink import (
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    VarlinkMethodCall,
    VarlinkMethodReply,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import ConversionError
from asyncvarlink.serviceinterface import (
    InvalidParameter,
    MethodNotFound,
)

from imagepool import varlink
from machined.machine import Machine, MachineClass
from machined.ops import idmap
from machined.ops.idmap import HOST_ID_RANGE

log = logging.getLogger(__name__)

SOCKET_PATH = "/run/systemd/userdb/io.systemd.Machine"
SERVICE = "io.systemd.Machine"
INTERFACE = "io.systemd.UserDatabase"

NOBODY_GID = 65534
NOLOGIN = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/sbin/nologin"
_INVALID_IDS = (0xFFFF, 0xFFFFFFFF)  # systemd's uid_is_valid(): the 16 and 32 bit "-1"
_ID_MAX = 0xFFFFFFFF



# --- errors -------------------------------------------------------------------------


def _error(name: str) -> type[TypedVarlinkErrorReply]:
    """An io.systemd.UserDatabase error without parameters."""
    parameters = type("Parameters", (), {})
    return type(name, (TypedVarlinkErrorReply,), {"Parameters": parameters, "__module__": __name__},
                interface=INTERFACE)


NoRecordFound = _error("NoRecordFound")
BadService = _error("BadService")
ServiceNotAvailable = _error("ServiceNotAvailable")
ConflictingRecordFound = _error("ConflictingRecordFound")
EnumerationNotSupported = _error("EnumerationNotSupported")


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
        registry = VarlinkInterfaceRegistry()
        registry.register_interface(varlink.service_interface(registry, "systemd-machined (Python)"))
        self._interface = UserDatabaseInterface(self)
        registry.register_interface(self._interface)
        self.server = varlink.Server(registry, lambda server, cred: _Connection(server, cred, self))

    @property
    def path(self) -> str:
        return self.server.path

    @property
    def connection_count(self) -> int:
        return self.server.connection_count

    # --- lookups ------------------------------------------------------------------

    def _containers(self) -> Iterable[Machine]:
        return (m for m in self._machines() if m.machine_class == MachineClass.CONTAINER)

    def resolve_host_id(self, host_id: int, kind: str) -> Resolved | None:
        """The container and inner ID for a host UID/GID (kind "uid"/"gid")."""
        if host_id < HOST_ID_RANGE or host_id in _INVALID_IDS:
            return None
        found = idmap.find_machine_for(self._containers(), kind, host_id)
        if found is None or not idmap.uid_is_valid(found[1]):
            return None
        return Resolved(found[0], found[1], host_id)

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
        host = idmap.outer_of(idmap.shifted(machine, kind), inner)
        if host is None or host < HOST_ID_RANGE or not idmap.uid_is_valid(host):
            return None
        return Resolved(machine, inner, host)

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
        await self.server.start(path)

    async def stop(self) -> None:
        """Stop listening, drop every connection and remove the socket."""
        await self.server.stop()


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


class _Connection(varlink.Connection):
    """UserDatabase methods take "more" calls (answered with one final reply),
    ignore parameters they do not know (newer clients send filters) and get
    a missing service reported as BadService."""

    def __init__(self, server: varlink.Server, peercred: tuple[int, int, int], db: UserDatabase) -> None:
        super().__init__(server, peercred)
        self._db = db

    def call_received(self, call: VarlinkMethodCall, fds: typing.Any) -> asyncio.Future[None] | None:
        if call.method_interface != INTERFACE:
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
