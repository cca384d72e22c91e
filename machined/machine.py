"""A machine (container or VM) as machined keeps it: what was registered,
what the state file says, and the rules its registration is checked by."""

from __future__ import annotations

import enum
import errno
import os
import re
import threading
from dataclasses import dataclass, field

from imagepool.errors import Errno, InvalidArgs
from imagepool.names import hostname_is_valid

VMADDR_CID_ANY = 0xFFFFFFFF


class MachineClass(enum.StrEnum):
    CONTAINER = "container"
    VM = "vm"
    HOST = "host"


class MachineState(enum.StrEnum):
    OPENING = "opening"
    RUNNING = "running"
    CLOSING = "closing"


def unit_lookup_failed(pid: int) -> Errno:
    """RegisterMachine's error for a leader that is gone (cg_pid_get_unit)."""
    return Errno(errno.ESRCH, f"Failed to determine unit of process {pid} : No such process")


def no_such_process(pid: int) -> Errno:
    """What systemd 252 answers when asked for a scope of a process that is gone."""
    return Errno(errno.ESRCH, f"Process with ID {pid} does not exist.")


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
    # A Varlink address that controls the machine (io.systemd.MachineInstance).
    control_address: str = ""
    # The machine's cgroup below its unit's, when it has one of its own there.
    subgroup: str = ""
    # Who registered the machine.
    uid: int = 0
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

    def state_file_text(self) -> str:
        """/run/systemd/machines/NAME as systemd-machined writes it (its keys in
        its order; unset ones left out), and a few X_ keys of ours."""
        fields: list[tuple[str, object]] = [
            ("NAME", self.name), ("UID", self.uid), ("SCOPE", self.unit), ("SUBGROUP", self.subgroup),
            ("SCOPE_JOB", self.scope_job), ("SERVICE", self.service),
            ("ROOT", self.root_directory), ("ID", self.id.hex()), ("LEADER", str(self.leader)),
            ("LEADER_PIDFDID", self.leader_pidfd_id), ("SUPERVISOR", self.supervisor),
            ("SUPERVISOR_PIDFDID", self.supervisor and self.supervisor_pidfd_id),
            ("CLASS", str(self.machine_class)), ("REALTIME", str(self.timestamp)),
            ("MONOTONIC", str(self.timestamp_monotonic)), ("NETIF", " ".join(str(i) for i in self.netif)),
            ("VSOCK_CID", self.vsock_cid if self.vsock_cid != VMADDR_CID_ANY else 0),
            ("SSH_ADDRESS", self.ssh_address), ("SSH_PRIVATE_KEY_PATH", self.ssh_private_key_path),
            ("CONTROL_ADDRESS", self.control_address),
            ("X_CGROUP", self.cgroup), ("X_OWN_UNIT", 1 if self.own_unit else 0),
            ("X_SCOPE_CGROUP", self.scope_cgroup), ("X_LEADER_START", self.leader_start),
        ]
        lines = ["# This is private data. Do not parse."]
        lines += [f"{key}={_quote(str(value)) if key in _QUOTED else value}" for key, value in fields if value]
        return "\n".join(lines) + "\n"


# The free-form strings: systemd env-escapes these.
_QUOTED = frozenset({"SCOPE", "SUBGROUP", "SCOPE_JOB", "SERVICE", "ROOT", "SSH_ADDRESS", "SSH_PRIVATE_KEY_PATH",
                     "CONTROL_ADDRESS", "X_CGROUP", "X_SCOPE_CGROUP"})


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


def machine_from_state(name: str, data: dict[str, str]) -> Machine:
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
        control_address=data.get("CONTROL_ADDRESS", ""),
        subgroup=data.get("SUBGROUP", ""),
        uid=int(data.get("UID", "0")),
    )
    return machine
