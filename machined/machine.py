"""The registry of running machines (containers and VMs).

A machine is registered by its manager (nspawn, a VM manager) with a leader
process; machined watches the leader through a pidfd and drops the machine
when it exits.  The registry writes systemd's state files under
/run/systemd/machines, so libsystemd's sd-login and nss-mymachines see the
machines too, and reloads them when machined restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from imagepool import fsutil
from imagepool.errors import Errno, InvalidArgs, PoolError
from imagepool.metadata import parse_env_file
from imagepool.names import bus_label_escape, hostname_is_valid

log = logging.getLogger(__name__)

STATE_DIR = "/run/systemd/machines"
MACHINE_PATH_PREFIX = "/org/freedesktop/machine1/machine"


VMADDR_CID_ANY = 0xFFFFFFFF


class MachineClass(enum.StrEnum):
    CONTAINER = "container"
    VM = "vm"
    HOST = "host"


class MachineState(enum.StrEnum):
    OPENING = "opening"
    RUNNING = "running"
    CLOSING = "closing"


class NoSuchMachine(PoolError):
    dbus_name = "org.freedesktop.machine1.NoSuchMachine"

    def __init__(self, name: str) -> None:
        super().__init__(f"No machine '{name}' known")


class MachineExists(PoolError):
    dbus_name = "org.freedesktop.machine1.MachineExists"


class NoSuchProcess(Errno):
    """What systemd 252 answers when asked for a scope of a process that is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(errno.ESRCH, f"Process with ID {pid} does not exist.")


class NoMachineForPID(PoolError):
    dbus_name = "org.freedesktop.machine1.NoMachineForPID"


class NoPrivateNetworking(PoolError):
    dbus_name = "org.freedesktop.machine1.NoPrivateNetworking"


class NoSuchUserMapping(PoolError):
    dbus_name = "org.freedesktop.machine1.NoSuchUserMapping"


class NoSuchGroupMapping(PoolError):
    dbus_name = "org.freedesktop.machine1.NoSuchGroupMapping"


def machine_object_path(name: str) -> str:
    return f"{MACHINE_PATH_PREFIX}/{bus_label_escape(name)}"


def unit_name_escape(text: str) -> str:
    """systemd's unit name escaping: "/" becomes "-", other unsafe bytes \\xNN."""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_") or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def now_usec() -> tuple[int, int]:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000, time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(eq=False)
class Machine:
    name: str
    machine_class: MachineClass
    leader: int
    id: bytes = b""
    service: str = ""
    root_directory: str = ""
    netif: list[int] = field(default_factory=list)
    unit: str = ""
    timestamp: int = 0
    timestamp_monotonic: int = 0
    state: MachineState = MachineState.RUNNING
    supervisor: int = 0
    # pidfd inode ids (pidfs), 0 where the kernel has none: they tell a
    # recycled PID from the process that registered.
    leader_pidfd_id: int = 0
    supervisor_pidfd_id: int = 0
    vsock_cid: int = VMADDR_CID_ANY
    ssh_address: str = ""
    ssh_private_key_path: str = ""
    # Our own cgroup for the machine, when we made one (CreateMachine).
    cgroup: str = ""
    # The job systemd is starting the machine's scope with, until it is done.
    scope_job: str = ""
    # The unit is a name of ours (CreateMachine without systemd), not systemd's.
    own_unit: bool = False
    # The cgroup of the scope systemd made for the machine, when it did.
    scope_cgroup: str = ""
    # The leader's start time (clock ticks after boot): tells it from a
    # process that got its PID later, where pidfd ids don't.
    leader_start: int = 0
    pidfd: int = -1
    leader_exited: bool = False
    pidfd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def dup_pidfd(self) -> int:
        """A copy of the leader's pidfd for a worker thread, or -1 once the
        leader has exited (the event loop closes the original then)."""
        with self.pidfd_lock:
            return os.dup(self.pidfd) if self.pidfd >= 0 else -1

    @property
    def is_host(self) -> bool:
        return self.machine_class == MachineClass.HOST

    @property
    def object_path(self) -> str:
        return machine_object_path(self.name)

    def state_file_text(self) -> str:
        lines = ["# This is private data. Do not parse.", f"NAME={self.name}"]
        if self.unit:
            lines.append(f"SCOPE={_quote(self.unit)}")
        if self.scope_job:
            lines.append(f"SCOPE_JOB={_quote(self.scope_job)}")
        if self.service:
            lines.append(f"SERVICE={_quote(self.service)}")
        if self.root_directory:
            lines.append(f"ROOT={_quote(self.root_directory)}")
        if self.id:
            lines.append(f"ID={self.id.hex()}")
        lines.append(f"LEADER={self.leader}")
        if self.leader_pidfd_id:
            lines.append(f"LEADER_PIDFDID={self.leader_pidfd_id}")
        if self.supervisor:
            lines.append(f"SUPERVISOR={self.supervisor}")
            if self.supervisor_pidfd_id:
                lines.append(f"SUPERVISOR_PIDFDID={self.supervisor_pidfd_id}")
        lines.append(f"CLASS={self.machine_class}")
        lines.append(f"REALTIME={self.timestamp}")
        lines.append(f"MONOTONIC={self.timestamp_monotonic}")
        if self.netif:
            lines.append(f"NETIF={' '.join(str(i) for i in self.netif)}")
        if self.vsock_cid != VMADDR_CID_ANY:
            lines.append(f"VSOCK_CID={self.vsock_cid}")
        if self.ssh_address:
            lines.append(f"SSH_ADDRESS={_quote(self.ssh_address)}")
        if self.ssh_private_key_path:
            lines.append(f"SSH_PRIVATE_KEY_PATH={_quote(self.ssh_private_key_path)}")
        if self.cgroup:
            lines.append(f"X_CGROUP={_quote(self.cgroup)}")
        if self.own_unit:
            lines.append("X_OWN_UNIT=1")
        if self.scope_cgroup:
            lines.append(f"X_SCOPE_CGROUP={_quote(self.scope_cgroup)}")
        if self.leader_start:
            lines.append(f"X_LEADER_START={self.leader_start}")
        return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@+,=-]*", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'


def check_machine_name(name: str) -> None:
    if not hostname_is_valid(name):
        raise InvalidArgs("Invalid machine name")


def check_machine_id(machine_id: bytes) -> None:
    if len(machine_id) not in (0, 16):
        raise InvalidArgs("Invalid machine ID parameter")


def parse_class(text: str) -> MachineClass | None:
    """A class name, or None for "" (which, like "host", can't be started)."""
    if text == "":
        return None
    try:
        return MachineClass(text)
    except ValueError:
        raise InvalidArgs("Invalid machine class parameter") from None


def check_startable(machine_class: MachineClass | None) -> MachineClass:
    """machine_start(): only containers and VMs are registered."""
    if machine_class not in (MachineClass.CONTAINER, MachineClass.VM):
        raise Errno(errno.EOPNOTSUPP)
    return machine_class


def unit_lookup_failed(pid: int) -> Errno:
    """RegisterMachine's error for a leader that is gone (cg_pid_get_unit)."""
    return Errno(errno.ESRCH, f"Failed to determine unit of process {pid} : No such process")


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


PIDFS_MAGIC = 0x50494446


def pidfd_id(pidfd: int) -> int:
    """The pidfd's inode number, unique per process on pidfs (Linux 6.9+);
    0 where pidfds share one anonymous inode."""
    try:
        if fsutil.statfs(pidfd).magic != PIDFS_MAGIC:
            return 0
    except OSError:
        return 0
    return os.fstat(pidfd).st_ino


def process_start(pid: int) -> int:
    """A process's start time in clock ticks after boot (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_cgroup(pid: int) -> str:
    """A process's cgroup v2 path ("" if unknown)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return ""


def pidfd_pid(pidfd: int) -> int:
    """The PID a pidfd refers to (fdinfo's "Pid:"; -1 once it has exited)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def pid_id(pid: int) -> int:
    """pidfd_id() of PID's process (0 when gone or without pidfs)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        return pidfd_id(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_unit(pid: int) -> str:
    """The systemd unit of a process, from its cgroup path ("" if none)."""
    return cgroup_unit(process_cgroup(pid))


_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".target", ".device", ".automount",
                  ".timer", ".path")


def cgroup_unit(path: str) -> str:
    """systemd's cg_path_get_unit(): the first component below the slices,
    if it is a unit's name ("" otherwise)."""
    for component in path.split("/"):
        if not component or component.endswith(".slice"):
            continue
        return component if component.endswith(_UNIT_SUFFIXES) and not component.startswith(".") else ""
    return ""


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
        boot = 0
        with contextlib.suppress(OSError, ValueError):
            for line in open("/proc/stat"):
                if line.startswith("btime "):
                    boot = int(line.split()[1]) * 1_000_000
        return Machine(".host", MachineClass.HOST, 1, id=machine_id, unit="-.slice", root_directory="/",
                       timestamp=boot, timestamp_monotonic=0)

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
            ancestor = _parent(ancestor)
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
            machine.pidfd = pidfd_open(machine.leader)
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
            if entry.startswith(("unit:", ".")) or not hostname_is_valid(entry):
                continue
            path = os.path.join(self.state_dir, entry)
            try:
                with open(path) as f:
                    data = parse_env_file(f.read())
                machine = _machine_from_state(entry, data)
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


def _machine_from_state(name: str, data: dict[str, str]) -> Machine:
    machine = Machine(
        name,
        MachineClass(data.get("CLASS", "container")),
        int(data.get("LEADER", "0")),
        id=bytes.fromhex(data["ID"]) if data.get("ID") else b"",
        service=data.get("SERVICE", ""),
        root_directory=data.get("ROOT", ""),
        netif=[int(i) for i in data.get("NETIF", "").split()],
        unit=data.get("SCOPE", ""),
        timestamp=int(data.get("REALTIME", "0")),
        timestamp_monotonic=int(data.get("MONOTONIC", "0")),
        cgroup=data.get("X_CGROUP", ""),
        own_unit=data.get("X_OWN_UNIT") == "1",
        scope_cgroup=data.get("X_SCOPE_CGROUP", ""),
        leader_start=int(data.get("X_LEADER_START", "0")),
        leader_pidfd_id=int(data.get("LEADER_PIDFDID", "0")),
        supervisor=int(data.get("SUPERVISOR", "0")),
        supervisor_pidfd_id=int(data.get("SUPERVISOR_PIDFDID", "0")),
        vsock_cid=int(data.get("VSOCK_CID", str(VMADDR_CID_ANY))),
        ssh_address=data.get("SSH_ADDRESS", ""),
        ssh_private_key_path=data.get("SSH_PRIVATE_KEY_PATH", ""),
    )
    return machine


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


CGROUP_ROOT = "/sys/fs/cgroup"


def make_machine_cgroup(name: str, pid: int) -> str:
    """Put PID in a cgroup of its own (machine.slice/machine-<name>.scope) when
    the cgroup v2 hierarchy is writable; returns the cgroup path or ""."""
    rel = f"/machine.slice/machine-{unit_name_escape(name)}.scope"
    path = CGROUP_ROOT + rel
    try:
        if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.procs")):
            return ""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        return rel
    except OSError as e:
        log.debug("No cgroup for machine %s: %s", name, e)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return ""


CGROUP_POLL_INTERVAL = 0.5


def cgroup_populated(rel: str) -> bool:
    """Whether the cgroup (or one below it) has processes (cgroup.events)."""
    if not rel:
        return False
    try:
        with open(CGROUP_ROOT + rel + "/cgroup.events") as f:
            return "populated 1" in f.read().splitlines()
    except OSError:
        return False


def remove_cgroup(rel: str) -> None:
    path = CGROUP_ROOT + rel
    with contextlib.suppress(OSError):
        os.rmdir(path)
