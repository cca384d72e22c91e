"""machined's machine half: the registry, the exported Machine objects, and
registration (Create*/Register* and their argument rules, §1.4)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from imagepool.errors import Errno, InvalidArgs, LimitsExceeded
from machined.machine import (
    Machine,
    MachineClass,
    MachineRegistry,
    MachineState,
    NoMachineForPID,
    check_machine_id,
    check_machine_name,
    make_machine_cgroup,
    parse_class,
    process_unit,
    unit_name_escape,
)
from machined.machine_dbus import MachineObject

log = logging.getLogger(__name__)

OPERATIONS_MAX = 64
T = TypeVar("T")


class MachineManager:
    def __init__(self, registry: MachineRegistry | None = None) -> None:
        self.registry = registry or MachineRegistry()
        self.objects: dict[str, MachineObject] = {}
        self.operations = 0
        self.copies = 0
        self.on_new: Callable[[Machine], None] | None = None
        self.on_removed: Callable[[Machine], None] | None = None
        self.registry.on_new.append(self._added)
        self.registry.on_removed.append(self._removed)

    def start(self) -> None:
        """Export .host and whatever the state files say still runs."""
        self.registry.load()
        for machine in self.registry:
            self._export(machine)

    def close(self) -> None:
        self.registry.close()

    def _export(self, machine: Machine) -> None:
        obj = MachineObject(self, machine)
        obj.handle = obj.export_to_dbus(machine.object_path)
        self.objects[machine.name] = obj

    def _added(self, machine: Machine) -> None:
        self._export(machine)
        if self.on_new:
            self.on_new(machine)

    def _removed(self, machine: Machine) -> None:
        obj = self.objects.pop(machine.name, None)
        if obj and obj.handle:
            obj.handle.stop()
        if self.on_removed:
            self.on_removed(machine)

    async def run(self, func: Callable[..., T], *args: Any, copies: bool = False) -> T:
        if self.operations >= OPERATIONS_MAX:
            raise LimitsExceeded("Too many ongoing copies." if copies else "Too many ongoing operations.")
        self.operations += 1
        try:
            return await asyncio.to_thread(func, *args)
        finally:
            self.operations -= 1

    # --- lookup ----------------------------------------------------------------

    def get(self, name: str) -> Machine:
        return self.registry.get(name)

    def by_pid(self, pid: int) -> Machine:
        machine = self.registry.by_pid(pid) if pid > 1 else None
        if machine is None:
            if pid == 1 or pid == 0:
                return self.registry.host
            raise NoMachineForPID(f"PID {pid} does not belong to any known machine")
        return machine

    # --- registration -------------------------------------------------------------

    def register(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                 root_directory: str, netif: list[int], *, create: bool, caller_pid: int) -> Machine:
        check_machine_name(name)
        check_machine_id(machine_id)
        machine_class = parse_class(class_text) or MachineClass.CONTAINER
        if leader == 1:
            raise InvalidArgs("Invalid leader PID")
        if leader == 0:
            leader = caller_pid
        if root_directory and not root_directory.startswith("/"):
            raise InvalidArgs("Root directory must be empty or an absolute path")
        for ifindex in netif:
            if ifindex <= 0:
                raise InvalidArgs(f"Invalid network interface index {ifindex}")
        if name in self.registry.machines:
            from machined.machine import MachineExists

            raise MachineExists(f"Machine '{name}' already exists")
        machine = Machine(name, machine_class, leader, id=machine_id, service=service,
                          root_directory=root_directory, netif=list(netif))
        if create:
            # No systemd to make a scope: a cgroup of our own, if we may.
            machine.cgroup = make_machine_cgroup(name, leader)
            machine.unit = f"machine-{unit_name_escape(name)}.scope"
        else:
            machine.unit = process_unit(leader)
        machine.state = MachineState.RUNNING
        self.registry.add(machine)
        return machine

    def unregister(self, machine: Machine) -> None:
        if machine.is_host:
            raise Errno(errno.EPERM)
        self.registry.remove(machine)

    async def terminate(self, machine: Machine) -> None:
        if machine.is_host:
            raise Errno(errno.EPERM)
        from machined import machine_ops

        machine.state = MachineState.CLOSING
        await asyncio.to_thread(machine_ops.terminate, machine)
