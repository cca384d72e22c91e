"""org.freedesktop.machine1.Manager at /org/freedesktop/machine1.

Methods that take a machine or image name look it up and run the same
functions as the Machine and Image objects' methods (machined-dbus.c:
redirect_method_to_image/_machine)."""

from __future__ import annotations

from typing import Any

from sdbus import DbusInterfaceCommonAsync, dbus_property_async, dbus_signal_async

from imagepool import dbus
from imagepool.authz import MACHINE1
from machined.dbus import image as image_dbus
from machined.dbus import machine as machine_dbus
from machined.dbus.image import image_object_path
from machined.dbus.machine import MANAGE_MACHINES, machine_object_path
from machined.images import ImageManager
from machined.machine import Machine
from machined.machines import MachineManager
from machined.registration import Registration, parse_ex

PATH = "/org/freedesktop/machine1"
INTERFACE = "org.freedesktop.machine1.Manager"
Properties = list[tuple[str, tuple[str, Any]]]


class ManagerObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, images: ImageManager, machines: MachineManager) -> None:
        super().__init__()
        self.images = images
        self.machines = machines
        self.machine_objects = machine_dbus.MachineObjects(machines)
        self.image_objects = image_dbus.ImageObjects(images)

    def start(self) -> None:
        """Export the objects of the machines there are, and from now on of
        the ones that come and go, with the Manager's signals."""
        self.machine_objects.start()
        self.machines.subscribe(self._machine_new, self._machine_removed)

    def _machine_new(self, m: Machine) -> None:
        self.machine_new.emit((m.name, machine_object_path(m.name)))

    def _machine_removed(self, m: Machine) -> None:
        self.machine_removed.emit((m.name, machine_object_path(m.name)))

    # --- machines ------------------------------------------------------------------------

    @dbus.method("", "a(ssso)", "ListMachines", result_names=["machines"])
    async def list_machines(self) -> list[tuple[str, str, str, str]]:
        return [(m.name, str(m.machine_class), m.service, machine_object_path(m.name))
                for m in sorted(self.machines.registry, key=lambda m: m.name)]

    @dbus.method("s", "o", "GetMachine", ["name"], ["machine"])
    async def get_machine(self, name: str) -> str:
        return machine_object_path(self.machines.get(name).name)

    @dbus.method("u", "o", "GetMachineByPID", ["pid"], ["machine"])
    async def get_machine_by_pid(self, pid: int) -> str:
        if pid == 0:
            pid = await dbus.caller_pid()
        return machine_object_path(self.machines.by_pid(pid).name)

    async def _register(self, req: Registration, create: bool, scope_properties: Properties | None = None) -> str:
        """The classic forms: sd-bus refuses them to callers other than root."""
        dbus.require_privileged(await dbus.caller(), f"{INTERFACE}.{dbus.current_method()}")
        return await self._register_checked(req, create, scope_properties)

    async def _register_checked(self, req: Registration, create: bool, scope_properties: Properties | None) -> str:
        pid = await dbus.caller_pid()
        if create:
            machine = await self.machines.create(req, scope_properties or [], caller_pid=pid)
        else:
            machine = self.machines.register(req, caller_pid=pid)
        return machine_object_path(machine.name)

    async def _register_ex(self, name: str, properties: Properties, create: bool,
                           scope_properties: Properties | None = None) -> str:
        """The Ex forms: their arguments, then polkit."""
        req = parse_ex(self.machines.registry, name, properties, await dbus.caller_pid())
        # "create-machines" (sic) is systemd 262's id for CreateMachineEx, one its policy does not define
        # (polkit then refuses everybody but root); "create-machine" is what Varlink's Register asks.
        action = "create-machines" if create else "register-machine"
        await dbus.authorize(f"{MACHINE1}.{action}", {"name": name, "class": req.class_text})
        return await self._register_checked(req, create, scope_properties)

    @dbus.method("sayssusa(sv)", "o", "CreateMachine",
                 ["name", "id", "service", "class", "leader", "root_directory", "scope_properties"], ["path"])
    async def create_machine(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                             root_directory: str, scope_properties: Properties) -> str:
        req = Registration(name, bytes(machine_id), service, class_text, leader, root_directory)
        return await self._register(req, True, scope_properties)

    @dbus.method("sayssusaia(sv)", "o", "CreateMachineWithNetwork",
                 ["name", "id", "service", "class", "leader", "root_directory", "ifindices", "scope_properties"],
                 ["path"])
    async def create_machine_with_network(self, name: str, machine_id: bytes, service: str, class_text: str,
                                          leader: int, root_directory: str, ifindices: list[int],
                                          scope_properties: Properties) -> str:
        req = Registration(name, bytes(machine_id), service, class_text, leader, root_directory, ifindices)
        return await self._register(req, True, scope_properties)

    @dbus.method("sayssus", "o", "RegisterMachine",
                 ["name", "id", "service", "class", "leader", "root_directory"], ["path"])
    async def register_machine(self, name: str, machine_id: bytes, service: str, class_text: str, leader: int,
                               root_directory: str) -> str:
        return await self._register(Registration(name, bytes(machine_id), service, class_text, leader,
                                                 root_directory), False)

    @dbus.method("sayssusai", "o", "RegisterMachineWithNetwork",
                 ["name", "id", "service", "class", "leader", "root_directory", "ifindices"], ["path"])
    async def register_machine_with_network(self, name: str, machine_id: bytes, service: str, class_text: str,
                                            leader: int, root_directory: str, ifindices: list[int]) -> str:
        return await self._register(Registration(name, bytes(machine_id), service, class_text, leader,
                                                 root_directory, ifindices), False)

    @dbus.method("sa(sv)a(sv)", "o", "CreateMachineEx", ["name", "properties", "scope_properties"], ["path"])
    async def create_machine_ex(self, name: str, properties: Properties, scope_properties: Properties) -> str:
        return await self._register_ex(name, properties, True, scope_properties)

    @dbus.method("sa(sv)", "o", "RegisterMachineEx", ["name", "properties"], ["path"])
    async def register_machine_ex(self, name: str, properties: Properties) -> str:
        return await self._register_ex(name, properties, False)

    @dbus.method("s", "", "UnregisterMachine", ["name"])
    async def unregister_machine(self, name: str) -> None:
        machine = self.machines.get(name)
        await dbus.authorize(MANAGE_MACHINES, {"machine": name, "verb": "unregister"})
        self.machines.unregister(machine)

    @dbus.method("s", "", "TerminateMachine", ["name"])
    async def terminate_machine(self, name: str) -> None:
        await machine_dbus.terminate(self.machines, self.machines.get(name))

    @dbus.method("ssi", "", "KillMachine", ["name", "whom", "signal"])
    async def kill_machine(self, name: str, whom: str, signo: int) -> None:
        await machine_dbus.kill(self.machines, self.machines.get(name), whom, signo)

    @dbus.method("s", "a(iay)", "GetMachineAddresses", ["name"], ["addresses"])
    async def get_machine_addresses(self, name: str) -> list[tuple[int, bytes]]:
        return await machine_dbus.get_addresses(self.machines, self.machines.get(name))

    @dbus.method("s", "ss", "GetMachineSSHInfo", ["name"], ["ssh_address", "ssh_private_key_path"])
    async def get_machine_ssh_info(self, name: str) -> tuple[str, str]:
        return self.machines.get_ssh_info(self.machines.get(name))

    @dbus.method("s", "a{ss}", "GetMachineOSRelease", ["name"], ["fields"])
    async def get_machine_os_release(self, name: str) -> dict[str, str]:
        return await machine_dbus.get_os_release(self.machines, self.machines.get(name))

    @dbus.method("s", "u", "GetMachineUIDShift", ["name"], ["shift"])
    async def get_machine_uid_shift(self, name: str) -> int:
        return await self.machines.get_uid_shift(self.machines.get(name))

    @dbus.method("s", "hs", "OpenMachinePTY", ["name"], ["pty", "pty_path"])
    async def open_machine_pty(self, name: str) -> tuple[int, str]:
        dbus.require_privileged(await dbus.caller(), f"{INTERFACE}.OpenMachinePTY")
        return await machine_dbus.open_pty(self.machines, self.machines.get(name))

    @dbus.method("s", "hs", "OpenMachineLogin", ["name"], ["pty", "pty_path"])
    async def open_machine_login(self, name: str) -> tuple[int, str]:
        return await machine_dbus.open_login(self.machines, self.machines.get(name))

    @dbus.method("sssasas", "hs", "OpenMachineShell", ["name", "user", "path", "args", "environment"],
                 ["pty", "pty_path"])
    async def open_machine_shell(self, name: str, user: str, path: str, args: list[str],
                                 env: list[str]) -> tuple[int, str]:
        return await machine_dbus.open_shell(self.machines, self.machines.get(name), user, path, args, env)

    @dbus.method("s", "h", "OpenMachineRootDirectory", ["name"], ["fd"])
    async def open_machine_root_directory(self, name: str) -> int:
        return await machine_dbus.open_root_directory(self.machines, self.machines.get(name))

    @dbus.method("sssbb", "", "BindMountMachine", ["name", "source", "destination", "read_only", "mkdir"])
    async def bind_mount_machine(self, name: str, source: str, destination: str, read_only: bool,
                                 mkdir: bool) -> None:
        await machine_dbus.bind_mount(self.machines, self.machines.get(name), source, destination, read_only, mkdir)

    async def _copy(self, name: str, source: str, destination: str, flags: int, to_machine: bool) -> None:
        await machine_dbus.copy(self.machines, self.machines.get(name), source, destination, flags, to_machine)

    @dbus.method("sss", "", "CopyFromMachine", ["name", "source", "destination"])
    async def copy_from_machine(self, name: str, source: str, destination: str) -> None:
        await self._copy(name, source, destination, 0, False)

    @dbus.method("sss", "", "CopyToMachine", ["name", "source", "destination"])
    async def copy_to_machine(self, name: str, source: str, destination: str) -> None:
        await self._copy(name, source, destination, 0, True)

    @dbus.method("ssst", "", "CopyFromMachineWithFlags", ["name", "source", "destination", "flags"])
    async def copy_from_machine_with_flags(self, name: str, source: str, destination: str, flags: int) -> None:
        await self._copy(name, source, destination, flags, False)

    @dbus.method("ssst", "", "CopyToMachineWithFlags", ["name", "source", "destination", "flags"])
    async def copy_to_machine_with_flags(self, name: str, source: str, destination: str, flags: int) -> None:
        await self._copy(name, source, destination, flags, True)

    @dbus.method("su", "u", "MapFromMachineUser", ["name", "uid_inner"], ["uid_outer"])
    async def map_from_machine_user(self, name: str, uid: int) -> int:
        return await self.machines.map_from_machine(self.machines.get(name), "uid", uid)

    @dbus.method("su", "u", "MapFromMachineGroup", ["name", "gid_inner"], ["gid_outer"])
    async def map_from_machine_group(self, name: str, gid: int) -> int:
        return await self.machines.map_from_machine(self.machines.get(name), "gid", gid)

    async def _map_to(self, kind: str, outer: int) -> tuple[str, str, int]:
        machine, inner = await self.machines.map_to_machine(kind, outer)
        return machine.name, machine_object_path(machine.name), inner

    @dbus.method("u", "sou", "MapToMachineUser", ["uid_outer"], ["machine_name", "machine_path", "uid_inner"])
    async def map_to_machine_user(self, uid: int) -> tuple[str, str, int]:
        return await self._map_to("uid", uid)

    @dbus.method("u", "sou", "MapToMachineGroup", ["gid_outer"], ["machine_name", "machine_path", "gid_inner"])
    async def map_to_machine_group(self, gid: int) -> tuple[str, str, int]:
        return await self._map_to("gid", gid)

    @dbus_signal_async("so", signal_name="MachineNew", signal_args_names=["machine", "path"])
    def machine_new(self) -> tuple[str, str]:
        raise NotImplementedError

    @dbus_signal_async("so", signal_name="MachineRemoved", signal_args_names=["machine", "path"])
    def machine_removed(self) -> tuple[str, str]:
        raise NotImplementedError

    # --- properties ---------------------------------------------------------------------

    @dbus_property_async("s", property_name="PoolPath")
    def pool_path(self) -> str:
        return self.images.pool.path

    @dbus_property_async("t", property_name="PoolUsage")
    def pool_usage(self) -> int:
        return self.images.pool_usage()

    @dbus_property_async("t", property_name="PoolLimit")
    def pool_limit(self) -> int:
        return self.images.pool_limit()

    # --- images ---------------------------------------------------------------------------

    @dbus.method("s", "o", "GetImage", ["name"], ["image"])
    async def get_image(self, name: str) -> str:
        return image_object_path((await self.images.find(name, validate=False)).name)

    @dbus.method("", "a(ssbttto)", "ListImages", result_names=["images"])
    async def list_images(self) -> list[tuple[str, str, bool, int, int, int, str]]:
        images = await self.images.discover()
        return [(i.name, str(i.type), i.read_only, i.crtime, i.mtime, i.usage, image_object_path(i.name))
                for i in images.values()]

    @dbus.method("s", "", "RemoveImage", ["name"])
    async def remove_image(self, name: str) -> None:
        await image_dbus.remove_image(self.images, await self.images.find(name))

    @dbus.method("ss", "", "RenameImage", ["name", "new_name"])
    async def rename_image(self, name: str, new_name: str) -> None:
        await image_dbus.rename_image(self.images, await self.images.find(name), new_name)

    @dbus.method("ssb", "", "CloneImage", ["name", "new_name", "read_only"])
    async def clone_image(self, name: str, new_name: str, read_only: bool) -> None:
        await image_dbus.clone_image(self.images, await self.images.find(name), new_name, read_only)

    @dbus.method("sb", "", "MarkImageReadOnly", ["name", "read_only"])
    async def mark_image_read_only(self, name: str, read_only: bool) -> None:
        await image_dbus.mark_image_read_only(self.images, await self.images.find(name), read_only)

    @dbus.method("s", "s", "GetImageHostname", ["name"], ["hostname"])
    async def get_image_hostname(self, name: str) -> str:
        return (await self.images.metadata(await self.images.find(name))).hostname

    @dbus.method("s", "ay", "GetImageMachineID", ["name"], ["id"])
    async def get_image_machine_id(self, name: str) -> bytes:
        return (await self.images.metadata(await self.images.find(name))).machine_id

    @dbus.method("s", "a{ss}", "GetImageMachineInfo", ["name"], ["machine_info"])
    async def get_image_machine_info(self, name: str) -> dict[str, str]:
        return (await self.images.metadata(await self.images.find(name))).machine_info

    @dbus.method("s", "a{ss}", "GetImageOSRelease", ["name"], ["os_release"])
    async def get_image_os_release(self, name: str) -> dict[str, str]:
        return (await self.images.metadata(await self.images.find(name))).os_release

    @dbus.method("t", "", "SetPoolLimit", ["size"])
    async def set_pool_limit(self, size: int) -> None:
        # manage-machines, not manage-images: systemd's (252 and 262) action for the pool's methods.
        await dbus.authorize(MANAGE_MACHINES, {"verb": "set_pool_limit"})
        await self.images.set_pool_limit(size)

    @dbus.method("st", "", "SetImageLimit", ["name", "size"])
    async def set_image_limit(self, name: str, size: int) -> None:
        await image_dbus.set_image_limit(self.images, await self.images.find(name), size)

    @dbus.method("s", "a(st)", "CleanPool", ["mode"], ["images"])
    async def clean_pool(self, mode: str) -> list[tuple[str, int]]:
        self.images.check_clean_mode(mode)
        await dbus.authorize(MANAGE_MACHINES, {"verb": "clean_pool", "mode": mode})
        return await self.images.clean(mode)
