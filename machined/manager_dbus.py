"""org.freedesktop.machine1.Manager at /org/freedesktop/machine1.

Image methods validate the name, look the image up, then run the same code
as the Image object's method (machined-dbus.c: redirect_method_to_image)."""

from __future__ import annotations

import errno
import os

import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_property_async, dbus_signal_async

from imagepool import ops
from imagepool.bus import UNPRIVILEGED, caller_pid, require_root, translated
from imagepool.errors import Errno, InvalidArgs
from machined import image_dbus, machine_dbus, machine_ops
from machined.images import ImageManager, image_object_path
from machined.machine import (
    VMADDR_CID_ANY,
    MachineExists,
    check_machine_id,
    check_machine_name,
    parse_class,
    pid_id,
    pidfd_id,
    pidfd_pid,
)
from machined.machines import MachineManager

# The key/value form of RegisterMachineEx/CreateMachineEx (systemd 259).
EX_PROPERTIES = {"Id": "ay", "Service": "s", "Class": "s", "LeaderPID": "u", "LeaderPIDFD": "h",
                 "LeaderPIDFDID": "t", "RootDirectory": "s", "NetworkInterfaces": "ai", "VSockCID": "u",
                 "SSHAddress": "s", "SSHPrivateKeyPath": "s"}


def _ex_properties(properties: list) -> dict:
    """The properties, checked as systemd reads them, in their order."""
    values: dict = {}
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


def _ex_leader(values: dict) -> int:
    """The leader named by LeaderPIDFD and/or LeaderPID + LeaderPIDFDID, or 0
    (the caller)."""
    pid = values.get("LeaderPID", 0)
    fd_id = values.get("LeaderPIDFDID", 0)
    if "LeaderPIDFD" in values:
        fd = values["LeaderPIDFD"]
        try:
            leader = pidfd_pid(fd)
        except OSError as e:
            raise Errno(e.errno or errno.EBADF, f"Failed to parse PIDFD {fd}: {os.strerror(e.errno or errno.EBADF)}") from None
        if pid > 0 and leader != pid:
            raise InvalidArgs("LeaderPID and LeaderPIDFD refer to different processes")
        if fd_id > 0 and pidfd_id(fd) not in (0, fd_id):
            raise InvalidArgs("LeaderPIDFDID does not match the inode number of LeaderPIDFD")
        return leader
    if pid > 0 and fd_id > 0:
        actual = pid_id(pid)
        if actual != fd_id:
            code = errno.ESRCH
            raise Errno(code, f"Failed to pin process {pid} by PIDFDID {fd_id}: {os.strerror(code)}")
        return pid
    if pid > 0 or fd_id > 0:
        raise InvalidArgs("Both LeaderPID and LeaderPIDFDID must be specified to identify the leader process by "
                          "PIDFDID")
    return 0


MANAGER_PATH = "/org/freedesktop/machine1"


MANAGER_INTERFACE = "org.freedesktop.machine1.Manager"


class ManagerObject(DbusInterfaceCommonAsync, interface_name=MANAGER_INTERFACE):
    def __init__(self, images: ImageManager, machines: MachineManager) -> None:
        super().__init__()
        self.images = images
        self.machines = machines
        machines.on_new = lambda m: self.machine_new.emit((m.name, m.object_path))
        machines.on_removed = lambda m: self.machine_removed.emit((m.name, m.object_path))

    # --- machines ----------------------------------------------------------------

    @dbus_method_async("", "a(ssso)", flags=UNPRIVILEGED, method_name="ListMachines", result_args_names=["machines"])
    @translated
    async def list_machines(self) -> list[tuple[str, str, str, str]]:
        return [(m.name, str(m.machine_class), m.service, m.object_path)
                for m in sorted(self.machines.registry, key=lambda m: m.name)]

    @dbus_method_async("s", "o", flags=UNPRIVILEGED, method_name="GetMachine", input_args_names=["name"],
                       result_args_names=["machine"])
    @translated
    async def get_machine(self, name: str) -> str:
        return self.machines.get(name).object_path

    @dbus_method_async("u", "o", flags=UNPRIVILEGED, method_name="GetMachineByPID", input_args_names=["pid"],
                       result_args_names=["machine"])
    @translated
    async def get_machine_by_pid(self, pid: int) -> str:
        if pid == 0:
            pid = await caller_pid()
        return self.machines.by_pid(pid).object_path

    async def _register(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                        root_directory: str, netif: list[int], create: bool,
                        scope_properties: list | None = None, extra: dict | None = None) -> str:
        # Only the Ex forms ask polkit; sd-bus refuses the others to non-root callers.
        method = sdbus.get_current_message().member
        await require_root(None if method.endswith("Ex") else f"{MANAGER_INTERFACE}.{method}")
        pid = await caller_pid()
        if create:
            machine = await self.machines.create(name, bytes(machine_id), service, class_text, leader,
                                                 root_directory, netif, scope_properties or [], caller_pid=pid,
                                                 extra=extra)
        else:
            machine = self.machines.register(name, bytes(machine_id), service, class_text, leader, root_directory,
                                             netif, caller_pid=pid, extra=extra)
        return machine.object_path

    @dbus_method_async("sayssusa(sv)", "o", flags=UNPRIVILEGED, method_name="CreateMachine",
                       input_args_names=["name", "id", "service", "class", "leader", "root_directory",
                                         "scope_properties"], result_args_names=["path"])
    @translated
    async def create_machine(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                             root_directory: str, scope_properties: list) -> str:
        return await self._register(name, machine_id, service, class_text, leader, root_directory, [], True,
                                    scope_properties)

    @dbus_method_async("sayssusaia(sv)", "o", flags=UNPRIVILEGED, method_name="CreateMachineWithNetwork",
                       input_args_names=["name", "id", "service", "class", "leader", "root_directory",
                                         "ifindices", "scope_properties"], result_args_names=["path"])
    @translated
    async def create_machine_with_network(self, name: str, machine_id: bytes, service: str, class_text: str,
                                          leader: int, root_directory: str, ifindices: list[int],
                                          scope_properties: list) -> str:
        return await self._register(name, machine_id, service, class_text, leader, root_directory, ifindices, True,
                                    scope_properties)

    @dbus_method_async("sayssus", "o", flags=UNPRIVILEGED, method_name="RegisterMachine",
                       input_args_names=["name", "id", "service", "class", "leader", "root_directory"],
                       result_args_names=["path"])
    @translated
    async def register_machine(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                               root_directory: str) -> str:
        return await self._register(name, machine_id, service, class_text, leader, root_directory, [], False)

    @dbus_method_async("sayssusai", "o", flags=UNPRIVILEGED, method_name="RegisterMachineWithNetwork",
                       input_args_names=["name", "id", "service", "class", "leader", "root_directory",
                                         "ifindices"], result_args_names=["path"])
    @translated
    async def register_machine_with_network(self, name: str, machine_id: bytes, service: str, class_text: str,
                                            leader: int, root_directory: str, ifindices: list[int]) -> str:
        return await self._register(name, machine_id, service, class_text, leader, root_directory, ifindices,
                                    False)

    async def _register_ex(self, name: str, properties: list, create: bool,
                           scope_properties: list | None = None) -> str:
        check_machine_name(name)
        values = _ex_properties(properties)
        parse_class(values.get("Class", ""))
        root_directory = values.get("RootDirectory", "")
        if root_directory and not root_directory.startswith("/"):
            raise InvalidArgs("Root directory must be empty or an absolute path")
        if name in self.machines.registry.machines:
            raise MachineExists(f"Machine '{name}' already exists")
        leader = _ex_leader(values)
        extra = {"vsock_cid": values.get("VSockCID", VMADDR_CID_ANY), "ssh_address": values.get("SSHAddress", ""),
                 "ssh_private_key_path": values.get("SSHPrivateKeyPath", "")}
        client = await caller_pid()
        if leader and leader != client:
            extra["supervisor"] = client
        return await self._register(name, values.get("Id", b""), values.get("Service", ""),
                                    values.get("Class", ""), leader, root_directory,
                                    values.get("NetworkInterfaces", []), create, scope_properties, extra)

    @dbus_method_async("sa(sv)a(sv)", "o", flags=UNPRIVILEGED, method_name="CreateMachineEx",
                       input_args_names=["name", "properties", "scope_properties"], result_args_names=["path"])
    @translated
    async def create_machine_ex(self, name: str, properties: list, scope_properties: list) -> str:
        return await self._register_ex(name, properties, True, scope_properties)

    @dbus_method_async("sa(sv)", "o", flags=UNPRIVILEGED, method_name="RegisterMachineEx",
                       input_args_names=["name", "properties"], result_args_names=["path"])
    @translated
    async def register_machine_ex(self, name: str, properties: list) -> str:
        return await self._register_ex(name, properties, False)

    @dbus_method_async("s", "", flags=UNPRIVILEGED, method_name="UnregisterMachine", input_args_names=["name"])
    @translated
    async def unregister_machine(self, name: str) -> None:
        machine = self.machines.get(name)
        await require_root()
        self.machines.unregister(machine)

    @dbus_method_async("s", "", flags=UNPRIVILEGED, method_name="TerminateMachine", input_args_names=["name"])
    @translated
    async def terminate_machine(self, name: str) -> None:
        await machine_dbus.terminate(self.machines, self.machines.get(name))

    @dbus_method_async("ssi", "", flags=UNPRIVILEGED, method_name="KillMachine",
                       input_args_names=["name", "whom", "signal"])
    @translated
    async def kill_machine(self, name: str, whom: str, signo: int) -> None:
        await machine_dbus.kill(self.machines, self.machines.get(name), whom, signo)

    @dbus_method_async("s", "a(iay)", flags=UNPRIVILEGED, method_name="GetMachineAddresses",
                       input_args_names=["name"], result_args_names=["addresses"])
    @translated
    async def get_machine_addresses(self, name: str) -> list[tuple[int, bytes]]:
        return await machine_dbus.get_addresses(self.machines, self.machines.get(name))

    @dbus_method_async("s", "ss", flags=UNPRIVILEGED, method_name="GetMachineSSHInfo", input_args_names=["name"],
                       result_args_names=["ssh_address", "ssh_private_key_path"])
    @translated
    async def get_machine_ssh_info(self, name: str) -> tuple[str, str]:
        return machine_dbus.get_ssh_info(self.machines.get(name))

    @dbus_method_async("s", "a{ss}", flags=UNPRIVILEGED, method_name="GetMachineOSRelease",
                       input_args_names=["name"], result_args_names=["fields"])
    @translated
    async def get_machine_os_release(self, name: str) -> dict[str, str]:
        return await machine_dbus.get_os_release(self.machines, self.machines.get(name))

    @dbus_method_async("s", "u", flags=UNPRIVILEGED, method_name="GetMachineUIDShift", input_args_names=["name"],
                       result_args_names=["shift"])
    @translated
    async def get_machine_uid_shift(self, name: str) -> int:
        return await machine_dbus.get_uid_shift(self.machines, self.machines.get(name))

    @dbus_method_async("s", "hs", flags=UNPRIVILEGED, method_name="OpenMachinePTY", input_args_names=["name"],
                       result_args_names=["pty", "pty_path"])
    @translated
    async def open_machine_pty(self, name: str) -> tuple[int, str]:
        await require_root(f"{MANAGER_INTERFACE}.OpenMachinePTY")
        return await machine_dbus.open_pty(self.machines, self.machines.get(name))

    @dbus_method_async("s", "hs", flags=UNPRIVILEGED, method_name="OpenMachineLogin", input_args_names=["name"],
                       result_args_names=["pty", "pty_path"])
    @translated
    async def open_machine_login(self, name: str) -> tuple[int, str]:
        return await machine_dbus.open_login(self.machines, self.machines.get(name))

    @dbus_method_async("sssasas", "hs", flags=UNPRIVILEGED, method_name="OpenMachineShell",
                       input_args_names=["name", "user", "path", "args", "environment"],
                       result_args_names=["pty", "pty_path"])
    @translated
    async def open_machine_shell(self, name: str, user: str, path: str, args: list[str],
                                 env: list[str]) -> tuple[int, str]:
        return await machine_dbus.open_shell(self.machines, self.machines.get(name), user, path, args, env)

    @dbus_method_async("s", "h", flags=UNPRIVILEGED, method_name="OpenMachineRootDirectory",
                       input_args_names=["name"], result_args_names=["fd"])
    @translated
    async def open_machine_root_directory(self, name: str) -> int:
        return await machine_dbus.open_root_directory(self.machines, self.machines.get(name))

    @dbus_method_async("sssbb", "", flags=UNPRIVILEGED, method_name="BindMountMachine",
                       input_args_names=["name", "source", "destination", "read_only", "mkdir"])
    @translated
    async def bind_mount_machine(self, name: str, source: str, destination: str, read_only: bool,
                                 mkdir: bool) -> None:
        await machine_dbus.bind_mount(self.machines, self.machines.get(name), source, destination, read_only, mkdir)

    @dbus_method_async("sss", "", flags=UNPRIVILEGED, method_name="CopyFromMachine",
                       input_args_names=["name", "source", "destination"])
    @translated
    async def copy_from_machine(self, name: str, source: str, destination: str) -> None:
        await machine_dbus.copy(self.machines, self.machines.get(name), source, destination, 0, to_machine=False)

    @dbus_method_async("sss", "", flags=UNPRIVILEGED, method_name="CopyToMachine",
                       input_args_names=["name", "source", "destination"])
    @translated
    async def copy_to_machine(self, name: str, source: str, destination: str) -> None:
        await machine_dbus.copy(self.machines, self.machines.get(name), source, destination, 0, to_machine=True)

    @dbus_method_async("ssst", "", flags=UNPRIVILEGED, method_name="CopyFromMachineWithFlags",
                       input_args_names=["name", "source", "destination", "flags"])
    @translated
    async def copy_from_machine_with_flags(self, name: str, source: str, destination: str, flags: int) -> None:
        await machine_dbus.copy(self.machines, self.machines.get(name), source, destination, flags,
                                to_machine=False)

    @dbus_method_async("ssst", "", flags=UNPRIVILEGED, method_name="CopyToMachineWithFlags",
                       input_args_names=["name", "source", "destination", "flags"])
    @translated
    async def copy_to_machine_with_flags(self, name: str, source: str, destination: str, flags: int) -> None:
        await machine_dbus.copy(self.machines, self.machines.get(name), source, destination, flags,
                                to_machine=True)

    @dbus_method_async("su", "u", flags=UNPRIVILEGED, method_name="MapFromMachineUser",
                       input_args_names=["name", "uid_inner"], result_args_names=["uid_outer"])
    @translated
    async def map_from_machine_user(self, name: str, uid: int) -> int:
        return await self.machines.run(machine_ops.map_from_machine_user, self.machines.get(name), uid)

    @dbus_method_async("su", "u", flags=UNPRIVILEGED, method_name="MapFromMachineGroup",
                       input_args_names=["name", "gid_inner"], result_args_names=["gid_outer"])
    @translated
    async def map_from_machine_group(self, name: str, gid: int) -> int:
        return await self.machines.run(machine_ops.map_from_machine_group, self.machines.get(name), gid)

    @dbus_method_async("u", "sou", flags=UNPRIVILEGED, method_name="MapToMachineUser",
                       input_args_names=["uid_outer"], result_args_names=["machine_name", "machine_path", "uid_inner"])
    @translated
    async def map_to_machine_user(self, uid: int) -> tuple[str, str, int]:
        machine, inner = await self.machines.run(machine_ops.map_to_machine_user, list(self.machines.registry), uid)
        return machine.name, machine.object_path, inner

    @dbus_method_async("u", "sou", flags=UNPRIVILEGED, method_name="MapToMachineGroup",
                       input_args_names=["gid_outer"], result_args_names=["machine_name", "machine_path", "gid_inner"])
    @translated
    async def map_to_machine_group(self, gid: int) -> tuple[str, str, int]:
        machine, inner = await self.machines.run(machine_ops.map_to_machine_group, list(self.machines.registry), gid)
        return machine.name, machine.object_path, inner

    @dbus_signal_async("so", signal_name="MachineNew", signal_args_names=["machine", "path"])
    def machine_new(self) -> tuple[str, str]:
        raise NotImplementedError

    @dbus_signal_async("so", signal_name="MachineRemoved", signal_args_names=["machine", "path"])
    def machine_removed(self) -> tuple[str, str]:
        raise NotImplementedError

    # --- properties ----------------------------------------------------------

    @dbus_property_async("s", property_name="PoolPath")
    def pool_path(self) -> str:
        return self.images.pool.path

    @dbus_property_async("t", property_name="PoolUsage")
    def pool_usage(self) -> int:
        return ops.pool_usage(self.images.pool)

    @dbus_property_async("t", property_name="PoolLimit")
    def pool_limit(self) -> int:
        return ops.pool_limit(self.images.pool)

    # --- images --------------------------------------------------------------

    @dbus_method_async("s", "o", flags=UNPRIVILEGED, method_name="GetImage", input_args_names=["name"], result_args_names=["image"])
    @translated
    async def get_image(self, name: str) -> str:
        image = await self.images.find(name, validate=False)
        return image_object_path(image.name)

    @dbus_method_async("", "a(ssbttto)", flags=UNPRIVILEGED, method_name="ListImages", result_args_names=["images"])
    @translated
    async def list_images(self) -> list[tuple[str, str, bool, int, int, int, str]]:
        images = await self.images.discover()
        return [
            (i.name, str(i.type), i.read_only, i.crtime, i.mtime, i.usage, image_object_path(i.name))
            for i in images.values()
        ]

    @dbus_method_async("s", "", flags=UNPRIVILEGED, method_name="RemoveImage", input_args_names=["name"])
    @translated
    async def remove_image(self, name: str) -> None:
        await image_dbus.remove_image(self.images, await self.images.find(name))

    @dbus_method_async("ss", "", flags=UNPRIVILEGED, method_name="RenameImage", input_args_names=["name", "new_name"])
    @translated
    async def rename_image(self, name: str, new_name: str) -> None:
        await image_dbus.rename_image(self.images, await self.images.find(name), new_name)

    @dbus_method_async("ssb", "", flags=UNPRIVILEGED, method_name="CloneImage", input_args_names=["name", "new_name", "read_only"])
    @translated
    async def clone_image(self, name: str, new_name: str, read_only: bool) -> None:
        await image_dbus.clone_image(self.images, await self.images.find(name), new_name, read_only)

    @dbus_method_async("sb", "", flags=UNPRIVILEGED, method_name="MarkImageReadOnly", input_args_names=["name", "read_only"])
    @translated
    async def mark_image_read_only(self, name: str, read_only: bool) -> None:
        await image_dbus.mark_image_read_only(self.images, await self.images.find(name), read_only)

    @dbus_method_async("s", "s", flags=UNPRIVILEGED, method_name="GetImageHostname", input_args_names=["name"],
                       result_args_names=["hostname"])
    @translated
    async def get_image_hostname(self, name: str) -> str:
        return await image_dbus.get_image_hostname(self.images, await self.images.find(name))

    @dbus_method_async("s", "ay", flags=UNPRIVILEGED, method_name="GetImageMachineID", input_args_names=["name"],
                       result_args_names=["id"])
    @translated
    async def get_image_machine_id(self, name: str) -> bytes:
        return await image_dbus.get_image_machine_id(self.images, await self.images.find(name))

    @dbus_method_async("s", "a{ss}", flags=UNPRIVILEGED, method_name="GetImageMachineInfo", input_args_names=["name"],
                       result_args_names=["machine_info"])
    @translated
    async def get_image_machine_info(self, name: str) -> dict[str, str]:
        return await image_dbus.get_image_machine_info(self.images, await self.images.find(name))

    @dbus_method_async("s", "a{ss}", flags=UNPRIVILEGED, method_name="GetImageOSRelease", input_args_names=["name"],
                       result_args_names=["os_release"])
    @translated
    async def get_image_os_release(self, name: str) -> dict[str, str]:
        return await image_dbus.get_image_os_release(self.images, await self.images.find(name))

    @dbus_method_async("t", "", flags=UNPRIVILEGED, method_name="SetPoolLimit", input_args_names=["size"])
    @translated
    async def set_pool_limit(self, size: int) -> None:
        await require_root()
        await self.images.set_pool_limit(size)

    @dbus_method_async("st", "", flags=UNPRIVILEGED, method_name="SetImageLimit", input_args_names=["name", "size"])
    @translated
    async def set_image_limit(self, name: str, size: int) -> None:
        await image_dbus.set_image_limit(self.images, await self.images.find(name), size)

    @dbus_method_async("s", "a(st)", flags=UNPRIVILEGED, method_name="CleanPool", input_args_names=["mode"],
                       result_args_names=["images"])
    @translated
    async def clean_pool(self, mode: str) -> list[tuple[str, int]]:
        if mode not in ("hidden", "all"):
            raise InvalidArgs(f"Unknown mode '{mode}'.")
        await require_root()
        return await self.images.clean(mode)
