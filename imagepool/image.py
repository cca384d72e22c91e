"""Images and their discovery, as systemd's discover-image.c sees them.

An image is a directory (a btrfs subvolume or a plain directory), a ``.raw``
file or a block device in one of the search directories; the first
directory that has a name wins.  ``.host`` is the host's root.
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, field

import btrfsutil

from imagepool import btrfs, fsutil
from imagepool.names import image_name_is_valid

UINT64_MAX = 2**64 - 1
DEFAULT_POOL = "/var/lib/machines"


class ImageType(enum.StrEnum):
    DIRECTORY = "directory"
    SUBVOLUME = "subvolume"
    RAW = "raw"
    BLOCK = "block"


@dataclass
class Image:
    name: str
    path: str
    type: ImageType
    read_only: bool = False
    crtime: int = 0
    mtime: int = 0
    usage: int = UINT64_MAX
    usage_exclusive: int = UINT64_MAX
    limit: int = UINT64_MAX
    limit_exclusive: int = UINT64_MAX
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def hidden(self) -> bool:
        return self.name.startswith(".")

    @property
    def is_host(self) -> bool:
        return self.name == ".host"

    @property
    def vendor(self) -> bool:
        """Images shipped below /usr can't be changed."""
        return self.path == "/usr" or self.path.startswith("/usr/")

    @property
    def immutable(self) -> bool:
        return self.is_host or self.vendor


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)


def make_image(name: str, path: str) -> Image | None:
    """Inspect PATH; None when it is no image (wrong kind of file)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    vendor_or_ro = path.startswith("/usr/") or fsutil.fs_read_only(path)
    if stat.S_ISDIR(st.st_mode):
        if btrfs.is_subvolume(path):
            try:
                otime = btrfsutil.subvolume_info(path).otime
                read_only = btrfs.get_read_only(path)
            except (OSError, btrfsutil.BtrfsUtilError):
                otime = None
            if otime is not None:
                q = btrfs.qgroup_of(path)
                return Image(
                    name, path, ImageType.SUBVOLUME,
                    read_only=vendor_or_ro or read_only,
                    crtime=_usec(otime),
                    usage=q.referenced, usage_exclusive=q.exclusive,
                    limit=q.max_referenced, limit_exclusive=q.max_exclusive,
                )
        return Image(
            name, path, ImageType.DIRECTORY,
            read_only=vendor_or_ro or fsutil.get_immutable(path),
            crtime=fsutil.birth_time_usec(path),
        )
    if stat.S_ISREG(st.st_mode):
        return Image(
            name, path, ImageType.RAW,
            read_only=vendor_or_ro or (st.st_mode & 0o222) == 0,
            crtime=fsutil.birth_time_usec(path),
            mtime=st.st_mtime_ns // 1000,
            usage=st.st_blocks * 512, usage_exclusive=st.st_blocks * 512,
            limit=st.st_size, limit_exclusive=st.st_size,
        )
    if stat.S_ISBLK(st.st_mode):
        try:
            size = fsutil.block_device_size(path)
            ro = fsutil.block_device_read_only(path)
        except OSError:
            size, ro = UINT64_MAX, False
        return Image(
            name, path, ImageType.BLOCK,
            read_only=vendor_or_ro or ro or (st.st_mode & 0o222) == 0,
            usage=size, usage_exclusive=size, limit=size, limit_exclusive=size,
        )
    return None


def host_image() -> Image:
    return Image(".host", "/", ImageType.DIRECTORY)


class Pool:
    """The search path of machine images, with the pool directory in it."""

    def __init__(self, pool_path: str = DEFAULT_POOL, search_paths: list[str] | None = None) -> None:
        self.path = os.path.abspath(pool_path)
        if search_paths is None:
            search_paths = [
                "/etc/machines",
                "/run/machines",
                self.path,
                "/var/lib/container",
                "/usr/local/lib/machines",
                "/usr/lib/machines",
            ]
        # The pool is always searched, whatever the list says.
        if self.path not in search_paths:
            search_paths = [self.path, *search_paths]
        self.search_paths = search_paths

    def find(self, name: str) -> Image | None:
        if name == ".host":
            return host_image()
        if not image_name_is_valid(name):
            return None
        for directory in self.search_paths:
            candidate = os.path.join(directory, name)
            try:
                st = os.stat(candidate)
            except OSError:
                st = None
            if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                image = make_image(name, candidate)
                if image:
                    return image
            raw = candidate + ".raw"
            try:
                if stat.S_ISREG(os.stat(raw).st_mode):
                    image = make_image(name, raw)
                    if image:
                        return image
            except OSError:
                pass
        return None

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def discover(self) -> dict[str, Image]:
        images: dict[str, Image] = {}
        for directory in self.search_paths:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                name = _image_name_of(entry)
                if name is None or name in images or not image_name_is_valid(name):
                    continue
                image = make_image(name, entry.path)
                if image:
                    images[name] = image
        images.setdefault(".host", host_image())
        return images


def _image_name_of(entry: os.DirEntry) -> str | None:
    try:
        st = entry.stat()  # follows symlinks, as systemd does
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return entry.name
    if stat.S_ISREG(st.st_mode) and entry.name.endswith(".raw") and len(entry.name) > 4:
        return entry.name[:-4]
    return None


def pool_target(pool: Pool, name: str, image_type: ImageType) -> str:
    suffix = ".raw" if image_type == ImageType.RAW else ""
    return os.path.join(pool.path, name + suffix)
