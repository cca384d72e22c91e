"""machined's image half: the pool, the images known in it, and the
operations on them, whichever front end asks.

Front ends subscribe to hear of images added, changed and removed (the pool
is watched, so that happens whoever changes it); they check arguments,
authorize, then call the methods here.  Blocking work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from imagepool import ops
from imagepool.errors import Errno, InvalidArgs, LimitsExceeded, NoSuchImage
from imagepool.image import Image, ImageType, Pool
from imagepool.inotify import DirectoryWatch
from imagepool.metadata import ImageMetadata, read_tree_metadata
from imagepool.names import image_name_is_valid
from imagepool.rawmeta import read_raw_metadata

log = logging.getLogger(__name__)

OPERATIONS_MAX = 64
CLEAN_MODES = ("hidden", "all", "layers")  # "layers": OCI layers no mount stack refers to (ours)

T = TypeVar("T")
Listener = Callable[[Image], None]


class ImageManager:
    """Owns the pool of one machined and the images known in it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.operations = 0
        self.images: dict[str, Image] = {}
        self._on_added: list[Listener] = []
        self._on_changed: list[Listener] = []
        self._on_removed: list[Listener] = []
        self._watch: DirectoryWatch | None = None
        self._rescan: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def subscribe(self, on_added: Listener, on_changed: Listener, on_removed: Listener) -> None:
        """Hear of images that appear, change or go away."""
        self._on_added.append(on_added)
        self._on_changed.append(on_changed)
        self._on_removed.append(on_removed)

    def start_watching(self) -> None:
        """Keep the known images (and so introspection) in step with the
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

    # --- what is known ------------------------------------------------------------------

    def _known(self, image: Image) -> None:
        old = self.images.get(image.name)
        if old is image:
            return  # the same facts as before (a scan takes unchanged images again)
        self.images[image.name] = image
        for cb in self._on_added if old is None else self._on_changed:
            cb(image)

    def _forget(self, name: str) -> None:
        image = self.images.pop(name, None)
        if image is not None:
            for cb in self._on_removed:
                cb(image)

    async def find(self, name: str, validate: bool = True) -> Image:
        """Validate NAME and find the image.  Without VALIDATE an invalid
        name is simply not found (GetImage does that)."""
        if validate and not image_name_is_valid(name) and name != ".host":
            raise InvalidArgs(f"Image name '{name}' is invalid.")
        image = await asyncio.to_thread(self.pool.find, name)
        if image is None:
            raise NoSuchImage(name)
        self._known(image)
        return image

    async def discover(self) -> dict[str, Image]:
        images = await asyncio.to_thread(self.pool.discover)
        for name in [name for name in self.images if name not in images]:
            self._forget(name)
        for image in images.values():
            self._known(image)
        return images

    async def refresh(self, name: str) -> None:
        image = await asyncio.to_thread(self.pool.find, name)
        if image is None:
            self._forget(name)
        else:
            self._known(image)

    # --- operations (callers have checked authorization) -----------------------------

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
        await self.run(ops.set_image_limit, self.pool, image, limit)
        await self.refresh(image.name)

    async def usage_status(self, image: Image) -> str:
        return await self.run(ops.usage_status, self.pool, image)

    async def set_pool_limit(self, limit: int) -> None:
        await self.run(ops.set_pool_limit, self.pool, limit)

    def pool_usage(self) -> int:
        return ops.pool_usage(self.pool)

    def pool_limit(self) -> int:
        return ops.pool_limit(self.pool)

    @staticmethod
    def check_clean_mode(mode: str) -> None:
        if mode not in CLEAN_MODES:
            raise InvalidArgs(f"Unknown mode '{mode}'.")

    async def clean(self, mode: str) -> list[tuple[str, int]]:
        removed = await self.run(ops.clean_pool, self.pool, mode)
        for name, _ in removed:
            self._forget(name)
        return removed

    async def metadata(self, image: Image) -> ImageMetadata:
        return await self.run(read_metadata, image)


def read_metadata(image: Image) -> ImageMetadata:
    if image.type in (ImageType.DIRECTORY, ImageType.SUBVOLUME):
        return read_tree_metadata(image.path)
    if image.type == ImageType.MSTACK:  # as systemd 262
        raise Errno(errno.EOPNOTSUPP, "Failed to read image metadata: Operation not supported")
    return read_raw_metadata(image.path)
