"""Partition tables of raw disk images, as systemd's dissection reads them:
a GPT (the Discoverable Partitions Specification's types) or a DOS table,
and which partition is the root (and /usr).  The image is untrusted input:
every size, count and offset read from it is bounded and checked."""

from __future__ import annotations

import errno
import os
import platform
import re
import struct
import sys
import uuid
import zlib
from dataclasses import dataclass

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
    """The image cannot be dissected; the message is the reason (one line),
    ERRNO the error systemd's dissection has for it (EUCLEAN: a damaged or
    contradictory partition table)."""

    def __init__(self, message: str, code: int = errno.EUCLEAN) -> None:
        super().__init__(message)
        self.errno = code


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
            na, nb = _match(_DIGITS, a, i), _match(_DIGITS, b, j)
            if (na != "") != (nb != ""):
                return 1 if na else -1
            i += len(na)
            j += len(nb)
            na, nb = na.lstrip("0"), nb.lstrip("0")
            if (len(na), na) != (len(nb), nb):
                return 1 if (len(na), na) > (len(nb), nb) else -1
        else:
            sa, sb = _match(_LETTERS, a, i), _match(_LETTERS, b, j)
            if sa != sb:
                return 1 if sa > sb else -1
            i += len(sa)
            j += len(sb)


def _match(pattern: re.Pattern[str], text: str, at: int) -> str:
    """What PATTERN (which matches the empty string too) matches at AT."""
    found = pattern.match(text, at)
    return found.group() if found else ""


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
            raise DissectError("Multiple Linux partitions found, none of them marked as root", errno.ENOTUNIQ)
        if not linux:
            raise DissectError("No root partition found (no Linux partition in the DOS partition table)", errno.ENXIO)
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
        if not isinstance(p.type, uuid.UUID):
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
        if arch is None:
            continue
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
    raise DissectError("No root partition found", errno.ENXIO)
