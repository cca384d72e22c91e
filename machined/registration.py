"""The rules a new machine is registered by (machined-dbus.c:
method_create_or_register_machine(), machine_start(); the key/value form of
systemd 259's RegisterMachineEx/CreateMachineEx), and the transient scope
systemd makes for a created machine."""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagepool.errors import Errno, InvalidArgs, MachineExists
from machined.machine import (
    VMADDR_CID_ANY,
    Machine,
    MachineClass,
    check_machine_id,
    check_machine_name,
    check_startable,
    parse_class,
    unit_lookup_failed,
)
from machined.procs import pid_id, pidfd_id, pidfd_pid, process_alive, unit_name_escape
from machined.registry import MachineRegistry


@dataclass
class Registration:
    """What a registering client asks for (LEADER 0: the caller itself)."""

    name: str
    id: bytes = b""
    service: str = ""
    class_text: str = ""
    leader: int = 0
    root_directory: str = ""
    netif: list[int] = field(default_factory=list)
    # Machine fields only the Ex forms set (vsock_cid, ssh_address, supervisor, ...).
    extra: dict[str, Any] = field(default_factory=dict)


def check_new(registry: MachineRegistry, pending: Collection[int], names_pending: Collection[str],
              req: Registration, caller_pid: int, *, register: bool) -> Machine:
    """The machine REQ describes, after systemd's checks in their order.
    PENDING: leaders of machines being created, NAMES_PENDING their names."""
    check_machine_name(req.name)
    check_machine_id(req.id)
    for ifindex in req.netif:
        if ifindex <= 0:
            raise InvalidArgs(f"Invalid network interface index {ifindex}")
    machine_class = parse_class(req.class_text)
    if req.leader == 1:
        raise InvalidArgs("Invalid leader PID")
    if req.root_directory and not req.root_directory.startswith("/"):
        raise InvalidArgs("Root directory must be empty or an absolute path")
    leader = req.leader or caller_pid
    if req.name in registry.machines or req.name in names_pending:
        raise MachineExists(f"Machine '{req.name}' already exists")
    if register and not process_alive(leader):
        raise unit_lookup_failed(leader)
    machine_class = check_startable(machine_class)
    if registry.leader_taken(leader) or leader in pending:
        raise Errno(errno.EEXIST)
    machine = Machine(req.name, machine_class, leader, id=req.id, service=req.service,
                      root_directory=req.root_directory, netif=list(req.netif), **req.extra)
    if machine.supervisor:
        machine.supervisor_pidfd_id = pid_id(machine.supervisor)
    return machine


# --- the scope ------------------------------------------------------------------------


def scope_unit_name(name: str) -> str:
    return f"machine-{unit_name_escape(name)}.scope"


def scope_properties(machine: Machine) -> list[tuple[str, tuple[str, Any]]]:
    """What systemd-machined asks for in a machine's transient scope
    (machined-core.c: manager_start_scope), before the caller's properties."""
    kind = "Virtual Machine" if machine.machine_class == MachineClass.VM else "Container"
    return [
        ("Slice", ("s", "machine.slice")),
        ("Description", ("s", f"{kind} {machine.name}")),
        ("PIDs", ("au", [machine.leader])),
        ("Delegate", ("b", True)),
        ("CollectMode", ("s", "inactive-or-failed")),
        ("AddRef", ("b", True)),
        ("TasksMax", ("t", 16384)),
    ]


# --- the key/value form (systemd 259) ------------------------------------------------

EX_PROPERTIES = {"Id": "ay", "Service": "s", "Class": "s", "LeaderPID": "u", "LeaderPIDFD": "h",
                 "LeaderPIDFDID": "t", "RootDirectory": "s", "NetworkInterfaces": "ai", "VSockCID": "u",
                 "SSHAddress": "s", "SSHPrivateKeyPath": "s"}


def _ex_values(properties: list[tuple[str, tuple[str, Any]]]) -> dict[str, Any]:
    """The properties, checked as systemd reads them, in their order."""
    values: dict[str, Any] = {}
    for key, (signature, value) in properties:
        if key not in EX_PROPERTIES:
            raise InvalidArgs(f"Unknown property '{key}'")
        if signature != EX_PROPERTIES[key]:
            raise Errno(errno.ENXIO)  # what sd_bus_message_read() says to a wrong type
        if key == "Id":
            check_machine_id(bytes(value))
            value = bytes(value)
        elif key == "NetworkInterfaces":
            for ifindex in value:
                if ifindex <= 0:
                    raise InvalidArgs(f"Invalid network interface index {ifindex}")
        elif key == "VSockCID" and not (3 <= value < VMADDR_CID_ANY):
            raise InvalidArgs("JSON field 'vSockCid' is not a regular VSOCK CID.")
        values[key] = value
    return values


def _ex_leader(values: Mapping[str, Any]) -> int:
    """The leader named by LeaderPIDFD and/or LeaderPID + LeaderPIDFDID, or 0
    (the caller)."""
    pid = values.get("LeaderPID", 0)
    fd_id = values.get("LeaderPIDFDID", 0)
    if "LeaderPIDFD" in values:
        fd = values["LeaderPIDFD"]
        try:
            leader = pidfd_pid(fd)
        except OSError as e:
            code = e.errno or errno.EBADF
            raise Errno(code, f"Failed to parse PIDFD {fd}: {os.strerror(code)}") from None
        if pid > 0 and leader != pid:
            raise InvalidArgs("LeaderPID and LeaderPIDFD refer to different processes")
        if fd_id > 0 and pidfd_id(fd) not in (0, fd_id):
            raise InvalidArgs("LeaderPIDFDID does not match the inode number of LeaderPIDFD")
        return int(leader)
    if pid > 0 and fd_id > 0:
        if pid_id(pid) != fd_id:
            code = errno.ESRCH
            raise Errno(code, f"Failed to pin process {pid} by PIDFDID {fd_id}: {os.strerror(code)}")
        return int(pid)
    if pid > 0 or fd_id > 0:
        raise InvalidArgs("Both LeaderPID and LeaderPIDFDID must be specified to identify the leader process by "
                          "PIDFDID")
    return 0


def parse_ex(registry: MachineRegistry, name: str, properties: list[tuple[str, tuple[str, Any]]],
             caller_pid: int) -> Registration:
    """RegisterMachineEx/CreateMachineEx's NAME and PROPERTIES, checked in
    systemd's order; the caller is the supervisor of a leader not its own."""
    check_machine_name(name)
    values = _ex_values(properties)
    parse_class(values.get("Class", ""))
    root_directory = values.get("RootDirectory", "")
    if root_directory and not root_directory.startswith("/"):
        raise InvalidArgs("Root directory must be empty or an absolute path")
    if name in registry.machines:
        raise MachineExists(f"Machine '{name}' already exists")
    leader = _ex_leader(values)
    extra: dict[str, Any] = {"vsock_cid": values.get("VSockCID", VMADDR_CID_ANY),
                             "ssh_address": values.get("SSHAddress", ""),
                             "ssh_private_key_path": values.get("SSHPrivateKeyPath", "")}
    if leader and leader != caller_pid:
        extra["supervisor"] = caller_pid
    return Registration(name, values.get("Id", b""), values.get("Service", ""), values.get("Class", ""), leader,
                        root_directory, list(values.get("NetworkInterfaces", [])), extra)
