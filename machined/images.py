"""machined's image half: the pool, running operations, and the exported
Image objects, kept in step with what is on disk."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from imagepool import ops
from imagepool.errors import InvalidArgs, LimitsExceeded, NoSuchImage
from imagepool.image import Image, ImageType, Pool
from imagepool.inotify import DirectoryWatch
from imagepool.metadata import ImageMetadata, read_tree_metadata
from imagepool.names import bus_label_escape, image_name_is_valid
from imagepool.rawmeta import read_raw_metadata
from machined.image_dbus import ImageObject

log = logging.getLogger(__name__)

IMAGE_PATH_PREFIX = "/org/freedesktop/machine1/image"
OPERATIONS_MAX = 64

T = TypeVar("T")


@functools.lru_cache(maxsize=16384)  # every ListImages asks again for every name
def image_object_path(name: str) -> str:
    return f"{IMAGE_PATH_PREFIX}/{bus_label_escape(name)}"


class ImageManager:
    """Owns the pool and the exported Image objects of one machined."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.operations = 0
        self.objects: dict[str, ImageObject] = {}
        self._watch: DirectoryWatch | None = None
        self._rescan: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    def start_watching(self) -> None:
        """Keep the exported objects (and so introspection) in step with the
        search directories, whoever changes them."""
        self._watch = DirectoryWatch(self.pool.search_paths, self._changed)

    def stop_watching(self) -> None:
        if self._watch:
            self._watch.close()
        if self._rescan:
            self._rescan.cancel()
        for task in self._tasks:
            task.cancel()

    def _changed(self, name: str) -> None:
        if name.startswith(".#"):
            return  # temporary files and lock files
        if self._rescan is None:
            self._rescan = asyncio.get_running_loop().call_later(0.05, self._start_rescan)

    def _start_rescan(self) -> None:
        self._rescan = None
        task = asyncio.get_running_loop().create_task(self.discover())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking file-system work in a worker thread, within the
        limit of concurrent operations."""
        if self.operations >= OPERATIONS_MAX:
            raise LimitsExceeded("Too many ongoing operations.")
        self.operations += 1
        try:
            return await asyncio.to_thread(func, *args)
        finally:
            self.operations -= 1

    # --- lookup and export ----------------------------------------------------

    async def find(self, name: str, validate: bool = True) -> Image:
        """Validate NAME, find the image, and export its object.  Without
        VALIDATE an invalid name is simply not found (GetImage does that)."""
        if validate and not image_name_is_valid(name) and name != ".host":
            raise InvalidArgs(f"Image name '{name}' is invalid.")
        image = await asyncio.to_thread(self.pool.find, name)
        if image is None:
            raise NoSuchImage(name)
        self._export(image)
        return image

    async def discover(self) -> dict[str, Image]:
        images = await asyncio.to_thread(self.pool.discover)
        objects = self.objects
        for name in [name for name in objects if name not in images]:
            self._unexport(name)
        # Objects already exported only get the fresh Image: no call per image.
        for name, image in images.items():
            obj = objects.get(name)
            if obj is None:
                self._export(image)
            else:
                obj.image = image
        return images

    def _export(self, image: Image) -> None:
        obj = self.objects.get(image.name)
        if obj is None:
            obj = ImageObject(self, image)
            obj.handle = obj.export_to_dbus(image_object_path(image.name))
            self.objects[image.name] = obj
        else:
            obj.image = image

    def _unexport(self, name: str) -> None:
        obj = self.objects.pop(name, None)
        if obj is not None and obj.handle is not None:
            obj.handle.stop()

    async def refresh(self, name: str) -> None:
        image = await asyncio.to_thread(self.pool.find, name)
        if image is None:
            self._unexport(name)
        else:
            self._export(image)

    # --- operations (callers have checked authorization) ----------------------

    async def remove(self, image: Image) -> None:
        await self.run(ops.remove_image, image)
        await self.refresh(image.name)

    async def rename(self, image: Image, new_name: str) -> None:
        await self.run(ops.rename_image, self.pool, image, new_name)
        await self.refresh(image.name)
        await self.refresh(new_name)

    async def clone(self, image: Image, new_name: str, read_only: bool) -> None:
        await self.run(ops.clone_image, self.pool, image, new_name, read_only)
        await self.refresh(new_name)

    async def mark_read_only(self, image: Image, read_only: bool) -> None:
        await self.run(ops.mark_read_only, image, read_only)
        await self.refresh(image.name)

    async def set_limit(self, image: Image, limit: int) -> None:
        await self.run(ops.set_image_limit, image, limit)
        await self.refresh(image.name)

    async def set_pool_limit(self, limit: int) -> None:
        await self.run(ops.set_pool_limit, self.pool, limit)

    async def clean(self, mode: str) -> list[tuple[str, int]]:
        removed = await self.run(ops.clean_pool, self.pool, mode)
        for name, _ in removed:
            self._unexport(name)
        return removed

    async def metadata(self, image: Image) -> ImageMetadata:
        return await self.run(read_metadata, image)


def read_metadata(image: Image) -> ImageMetadata:
    if image.type in (ImageType.DIRECTORY, ImageType.SUBVOLUME):
        return read_tree_metadata(image.path)
    return read_raw_metadata(image.path)
