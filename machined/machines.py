"""machined's machine half: the registry, the exported Machine objects, and
registration (Create*/Register* and their argument rules, §1.4)."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from imagepool.errors import Errno, InvalidArgs, LimitsExceeded
from machined import machine_ops, systemd1
from machined.machine import (
    Machine,
    MachineClass,
    MachineExists,
    MachineRegistry,
    MachineState,
    NoMachineForPID,
    NoSuchMachine,
    NoSuchProcess,
    check_machine_id,
    check_machine_name,
    check_startable,
    make_machine_cgroup,
    parse_class,
    pid_id,
    process_alive,
    process_cgroup,
    process_unit,
    remove_cgroup,
    unit_lookup_failed,
    unit_name_escape,
)
from machined.machine_dbus import MachineObject, export_self

if TYPE_CHECKING:
    from sdbus.sd_bus_internals import SdBusInterface

log = logging.getLogger(__name__)

OPERATIONS_MAX = 64
T = TypeVar("T")


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


class MachineManager:
    def __init__(self, registry: MachineRegistry | None = None, systemd: systemd1.Systemd | None = None) -> None:
        self.registry = registry or MachineRegistry()
        self.systemd = systemd or systemd1.Systemd()
        # Machines whose scope systemd made for us: stopped and killed through systemd.
        self.scoped: set[Machine] = set()
        # Names (→ leaders) being created while systemd starts their scope.
        self.pending: dict[str, int] = {}
        self.objects: dict[str, MachineObject] = {}
        self.self_object: SdBusInterface | None = None
        self.operations = 0
        self._tasks: set[asyncio.Task] = set()
        self.on_new: Callable[[Machine], None] | None = None
        self.on_removed: Callable[[Machine], None] | None = None
        self.registry.on_new.append(self._added)
        self.registry.on_removed.append(self._removed)

    def start(self) -> None:
        """Export .host and whatever the state files say still runs."""
        self.registry.load()
        self.self_object = export_self(self)
        for machine in self.registry:
            self._export(machine)
            # A scope named like ours that we did not make ourselves: systemd made it.
            if not machine.is_host and not machine.own_unit and machine.unit == scope_unit_name(machine.name):
                self.scoped.add(machine)

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
        if machine in self.scoped:
            # Drop the reference CreateMachine's AddRef=true took (machine_release_unit).
            task = asyncio.get_running_loop().create_task(self._unref(machine.unit))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.scoped.discard(machine)
        obj = self.objects.pop(machine.name, None)
        if obj and obj.handle:
            obj.handle.stop()
        if self.on_removed:
            self.on_removed(machine)

    async def _unref(self, unit: str) -> None:
        try:
            await self.systemd.unref_unit(unit)
        except Exception as e:  # noqa: BLE001 - systemd gone, unit gone: nothing to drop
            log.debug("Failed to drop reference to machine scope, ignoring: %s", e)

    def check_operations(self, copies: bool = False) -> None:
        if self.operations >= OPERATIONS_MAX:
            raise LimitsExceeded("Too many ongoing copies." if copies else "Too many ongoing operations.")

    async def run(self, func: Callable[..., T], *args: Any, copies: bool = False) -> T:
        """FUNC(*ARGS) in a worker thread; copies count against the limit of
        ongoing operations, as systemd's forked copy operations do."""
        if not copies:
            return await asyncio.to_thread(func, *args)
        self.check_operations(copies)
        self.operations += 1
        try:
            return await asyncio.to_thread(func, *args)
        finally:
            self.operations -= 1

    # --- lookup ----------------------------------------------------------------

    def get(self, name: str) -> Machine:
        return self.registry.get(name)

    def by_pid(self, pid: int) -> Machine:
        # Like systemd, the host is nobody's machine: PID 1 included.
        machine = self.registry.by_pid(pid) if pid > 1 else None
        if machine is None:
            raise NoMachineForPID(f"PID {pid} does not belong to any known machine")
        return machine

    # --- registration -------------------------------------------------------------

    def _new_machine(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                     root_directory: str, netif: list[int], caller_pid: int, *, register: bool,
                     extra: dict | None = None) -> Machine:
        """The checks of systemd's method_create_or_register_machine() and
        machine_start(), in their order."""
        check_machine_name(name)
        check_machine_id(machine_id)
        for ifindex in netif:
            if ifindex <= 0:
                raise InvalidArgs(f"Invalid network interface index {ifindex}")
        machine_class = parse_class(class_text)
        if leader == 1:
            raise InvalidArgs("Invalid leader PID")
        if root_directory and not root_directory.startswith("/"):
            raise InvalidArgs("Root directory must be empty or an absolute path")
        if leader == 0:
            leader = caller_pid
        if name in self.registry.machines or name in self.pending:
            raise MachineExists(f"Machine '{name}' already exists")
        if register and not process_alive(leader):
            raise unit_lookup_failed(leader)
        machine_class = check_startable(machine_class)
        if self.registry.leader_taken(leader) or leader in self.pending.values():
            raise Errno(errno.EEXIST)
        machine = Machine(name, machine_class, leader, id=machine_id, service=service,
                          root_directory=root_directory, netif=list(netif), **(extra or {}))
        if machine.supervisor:
            machine.supervisor_pidfd_id = pid_id(machine.supervisor)
        return machine

    def register(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                 root_directory: str, netif: list[int], *, caller_pid: int, extra: dict | None = None) -> Machine:
        machine = self._new_machine(name, machine_id, service, class_text, leader, root_directory, netif,
                                    caller_pid, register=True, extra=extra)
        machine.unit = process_unit(machine.leader)
        machine.state = MachineState.RUNNING
        self.registry.add(machine)
        return machine

    async def create(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                     root_directory: str, netif: list[int], properties: list, *, caller_pid: int,
                     extra: dict | None = None) -> Machine:
        """CreateMachine*: with systemd on the bus, a transient scope from it
        (the machine is `opening` until the start job is done, and only then
        returned); without, a cgroup of our own."""
        machine = self._new_machine(name, machine_id, service, class_text, leader, root_directory, netif,
                                    caller_pid, register=False, extra=extra)
        if not process_alive(machine.leader):
            raise NoSuchProcess(machine.leader)
        # Name and leader are taken from here on: the checks above and this
        # run with no await between them.
        machine.unit = scope_unit_name(name)
        self.pending[name] = machine.leader
        job = None
        try:
            if await self.systemd.has_owner():
                machine.state = MachineState.OPENING
                job = await self.systemd.start_transient_scope(machine.unit,
                                                               scope_properties(machine) + list(properties))
        finally:
            del self.pending[name]
        if job is None:
            # No systemd to make a scope: a cgroup of our own, if we may; the
            # unit's name is the scope's all the same (ours, not systemd's).
            # (Nothing awaited since they stopped being pending: still free.)
            machine.cgroup = make_machine_cgroup(name, machine.leader)
            machine.own_unit = True
            machine.state = MachineState.RUNNING
            try:
                self.registry.add(machine)
            except BaseException:
                if machine.cgroup:
                    remove_cgroup(machine.cgroup)
                raise
            return machine
        machine.scope_job = job.path
        try:
            self.registry.add(machine)
        except BaseException:
            job.forget()
            raise
        self.scoped.add(machine)
        log.debug("Started %s for machine %s, job %s.", machine.unit, name, job.path)
        try:
            result = await job.wait()
        except Exception:  # a timeout; not a cancellation (shutdown), the machine may well run
            self.registry.remove(machine)
            raise
        machine.scope_job = ""
        if result != "done":
            self.registry.remove(machine)
            raise systemd1.JobFailed(f"Start job for unit {machine.unit} failed with '{result}'")
        if self.registry.machines.get(name) is not machine:
            raise NoSuchMachine(name)
        # Where systemd put the leader: the machine lasts while that cgroup has processes.
        path = process_cgroup(machine.leader) + "/"
        at = path.find(f"/{machine.unit}/")
        if at >= 0:
            machine.scope_cgroup = path[: at + 1 + len(machine.unit)]
        if machine.state == MachineState.OPENING:
            machine.state = MachineState.RUNNING
        self.registry.save(machine)
        return machine

    @staticmethod
    def _systemds(machine: Machine) -> bool:
        """Whether the machine's unit is systemd's to stop and signal (as
        systemd-machined does for any machine with a unit): not when the
        unit is just the name of a cgroup of ours."""
        return bool(machine.unit) and not machine.own_unit

    def unregister(self, machine: Machine) -> None:
        if not machine.is_host:  # systemd "finalizes" the host without effect
            self.registry.remove(machine)

    async def terminate(self, machine: Machine) -> None:
        if machine.is_host:
            raise Errno(errno.EOPNOTSUPP)
        if self._systemds(machine) and await self.systemd.has_owner():
            job = await self.systemd.stop_unit(machine.unit, "fail")
            log.debug("Stopping %s of machine %s, job %s.", machine.unit, machine.name, job)
            machine.state = MachineState.CLOSING
            return
        machine.state = MachineState.CLOSING
        # Like systemd's stop job: the reply goes out once SIGTERM is sent;
        # SIGKILL follows for what is still there after the timeout.
        await asyncio.to_thread(machine_ops.start_terminate, machine)
        threading.Thread(target=machine_ops.finish_terminate, args=(machine,), daemon=True,
                         name=f"machined-terminate-{machine.name}").start()

    async def kill(self, machine: Machine, whom: str, signo: int) -> None:
        """KillMachine: whom=all of a machine in a unit of systemd's is
        systemd's business (KillUnit); the rest we signal ourselves."""
        if machine.is_host:
            raise Errno(errno.EOPNOTSUPP)
        if whom in ("", "all") and self._systemds(machine) and await self.systemd.has_owner():
            await self.systemd.kill_unit(machine.unit, "all", signo)
            return
        await asyncio.to_thread(machine_ops.kill, machine, whom, signo)
