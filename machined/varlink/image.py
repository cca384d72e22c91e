"""io.systemd.MachineImage: the pool over Varlink, as systemd 262's machined
serves it.  Each method checks its arguments, asks authorization and calls
the ImageManager, like the D-Bus Image objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from imagepool import authz
from imagepool.errors import NoSuchImage, PoolError
from imagepool.image import UINT64_MAX, Image
from imagepool.names import image_name_is_valid
from imagepool.varlink_service import Call, Handler, Result, expected_more, invalid_parameter
from machined.images import ImageManager

MANAGE_IMAGES = f"{authz.MACHINE1}.manage-images"


def _entry(image: Image) -> dict[str, Any]:
    """An image as List answers it: what is not known is left out."""
    entry: dict[str, Any] = {"name": image.name, "path": image.path, "type": str(image.type), "class": "machine",
                             "readOnly": image.read_only}
    for key, value in (("creationTimestamp", image.crtime), ("modificationTimestamp", image.mtime)):
        if value:
            entry[key] = value
    for key, value in (("usage", image.usage), ("usageExclusive", image.usage_exclusive), ("limit", image.limit),
                       ("limitExclusive", image.limit_exclusive)):
        if value != UINT64_MAX:
            entry[key] = value
    return entry


def _check_name(value: Any, parameter: str = "name") -> str:
    if not isinstance(value, str) or not (image_name_is_valid(value) or value == ".host"):
        raise invalid_parameter(parameter)
    return value


class ImageInterface:
    def __init__(self, images: ImageManager) -> None:
        self.images = images

    def handlers(self) -> dict[str, Handler]:
        return {"List": self.list, "Update": self.update, "Clone": self.clone, "Remove": self.remove,
                "SetPoolLimit": self.set_pool_limit, "CleanPool": self.clean_pool}

    async def _with_metadata(self, image: Image, mode: str) -> dict[str, Any]:
        entry = _entry(image)
        if mode == "no":
            return entry
        try:
            md = await self.images.metadata(image)
        except (PoolError, OSError):
            if mode == "graceful":
                return entry
            raise
        if md.hostname:
            entry["hostname"] = md.hostname
        if md.machine_id:
            entry["machineId"] = md.machine_id.hex()
        if md.machine_info:
            entry["machineInfo"] = [f"{k}={v}" for k, v in md.machine_info.items()]
        if md.os_release:
            entry["OSRelease"] = [f"{k}={v}" for k, v in md.os_release.items()]
        return entry

    async def list(self, call: Call) -> AsyncIterator[Result]:
        mode = call["acquireMetadata"] or "no"
        if mode != "no":  # systemd 262 asks once, for the name asked for ("n/a" for all)
            await authz.authorize(call.caller, f"{authz.MACHINE1}.inspect-images", {"name": call["name"] or "n/a"})
        if call["name"] is not None:
            image = await self.images.find(_check_name(call["name"]))
            yield await self._with_metadata(image, mode)
            return
        if not call.more:
            raise expected_more()
        images = await self.images.discover()
        if not images:
            raise NoSuchImage("")
        for image in images.values():
            yield await self._with_metadata(image, mode)

    async def _find(self, call: Call) -> Image:
        return await self.images.find(_check_name(call["name"]))

    async def update(self, call: Call) -> Result:
        image = await self._find(call)
        new_name = call["newName"]
        if new_name is not None:
            _check_name(new_name, "newName")
        await authz.authorize(call.caller, MANAGE_IMAGES, {"image": image.name, "verb": "update"})
        if new_name is not None and new_name != image.name:
            await self.images.rename(image, new_name)
            image = await self.images.find(new_name)
        if call["readOnly"] is not None:
            await self.images.mark_read_only(image, call["readOnly"])
        if call["limit"] is not None:
            await self.images.set_limit(image, call["limit"])
        return {}

    async def clone(self, call: Call) -> Result:
        image = await self._find(call)
        new_name = _check_name(call["newName"], "newName")
        await authz.authorize(call.caller, MANAGE_IMAGES, {"image": image.name, "verb": "clone",
                                                          "new_name": new_name})
        await self.images.clone(image, new_name, bool(call["readOnly"]))
        return {}

    async def remove(self, call: Call) -> Result:
        image = await self._find(call)
        await authz.authorize(call.caller, MANAGE_IMAGES, {"image": image.name, "verb": "remove"})
        await self.images.remove(image)
        return {}

    async def set_pool_limit(self, call: Call) -> Result:
        if call["limit"] < 0:
            raise invalid_parameter("limit")
        await authz.authorize(call.caller, MANAGE_IMAGES, {"verb": "set_pool_limit"})
        await self.images.set_pool_limit(call["limit"])
        return {}

    async def clean_pool(self, call: Call) -> AsyncIterator[Result]:
        if not call.more:
            raise expected_more()
        await authz.authorize(call.caller, MANAGE_IMAGES, {"verb": "clean_pool", "mode": call["mode"]})
        removed = await self.images.clean(call["mode"])
        if not removed:
            raise NoSuchImage("")
        for name, usage in removed:
            yield {"name": name, **({"usageExclusive": usage} if usage != UINT64_MAX else {})}
