"""The helper's side of reading a raw image's metadata (``python -m
imagepool.rawmeta``): in a private mount namespace of its own, read-only
loop devices (autoclear, so a killed helper leaks none) over the root (and
/usr) partition, mounted ``ro,nodev,nosuid,noexec``; the metadata read; one
JSON object printed on stdout."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

from imagepool import syscalls
from imagepool.metadata import ImageMetadata, read_tree_metadata
from imagepool.rawmeta.partitions import SECTOR_SIZES, DissectError, Partition, read_gpt, read_mbr, select_partitions
from imagepool.syscalls import libc as _libc

# File systems we mount: blkid's name -> (kernel driver, option strings to try in order).
# A read-only loop device cannot replay a journal: ext4 wants "noload", xfs
# and f2fs "norecovery", btrfs "nologreplay".
FILE_SYSTEMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ext2": ("ext4", ("noload",)),
    "ext3": ("ext4", ("noload",)),
    "ext4": ("ext4", ("noload",)),
    "btrfs": ("btrfs", ("rescue=nologreplay", "nologreplay")),
    "xfs": ("xfs", ("norecovery",)),
    "f2fs": ("f2fs", ("norecovery",)),
    "squashfs": ("squashfs", ("",)),
    "erofs": ("erofs", ("",)),
    "vfat": ("vfat", ("",)),
}


_LOOP_CONFIGURE = 0x4C0A
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_BLKSSZGET = 0x1268

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MNT_DETACH = 2


def _loop_info64(offset: int, size: int, flags: int, name: str) -> bytes:
    # struct loop_info64: device, inode, rdevice, offset, sizelimit (u64),
    # number, encrypt_type, encrypt_key_size, flags (u32), file_name[64],
    # crypt_name[64], encrypt_key[32], init[2] (u64): 232 bytes.
    return struct.pack(
        "=QQQQQIIII64s64s32sQQ", 0, 0, 0, offset, size, 0, 0, 0, flags,
        os.fsencode(name)[:63], b"", b"", 0, 0,
    )


class LoopDevice:
    """A read-only, autoclear loop device over a byte range of BACKING_FD.
    Autoclear: when the last user (our fd, a mount) goes away the kernel
    detaches it, so even a SIGKILLed child leaves none behind."""

    def __init__(self, backing_fd: int, offset: int, size: int, name: str) -> None:
        info = _loop_info64(offset, size, _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR, name)
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _attempt in range(64):
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                path = f"/dev/loop{number}"
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    time.sleep(0.01)  # the node is still being created
                    continue
                try:
                    self._configure(fd, backing_fd, info)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EBUSY:
                        continue  # somebody else took it; get another
                    raise
                self.fd, self.path = fd, path
                return
        finally:
            os.close(ctl)
        raise OSError(errno.EBUSY, "No free loop device")

    @staticmethod
    def _configure(fd: int, backing_fd: int, info: bytes) -> None:
        config = struct.pack("=II", backing_fd, 0) + info + bytes(64)
        try:
            fcntl.ioctl(fd, _LOOP_CONFIGURE, config)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
        # Kernels before 5.8: attach, then set offset, size and autoclear.
        fcntl.ioctl(fd, _LOOP_SET_FD, backing_fd)
        try:
            fcntl.ioctl(fd, _LOOP_SET_STATUS64, info)
        except OSError:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, _LOOP_CLR_FD, 0)
            os.close(self.fd)
            self.fd = -1


def probe_fstype(device: str) -> str | None:
    """The file system type on DEVICE as blkid's low-level probe sees it."""
    r = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", device],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    if r.returncode == 0:
        value = r.stdout.strip().splitlines()
        return value[0] if value else None
    if r.returncode == 8:
        raise DissectError("Ambivalent file system signatures found (more than one file system?)")
    return None


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    ret = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(),
                      ctypes.c_ulong(flags), data.encode() if data else None)
    syscalls.check(ret, target)


def _umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        _libc.umount2(os.fsencode(target), _MNT_DETACH)


def _mount_range(stack: contextlib.ExitStack, fd: int, offset: int, size: int,
                 target: str, what: str, name: str, loop: LoopDevice | None = None) -> None:
    """Attach a loop device for [OFFSET, OFFSET+SIZE) (unless LOOP is given)
    and mount the file system on it read-only at TARGET."""
    if loop is None:
        loop = LoopDevice(fd, offset, size, name)
        stack.callback(loop.close)
    fstype = probe_fstype(loop.path)
    if fstype is None:
        raise DissectError(f"No file system found on {what}", errno.ENOPKG)
    if fstype not in FILE_SYSTEMS:
        raise DissectError(f"Unsupported file system '{fstype}' on {what}", errno.EPROTONOSUPPORT)
    driver, option_sets = FILE_SYSTEMS[fstype]
    flags = _MS_RDONLY | _MS_NODEV | _MS_NOSUID | _MS_NOEXEC
    error: OSError | None = None
    for data in option_sets:
        try:
            _mount(loop.path, target, driver, flags, data)
        except OSError as e:
            error = e
            continue
        stack.callback(_umount, target)
        return
    assert error is not None
    raise DissectError(f"Failed to mount {fstype} file system of {what}: {error.strerror}", error.errno or errno.EIO)


def _mount_usr(stack: contextlib.ExitStack, fd: int, usr: Partition, root: str, name: str) -> None:
    target = os.path.join(root, "usr")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return  # never follow a symlink out of the image
    _mount_range(stack, fd, usr.offset, usr.size, target, f"/usr partition {usr.number}", name)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def dissect_and_read(path: str, mountpoint: str) -> ImageMetadata:
    """Dissect the image at PATH, mount its root file system at MOUNTPOINT
    (in the current mount namespace, which must be a private one), read the
    metadata, unmount and detach everything."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise DissectError(e.strerror or str(e), e.errno or errno.EIO) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DissectError("Not a regular file or block device", errno.EBADFD)
        size = _device_size(fd)
        if size == 0:
            raise DissectError("Image is empty", errno.ENOPKG)
        sector_sizes = SECTOR_SIZES
        if stat.S_ISBLK(st.st_mode):
            with contextlib.suppress(OSError):
                ssz = struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
                sector_sizes = (ssz,) + tuple(s for s in SECTOR_SIZES if s != ssz)
        with contextlib.ExitStack() as stack:
            table = read_gpt(fd, size, sector_sizes)
            if table is None:
                # No GPT: a bare file system, else a DOS partition table.
                whole = LoopDevice(fd, 0, 0, path)
                stack.callback(whole.close)
                if probe_fstype(whole.path) is not None:
                    _mount_range(stack, fd, 0, 0, mountpoint, "the image", path, loop=whole)
                    return read_tree_metadata(mountpoint)
                whole.close()
                table = read_mbr(fd, size)
                if table is None:
                    raise DissectError("No partition table or file system found", errno.ENOPKG)
            root, usr = select_partitions(table)
            for p in (root, usr):
                if p is not None and p.offset + p.size > size:
                    raise DissectError(f"Partition {p.number} extends beyond the end of the image")
            if root is not None:
                _mount_range(stack, fd, root.offset, root.size, mountpoint,
                             f"root partition {root.number}", path)
                if usr is not None:
                    _mount_usr(stack, fd, usr, mountpoint, path)
            else:
                assert usr is not None
                _mount(
                    "tmpfs", mountpoint, "tmpfs", _MS_NODEV | _MS_NOSUID | _MS_NOEXEC, "mode=0755"
                )
                stack.callback(_umount, mountpoint)
                os.mkdir(os.path.join(mountpoint, "usr"), 0o755)
                _mount_usr(stack, fd, usr, mountpoint, path)
            return read_tree_metadata(mountpoint)
    finally:
        os.close(fd)


def metadata_to_json(md: ImageMetadata) -> dict[str, Any]:
    return {
        "hostname": md.hostname,
        "machine_id": md.machine_id.hex(),
        "machine_info": md.machine_info,
        "os_release": md.os_release,
    }


def metadata_from_json(obj: object) -> ImageMetadata:
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    hostname = obj.get("hostname", "")
    machine_id = obj.get("machine_id", "")
    info = obj.get("machine_info", {})
    osrel = obj.get("os_release", {})
    if not isinstance(hostname, str) or not isinstance(machine_id, str):
        raise ValueError("bad types")
    for d in (info, osrel):
        if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
            raise ValueError("bad environment block")
    return ImageMetadata(
        hostname=hostname, machine_id=bytes.fromhex(machine_id), machine_info=dict(info), os_release=dict(osrel)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagepool.rawmeta",
                                     description="Print the metadata of a raw image as JSON.")
    parser.add_argument("--mountpoint", help="an empty directory to mount on (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=0, help="give up (SIGALRM) after this many seconds")
    parser.add_argument("path")
    args = parser.parse_args(argv)
    if 0 < args.timeout < 1e6:
        signal.alarm(math.ceil(args.timeout) + 5)  # a backstop if the parent is gone
    made = None
    try:
        syscalls.private_mount_namespace()
        mountpoint = args.mountpoint
        if mountpoint is None:
            mountpoint = made = tempfile.mkdtemp(prefix="rawmeta-")
        result: dict[str, Any] = metadata_to_json(dissect_and_read(args.path, mountpoint))
        rc = 0
    except DissectError as e:
        result, rc = {"error": str(e), "errno": e.errno}, 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        result, rc = {"error": f"{e.strerror or e}{where}"}, 1
    except Exception as e:  # noqa: BLE001 - reported to the parent, one line
        result, rc = {"error": f"{type(e).__name__}: {e}"}, 1
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(made)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return rc
