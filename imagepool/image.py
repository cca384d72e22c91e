"""Images and their discovery, as systemd's discover-image.c sees them.

An image is a directory (a btrfs subvolume or a plain directory), a ``.raw``
file or a block device in one of the search directories; the first
directory that has a name wins.  ``.host`` is the host's root.
"""

from __future__ import annotations

import enum
import functools
import os
import stat
from dataclasses import dataclass, field

from imagepool import btrfs, fsutil, mstack
from imagepool.names import image_name_is_valid

UINT64_MAX = 2**64 - 1
DEFAULT_POOL = "/var/lib/machines"


class ImageType(enum.StrEnum):
    DIRECTORY = "directory"
    SUBVOLUME = "subvolume"
    RAW = "raw"
    BLOCK = "block"
    MSTACK = "mstack"  # systemd 262's mount stack, NAME.mstack/ (imagepool.mstack)


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

    in_vendor_directory: bool = False  # found where the search path has vendor images (Pool)

    @property
    def vendor(self) -> bool:
        """Images shipped below /usr can't be changed."""
        return self.in_vendor_directory or self.path == "/usr" or self.path.startswith("/usr/")

    @property
    def immutable(self) -> bool:
        return self.is_host or self.vendor


# File systems whose only EROFS for a write access check is a read-only
# mount or file system (which statfs reports), so systemd's faccessat() test
# can be answered once per mount: ext2/3/4, xfs, tmpfs.
_EROFS_ONLY_WHEN_MOUNTED_RO = frozenset({0xEF53, 0x58465342, 0x01021994})
_SUBVOLUME_ROOT_INO = 256
_NO_QGROUP = btrfs.Qgroup()


class _Mount:
    """What one scan learns once per mount: the file system type, whether a
    write access check could fail with EROFS, and (on btrfs) the qgroups.
    Never kept across scans: all of it may change at any time."""

    __slots__ = ("btrfs", "erofs_possible", "erofs_possible_subvolume", "_qgroups", "_have_qgroups")

    def __init__(self, fs: fsutil.Statfs) -> None:
        self.btrfs = fs.magic == btrfs.BTRFS_SUPER_MAGIC
        # EROFS is possible on a read-only mount, in a read-only btrfs
        # subvolume, and whenever the file system may decide so itself ...
        self.erofs_possible = fs.read_only or self.btrfs or fs.magic not in _EROFS_ONLY_WHEN_MOUNTED_RO
        # ... but for the root of a writable subvolume only on a read-only mount.
        self.erofs_possible_subvolume = fs.read_only
        self._qgroups: dict[int, btrfs.Qgroup] | None = None
        self._have_qgroups = False

    def qgroup(self, fd: int, subvolume_id: int) -> btrfs.Qgroup:
        # One look at the quota tree per file system and scan, not per image.
        if not self._have_qgroups:
            try:
                self._qgroups = btrfs.qgroups(fd)
            except OSError:
                self._qgroups = None
            self._have_qgroups = True
        if self._qgroups is None:
            return _NO_QGROUP
        return self._qgroups.get(subvolume_id, _NO_QGROUP)


# Images by path, with the facts they were made of.
_Made = dict[str, tuple[object, Image]]


class _Scan:
    """Makes Images as systemd's image_make() does, with few system calls:
    one statx per entry (by the caller), facts about a mount gathered once,
    and a file descriptor only for subvolumes.

    Making Image objects costs as much as the system calls, so an Image of
    the previous scan is taken again when the facts it was made of, read
    afresh, are all the same: its statx where nothing else goes into it, or
    what the kernel said of a subvolume and its qgroup."""

    def __init__(self, previous: _Made | None = None) -> None:
        self._mounts: dict[int | None, _Mount] = {}
        self._previous = previous or {}
        self.made: _Made = {}

    def make(self, name: str, path: str, st: fsutil.Statx, dir_fd: int = fsutil.AT_FDCWD,
             file: str | None = None) -> Image | None:
        """The image NAME at PATH, also reachable as FILE relative to DIR_FD;
        ST is its statx (symlinks followed)."""
        mount = self._mounts.get(st.mount_id) or self._new_mount(st, path)
        if mount is None:
            return None
        file = file or path
        if not _statx_only(st, mount) or path.endswith(mstack.SUFFIX):
            image = self._make(name, path, st, mount, dir_fd, file)
        else:
            image = self._unchanged(path, st) or self._make(name, path, st, mount, dir_fd, file)
            if image is not None:
                self.made[path] = (st, image)
        if image is not None and image.hidden:
            image.read_only = True  # as systemd 262 says of every hidden image
        return image

    def _unchanged(self, path: str, facts: object) -> Image | None:
        seen = self._previous.get(path)
        return seen[1] if seen is not None and seen[0] == facts else None

    def _make(self, name: str, path: str, st: fsutil.Statx, mount: _Mount, dir_fd: int, file: str) -> Image | None:
        if stat.S_ISDIR(st.mode):
            return self._directory(name, path, st, mount, dir_fd, file)
        if stat.S_ISREG(st.mode):
            return self._raw(name, path, st, mount, dir_fd, file)
        if stat.S_ISBLK(st.mode):
            return self._block(name, path, st, mount, dir_fd, file)
        return None

    def _new_mount(self, st: fsutil.Statx, path: str) -> _Mount | None:
        try:
            mount = _Mount(fsutil.statfs(path))
        except OSError:
            return None  # gone since the statx
        if st.mount_id is not None:  # else the kernel is too old to tell mounts apart
            self._mounts[st.mount_id] = mount
        return mount

    def _directory(self, name: str, path: str, st: fsutil.Statx, mount: _Mount, dir_fd: int,
                   file: str) -> Image:
        if path.endswith(mstack.SUFFIX):
            flag = st.immutable if st.immutable is not None else fsutil.get_immutable(file, dir_fd, follow=True)
            return Image(name, path, ImageType.MSTACK, crtime=st.btime_usec,
                         read_only=flag or _refuses_writes(path, mount.erofs_possible, dir_fd, file)
                         or mstack.read_only(path))
        if st.ino == _SUBVOLUME_ROOT_INO and mount.btrfs:
            image = self._subvolume(name, path, mount, dir_fd, file)
            if image is not None:
                return image
        immutable = st.immutable
        if immutable is None:  # not reported by this file system's statx
            immutable = fsutil.get_immutable(file, dir_fd, follow=True)
        return Image(
            name, path, ImageType.DIRECTORY,
            read_only=immutable or _refuses_writes(path, mount.erofs_possible, dir_fd, file),
            crtime=st.btime_usec,
        )

    def _subvolume(self, name: str, path: str, mount: _Mount, dir_fd: int, file: str) -> Image | None:
        """The subvolume at FILE; None when it is none after all."""
        try:
            fd = os.open(file, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            info = btrfs.subvolume_info_fd(fd)
            q = mount.qgroup(fd, info.id)
        except OSError:
            return None
        finally:
            os.close(fd)
        facts = (info, q, info.read_only or _refuses_writes(path, mount.erofs_possible_subvolume, dir_fd, file))
        image = self._unchanged(path, facts)
        if image is None:
            image = Image(
                name, path, ImageType.SUBVOLUME,
                read_only=facts[2],
                crtime=info.otime, mtime=info.ctime,
                usage=q.referenced, usage_exclusive=q.exclusive,
                limit=q.max_referenced, limit_exclusive=q.max_exclusive,
            )
        self.made[path] = (facts, image)
        return image

    @staticmethod
    def _raw(name: str, path: str, st: fsutil.Statx, mount: _Mount, dir_fd: int, file: str) -> Image:
        usage = st.blocks * 512
        return Image(
            name, path, ImageType.RAW,
            read_only=(st.mode & 0o222) == 0 or _refuses_writes(path, mount.erofs_possible, dir_fd, file),
            crtime=st.btime_usec,
            mtime=st.mtime_usec,
            usage=usage, usage_exclusive=usage,
            limit=st.size, limit_exclusive=st.size,
        )

    @staticmethod
    def _block(name: str, path: str, st: fsutil.Statx, mount: _Mount, dir_fd: int, file: str) -> Image:
        try:
            size = fsutil.block_device_size(path)
            ro = fsutil.block_device_read_only(path)
        except OSError:
            size, ro = UINT64_MAX, False
        return Image(
            name, path, ImageType.BLOCK,
            read_only=ro or (st.mode & 0o222) == 0 or _refuses_writes(path, mount.erofs_possible, dir_fd, file),
            usage=size, usage_exclusive=size, limit=size, limit_exclusive=size,
        )


def _statx_only(st: fsutil.Statx, mount: _Mount) -> bool:
    """Whether the image is made of its path and statx alone: no EROFS test
    to make (so no btrfs, no subvolume), and no ioctl for the immutable
    attribute either."""
    if mount.erofs_possible:
        return False
    return stat.S_ISREG(st.mode) or (stat.S_ISDIR(st.mode) and st.immutable is not None)


def _refuses_writes(path: str, erofs_possible: bool, dir_fd: int, file: str) -> bool:
    """systemd's read-only test: images below /usr, and EROFS from a write
    access check (made only where EROFS is possible at all)."""
    if path.startswith("/usr/"):
        return True
    return erofs_possible and fsutil.refuses_writes(file, dir_fd)


def make_image(name: str, path: str) -> Image | None:
    """Inspect PATH; None when it is no image (wrong kind of file)."""
    try:
        st = fsutil.statx(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _Scan().make(name, path, st)


def host_image() -> Image:
    """The host's root, as systemd 262 reports it: what "/" is (a directory
    or a subvolume, with its times), always read-only."""
    image = make_image(".host", "/") or Image(".host", "/", ImageType.DIRECTORY)
    image.read_only = True
    return image


class Pool:
    """The search path of one class of images, with the pool directory (where
    new images go) in it; imagepool.classes knows the real ones.  Images in
    VENDOR_PATHS (systemd's below /usr) can't be changed."""

    def __init__(self, pool_path: str = DEFAULT_POOL, search_paths: list[str] | None = None,
                 vendor_paths: list[str] | None = None, host: bool = True, quota: str = "keep") -> None:
        self.path = os.path.abspath(pool_path)
        # btrfs quotas: "keep" (never turned on here) or "simple" (simple quotas
        # turned on when a limit is set, or the service starts).
        self.quota = quota
        self.host = host  # .host is one of the images (machines only)
        search_paths = list(search_paths or [])
        # The pool is always searched, whatever the list says.
        if self.path not in search_paths:
            search_paths = [self.path, *search_paths]
        self.search_paths = search_paths
        self.vendor_paths = frozenset(vendor_paths or ())
        self._made: _Made = {}  # by the last discover(), see _Scan

    def _vendor(self, image: Image | None) -> Image | None:
        if image is not None and self.vendor_paths and os.path.dirname(image.path) in self.vendor_paths:
            image.in_vendor_directory = True
            image.read_only = True
        return image

    def find(self, name: str) -> Image | None:
        if name == ".host":
            return host_image() if self.host else None
        return self._vendor(self._find(name))

    def _find(self, name: str) -> Image | None:
        if not image_name_is_valid(name):
            return None
        scan = _Scan()
        for directory in self.search_paths:
            candidate = os.path.join(directory, name)
            st = _statx(candidate)
            if st is not None and (stat.S_ISDIR(st.mode) or stat.S_ISBLK(st.mode)):
                image = scan.make(name, candidate, st)
                if image:
                    return image
            raw = candidate + ".raw"
            st = _statx(raw)
            if st is not None and stat.S_ISREG(st.mode):
                image = scan.make(name, raw, st)
                if image:
                    return image
            st = _statx(candidate + mstack.SUFFIX)
            if st is not None and stat.S_ISDIR(st.mode):
                image = scan.make(name, candidate + mstack.SUFFIX, st)
                if image:
                    return image
        return None

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def discover(self) -> dict[str, Image]:
        images: dict[str, Image] = {}
        scan = _Scan(self._made)
        for directory in self.search_paths:
            try:
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                _discover_in(scan, directory, dir_fd, images)
            finally:
                os.close(dir_fd)
        self._made = scan.made
        if self.vendor_paths:
            for image in images.values():
                self._vendor(image)
        if self.host:
            images.setdefault(".host", host_image())
        return images


# Names repeat from one scan to the next; checking one is slower than a lookup.
_name_is_valid = functools.lru_cache(maxsize=16384)(image_name_is_valid)


def _statx(path: str, dir_fd: int = fsutil.AT_FDCWD) -> fsutil.Statx | None:
    try:
        return fsutil.statx(path, dir_fd)  # follows symlinks, as systemd does
    except OSError:
        return None


def _discover_in(scan: _Scan, directory: str, dir_fd: int, images: dict[str, Image]) -> None:
    """Add the images in DIRECTORY (open as DIR_FD) whose names are not taken yet."""
    prefix = os.path.join(directory, "")
    try:
        files = os.listdir(dir_fd)
    except OSError:
        return
    for file in files:
        try:
            st = fsutil.statx(file, dir_fd)  # follows symlinks, as systemd does
        except OSError:
            continue
        name = _image_name_of(file, st.mode)
        if name is None or name in images or not _name_is_valid(name):
            continue
        image = scan.make(name, prefix + file, st, dir_fd, file)
        if image is not None:
            images[name] = image


def _image_name_of(file: str, mode: int) -> str | None:
    if stat.S_ISDIR(mode) and file.endswith(mstack.SUFFIX) and len(file) > len(mstack.SUFFIX):
        return file[: -len(mstack.SUFFIX)]
    if stat.S_ISDIR(mode) or stat.S_ISBLK(mode):
        return file
    if stat.S_ISREG(mode) and file.endswith(".raw") and len(file) > 4:
        return file[:-4]
    return None


def pool_target(pool: Pool, name: str, image_type: ImageType) -> str:
    suffix = {ImageType.RAW: ".raw", ImageType.MSTACK: mstack.SUFFIX}.get(image_type, "")
    return os.path.join(pool.path, name + suffix)
