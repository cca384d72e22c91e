"""UID/GID maps of user-namespaced containers: the one parser of
/proc/<leader>/uid_map and gid_map, the UID shift, and the translations
between IDs inside a machine and on the host (machine-dbus.c and machined's
userdb both use these)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

from imagepool.errors import (
    Errno,
    GroupInHostRange,
    InvalidArgs,
    InvalidForMachine,
    NoSuchGroupMapping,
    NoSuchUserMapping,
    NotSupported,
    NoUIDShift,
    PoolError,
    UserInHostRange,
)
from machined.machine import Machine, MachineClass
from machined.ops.leader import Leader, check_container, oserror

log = logging.getLogger(__name__)

UID_NOBODY = 65534
HOST_ID_RANGE = 0x10000  # host IDs below this are never a container's
ID_MAX = 0xFFFFFFFF

# (inner base, outer base, count) per line
IdMap = list[tuple[int, int, int]]


def uid_is_valid(uid: int) -> bool:
    """systemd's uid_is_valid(): neither the 16 nor the 32 bit "-1"."""
    return 0 <= uid < ID_MAX and uid != 0xFFFF


def parse_id_map(text: str) -> IdMap:
    """The lines of a uid_map/gid_map; a malformed one is EBADMSG."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise Errno(errno.EBADMSG)
        try:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
        except ValueError:
            raise Errno(errno.EBADMSG) from None
    return out


def outer_of(id_map: IdMap, inner: int) -> int | None:
    for base, shift, count in id_map:
        if base <= inner < base + count:
            return inner - base + shift
    return None


def inner_of(id_map: IdMap, outer: int) -> int | None:
    for base, shift, count in id_map:
        if shift <= outer < shift + count:
            return outer - shift + base
    return None


def id_map(m: Machine, kind: str) -> IdMap:
    """The leader's map of KIND ("uid" or "gid")."""
    with Leader(m) as leader:
        try:
            return parse_id_map(leader.read(f"{kind}_map"))
        except OSError as e:
            raise oserror(e) from None


def shifted(m: Machine, kind: str) -> IdMap:
    """The lines of the leader's map that shift IDs (an outer base of 0 is
    the host's own range); empty when the map can't be read."""
    try:
        return [line for line in id_map(m, kind) if line[1] != 0]
    except PoolError as e:
        log.debug("Cannot read %s_map of machine %s, ignoring: %s", kind, m.name, e)
        return []


def uid_shift(m: Machine) -> int:
    """systemd's machine_get_uid_shift(): Errno(ENXIO) for a mapping that is
    not a single range starting at 0, covering nobody, equal for groups."""
    if m.is_host:
        return 0
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    try:
        uid_map = id_map(m, "uid")
    except Errno as e:
        if e.errno == errno.ENOENT:
            return 0  # no user namespaces in this kernel
        raise
    if not uid_map:
        raise Errno(errno.ENOMSG)
    base, shift, count = uid_map[0]
    if base != 0 or count < UID_NOBODY or len(uid_map) != 1:
        raise Errno(errno.ENXIO)
    gid_map = id_map(m, "gid")
    if not gid_map:
        raise Errno(errno.ENOMSG)
    if len(gid_map) != 1 or gid_map[0] != uid_map[0]:
        raise Errno(errno.ENXIO)
    return shift


def get_uid_shift(m: Machine) -> int:
    if m.is_host:
        return 0
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported("UID/GID shift may only be determined for container machines.")
    try:
        return uid_shift(m)
    except Errno as e:
        if e.errno == errno.ENXIO:
            raise NoUIDShift(f"Machine {m.name} uses a complex UID/GID mapping, cannot determine shift") from None
        raise


_WORDS = {"uid": ("user", "User", "UID"), "gid": ("group", "Group", "GID")}


def map_from_machine(m: Machine, kind: str, inner: int) -> int:
    """The host ID of the machine's ID INNER (KIND "uid" or "gid")."""
    word, _, _ = _WORDS[kind]
    if not uid_is_valid(inner):
        raise InvalidArgs(f"Invalid {word} ID {inner}")
    check_container(m, InvalidForMachine("Not supported for non-container machines."))
    outer = outer_of(id_map(m, kind), inner)
    if outer is None:
        # (systemd answers a group too with NoSuchUserMapping, not ...Group...)
        raise NoSuchUserMapping(f"Machine '{m.name}' has no matching {word} mappings.")
    if not uid_is_valid(outer):
        raise Errno(errno.EINVAL)
    return outer


def map_from_machine_user(m: Machine, uid: int) -> int:
    return map_from_machine(m, "uid", uid)


def map_from_machine_group(m: Machine, gid: int) -> int:
    return map_from_machine(m, "gid", gid)


def find_machine_for(machines: Iterable[Machine], kind: str, outer: int) -> tuple[Machine, int] | None:
    """systemd's manager_find_machine_for_uid(): the first container whose map
    has a shifted line containing the host ID OUTER, and the ID inside it."""
    for m in machines:
        if m.machine_class != MachineClass.CONTAINER:
            continue
        inner = inner_of(shifted(m, kind), outer)
        if inner is not None:
            return m, inner
    return None


def map_to_machine(machines: Iterable[Machine], kind: str, outer: int) -> tuple[Machine, int]:
    """The container and its ID for the host ID OUTER (KIND "uid" or "gid")."""
    word, title, short = _WORDS[kind]
    error = NoSuchUserMapping if kind == "uid" else NoSuchGroupMapping
    if not uid_is_valid(outer):
        raise InvalidArgs(f"Invalid {word} ID {outer}")
    if outer < HOST_ID_RANGE:
        in_host_range = UserInHostRange if kind == "uid" else GroupInHostRange
        raise in_host_range(f"{title} {outer} belongs to host {short} range")
    found = find_machine_for(machines, kind, outer)
    if found is None:
        raise error(f"No matching {word} mapping for {outer}.")
    if not uid_is_valid(found[1]):
        raise Errno(errno.EINVAL)
    return found


def map_to_machine_user(machines: Iterable[Machine], uid: int) -> tuple[Machine, int]:
    return map_to_machine(machines, "uid", uid)


def map_to_machine_group(machines: Iterable[Machine], gid: int) -> tuple[Machine, int]:
    return map_to_machine(machines, "gid", gid)
