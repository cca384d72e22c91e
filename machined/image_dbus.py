"""org.freedesktop.machine1.Image: one object per image."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_property_async

from imagepool.bus import UNPRIVILEGED, require_root, translated
from imagepool.image import Image

if TYPE_CHECKING:
    from sdbus.dbus_common_elements import DbusExportHandle

    from machined.images import ImageManager


class ImageObject(DbusInterfaceCommonAsync, interface_name="org.freedesktop.machine1.Image"):
    def __init__(self, manager: ImageManager, image: Image) -> None:
        super().__init__()
        self.manager = manager
        self.image = image
        self.handle: DbusExportHandle | None = None

    async def _current(self) -> Image:
        return await self.manager.find(self.image.name)

    # The Manager's *Image methods land here too, after looking the image up.

    @dbus_method_async("", "", flags=UNPRIVILEGED, method_name="Remove")
    @translated
    async def remove(self) -> None:
        await remove_image(self.manager, await self._current())

    @dbus_method_async("s", "", flags=UNPRIVILEGED, method_name="Rename", input_args_names=["new_name"])
    @translated
    async def rename(self, new_name: str) -> None:
        await rename_image(self.manager, await self._current(), new_name)

    @dbus_method_async("sb", "", flags=UNPRIVILEGED, method_name="Clone", input_args_names=["new_name", "read_only"])
    @translated
    async def clone(self, new_name: str, read_only: bool) -> None:
        await clone_image(self.manager, await self._current(), new_name, read_only)

    @dbus_method_async("b", "", flags=UNPRIVILEGED, method_name="MarkReadOnly", input_args_names=["read_only"])
    @translated
    async def mark_read_only(self, read_only: bool) -> None:
        await mark_image_read_only(self.manager, await self._current(), read_only)

    @dbus_method_async("t", "", flags=UNPRIVILEGED, method_name="SetLimit", input_args_names=["limit"])
    @translated
    async def set_limit(self, limit: int) -> None:
        await set_image_limit(self.manager, await self._current(), limit)

    @dbus_method_async("", "s", flags=UNPRIVILEGED, method_name="GetHostname")
    @translated
    async def get_hostname(self) -> str:
        return await get_image_hostname(self.manager, await self._current())

    @dbus_method_async("", "ay", flags=UNPRIVILEGED, method_name="GetMachineID")
    @translated
    async def get_machine_id(self) -> bytes:
        return await get_image_machine_id(self.manager, await self._current())

    @dbus_method_async("", "a{ss}", flags=UNPRIVILEGED, method_name="GetMachineInfo")
    @translated
    async def get_machine_info(self) -> dict[str, str]:
        return await get_image_machine_info(self.manager, await self._current())

    @dbus_method_async("", "a{ss}", flags=UNPRIVILEGED, method_name="GetOSRelease")
    @translated
    async def get_os_release(self) -> dict[str, str]:
        return await get_image_os_release(self.manager, await self._current())

    @dbus_property_async("s", property_name="Name")
    def name(self) -> str:
        return self.image.name

    @dbus_property_async("s", property_name="Path")
    def path(self) -> str:
        return self.image.path

    @dbus_property_async("s", property_name="Type")
    def type(self) -> str:
        return str(self.image.type)

    @dbus_property_async("b", property_name="ReadOnly")
    def read_only(self) -> bool:
        return self.image.read_only

    @dbus_property_async("t", property_name="CreationTimestamp")
    def creation_timestamp(self) -> int:
        return self.image.crtime

    @dbus_property_async("t", property_name="ModificationTimestamp")
    def modification_timestamp(self) -> int:
        return self.image.mtime

    @dbus_property_async("t", property_name="Usage")
    def usage(self) -> int:
        return self.image.usage

    @dbus_property_async("t", property_name="Limit")
    def limit(self) -> int:
        return self.image.limit

    @dbus_property_async("t", property_name="UsageExclusive")
    def usage_exclusive(self) -> int:
        return self.image.usage_exclusive

    @dbus_property_async("t", property_name="LimitExclusive")
    def limit_exclusive(self) -> int:
        return self.image.limit_exclusive


# One implementation per operation, shared by the Image object and the Manager.


async def remove_image(manager: ImageManager, image: Image) -> None:
    await require_root()
    await manager.remove(image)


async def rename_image(manager: ImageManager, image: Image, new_name: str) -> None:
    await require_root()
    await manager.rename(image, new_name)


async def clone_image(manager: ImageManager, image: Image, new_name: str, read_only: bool) -> None:
    await require_root()
    await manager.clone(image, new_name, read_only)


async def mark_image_read_only(manager: ImageManager, image: Image, read_only: bool) -> None:
    await require_root()
    await manager.mark_read_only(image, read_only)


async def set_image_limit(manager: ImageManager, image: Image, limit: int) -> None:
    await require_root()
    await manager.set_limit(image, limit)


async def get_image_hostname(manager: ImageManager, image: Image) -> str:
    return (await manager.metadata(image)).hostname


async def get_image_machine_id(manager: ImageManager, image: Image) -> bytes:
    return (await manager.metadata(image)).machine_id


async def get_image_machine_info(manager: ImageManager, image: Image) -> dict[str, str]:
    return (await manager.metadata(image)).machine_info


async def get_image_os_release(manager: ImageManager, image: Image) -> dict[str, str]:
    return (await manager.metadata(image)).os_release
