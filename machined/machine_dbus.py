"""org.freedesktop.machine1.Machine: one object per registered machine.

The Manager's *Machine methods look the machine up and call the same
functions as the Machine object's methods (machine-dbus.c)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sdbus import (
    DbusHiddenFlag,
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    dbus_method_async,
    dbus_property_async,
)

from imagepool.bus import UNPRIVILEGED, export_per_caller, require_root, translated
from imagepool.errors import Errno, InvalidArgs
from machined import machine_ops, nsexec
from machined.machine import Machine

if TYPE_CHECKING:
    from sdbus.dbus_common_elements import DbusExportHandle
    from sdbus.sd_bus_internals import SdBusInterface

    from machined.machines import MachineManager

COPY_REPLACE = 1
INTERFACE = "org.freedesktop.machine1.Machine"
SELF_PATH = "/org/freedesktop/machine1/machine/self"


class MachineObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, manager: MachineManager, machine: Machine) -> None:
        super().__init__()
        self.manager = manager
        self.machine = machine
        self.handle: DbusExportHandle | None = None

    # --- properties ----------------------------------------------------------

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Name")
    def name(self) -> str:
        return self.machine.name

    @dbus_property_async("ay", flags=DbusPropertyConstFlag, property_name="Id")
    def id(self) -> bytes:
        return self.machine.id

    @dbus_property_async("t", flags=DbusPropertyConstFlag, property_name="Timestamp")
    def timestamp(self) -> int:
        return self.machine.timestamp

    @dbus_property_async("t", flags=DbusPropertyConstFlag, property_name="TimestampMonotonic")
    def timestamp_monotonic(self) -> int:
        return self.machine.timestamp_monotonic

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Service")
    def service(self) -> str:
        return self.machine.service

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Unit")
    def unit(self) -> str:
        return self.machine.unit

    @dbus_property_async("s", flags=DbusPropertyConstFlag | DbusHiddenFlag, property_name="Scope")
    def scope(self) -> str:
        return self.machine.unit

    @dbus_property_async("u", flags=DbusPropertyConstFlag, property_name="Leader")
    def leader(self) -> int:
        return self.machine.leader

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Class")
    def machine_class(self) -> str:
        return str(self.machine.machine_class)

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="RootDirectory")
    def root_directory(self) -> str:
        return self.machine.root_directory

    @dbus_property_async("ai", flags=DbusPropertyConstFlag, property_name="NetworkInterfaces")
    def network_interfaces(self) -> list[int]:
        return list(self.machine.netif)

    @dbus_property_async("t", flags=DbusPropertyConstFlag, property_name="LeaderPIDFDId")
    def leader_pidfd_id(self) -> int:
        return self.machine.leader_pidfd_id

    @dbus_property_async("u", flags=DbusPropertyConstFlag, property_name="Supervisor")
    def supervisor(self) -> int:
        return self.machine.supervisor

    @dbus_property_async("t", flags=DbusPropertyConstFlag, property_name="SupervisorPIDFDId")
    def supervisor_pidfd_id(self) -> int:
        return self.machine.supervisor_pidfd_id

    @dbus_property_async("u", flags=DbusPropertyConstFlag, property_name="VSockCID")
    def vsock_cid(self) -> int:
        return self.machine.vsock_cid

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="SSHAddress")
    def ssh_address(self) -> str:
        return self.machine.ssh_address

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="SSHPrivateKeyPath")
    def ssh_private_key_path(self) -> str:
        return self.machine.ssh_private_key_path

    @dbus_property_async("s", property_name="State")
    def state(self) -> str:
        return str(self.machine.state)

    # --- methods ---------------------------------------------------------------

    @dbus_method_async("", "", flags=UNPRIVILEGED, method_name="Terminate")
    @translated
    async def terminate(self) -> None:
        await terminate(self.manager, self.machine)

    @dbus_method_async("si", "", flags=UNPRIVILEGED, method_name="Kill", input_args_names=["whom", "signal"])
    @translated
    async def kill(self, whom: str, signo: int) -> None:
        await kill(self.manager, self.machine, whom, signo)

    @dbus_method_async("", "a(iay)", flags=UNPRIVILEGED, method_name="GetAddresses",
                       result_args_names=["addresses"])
    @translated
    async def get_addresses(self) -> list[tuple[int, bytes]]:
        return await get_addresses(self.manager, self.machine)

    @dbus_method_async("", "ss", flags=UNPRIVILEGED, method_name="GetSSHInfo",
                       result_args_names=["ssh_address", "ssh_private_key_path"])
    @translated
    async def get_ssh_info(self) -> tuple[str, str]:
        return get_ssh_info(self.machine)

    @dbus_method_async("", "a{ss}", flags=UNPRIVILEGED, method_name="GetOSRelease", result_args_names=["fields"])
    @translated
    async def get_os_release(self) -> dict[str, str]:
        return await get_os_release(self.manager, self.machine)

    @dbus_method_async("", "u", flags=UNPRIVILEGED, method_name="GetUIDShift", result_args_names=["shift"])
    @translated
    async def get_uid_shift(self) -> int:
        return await get_uid_shift(self.manager, self.machine)

    @dbus_method_async("", "hs", flags=UNPRIVILEGED, method_name="OpenPTY", result_args_names=["pty", "pty_path"])
    @translated
    async def open_pty(self) -> tuple[int, str]:
        return await open_pty(self.manager, self.machine)

    @dbus_method_async("", "hs", flags=UNPRIVILEGED, method_name="OpenLogin",
                       result_args_names=["pty", "pty_path"])
    @translated
    async def open_login(self) -> tuple[int, str]:
        return await open_login(self.manager, self.machine)

    @dbus_method_async("ssasas", "hs", flags=UNPRIVILEGED, method_name="OpenShell",
                       input_args_names=["user", "path", "args", "environment"],
                       result_args_names=["pty", "pty_path"])
    @translated
    async def open_shell(self, user: str, path: str, args: list[str], env: list[str]) -> tuple[int, str]:
        return await open_shell(self.manager, self.machine, user, path, args, env)

    @dbus_method_async("ssbb", "", flags=UNPRIVILEGED, method_name="BindMount",
                       input_args_names=["source", "destination", "read_only", "mkdir"])
    @translated
    async def bind_mount(self, source: str, destination: str, read_only: bool, mkdir: bool) -> None:
        await bind_mount(self.manager, self.machine, source, destination, read_only, mkdir)

    @dbus_method_async("ss", "", flags=UNPRIVILEGED, method_name="CopyFrom",
                       input_args_names=["source", "destination"])
    @translated
    async def copy_from(self, source: str, destination: str) -> None:
        await copy(self.manager, self.machine, source, destination, 0, to_machine=False)

    @dbus_method_async("ss", "", flags=UNPRIVILEGED, method_name="CopyTo", input_args_names=["source", "destination"])
    @translated
    async def copy_to(self, source: str, destination: str) -> None:
        await copy(self.manager, self.machine, source, destination, 0, to_machine=True)

    @dbus_method_async("sst", "", flags=UNPRIVILEGED, method_name="CopyFromWithFlags",
                       input_args_names=["source", "destination", "flags"])
    @translated
    async def copy_from_with_flags(self, source: str, destination: str, flags: int) -> None:
        await copy(self.manager, self.machine, source, destination, flags, to_machine=False)

    @dbus_method_async("sst", "", flags=UNPRIVILEGED, method_name="CopyToWithFlags",
                       input_args_names=["source", "destination", "flags"])
    @translated
    async def copy_to_with_flags(self, source: str, destination: str, flags: int) -> None:
        await copy(self.manager, self.machine, source, destination, flags, to_machine=True)

    @dbus_method_async("", "h", flags=UNPRIVILEGED, method_name="OpenRootDirectory", result_args_names=["fd"])
    @translated
    async def open_root_directory(self) -> int:
        return await open_root_directory(self.manager, self.machine)


def export_self(manager: MachineManager) -> SdBusInterface:
    """``machine/self``: the Machine object of the machine the caller runs in."""

    def find(pid: int) -> MachineObject | None:
        machine = manager.registry.by_pid(pid) if pid > 1 else None
        return manager.objects.get(machine.name) if machine else None

    return export_per_caller(SELF_PATH, INTERFACE, MachineObject, find)


# --- one implementation per operation, for the Machine object and the Manager ------


async def terminate(manager: MachineManager, m: Machine) -> None:
    await require_root()
    await manager.terminate(m)


async def kill(manager: MachineManager, m: Machine, whom: str, signo: int) -> None:
    if whom not in ("", "all", "leader"):
        raise InvalidArgs(f"Invalid kill parameter '{whom}'")
    if signo <= 0 or signo >= signal.NSIG:
        raise InvalidArgs(f"Invalid signal {signo}")
    await require_root()
    await manager.kill(m, whom, signo)


async def get_addresses(manager: MachineManager, m: Machine) -> list[tuple[int, bytes]]:
    return await manager.run(machine_ops.get_addresses, m)


def get_ssh_info(m: Machine) -> tuple[str, str]:
    if not m.ssh_address or not m.ssh_private_key_path:
        raise Errno(errno.ENOENT)
    return m.ssh_address, m.ssh_private_key_path


async def get_os_release(manager: MachineManager, m: Machine) -> dict[str, str]:
    return await manager.run(machine_ops.get_os_release, m)


async def get_uid_shift(manager: MachineManager, m: Machine) -> int:
    return await manager.run(machine_ops.get_uid_shift, m)


async def open_pty(manager: MachineManager, m: Machine) -> tuple[int, str]:
    await require_root()
    return await _returning_fd(manager.run(machine_ops.open_pty, m))


async def open_login(manager: MachineManager, m: Machine) -> tuple[int, str]:
    await require_root()
    if m.is_host:
        # As systemd: a getty of the host's systemd on a pty of the host (an
        # error from the bus when there is no systemd on it).
        return await _returning_fd(_host_unit(
            manager, m, lambda number, name, slave: manager.systemd.start_unit(
                f"container-getty@{number}.service", "replace")))
    return await _returning_fd(manager.run(machine_ops.open_login, m))


async def open_shell(manager: MachineManager, m: Machine, user: str, path: str, args: list[str],
                     env: list[str]) -> tuple[int, str]:
    await require_root()
    if m.is_host and await manager.systemd.has_owner():
        # As systemd: container-shell@N.service of the host's systemd.
        user, path, argv = machine_ops.shell_command(m, user, path, args, env)

        def start(number: str, name: str, slave: int) -> Awaitable[str]:
            properties = machine_ops.shell_unit_properties(user, path, argv, env, name, 0)
            return manager.systemd.start_transient_unit(f"container-shell@{number}.service", "fail",
                                                        nsexec.unit_properties(properties, [slave]))

        return await _returning_fd(_host_unit(manager, m, start))
    return await _returning_fd(manager.run(machine_ops.open_shell, m, user, path, args, env))


async def _host_unit(manager: MachineManager, m: Machine,
                     start: Callable[[str, str, int], Awaitable[str]]) -> tuple[int, str]:
    """A pty on the host, and START(number, path, slave fd) of a unit on it."""
    master, name = await manager.run(machine_ops.open_pty, m)
    try:
        slave = nsexec.pty_peer(master)
        try:
            await start(name.removeprefix("/dev/pts/"), name, slave)
        finally:
            os.close(slave)
    except BaseException:
        os.close(master)
        raise
    return master, name


async def _returning_fd(call) -> tuple[int, str]:
    fd, path = await call
    # sd-bus duplicates the fd into the reply; ours must be closed after it.
    asyncio.get_running_loop().call_soon(os.close, fd)
    return fd, path


async def bind_mount(manager: MachineManager, m: Machine, source: str, destination: str, read_only: bool,
                     mkdir: bool) -> None:
    machine_ops.check_bind_mount(m, source, destination)
    await require_root()
    await manager.run(machine_ops.bind_mount, m, source, destination, read_only, mkdir)


async def copy(manager: MachineManager, m: Machine, source: str, destination: str, flags: int,
               to_machine: bool) -> None:
    # systemd's order: the limit, the class, the flags, the paths, then polkit.
    manager.check_operations(copies=True)
    machine_ops.check_copyable(m)
    if flags & ~COPY_REPLACE:
        raise Errno(errno.EINVAL)
    destination = machine_ops.check_copy_paths(source, destination)
    await require_root()
    func = machine_ops.copy_to if to_machine else machine_ops.copy_from
    await manager.run(func, m, source, destination, bool(flags & COPY_REPLACE), copies=True)


async def open_root_directory(manager: MachineManager, m: Machine) -> int:
    await require_root()
    fd = await manager.run(machine_ops.open_root_directory, m)
    asyncio.get_running_loop().call_soon(os.close, fd)
    return fd
