"""org.freedesktop.machine1.Manager at /org/freedesktop/machine1.

Image methods validate the name, look the image up, then run the same code
as the Image object's method (machined-dbus.c: redirect_method_to_image)."""

from __future__ import annotations

from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_property_async

from imagepool import ops
from imagepool.bus import UNPRIVILEGED, require_root, translated
from imagepool.errors import InvalidArgs
from machined import image_dbus
from machined.images import ImageManager, image_object_path

MANAGER_PATH = "/org/freedesktop/machine1"


class ManagerObject(DbusInterfaceCommonAsync, interface_name="org.freedesktop.machine1.Manager"):
    def __init__(self, images: ImageManager) -> None:
        super().__init__()
        self.images = images

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
