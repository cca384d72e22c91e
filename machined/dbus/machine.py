"""org.freedesktop.machine1.Machine: one object per registered machine, and
machine/self.

The Manager's *Machine methods look the machine up and call the same
functions as the Machine object's methods (machine-dbus.c); each checks the
arguments, asks authorization and calls the MachineManager."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from sdbus import DbusHiddenFlag, DbusInterfaceCommonAsync, DbusPropertyConstFlag
from sdbus.sd_bus_internals import SdBusInterface

from imagepool import dbus
from imagepool.authz import MACHINE1
from imagepool.names import bus_label_escape
from machined import ops
from machined.machine import Machine
from machined.machines import MachineManager

INTERFACE = "org.freedesktop.machine1.Machine"
PATH_PREFIX = "/org/freedesktop/machine1/machine"
SELF_PATH = f"{PATH_PREFIX}/self"
MANAGE_MACHINES = f"{MACHINE1}.manage-machines"
INSPECT_MACHINES = f"{MACHINE1}.inspect-machines"

C = DbusPropertyConstFlag
# (name, signature, attribute of the Machine, flags), in systemd's order; Scope is Unit's deprecated alias.
PROPERTIES = [
    ("Name", "s", "name", C), ("Id", "ay", "id", C), ("Timestamp", "t", "timestamp", C),
    ("TimestampMonotonic", "t", "timestamp_monotonic", C), ("Service", "s", "service", C), ("Unit", "s", "unit", C),
    ("Scope", "s", "unit", C | DbusHiddenFlag), ("Subgroup", "s", "subgroup", C), ("Leader", "u", "leader", C),
    ("LeaderPIDFDId", "t", "leader_pidfd_id", C), ("Supervisor", "u", "supervisor", C),
    ("SupervisorPIDFDId", "t", "supervisor_pidfd_id", C), ("Class", "s", "machine_class", C),
    ("RootDirectory", "s", "root_directory", C), ("NetworkInterfaces", "ai", "netif", C),
    ("VSockCID", "u", "vsock_cid", C), ("SSHAddress", "s", "ssh_address", C),
    ("SSHPrivateKeyPath", "s", "ssh_private_key_path", C), ("State", "s", "state", 0), ("UID", "u", "uid", C),
]


def machine_object_path(name: str) -> str:
    return f"{PATH_PREFIX}/{bus_label_escape(name)}"


class MachineObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, manager: MachineManager, machine: Machine) -> None:
        super().__init__()
        self.manager = manager
        self.machine = machine

    locals().update(dbus.properties("machine", PROPERTIES))

    @dbus.method("", "", "Terminate")
    async def terminate(self) -> None:
        await terminate(self.manager, self.machine)

    @dbus.method("si", "", "Kill", ["whom", "signal"])
    async def kill(self, whom: str, signo: int) -> None:
        await kill(self.manager, self.machine, whom, signo)

    @dbus.method("", "a(iay)", "GetAddresses", result_names=["addresses"])
    async def get_addresses(self) -> list[tuple[int, bytes]]:
        return await get_addresses(self.manager, self.machine)

    @dbus.method("", "ss", "GetSSHInfo", result_names=["ssh_address", "ssh_private_key_path"])
    async def get_ssh_info(self) -> tuple[str, str]:
        return self.manager.get_ssh_info(self.machine)

    @dbus.method("", "a{ss}", "GetOSRelease", result_names=["fields"])
    async def get_os_release(self) -> dict[str, str]:
        return await get_os_release(self.manager, self.machine)

    @dbus.method("", "u", "GetUIDShift", result_names=["shift"])
    async def get_uid_shift(self) -> int:
        return await self.manager.get_uid_shift(self.machine)

    @dbus.method("", "hs", "OpenPTY", result_names=["pty", "pty_path"])
    async def open_pty(self) -> tuple[int, str]:
        return await open_pty(self.manager, self.machine)

    @dbus.method("", "hs", "OpenLogin", result_names=["pty", "pty_path"])
    async def open_login(self) -> tuple[int, str]:
        return await open_login(self.manager, self.machine)

    @dbus.method("ssasas", "hs", "OpenShell", ["user", "path", "args", "environment"], ["pty", "pty_path"])
    async def open_shell(self, user: str, path: str, args: list[str], env: list[str]) -> tuple[int, str]:
        return await open_shell(self.manager, self.machine, user, path, args, env)

    @dbus.method("ssbb", "", "BindMount", ["source", "destination", "read_only", "mkdir"])
    async def bind_mount(self, source: str, destination: str, read_only: bool, mkdir: bool) -> None:
        await bind_mount(self.manager, self.machine, source, destination, read_only, mkdir)

    @dbus.method("ss", "", "CopyFrom", ["source", "destination"])
    async def copy_from(self, source: str, destination: str) -> None:
        await copy(self.manager, self.machine, source, destination, 0, to_machine=False)

    @dbus.method("ss", "", "CopyTo", ["source", "destination"])
    async def copy_to(self, source: str, destination: str) -> None:
        await copy(self.manager, self.machine, source, destination, 0, to_machine=True)

    @dbus.method("sst", "", "CopyFromWithFlags", ["source", "destination", "flags"])
    async def copy_from_with_flags(self, source: str, destination: str, flags: int) -> None:
        await copy(self.manager, self.machine, source, destination, flags, to_machine=False)

    @dbus.method("sst", "", "CopyToWithFlags", ["source", "destination", "flags"])
    async def copy_to_with_flags(self, source: str, destination: str, flags: int) -> None:
        await copy(self.manager, self.machine, source, destination, flags, to_machine=True)

    @dbus.method("", "h", "OpenRootDirectory", result_names=["fd"])
    async def open_root_directory(self) -> int:
        return await open_root_directory(self.manager, self.machine)


class MachineObjects:
    """The exported Machine objects, in step with the MachineManager, and
    machine/self."""

    def __init__(self, manager: MachineManager) -> None:
        self.manager = manager
        self.exported: dbus.Exported[str, MachineObject] = dbus.Exported(machine_object_path)
        self._self: SdBusInterface | None = None  # kept: dropping it unexports machine/self

    def start(self) -> None:
        self._self = dbus.export_per_caller(SELF_PATH, INTERFACE, MachineObject, self._find_by_pid)
        for machine in self.manager:
            self._export(machine)
        self.manager.subscribe(self._export, self._unexport)

    def _find_by_pid(self, pid: int) -> MachineObject | None:
        machine = self.manager.registry.by_pid(pid) if pid > 1 else None
        return self.exported.objects.get(machine.name) if machine else None

    def _export(self, machine: Machine) -> None:
        self.exported.export(machine.name, MachineObject(self.manager, machine))

    def _unexport(self, machine: Machine) -> None:
        self.exported.unexport(machine.name)


# --- one implementation per operation, for the Machine object and the Manager ------


def _details(m: Machine, verb: str, **more: str) -> dict[str, str]:
    return {"machine": m.name, "verb": verb, **more}


async def get_os_release(manager: MachineManager, m: Machine) -> dict[str, str]:
    # systemd 262 asks polkit for this one (not for the addresses, the UID shift or the SSH info).
    await dbus.authorize(INSPECT_MACHINES, _details(m, "get_os_release"))
    return await manager.get_os_release(m)


async def terminate(manager: MachineManager, m: Machine) -> None:
    await dbus.authorize(MANAGE_MACHINES, _details(m, "terminate"))
    await manager.terminate(m)


async def kill(manager: MachineManager, m: Machine, whom: str, signo: int) -> None:
    ops.check_kill(whom, signo)
    await dbus.authorize(MANAGE_MACHINES, _details(m, "kill"))
    await manager.kill(m, whom, signo)


async def get_addresses(manager: MachineManager, m: Machine) -> list[tuple[int, bytes]]:
    return [(family, address) for _ifindex, family, address in await manager.get_addresses(m)]


def _host_or(m: Machine, action: str) -> str:
    """systemd's action for a machine, or its host-* variant for .host."""
    return f"{MACHINE1}.host-{action}" if m.is_host else f"{MACHINE1}.{action}"


async def open_pty(manager: MachineManager, m: Machine) -> tuple[int, str]:
    await dbus.authorize(_host_or(m, "open-pty"), {"machine": m.name})
    return await _returning_fd(manager.open_pty(m))


async def open_login(manager: MachineManager, m: Machine) -> tuple[int, str]:
    await dbus.authorize(_host_or(m, "login"), {"machine": m.name, "verb": "login"})
    return await _returning_fd(manager.open_login(m))


async def open_shell(manager: MachineManager, m: Machine, user: str, path: str, args: list[str],
                     env: list[str]) -> tuple[int, str]:
    # (no "verb" here, unlike Varlink's: systemd 262's details)
    await dbus.authorize(_host_or(m, "shell"), {"machine": m.name, **ops.shell_polkit_details(user, path, args)})
    return await _returning_fd(manager.open_shell(m, user, path, args, env))


async def _returning_fd(call: Awaitable[tuple[int, str]]) -> tuple[int, str]:
    fd, path = await call
    # sd-bus duplicates the fd into the reply; ours must be closed after it.
    asyncio.get_running_loop().call_soon(os.close, fd)
    return fd, path


async def bind_mount(manager: MachineManager, m: Machine, source: str, destination: str, read_only: bool,
                     mkdir: bool) -> None:
    destination = ops.check_bind_mount(m, source, destination)
    await dbus.authorize(MANAGE_MACHINES, _details(m, "bind", src=source, dest=destination))
    await manager.bind_mount(m, source, destination, read_only, mkdir)


async def copy(manager: MachineManager, m: Machine, source: str, destination: str, flags: int,
               to_machine: bool) -> None:
    destination = manager.check_copy(m, source, destination, flags)
    await dbus.authorize(MANAGE_MACHINES, _details(m, "copy", src=source, dest=destination))
    await manager.copy(m, source, destination, flags, to_machine=to_machine)


async def open_root_directory(manager: MachineManager, m: Machine) -> int:
    await dbus.authorize(MANAGE_MACHINES, _details(m, "open_root_directory"))
    fd = await manager.open_root_directory(m)
    asyncio.get_running_loop().call_soon(os.close, fd)
    return fd
