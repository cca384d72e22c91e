"""The registry of running machines (containers and VMs).

A machine is registered by its manager (nspawn, a VM manager) with a leader
process; the registry watches the leader through a pidfd and drops the
machine when it exits (or, with a cgroup, once the cgroup is empty).  It
writes systemd's state files under /run/systemd/machines, so libsystemd's
sd-login and nss-mymachines see the machines too, and reloads them when
machined restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator

from imagepool.errors import Errno, MachineExists, NoSuchMachine, PoolError
from imagepool.metadata import parse_env_file
from imagepool.names import hostname_is_valid
from machined.machine import Machine, MachineClass, machine_from_state, unit_lookup_failed
from machined.procs import (
    CGROUP_POLL_INTERVAL,
    cgroup_populated,
    cgroup_unit,
    now_usec,
    parent_pid,
    pid_id,
    pidfd_id,
    process_alive,
    process_cgroup,
    process_start,
    process_unit,
    remove_cgroup,
)

log = logging.getLogger(__name__)

STATE_DIR = "/run/systemd/machines"


class MachineRegistry:
    """All registered machines, by name and by leader; owns the state files
    and the pidfd watches.  Listeners hear about additions and removals."""

    def __init__(self, state_dir: str = STATE_DIR) -> None:
        self.state_dir = state_dir
        self.machines: dict[str, Machine] = {}
        self.on_new: list[Callable[[Machine], None]] = []
        self.on_removed: list[Callable[[Machine], None]] = []
        self.host = self._make_host()
        self.machines[self.host.name] = self.host
        # Our own unit: processes sharing it are nobody's machine by unit.
        self.own_unit = process_unit(os.getpid())

    @staticmethod
    def _make_host() -> Machine:
        machine_id = b""
        with contextlib.suppress(OSError, ValueError):
            machine_id = bytes.fromhex(open("/etc/machine-id").read().strip())
        # The host started at boot (systemd 262: both clocks at boot time,
        # monotonic 0 unless suspended since); it gets VMADDR_CID_LOCAL (1),
        # whatever its own CID.
        boottime = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        realtime = time.clock_gettime_ns(time.CLOCK_REALTIME) - boottime
        monotonic = max(time.clock_gettime_ns(time.CLOCK_MONOTONIC) - boottime, 0)
        return Machine(".host", MachineClass.HOST, 1, id=machine_id, unit="-.slice", root_directory="/",
                       timestamp=realtime // 1000, timestamp_monotonic=monotonic // 1000, vsock_cid=1)

    def __iter__(self) -> Iterator[Machine]:
        return iter(list(self.machines.values()))

    def get(self, name: str) -> Machine:
        machine = self.machines.get(name)
        if machine is None:
            raise NoSuchMachine(name)
        return machine

    def by_pid(self, pid: int) -> Machine | None:
        """The machine a process belongs to: its leader; a process of the
        machine's unit, as systemd has it (unless machined shares that unit,
        as where nothing runs under systemd); a process in the machine's
        cgroup; a descendant of the leader."""
        for m in self.machines.values():
            if not m.is_host and m.leader == pid:
                return m
        cgroup = process_cgroup(pid)
        unit = cgroup_unit(cgroup)
        if unit and unit != self.own_unit:
            for m in self.machines.values():
                if not m.is_host and m.unit == unit:
                    return m
        for m in self.machines.values():
            for own in (m.cgroup, m.scope_cgroup):
                if own and (cgroup == own or cgroup.startswith(own + "/")):
                    return m
        ancestor = pid
        for _ in range(64):
            ancestor = parent_pid(ancestor)
            if ancestor <= 1:
                break
            for m in self.machines.values():
                if not m.is_host and m.leader == ancestor:
                    return m
        return None

    def leader_taken(self, pid: int) -> bool:
        return any(not m.is_host and m.leader == pid for m in self.machines.values())

    # --- adding and removing ----------------------------------------------------

    def add(self, machine: Machine) -> None:
        if machine.name in self.machines:
            raise MachineExists(f"Machine '{machine.name}' already exists")
        if machine.leader <= 1 or not process_alive(machine.leader):
            raise unit_lookup_failed(machine.leader)
        if self.leader_taken(machine.leader):
            raise Errno(errno.EEXIST)
        if not machine.timestamp:
            machine.timestamp, machine.timestamp_monotonic = now_usec()
        self._watch(machine)
        self.machines[machine.name] = machine
        self.save(machine)
        log.info("New machine %s.", machine.name)
        for cb in self.on_new:
            cb(machine)

    def remove(self, machine: Machine) -> None:
        if self.machines.get(machine.name) is not machine:
            return
        del self.machines[machine.name]
        self._unwatch(machine)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.state_dir, machine.name))
        if machine.unit:
            link = os.path.join(self.state_dir, f"unit:{machine.unit}")
            with contextlib.suppress(OSError):
                if os.readlink(link) == machine.name:
                    os.unlink(link)
        if machine.cgroup:
            remove_cgroup(machine.cgroup)
        log.info("Machine %s terminated.", machine.name)
        for cb in self.on_removed:
            cb(machine)

    def _watch(self, machine: Machine) -> None:
        try:
            machine.pidfd = os.pidfd_open(machine.leader)
        except OSError as e:
            raise unit_lookup_failed(machine.leader) from e
        if not machine.leader_pidfd_id:
            machine.leader_pidfd_id = pidfd_id(machine.pidfd)
        if not machine.leader_start:
            machine.leader_start = process_start(machine.leader)
        loop = asyncio.get_running_loop()
        loop.add_reader(machine.pidfd, self._leader_exited, machine)

    def _unwatch(self, machine: Machine) -> None:
        with machine.pidfd_lock:
            if machine.pidfd >= 0:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(machine.pidfd)
                os.close(machine.pidfd)
                machine.pidfd = -1

    def _leader_exited(self, machine: Machine) -> None:
        log.info("Leader of machine %s (PID %d) exited.", machine.name, machine.leader)
        machine.leader_exited = True
        self._unwatch(machine)
        if cgroup_populated(machine.cgroup or machine.scope_cgroup):
            # As with systemd's scope: the machine lasts while processes of
            # its cgroup do.
            self._remove_when_empty(machine)
            return
        self.remove(machine)

    def _remove_when_empty(self, machine: Machine) -> None:
        def check() -> None:
            if self.machines.get(machine.name) is not machine:
                return
            if cgroup_populated(machine.cgroup or machine.scope_cgroup):
                loop.call_later(CGROUP_POLL_INTERVAL, check)
            else:
                self.remove(machine)

        loop = asyncio.get_running_loop()
        loop.call_later(CGROUP_POLL_INTERVAL, check)

    # --- state files -------------------------------------------------------------

    def save(self, machine: Machine) -> None:
        if machine.is_host:
            return
        # As systemd: a state file that can't be written is logged, nothing more.
        path = os.path.join(self.state_dir, machine.name)
        tmp = os.path.join(self.state_dir, f".#{machine.name}{os.urandom(8).hex()}")
        try:
            os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
            try:
                with open(tmp, "w") as f:
                    f.write(machine.state_file_text())
                os.chmod(tmp, 0o644)
                os.rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if machine.unit:
                link = os.path.join(self.state_dir, f"unit:{machine.unit}")
                tmp_link = link + ".#new"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_link)
                os.symlink(machine.name, tmp_link)
                os.rename(tmp_link, link)
        except OSError as e:
            log.error("Failed to save machine data %s: %s", path, e)

    def load(self) -> None:
        """Pick up machines registered before a restart: those whose leader
        still runs are kept, the others are cleaned up."""
        try:
            entries = os.listdir(self.state_dir)
        except FileNotFoundError:
            return
        for entry in sorted(entries):
            if entry.startswith(".#") or entry.endswith(".#new"):
                # A state file or link being written when a crash came: only we write here.
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.state_dir, entry))
                continue
            if entry.startswith(("unit:", ".")) or not hostname_is_valid(entry):
                continue
            path = os.path.join(self.state_dir, entry)
            try:
                with open(path) as f:
                    data = parse_env_file(f.read())
                machine = machine_from_state(entry, data)
            except (OSError, ValueError) as e:
                log.warning("Failed to load state of machine %s: %s", entry, e)
                continue
            recycled = ((machine.leader_pidfd_id and pid_id(machine.leader) not in (0, machine.leader_pidfd_id))
                        or (machine.leader_start and process_start(machine.leader) != machine.leader_start))
            if machine.leader > 1 and process_alive(machine.leader) and not recycled:
                try:
                    self._watch(machine)
                except PoolError:
                    machine = None  # type: ignore[assignment]
                if machine is not None:
                    self.machines[machine.name] = machine
                    log.info("Recovered machine %s (leader %d).", machine.name, machine.leader)
                    continue
            elif cgroup_populated(machine.cgroup or machine.scope_cgroup):
                machine.leader_exited = True
                self.machines[machine.name] = machine
                log.info("Recovered machine %s (leader gone, cgroup still populated).", machine.name)
                self._remove_when_empty(machine)
                continue
            log.info("Cleaning up state of vanished machine %s.", entry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            unit = data.get("SCOPE", "")
            if unit:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.state_dir, f"unit:{unit}"))

    def close(self) -> None:
        for machine in list(self.machines.values()):
            self._unwatch(machine)
