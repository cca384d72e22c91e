"""Metadata of raw disk images (``.raw``) and block devices.

systemd dissects such an image: a GPT with a root partition (or, failing
that, a single generic Linux partition), an MBR with a single Linux
partition, or a bare file system.  It mounts the root file system read-only
in a private mount namespace and reads hostname, machine-id, machine-info and
os-release from it.

``read_raw_metadata()`` does the same in a child process started through
``unshare --mount --propagation private``: the child (this module's
``__main__`` part, which also detaches its own mount namespace first) opens
the image read-only, parses the partition table itself, attaches read-only
loop devices (with autoclear, so a killed child leaks none), mounts them
``ro,nodev,nosuid,noexec``, reads the metadata, unmounts, detaches and prints
one JSON object on stdout.  Nothing is ever mounted in the caller's mount
namespace.  The image is untrusted input: every size, count and offset read
from it is bounded and checked before use.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass

from imagepool.errors import MetadataError
from imagepool.metadata import ImageMetadata, read_tree_metadata

# --------------------------------------------------------------------------
# Partition types (the Discoverable Partitions Specification)
# --------------------------------------------------------------------------

# architecture (systemd's name) -> (root partition type, /usr partition type)
PARTITION_TYPES: dict[str, tuple[uuid.UUID, uuid.UUID]] = {
    arch: (uuid.UUID(root), uuid.UUID(usr))
    for arch, root, usr in (
        ("alpha", "6523f8ae-3eb1-4e2a-a05a-18b695ae656f", "e18cf08c-33ec-4c0d-8246-c6c6fb3da024"),
        ("arc", "d27f46ed-2919-4cb8-bd25-9531f3c16534", "7978a683-6316-4922-bbee-38bff5a2fecc"),
        ("arm", "69dad710-2ce4-4e3c-b16c-21a1d49abed3", "7d0359a3-02b3-4f0a-865c-654403e70625"),
        ("arm64", "b921b045-1df0-41c3-af44-4c6f280d3fae", "b0e01050-ee5f-4390-949a-9101b17104e9"),
        ("ia64", "993d8d3d-f80e-4225-855a-9daf8ed7ea97", "4301d2a6-4e3b-4b2a-bb94-9e0b2c4225ea"),
        ("loongarch64", "77055800-792c-4f94-b39a-98c91b762bb6", "e611c702-575c-4cbe-9a46-434fa0bf7e3f"),
        ("m68k", "0cf191c8-3b54-433a-b715-68c6fa4086de", "a639b810-a02d-44bc-b579-d23e7bffdede"),
        ("mips", "e9434544-6e2c-47cc-bae2-12d6deafb44c", "773b2abc-2a99-4398-8bf5-03baac40d02b"),
        ("mips64", "d113af76-80ef-41b4-bdb6-0cff4d3d4a25", "57e13958-7331-4365-8e6e-35eeee17c61b"),
        ("mips-le", "37c58c8a-d913-4156-a25f-48b1b64e07f0", "0f4868e9-9952-4706-979f-3ed3a473e947"),
        ("mips64-le", "700bda43-7a34-4507-b179-eeb93d7a7ca3", "c97c1f32-ba06-40b4-9f22-236061b08aa8"),
        ("parisc", "1aacdb3b-5444-4138-bd9e-e5c2239b2346", "dc4a4480-6917-4262-a4ec-db9384949f25"),
        ("ppc", "1de3f1ef-fa98-47b5-8dcd-4a860a654d78", "7d14fec5-cc71-415d-9d6c-06bf0b3c3eaf"),
        ("ppc64", "912ade1d-a839-4913-8964-a10eee08fbd2", "2c9739e2-f068-46b3-9fd0-01c5a9afbcca"),
        ("ppc64-le", "c31c45e6-3f39-412e-80fb-4809c4980599", "15bb03af-77e7-4d4a-b12b-c0d084f7491c"),
        ("riscv32", "60d5a7fe-8e7d-435c-b714-3dd8162144e1", "b933fb22-5c3f-4f91-af90-e2bb0fa50702"),
        ("riscv64", "72ec70a6-cf74-40e6-bd49-4bda08e8f224", "beaec34b-8442-439b-a40b-984381ed097d"),
        ("s390", "08a7acea-624c-4a20-91e8-6e0fa67d23f9", "cd0f869b-d0fb-4ca0-b141-9ea87cc78d66"),
        ("s390x", "5eead9a9-fe09-4a1e-a1d7-520d00531306", "8a4f5770-50aa-4ed3-874a-99b710db6fea"),
        ("sh", "7b8f86b1-397a-4e1c-9eb0-850983baedc4", "0b6d8f08-1548-4183-a6fa-22fe95bc5422"),
        ("sparc64", "f7b4d167-1e51-42a9-8151-ec96c2e99478", "db8ce399-787c-460a-80e3-69104c1ce375"),
        ("tilegx", "c50cdd70-3862-4cc3-90e1-809a8c93ee2c", "55497029-c7c1-44cc-aa39-815ed1558630"),
        ("x86", "44479540-f297-41b2-9af7-d131d5f0458a", "75250d76-8cc6-458e-bd66-bd47cc81a812"),
        ("x86-64", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "8484680c-9521-48c6-9c11-b0720656f69e"),
    )
}
LINUX_GENERIC = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
GPT_FLAG_NO_AUTO = 1 << 63

_ROOT_ARCH = {root: arch for arch, (root, _usr) in PARTITION_TYPES.items()}
_USR_ARCH = {usr: arch for arch, (_root, usr) in PARTITION_TYPES.items()}

# MBR partition type of a Linux file system.
MBR_LINUX = 0x83

# Bounds for hostile partition tables.
MAX_GPT_ENTRIES = 4096
MAX_GPT_ENTRY_SIZE = 4096
MAX_GPT_ARRAY = 1 << 20
SECTOR_SIZES = (512, 4096)

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


def host_architectures(machine: str | None = None, byteorder: str | None = None) -> tuple[str, str | None]:
    """(native, secondary) architecture as systemd names them; the secondary
    one is what the native CPU also runs (x86 on x86-64, arm on arm64...)."""
    m = (machine or platform.machine()).lower()
    little = (byteorder or sys.byteorder) == "little"
    if m in ("x86_64", "amd64"):
        return "x86-64", "x86"
    if re.fullmatch(r"i[3-6]86|x86", m):
        return "x86", None
    if m in ("aarch64", "arm64"):
        return ("arm64", "arm") if little else ("arm64-be", None)
    if m.startswith("arm"):
        return ("arm", None) if little else ("arm-be", None)
    if m == "ppc64le":
        return "ppc64-le", None
    if m == "ppc64":
        return "ppc64", "ppc"
    if m in ("ppc", "powerpc"):
        return "ppc", None
    if m == "s390x":
        return "s390x", "s390"
    if m.startswith("mips64"):
        return ("mips64-le" if little else "mips64"), None
    if m.startswith("mips"):
        return ("mips-le" if little else "mips"), None
    if m.startswith("parisc"):
        return "parisc", None
    if m.startswith("sh"):
        return "sh", None
    return m, None


# --------------------------------------------------------------------------
# Partition tables
# --------------------------------------------------------------------------


class DissectError(Exception):
    """The image cannot be dissected; the message is the reason (one line)."""


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based index in the table
    type: uuid.UUID | int  # GPT type UUID, or MBR type byte
    offset: int  # bytes
    size: int  # bytes
    flags: int = 0
    label: str = ""


@dataclass(frozen=True)
class PartitionTable:
    kind: str  # "gpt" or "dos"
    sector_size: int
    partitions: tuple[Partition, ...]


_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # 128 bytes


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    return data


def _gpt_header(fd: int, size: int, sector: int, lba: int) -> tuple[int, int, int, int, bytes]:
    """Validate the GPT header at LBA and its entry array; return
    (first_usable, last_usable, count, entry_size, entries).  Raises
    DissectError with the reason."""
    raw = _pread(fd, sector, lba * sector)
    if len(raw) < _GPT_HEADER.size:
        raise DissectError("GPT header is truncated")
    (sig, _rev, hsize, hcrc, _res, my_lba, _alt, first_usable, last_usable, _guid,
     entries_lba, count, esize, ecrc) = _GPT_HEADER.unpack_from(raw)
    if sig != b"EFI PART":
        raise DissectError("no GPT signature")
    if not _GPT_HEADER.size <= hsize <= sector:
        raise DissectError(f"GPT header size {hsize} is invalid")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:hsize]) != hcrc:
        raise DissectError("GPT header checksum mismatch")
    if my_lba != lba:
        raise DissectError("GPT header is not where it says it is")
    if first_usable > last_usable:
        raise DissectError("GPT usable area is empty")
    if count > MAX_GPT_ENTRIES:
        raise DissectError(f"GPT claims {count} partition entries (more than {MAX_GPT_ENTRIES})")
    if esize < _GPT_ENTRY.size or esize > MAX_GPT_ENTRY_SIZE or esize % 8:
        raise DissectError(f"GPT partition entry size {esize} is invalid")
    if count * esize > MAX_GPT_ARRAY:
        raise DissectError("GPT partition entry array is too large")
    start = entries_lba * sector
    if entries_lba < 2 or start + count * esize > size:
        raise DissectError("GPT partition entry array lies outside the image")
    entries = _pread(fd, count * esize, start)
    if len(entries) != count * esize:
        raise DissectError("GPT partition entry array is truncated")
    if zlib.crc32(entries) != ecrc:
        raise DissectError("GPT partition entry array checksum mismatch")
    return first_usable, last_usable, count, esize, entries


def read_gpt(fd: int, size: int, sector_sizes: tuple[int, ...] = SECTOR_SIZES) -> PartitionTable | None:
    """The GPT of the image, None if it has none.  A GPT that is there but
    broken (both the primary and the backup header) raises DissectError."""
    for sector in sector_sizes:
        if size < 2 * sector:
            continue
        if _pread(fd, 8, sector) != b"EFI PART":
            continue
        try:
            header = _gpt_header(fd, size, sector, 1)
        except DissectError as primary:
            last = size // sector - 1
            try:
                if last <= 1:
                    raise DissectError("no backup")
                header = _gpt_header(fd, size, sector, last)
            except DissectError:
                raise DissectError(f"Invalid GPT partition table: {primary}") from None
        first_usable, last_usable, count, esize, entries = header
        parts = []
        for i in range(count):
            ptype, _puuid, first, last, attrs, name = _GPT_ENTRY.unpack_from(entries, i * esize)
            if ptype == bytes(16):
                continue
            if first > last or first < first_usable or last > last_usable:
                continue  # outside the usable area: ignored, as blkid does
            label = name.decode("utf-16-le", "replace").split("\0", 1)[0]
            parts.append(Partition(
                number=i + 1,
                type=uuid.UUID(bytes_le=ptype),
                offset=first * sector,
                size=(last - first + 1) * sector,
                flags=attrs,
                label=label,
            ))
        return PartitionTable("gpt", sector, tuple(parts))
    return None


def read_mbr(fd: int, size: int) -> PartitionTable | None:
    """The primary partitions of a DOS partition table, None if there is none."""
    raw = _pread(fd, 512, 0)
    if len(raw) < 512 or raw[510:512] != b"\x55\xaa":
        return None
    parts = []
    for i in range(4):
        status, ptype, start, count = struct.unpack_from("<B3xB3xII", raw, 446 + 16 * i)
        if status not in (0x00, 0x80):
            return None  # boot code or a file system, not a partition table
        if ptype == 0 or start == 0 or count == 0:
            continue
        if ptype == 0xEE:
            return None  # a protective MBR without a usable GPT
        parts.append(Partition(number=i + 1, type=ptype, offset=start * 512, size=count * 512))
    return PartitionTable("dos", 512, tuple(parts)) if parts else None


def compare_versions(a: str, b: str) -> int:
    """Compare two version strings as systemd's strverscmp_improved() does
    (the UAPI Version Format Specification): <0, 0, >0."""
    i = j = 0
    while True:
        while i < len(a) and not _VERSION_CHAR.match(a[i]):
            i += 1
        while j < len(b) and not _VERSION_CHAR.match(b[j]):
            j += 1
        # "~" sorts lower than anything, even the end of the string;
        # "-", "^" and "." lower than anything but the end.
        for ch in "~", "", "-", "^", ".":
            ca, cb = a[i : i + 1], b[j : j + 1]
            if ch == "":
                if not ca or not cb:
                    return (ca != "") - (cb != "")
                continue
            if ca == ch or cb == ch:
                if ca != ch:
                    return 1
                if cb != ch:
                    return -1
                i += 1
                j += 1
        ca, cb = a[i : i + 1], b[j : j + 1]
        if ca.isdigit() or cb.isdigit():
            # A number is newer than letters; numbers compare numerically.
            na = _DIGITS.match(a, i).group()
            nb = _DIGITS.match(b, j).group()
            if (na != "") != (nb != ""):
                return 1 if na else -1
            i += len(na)
            j += len(nb)
            na, nb = na.lstrip("0"), nb.lstrip("0")
            if (len(na), na) != (len(nb), nb):
                return 1 if (len(na), na) > (len(nb), nb) else -1
        else:
            sa = _LETTERS.match(a, i).group()
            sb = _LETTERS.match(b, j).group()
            if sa != sb:
                return 1 if sa > sb else -1
            i += len(sa)
            j += len(sb)


_VERSION_CHAR = re.compile(r"[A-Za-z0-9~^.\-]")
_DIGITS = re.compile(r"[0-9]*")
_LETTERS = re.compile(r"[A-Za-z]*")


def select_partitions(
    table: PartitionTable, native: str | None = None, secondary: str | None = None
) -> tuple[Partition | None, Partition | None]:
    """(root, usr) of a partition table, chosen as systemd's dissection does:
    the root (and /usr) partition of the native architecture, else of the
    secondary one; partitions flagged no-auto or labelled "_empty" are
    skipped; of several, the first wins unless a later one's label is a
    newer version.  Without root and /usr, a single generic Linux
    partition is the root.  Raises DissectError when there is no root."""
    if native is None:
        native, secondary = host_architectures()
    if table.kind == "dos":
        linux = [p for p in table.partitions if p.type == MBR_LINUX]
        if len(linux) > 1:
            raise DissectError("Multiple Linux partitions found, none of them marked as root")
        if not linux:
            raise DissectError("No root partition found (no Linux partition in the DOS partition table)")
        return linux[0], None

    best: dict[tuple[str, str], Partition] = {}
    generic: list[Partition] = []
    foreign: set[str] = set()
    for p in table.partitions:
        if p.flags & GPT_FLAG_NO_AUTO:
            continue
        if p.type == LINUX_GENERIC:
            generic.append(p)
            continue
        if p.type in _ROOT_ARCH:
            key = ("root", _ROOT_ARCH[p.type])
        elif p.type in _USR_ARCH:
            key = ("usr", _USR_ARCH[p.type])
        else:
            continue
        if key[1] not in (native, secondary):
            foreign.add(key[1])
            continue
        if p.label == "_empty":
            continue
        if key not in best or compare_versions(p.label, best[key].label) > 0:
            best[key] = p

    for arch in (native, secondary):
        root, usr = best.get(("root", arch)), best.get(("usr", arch))
        if root or usr:
            return root, usr
    if len(generic) == 1:
        return generic[0], None
    if len(generic) > 1:
        raise DissectError("Multiple generic Linux partitions found, none of them marked as root")
    if foreign:
        raise DissectError(
            f"No root partition for architecture {native} found "
            f"(only for: {', '.join(sorted(foreign))})"
        )
    raise DissectError("No root partition found")


# --------------------------------------------------------------------------
# Loop devices and mounts (the child)
# --------------------------------------------------------------------------

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
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_CLONE_NEWNS = 0x00020000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), what)


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
    _check(ret, target)


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
        raise DissectError(f"No file system found on {what}")
    if fstype not in FILE_SYSTEMS:
        raise DissectError(f"Unsupported file system '{fstype}' on {what}")
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
    raise DissectError(f"Failed to mount {fstype} file system of {what}: {error.strerror}")


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
        raise DissectError(e.strerror) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DissectError("Not a regular file or block device")
        size = _device_size(fd)
        if size == 0:
            raise DissectError("Image is empty")
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
                    raise DissectError("No partition table or file system found")
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


def _private_mount_namespace() -> None:
    """Detach from the caller's mount namespace; make every mount private."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    ret = _libc.mount(b"none", b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None)
    _check(ret, "/")


def metadata_to_json(md: ImageMetadata) -> dict:
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
        _private_mount_namespace()
        mountpoint = args.mountpoint
        if mountpoint is None:
            mountpoint = made = tempfile.mkdtemp(prefix="rawmeta-")
        result: dict = metadata_to_json(dissect_and_read(args.path, mountpoint))
        rc = 0
    except DissectError as e:
        result, rc = {"error": str(e)}, 1
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


# --------------------------------------------------------------------------
# The caller's side
# --------------------------------------------------------------------------

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_raw_metadata(path: str, timeout: float = 60) -> ImageMetadata:
    """The metadata of the raw image or block device at PATH.

    Blocking: run it in a thread.  Raises MetadataError ("Failed to dissect
    image 'PATH': reason") when the image cannot be dissected or mounted, or
    the helper does not finish within TIMEOUT seconds (it is then killed)."""

    def fail(reason: str) -> MetadataError:
        reason = " ".join(reason.split()) or "unknown error"
        return MetadataError(f"Failed to dissect image '{path}': {reason}")

    try:
        st = os.stat(path)
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise fail("Not a regular file or block device")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    mountpoint = tempfile.mkdtemp(prefix="machined-rawmeta-")
    argv = [
        shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "--",
        sys.executable, "-m", "imagepool.rawmeta",
        "--mountpoint", mountpoint, "--timeout", f"{timeout:g}", "--", path,
    ]
    try:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, start_new_session=True, close_fds=True,
            )
        except OSError as e:
            raise fail(f"Failed to start helper: {e.strerror or e}") from None
        try:
            out, err = proc.communicate(timeout=timeout if math.isfinite(timeout) else None)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise fail(f"Timed out after {timeout:g} s") from None
        except BaseException:
            _kill(proc)
            raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)

    result = None
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            break
    if proc.returncode == 0 and isinstance(result, dict) and "error" not in result:
        try:
            return metadata_from_json(result)
        except ValueError as e:
            raise fail(f"Malformed helper output: {e}") from None
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        raise fail(result["error"])
    errlines = [s for s in err.decode("utf-8", "replace").splitlines() if s.strip()]
    if errlines:
        raise fail(errlines[-1])
    if proc.returncode < 0:
        raise fail(f"Helper killed by signal {signal.Signals(-proc.returncode).name}")
    raise fail(f"Helper failed with exit status {proc.returncode}")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the helper and everything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


if __name__ == "__main__":
    sys.exit(main())
