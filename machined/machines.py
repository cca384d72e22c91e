"""machined's machine half: the registry of machines, their registration,
and every operation on a machine, whichever front end asks.

Front ends subscribe to hear of machines added and removed; they check
arguments with the ``check_*`` functions of ``machined.ops`` (and
``machined.registration``), authorize, then call the methods here.  Blocking
work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from imagepool.errors import Errno, JobFailed, LimitsExceeded, NoMachineForPID, NoSuchMachine
from machined import nsexec, ops, systemd1
from machined.machine import Machine, MachineState, no_such_process
from machined.procs import make_machine_cgroup, process_alive, process_cgroup, process_unit, remove_cgroup
from machined.registration import Registration, check_new, scope_properties, scope_unit_name
from machined.registry import MachineRegistry

log = logging.getLogger(__name__)

OPERATIONS_MAX = 64
T = TypeVar("T")
Listener = Callable[[Machine], None]


class MachineManager:
    def __init__(self, registry: MachineRegistry | None = None, systemd: systemd1.Systemd | None = None) -> None:
        self.registry = registry or MachineRegistry()
        self.systemd = systemd or systemd1.Systemd()
        # Machines whose scope systemd made for us: stopped and killed through systemd.
        self.scoped: set[Machine] = set()
        # Names (→ leaders) being created while systemd starts their scope.
        self.pending: dict[str, int] = {}
        self.operations = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_added: list[Listener] = []
        self._on_removed: list[Listener] = []
        self.registry.on_new.append(self._added)
        self.registry.on_removed.append(self._removed)

    def subscribe(self, on_added: Listener, on_removed: Listener) -> None:
        """Hear of machines added and removed from now on (the ones there
        are: iterate over the manager)."""
        self._on_added.append(on_added)
        self._on_removed.append(on_removed)

    def start(self) -> None:
        """Take over whatever the state files say still runs."""
        self.registry.load()
        for machine in self.registry:
            # A scope named like ours that we did not make ourselves: systemd made it.
            if not machine.is_host and not machine.own_unit and machine.unit == scope_unit_name(machine.name):
                self.scoped.add(machine)

    def close(self) -> None:
        self.registry.close()

    def _added(self, machine: Machine) -> None:
        for cb in self._on_added:
            cb(machine)

    def _removed(self, machine: Machine) -> None:
        if machine in self.scoped:
            # Drop the reference CreateMachine's AddRef=true took (machine_release_unit).
            task = asyncio.get_running_loop().create_task(self._unref(machine.unit))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.scoped.discard(machine)
        for cb in self._on_removed:
            cb(machine)

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

    # --- lookup ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Machine]:
        return iter(self.registry)

    def get(self, name: str) -> Machine:
        return self.registry.get(name)

    def by_pid(self, pid: int) -> Machine:
        # Like systemd, the host is nobody's machine: PID 1 included.
        machine = self.registry.by_pid(pid) if pid > 1 else None
        if machine is None:
            raise NoMachineForPID(f"PID {pid} does not belong to any known machine")
        return machine

    # --- registration -------------------------------------------------------------------

    def _check_new(self, req: Registration, caller_pid: int, register: bool) -> Machine:
        return check_new(self.registry, self.pending.values(), self.pending, req, caller_pid, register=register)

    def register(self, req: Registration, *, caller_pid: int) -> Machine:
        machine = self._check_new(req, caller_pid, register=True)
        machine.unit = process_unit(machine.leader)
        machine.state = MachineState.RUNNING
        self.registry.add(machine)
        return machine

    async def create(self, req: Registration, properties: list[tuple[str, tuple[str, Any]]], *,
                     caller_pid: int) -> Machine:
        """CreateMachine*: with systemd on the bus, a transient scope from it
        (the machine is `opening` until the start job is done, and only then
        returned); without, a cgroup of our own."""
        machine = self._check_new(req, caller_pid, register=False)
        if not process_alive(machine.leader):
            raise no_such_process(machine.leader)
        # Name and leader are taken from here on: the checks above and this
        # run with no await between them.
        machine.unit = scope_unit_name(machine.name)
        self.pending[machine.name] = machine.leader
        job = None
        try:
            if await self.systemd.has_owner():
                machine.state = MachineState.OPENING
                job = await self.systemd.start_transient_scope(machine.unit,
                                                               scope_properties(machine) + list(properties))
        finally:
            del self.pending[machine.name]
        if job is None:
            self._create_own_cgroup(machine)
            return machine
        machine.scope_job = job.path
        try:
            self.registry.add(machine)
        except BaseException:
            job.forget()
            raise
        self.scoped.add(machine)
        log.debug("Started %s for machine %s, job %s.", machine.unit, machine.name, job.path)
        try:
            result = await job.wait()
        except Exception:  # a timeout; not a cancellation (shutdown), the machine may well run
            self.registry.remove(machine)
            raise
        machine.scope_job = ""
        if result != "done":
            self.registry.remove(machine)
            raise JobFailed(f"Start job for unit {machine.unit} failed with '{result}'")
        if self.registry.machines.get(machine.name) is not machine:
            raise NoSuchMachine(machine.name)
        # Where systemd put the leader: the machine lasts while that cgroup has processes.
        path = process_cgroup(machine.leader) + "/"
        at = path.find(f"/{machine.unit}/")
        if at >= 0:
            machine.scope_cgroup = path[: at + 1 + len(machine.unit)]
        if machine.state == MachineState.OPENING:
            machine.state = MachineState.RUNNING
        self.registry.save(machine)
        return machine

    def _create_own_cgroup(self, machine: Machine) -> None:
        """No systemd to make a scope: a cgroup of our own, if we may; the
        unit's name is the scope's all the same (ours, not systemd's).
        (Nothing awaited since the machine stopped being pending: still free.)"""
        machine.cgroup = make_machine_cgroup(machine.name, machine.leader)
        machine.own_unit = True
        machine.state = MachineState.RUNNING
        try:
            self.registry.add(machine)
        except BaseException:
            if machine.cgroup:
                remove_cgroup(machine.cgroup)
            raise

    @staticmethod
    def _systemds(machine: Machine) -> bool:
        """Whether the machine's unit is systemd's to stop and signal (as
        systemd-machined does for any machine with a unit): not when the
        unit is just the name of a cgroup of ours."""
        return bool(machine.unit) and not machine.own_unit

    def unregister(self, machine: Machine) -> None:
        if not machine.is_host:  # systemd "finalizes" the host without effect
            self.registry.remove(machine)

    # --- stopping and signalling ----------------------------------------------------

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
        await asyncio.to_thread(ops.start_terminate, machine)
        threading.Thread(target=ops.finish_terminate, args=(machine,), daemon=True,
                         name=f"machined-terminate-{machine.name}").start()

    async def kill(self, machine: Machine, whom: str, signo: int) -> None:
        """KillMachine: whom=all of a machine in a unit of systemd's is
        systemd's business (KillUnit); the rest we signal ourselves."""
        ops.check_kill(whom, signo)
        if machine.is_host:
            raise Errno(errno.EOPNOTSUPP)
        if whom in ("", "all") and self._systemds(machine) and await self.systemd.has_owner():
            await self.systemd.kill_unit(machine.unit, "all", signo)
            return
        await asyncio.to_thread(ops.kill, machine, whom, signo)

    # --- what is inside ---------------------------------------------------------------

    async def get_addresses(self, machine: Machine) -> list[tuple[int, int, bytes]]:
        """(ifindex, family, address bytes) of each address of the machine."""
        return await self.run(ops.get_addresses, machine)

    @staticmethod
    def get_ssh_info(machine: Machine) -> tuple[str, str]:
        if not machine.ssh_address or not machine.ssh_private_key_path:
            raise Errno(errno.ENOENT)
        return machine.ssh_address, machine.ssh_private_key_path

    async def get_os_release(self, machine: Machine) -> dict[str, str]:
        return await self.run(ops.get_os_release, machine)

    async def get_uid_shift(self, machine: Machine) -> int:
        return await self.run(ops.get_uid_shift, machine)

    async def map_from_machine(self, machine: Machine, kind: str, inner: int) -> int:
        return await self.run(ops.map_from_machine, machine, kind, inner)

    async def map_to_machine(self, kind: str, outer: int) -> tuple[Machine, int]:
        return await self.run(ops.map_to_machine, list(self.registry), kind, outer)

    async def open_root_directory(self, machine: Machine) -> int:
        return await self.run(ops.open_root_directory, machine)

    # --- terminals ----------------------------------------------------------------------

    async def open_pty(self, machine: Machine) -> tuple[int, str]:
        return await self.run(ops.open_pty, machine)

    async def open_login(self, machine: Machine) -> tuple[int, str]:
        if machine.is_host:
            # As systemd: a getty of the host's systemd on a pty of the host (an
            # error from the bus when there is no systemd on it).
            return await self._host_unit(machine, lambda number, name, slave: self.systemd.start_unit(
                f"container-getty@{number}.service", "replace"))
        return await self.run(ops.open_login, machine)

    async def open_shell(self, machine: Machine, user: str, path: str, args: list[str],
                         env: list[str]) -> tuple[int, str]:
        if machine.is_host and await self.systemd.has_owner():
            # As systemd: container-shell@N.service of the host's systemd.
            user, path, argv = ops.shell_command(machine, user, path, args, env)

            async def start(number: str, name: str, slave: int) -> str:
                properties = ops.shell_unit_properties(user, path, argv, env, name, 0)
                return await self.systemd.start_transient_unit(f"container-shell@{number}.service", "fail",
                                                               nsexec.unit_properties(properties, [slave]))

            return await self._host_unit(machine, start)
        return await self.run(ops.open_shell, machine, user, path, args, env)

    async def _host_unit(self, machine: Machine, start: Callable[[str, str, int], Any]) -> tuple[int, str]:
        """A pty on the host, and START(number, path, slave fd) of a unit on it."""
        master, name = await self.run(ops.open_pty, machine)
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

    # --- files ----------------------------------------------------------------------------

    async def bind_mount(self, machine: Machine, source: str, destination: str, read_only: bool,
                         mkdir: bool) -> None:
        await self.run(ops.bind_mount, machine, source, destination, read_only, mkdir)

    def check_copy(self, machine: Machine, source: str, destination: str, flags: int) -> str:
        """CopyFrom/CopyTo's checks before polkit's, in systemd's order (the
        limit, the class, the flags, the paths); the destination."""
        self.check_operations(copies=True)
        ops.check_copyable(machine)
        if flags & ~ops.COPY_REPLACE:
            raise Errno(errno.EINVAL)
        return ops.check_copy_paths(source, destination)

    async def copy(self, machine: Machine, source: str, destination: str, flags: int, *, to_machine: bool) -> None:
        func = ops.copy_to if to_machine else ops.copy_from
        await self.run(func, machine, source, destination, bool(flags & ops.COPY_REPLACE), copies=True)
