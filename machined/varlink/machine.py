"""io.systemd.Machine: the machine registry over Varlink, as systemd 262's
machined serves it (what its machinectl, systemd-nspawn and
systemd-ssh-proxy call).  Each method checks its arguments, asks
authorization and calls the MachineManager, like the D-Bus Machine objects."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator
from typing import Any

from imagepool import authz
from imagepool.errors import Errno, PoolError
from imagepool.names import hostname_is_valid, machine_name_is_valid
from imagepool.varlink_service import Call, Handler, Reply, Result, expected_more, invalid_parameter
from machined import ops
from machined.machine import VMADDR_CID_ANY, Machine
from machined.machines import MachineManager
from machined.procs import pid_id
from machined.registration import Registration

MACHINE1 = authz.MACHINE1
MANAGE_MACHINES = f"{MACHINE1}.manage-machines"


def boot_id() -> str:
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip().replace("-", "")
    return ""


def process_id(pid: int, pidfd_id: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"pid": pid}
    if pidfd_id:
        entry["pidfdId"] = pidfd_id
        if boot := boot_id():
            entry["bootId"] = boot
    return entry


def _entry(m: Machine) -> dict[str, Any]:
    """A machine as List answers it: what is not known is left out."""
    entry: dict[str, Any] = {"name": m.name}
    if m.id:
        entry["id"] = m.id.hex()
    if m.service:
        entry["service"] = m.service
    entry["class"] = str(m.machine_class)
    for key, value in (("rootDirectory", m.root_directory), ("unit", m.unit)):
        if value:
            entry[key] = value
    if m.leader:
        entry["leader"] = process_id(m.leader, m.leader_pidfd_id or (pid_id(m.leader) if m.is_host else 0))
    if m.supervisor:
        entry["supervisor"] = process_id(m.supervisor, m.supervisor_pidfd_id)
    if m.timestamp:
        entry["timestamp"] = {"realtime": m.timestamp, "monotonic": m.timestamp_monotonic}
    if m.vsock_cid != VMADDR_CID_ANY:
        entry["vSockCid"] = m.vsock_cid
    for key, value in (("sshAddress", m.ssh_address), ("sshPrivateKeyPath", m.ssh_private_key_path),
                       ("controlAddress", m.control_address), ("subgroup", m.subgroup)):
        if value:
            entry[key] = value
    entry["UID"] = m.uid
    return entry


def _host_or(m: Machine, action: str) -> str:
    return f"{MACHINE1}.host-{action}" if m.is_host else f"{MACHINE1}.{action}"


class MachineInterface:
    def __init__(self, machines: MachineManager) -> None:
        self.machines = machines

    def handlers(self) -> dict[str, Handler]:
        return {"Register": self.register, "Unregister": self.unregister, "Terminate": self.terminate,
                "Kill": self.kill, "List": self.list, "Open": self.open, "MapFrom": self.map_from,
                "MapTo": self.map_to, "BindMount": self.bind_mount, "CopyFrom": self.copy_from,
                "CopyTo": self.copy_to, "OpenRootDirectory": self.open_root_directory}

    def _machine(self, call: Call) -> Machine:
        """The machine a call names, or the one of the process it names (PID
        0: the caller's)."""
        name, pid = call["name"], call["pid"]
        if name is not None:
            if not machine_name_is_valid(name):
                raise invalid_parameter("name")
            return self.machines.get(name)
        if pid is not None:
            number = pid["pid"] or call.peercred[0]
            if pid.get("pidfdId") and pid_id(number) not in (0, pid["pidfdId"]):
                raise Errno(errno.ESRCH)
            return self.machines.by_pid(number)
        raise invalid_parameter("name")

    async def _authorize(self, call: Call, m: Machine, verb: str, **more: str) -> None:
        # "name", where the D-Bus side says "machine" (systemd 262's details)
        await authz.authorize(call.caller, MANAGE_MACHINES, {"name": m.name, "verb": verb, **more})

    # --- registration -------------------------------------------------------------------

    async def register(self, call: Call) -> Result:
        name = call["name"]
        if not hostname_is_valid(name):
            raise invalid_parameter("name")
        machine_id = b""
        if call["id"]:
            try:
                machine_id = bytes.fromhex(call["id"])
            except ValueError:
                raise invalid_parameter("id") from None
            if len(machine_id) != 16:
                raise invalid_parameter("id")
        caller_pid, caller_uid, _ = call.peercred
        leader = call["leader"] or 0
        if call["leaderProcessId"] is not None:
            wanted = call["leaderProcessId"]
            if leader and leader != wanted["pid"]:
                raise invalid_parameter("leaderProcessId")
            leader = wanted["pid"]
            if wanted.get("pidfdId") and pid_id(leader) != wanted["pidfdId"]:
                raise Errno(errno.ESRCH, f"Failed to pin process {leader} by PIDFDID {wanted['pidfdId']}")
        for ifindex in call["ifIndices"] or []:
            if ifindex <= 0:
                raise invalid_parameter("ifIndices")
        vsock = call["vSockCid"]
        if vsock is not None and not 3 <= vsock < VMADDR_CID_ANY:
            raise invalid_parameter("vSockCid")
        extra: dict[str, Any] = {"vsock_cid": VMADDR_CID_ANY if vsock is None else vsock,
                                 "ssh_address": call["sshAddress"] or "",
                                 "ssh_private_key_path": call["sshPrivateKeyPath"] or "",
                                 "control_address": call["controlAddress"] or "", "uid": caller_uid}
        if leader and leader != caller_pid:
            extra["supervisor"] = caller_pid
        req = Registration(name, machine_id, call["service"] or "", call["class"], leader,
                           call["rootDirectory"] or "", list(call["ifIndices"] or []), extra)
        create = bool(call["allocateUnit"])
        action = "create-machine" if create else "register-machine"
        await authz.authorize(call.caller, f"{MACHINE1}.{action}", {"name": name, "class": call["class"]})
        if create:
            await self.machines.create(req, [], caller_pid=caller_pid)
        else:
            self.machines.register(req, caller_pid=caller_pid)
        return {}

    async def unregister(self, call: Call) -> Result:
        m = self._machine(call)
        await self._authorize(call, m, "unregister")
        self.machines.unregister(m)
        return {}

    # --- stopping and signalling -------------------------------------------------------

    async def terminate(self, call: Call) -> Result:
        m = self._machine(call)
        await self._authorize(call, m, "terminate")
        await self.machines.terminate(m)
        return {}

    async def kill(self, call: Call) -> Result:
        m = self._machine(call)
        whom, signo = call["whom"] or "all", call["signal"]
        try:
            ops.check_kill(whom, signo)
        except PoolError:
            raise invalid_parameter("signal") from None
        await self._authorize(call, m, "kill")
        await self.machines.kill(m, whom, signo)
        return {}

    # --- listing ---------------------------------------------------------------------------

    async def _with_metadata(self, m: Machine, mode: str) -> dict[str, Any]:
        entry = _entry(m)
        if mode == "no":
            return entry
        for key, fetch in (("addresses", self._addresses), ("OSRelease", self._os_release),
                           ("UIDShift", self.machines.get_uid_shift)):
            try:
                entry[key] = await fetch(m)
            except (PoolError, OSError):
                if mode != "graceful":
                    raise
        return entry

    async def _addresses(self, m: Machine) -> list[dict[str, Any]]:
        return [{"ifindex": ifindex, "family": family, "address": list(address)}
                for ifindex, family, address in await self.machines.get_addresses(m)]

    async def _os_release(self, m: Machine) -> list[str]:
        return [f"{k}={v}" for k, v in (await self.machines.get_os_release(m)).items()]

    async def list(self, call: Call) -> AsyncIterator[Result]:
        mode = call["acquireMetadata"] or "no"
        if mode != "no":  # systemd 262 asks once, for the name asked for ("n/a" for all)
            await authz.authorize(call.caller, f"{MACHINE1}.inspect-machines", {"name": call["name"] or "n/a"})
        if call["name"] is not None or call["pid"] is not None:
            yield await self._with_metadata(self._machine(call), mode)
            return
        if not call.more:
            raise expected_more()
        for m in sorted(self.machines, key=lambda m: m.name):
            yield await self._with_metadata(m, mode)

    # --- what is inside ---------------------------------------------------------------------

    async def open(self, call: Call) -> Result:
        m = self._machine(call)
        mode = call["mode"]
        if mode == "tty":
            await authz.authorize(call.caller, _host_or(m, "open-pty"), {"machine": m.name})
            fd, path = await self.machines.open_pty(m)
        elif mode == "login":
            await authz.authorize(call.caller, _host_or(m, "login"), {"machine": m.name, "verb": "login"})
            fd, path = await self.machines.open_login(m)
        else:
            user, program, args = call["user"] or "", call["path"] or "", call["args"] or []
            await authz.authorize(call.caller, _host_or(m, "shell"),
                                  {"machine": m.name, "verb": "shell", **ops.shell_polkit_details(user, program, args)})
            fd, path = await self.machines.open_shell(m, user, program, list(args), list(call["environment"] or []))
        return Reply({"ptyFileDescriptor": 0, "ptyPath": path}, [fd])

    async def map_from(self, call: Call) -> Result:
        m = self._machine(call)
        reply: dict[str, Any] = {}
        for kind in ("uid", "gid"):
            if call[kind] is not None:
                reply[kind] = await self.machines.map_from_machine(m, kind, call[kind])
        return reply

    async def map_to(self, call: Call) -> Result:
        reply: dict[str, Any] = {}
        for kind in ("uid", "gid"):
            if call[kind] is not None:
                m, inner = await self.machines.map_to_machine(kind, call[kind])
                reply[kind] = inner
                reply.setdefault("machineName", m.name)
        return reply

    async def bind_mount(self, call: Call) -> Result:
        m = self._machine(call)
        destination = ops.check_bind_mount(m, call["source"], call["destination"] or "")
        await self._authorize(call, m, "bind", src=call["source"], dest=destination)
        await self.machines.bind_mount(m, call["source"], destination, bool(call["readOnly"]), bool(call["mkdir"]))
        return {}

    async def _copy(self, call: Call, to_machine: bool) -> Result:
        m = self._machine(call)
        flags = ops.COPY_REPLACE if call["replace"] else 0
        destination = self.machines.check_copy(m, call["source"], call["destination"] or "", flags)
        await self._authorize(call, m, "copy", src=call["source"], dest=destination)
        await self.machines.copy(m, call["source"], destination, flags, to_machine=to_machine)
        return {}

    async def copy_from(self, call: Call) -> Result:
        return await self._copy(call, to_machine=False)

    async def copy_to(self, call: Call) -> Result:
        return await self._copy(call, to_machine=True)

    async def open_root_directory(self, call: Call) -> Result:
        m = self._machine(call)
        await self._authorize(call, m, "open_root_directory")
        return Reply({"fileDescriptor": 0}, [await self.machines.open_root_directory(m)])
