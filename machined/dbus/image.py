"""org.freedesktop.machine1.Image: one object per image.

The Manager's *Image methods validate the name, look the image up, then run
the same functions as the Image object's methods (machined-dbus.c:
redirect_method_to_image); each asks authorization and calls the
ImageManager."""

from __future__ import annotations

import functools

from sdbus import DbusInterfaceCommonAsync

from imagepool import dbus
from imagepool.authz import MACHINE1
from imagepool.image import Image
from imagepool.names import bus_label_escape
from machined.images import ImageManager

INTERFACE = "org.freedesktop.machine1.Image"
PATH_PREFIX = "/org/freedesktop/machine1/image"
MANAGE_IMAGES = f"{MACHINE1}.manage-images"

PROPERTIES = [
    ("Name", "s", "name", 0),
    ("Path", "s", "path", 0),
    ("Type", "s", "type", 0),
    ("ReadOnly", "b", "read_only", 0),
    ("CreationTimestamp", "t", "crtime", 0),
    ("ModificationTimestamp", "t", "mtime", 0),
    ("Usage", "t", "usage", 0),
    ("Limit", "t", "limit", 0),
    ("UsageExclusive", "t", "usage_exclusive", 0),
    ("LimitExclusive", "t", "limit_exclusive", 0),
]


@functools.lru_cache(maxsize=16384)  # every ListImages asks again for every name
def image_object_path(name: str) -> str:
    return f"{PATH_PREFIX}/{bus_label_escape(name)}"


class ImageObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, manager: ImageManager, image: Image) -> None:
        super().__init__()
        self.manager = manager
        self.image = image

    async def _current(self) -> Image:
        return await self.manager.find(self.image.name)

    locals().update(dbus.properties("image", PROPERTIES))

    @dbus.method("", "", "Remove")
    async def remove(self) -> None:
        await remove_image(self.manager, await self._current())

    @dbus.method("s", "", "Rename", ["new_name"])
    async def rename(self, new_name: str) -> None:
        await rename_image(self.manager, await self._current(), new_name)

    @dbus.method("sb", "", "Clone", ["new_name", "read_only"])
    async def clone(self, new_name: str, read_only: bool) -> None:
        await clone_image(self.manager, await self._current(), new_name, read_only)

    @dbus.method("b", "", "MarkReadOnly", ["read_only"])
    async def mark_read_only(self, read_only: bool) -> None:
        await mark_image_read_only(self.manager, await self._current(), read_only)

    @dbus.method("t", "", "SetLimit", ["limit"])
    async def set_limit(self, limit: int) -> None:
        await set_image_limit(self.manager, await self._current(), limit)

    @dbus.method("", "s", "GetHostname")
    async def get_hostname(self) -> str:
        return (await self.manager.metadata(await self._current())).hostname

    @dbus.method("", "ay", "GetMachineID")
    async def get_machine_id(self) -> bytes:
        return (await self.manager.metadata(await self._current())).machine_id

    @dbus.method("", "a{ss}", "GetMachineInfo")
    async def get_machine_info(self) -> dict[str, str]:
        return (await self.manager.metadata(await self._current())).machine_info

    @dbus.method("", "a{ss}", "GetOSRelease")
    async def get_os_release(self) -> dict[str, str]:
        return (await self.manager.metadata(await self._current())).os_release


class ImageObjects:
    """The exported Image objects, in step with what the ImageManager knows."""

    def __init__(self, manager: ImageManager) -> None:
        self.manager = manager
        self.exported: dbus.Exported[str, ImageObject] = dbus.Exported(image_object_path)
        manager.subscribe(self._export, self._changed, lambda image: self.exported.unexport(image.name))

    def _export(self, image: Image) -> None:
        self.exported.export(image.name, ImageObject(self.manager, image))

    def _changed(self, image: Image) -> None:
        obj = self.exported.objects.get(image.name)
        if obj is None:
            self._export(image)
        else:
            obj.image = image


# --- one implementation per operation, for the Image object and the Manager ------


def _details(image: Image, verb: str, **more: str) -> dict[str, str]:
    return {"image": image.name, "verb": verb, **more}


async def remove_image(manager: ImageManager, image: Image) -> None:
    await dbus.authorize(MANAGE_IMAGES, _details(image, "remove"))
    await manager.remove(image)


async def rename_image(manager: ImageManager, image: Image, new_name: str) -> None:
    await dbus.authorize(MANAGE_IMAGES, _details(image, "rename", new_name=new_name))
    await manager.rename(image, new_name)


async def clone_image(manager: ImageManager, image: Image, new_name: str, read_only: bool) -> None:
    await dbus.authorize(MANAGE_IMAGES, _details(image, "clone", new_name=new_name))
    await manager.clone(image, new_name, read_only)


async def mark_image_read_only(manager: ImageManager, image: Image, read_only: bool) -> None:
    await dbus.authorize(MANAGE_IMAGES, _details(image, "mark_read_only", read_only="1" if read_only else "0"))
    await manager.mark_read_only(image, read_only)


async def set_image_limit(manager: ImageManager, image: Image, limit: int) -> None:
    # "machine", not "image": systemd 262's details for SetLimit
    await dbus.authorize(MANAGE_IMAGES, {"machine": image.name, "verb": "set_limit"})
    await manager.set_limit(image, limit)
