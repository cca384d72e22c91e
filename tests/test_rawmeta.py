"""Metadata of raw images and block devices (imagepool.rawmeta).

Every image is built for real in tmp_path (mkfs.ext4 -d, mkfs.btrfs
--rootdir, sfdisk) and read through the real helper: a child in its own mount
namespace that attaches loop devices and mounts.  After every test no loop
device of ours may remain attached and our mount table must be unchanged.
"""

from __future__ import annotations

import os
import platform
import random
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from imagepool import rawmeta
from imagepool.errors import MetadataError
from imagepool.metadata import ImageMetadata
from imagepool.rawmeta import partitions

MiB = 1024 * 1024
ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
ROOT_ARM64 = "b921b045-1df0-41c3-af44-4c6f280d3fae"
GENERIC = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
NATIVE, SECONDARY = partitions.host_architectures()
NATIVE_ROOT = str(partitions.PARTITION_TYPES[NATIVE][0])
NATIVE_USR = str(partitions.PARTITION_TYPES[NATIVE][1])
FOREIGN_ROOT = ROOT_ARM64 if NATIVE != "arm64" else ROOT_X86_64

MACHINE_ID = "0123456789abcdef0123456789abcdef"
OS_RELEASE = (
    '# a comment\n'
    'NAME="Foo OS"\n'
    "ID=foo\n"
    'VERSION_ID="1.2"\n'
    'PRETTY_NAME="Foo OS 1.2 (\\"Quux\\")"\n'
    "VARIANT='Server Edition'\n"
)
OS_RELEASE_PARSED = {
    "NAME": "Foo OS",
    "ID": "foo",
    "VERSION_ID": "1.2",
    "PRETTY_NAME": 'Foo OS 1.2 ("Quux")',
    "VARIANT": "Server Edition",
}
MACHINE_INFO = 'PRETTY_HOSTNAME="Foo\'s box"\nICON_NAME=computer-vm\nCHASSIS=vm\n'
MACHINE_INFO_PARSED = {"PRETTY_HOSTNAME": "Foo's box", "ICON_NAME": "computer-vm", "CHASSIS": "vm"}


# ---------------------------------------------------------------- helpers


def run(*argv: str, input: str | None = None) -> str:
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def loop_lines(*needles: str) -> set[str]:
    """The lines of `losetup -a` that mention one of NEEDLES."""
    out = run("losetup", "-a")
    return {line for line in out.splitlines() if any(n in line for n in needles)}


def mountinfo() -> set[str]:
    return set(Path("/proc/self/mountinfo").read_text().splitlines())


def helper_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith("machined-rawmeta-")}


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    """Nothing of ours stays attached or mounted, no helper directory stays."""
    loops, mounts, dirs = loop_lines(str(tmp_path)), mountinfo(), helper_dirs()
    yield
    deadline = time.monotonic() + 5
    while loop_lines(str(tmp_path)) != loops and time.monotonic() < deadline:
        time.sleep(0.05)  # autoclear after a SIGKILL happens as the child exits
    assert loop_lines(str(tmp_path)) == loops
    assert mountinfo() == mounts
    assert helper_dirs() == dirs


def make_tree(root: Path, hostname: str = "foo-host", os_release: str = OS_RELEASE,
              machine_info: str | None = MACHINE_INFO, machine_id: str | None = MACHINE_ID) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc/os-release").write_text(os_release)
    (root / "etc/hostname").write_text(f"{hostname}\n")
    if machine_id is not None:
        (root / "etc/machine-id").write_text(f"{machine_id}\n")
    if machine_info is not None:
        (root / "etc/machine-info").write_text(machine_info)
    return root


def mkext4(image: Path, tree: Path, size: int = 8 * MiB, mkfs: str = "mkfs.ext4") -> Path:
    with open(image, "wb") as f:
        f.truncate(size)
    run(mkfs, "-q", "-F", "-d", str(tree), str(image))
    return image


def gpt_image(image: Path, parts: list[dict], label: str = "gpt") -> Path:
    """A partitioned image: each part is {"type":, "fs": Path | None,
    "size": bytes, "name":, "attrs":}; each file system is written in place."""
    lines = [f"label: {label}"]
    offset = MiB
    placed = []
    for p in parts:
        size = p.get("size") or p["fs"].stat().st_size
        fields = [f"start={offset // 512}", f"size={size // 512}", f"type={p['type']}"]
        if "name" in p:
            fields.append(f'name="{p["name"]}"')
        if "attrs" in p:
            fields.append(f'attrs="{p["attrs"]}"')
        lines.append(", ".join(fields))
        placed.append((offset, p.get("fs")))
        offset += size
    with open(image, "wb") as f:
        f.truncate(offset + MiB)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image), input="\n".join(lines) + "\n")
    with open(image, "r+b") as f:
        for off, fs in placed:
            if fs is not None:
                f.seek(off)
                f.write(fs.read_bytes())
    return image


def expected(hostname: str = "foo-host") -> ImageMetadata:
    return ImageMetadata(
        hostname=hostname,
        machine_id=bytes.fromhex(MACHINE_ID),
        machine_info=MACHINE_INFO_PARSED,
        os_release=OS_RELEASE_PARSED,
    )


def dissect_error(path: Path | str) -> str:
    with pytest.raises(MetadataError) as info:
        rawmeta.read_raw_metadata(str(path))
    message = str(info.value)
    assert message.startswith(f"Failed to dissect image '{path}': "), message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- images that work


@pytest.mark.root
@pytest.mark.parametrize("mkfs", ["mkfs.ext4", "mkfs.ext2"])
def test_bare_ext4(tmp_path: Path, mkfs: str) -> None:
    image = mkext4(tmp_path / "bare.raw", make_tree(tmp_path / "tree"), mkfs=mkfs)
    assert rawmeta.read_raw_metadata(str(image)) == expected()


@pytest.mark.root
def test_ext4_journal_needing_recovery(tmp_path: Path) -> None:
    """The read-only loop device cannot replay a journal: mounted with noload."""
    image = mkext4(tmp_path / "dirty.raw", make_tree(tmp_path / "tree", hostname="dirty-host"))
    run("debugfs", "-w", "-R", "feature needs_recovery", str(image))
    assert "needs_recovery" in run("dumpe2fs", "-h", str(image))
    assert rawmeta.read_raw_metadata(str(image)) == expected("dirty-host")


@pytest.mark.root
def test_gpt_root_partition(tmp_path: Path) -> None:
    """A GPT with a swap partition and the root partition of this
    architecture (the x86-64 one on x86-64): the root is mounted."""
    if platform.machine() == "x86_64":
        assert NATIVE_ROOT == ROOT_X86_64
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree", hostname="gpt-host"))
    image = gpt_image(tmp_path / "gpt.raw", [
        {"type": SWAP, "size": MiB},
        {"type": NATIVE_ROOT, "fs": fs, "name": "root-x86-64"},
    ])
    assert rawmeta.read_raw_metadata(str(image)) == expected("gpt-host")


@pytest.mark.root
def test_gpt_generic_linux_partition(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "data.ext4", make_tree(tmp_path / "tree", hostname="generic-host"))
    image = gpt_image(tmp_path / "generic.raw", [{"type": GENERIC, "fs": fs}])
    assert rawmeta.read_raw_metadata(str(image)) == expected("generic-host")


@pytest.mark.root
def test_btrfs_bare(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", hostname="btrfs-host")
    image = tmp_path / "btrfs.raw"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    run("mkfs.btrfs", "-q", "-f", "--rootdir", str(tree), str(image))
    assert rawmeta.read_raw_metadata(str(image)) == expected("btrfs-host")


@pytest.mark.root
def test_symlinks_resolve_inside_the_image(tmp_path: Path) -> None:
    """os-release only in /usr/lib (relative symlink from /etc) and an
    absolute /etc/hostname symlink: both resolve inside the image."""
    tree = make_tree(tmp_path / "tree")
    (tree / "etc/os-release").unlink()
    (tree / "usr/lib/os-release").write_text(OS_RELEASE)
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")
    (tree / "etc/hostname").unlink()
    (tree / "etc/hostname.real").write_text("inside-host\n")
    (tree / "etc/hostname").symlink_to("/etc/hostname.real")
    assert not os.path.exists("/etc/hostname.real")  # resolving on the host finds nothing
    image = mkext4(tmp_path / "links.raw", tree)
    assert rawmeta.read_raw_metadata(str(image)) == expected("inside-host")


@pytest.mark.root
def test_usr_lib_os_release_without_etc(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", machine_info=None, machine_id=None)
    (tree / "etc/os-release").unlink()
    (tree / "usr/lib/os-release").write_text("ID=usronly\n")
    image = mkext4(tmp_path / "usronly.raw", tree)
    md = rawmeta.read_raw_metadata(str(image))
    assert md == ImageMetadata(hostname="foo-host", os_release={"ID": "usronly"})


@pytest.mark.root
def test_block_device(tmp_path: Path) -> None:
    image = mkext4(tmp_path / "bare.raw", make_tree(tmp_path / "tree", hostname="blockdev-host"))
    dev = run("losetup", "--find", "--show", "--read-only", str(image)).strip()
    try:
        assert rawmeta.read_raw_metadata(dev) == expected("blockdev-host")
        # The helper's own loop device (on top of DEV) is gone again.
        assert loop_lines(f"({dev})") == set()
    finally:
        run("losetup", "-d", dev)


@pytest.mark.root
def test_gpt_on_block_device(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree", hostname="gptdev-host"))
    image = gpt_image(tmp_path / "gpt.raw", [{"type": NATIVE_ROOT, "fs": fs}])
    dev = run("losetup", "--find", "--show", "--read-only", str(image)).strip()
    try:
        assert rawmeta.read_raw_metadata(dev) == expected("gptdev-host")
        assert loop_lines(f"({dev})") == set()
    finally:
        run("losetup", "-d", dev)


@pytest.mark.root
def test_versioned_root_partitions(tmp_path: Path) -> None:
    """Of several root partitions the newest label version wins; no-auto and
    "_empty" partitions are skipped (as systemd's dissection does)."""
    old = mkext4(tmp_path / "old.ext4", make_tree(tmp_path / "old", hostname="old-host"))
    new = mkext4(tmp_path / "new.ext4", make_tree(tmp_path / "new", hostname="new-host"))
    image = gpt_image(tmp_path / "ab.raw", [
        {"type": NATIVE_ROOT, "fs": old, "name": "fooOS_1.9"},
        {"type": NATIVE_ROOT, "fs": new, "name": "fooOS_1.10"},
        {"type": NATIVE_ROOT, "size": MiB, "name": "fooOS_2.0", "attrs": "GUID:63"},
        {"type": NATIVE_ROOT, "size": MiB, "name": "_empty"},
    ])
    assert rawmeta.read_raw_metadata(str(image)) == expected("new-host")


@pytest.mark.root
def test_root_and_usr_partitions(tmp_path: Path) -> None:
    """The /usr partition is mounted on the root's /usr, as systemd does."""
    root = make_tree(tmp_path / "root", hostname="split-host")
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    usr = tmp_path / "usr"
    (usr / "lib").mkdir(parents=True)
    (usr / "lib/os-release").write_text(OS_RELEASE)
    image = gpt_image(tmp_path / "split.raw", [
        {"type": NATIVE_ROOT, "fs": mkext4(tmp_path / "root.ext4", root)},
        {"type": NATIVE_USR, "fs": mkext4(tmp_path / "usr.ext4", usr)},
    ])
    assert rawmeta.read_raw_metadata(str(image)) == expected("split-host")
    # A /usr partition alone is enough: the os-release comes from it.
    image = gpt_image(tmp_path / "usronly.raw", [
        {"type": NATIVE_USR, "fs": mkext4(tmp_path / "usr2.ext4", usr)},
    ])
    assert rawmeta.read_raw_metadata(str(image)) == ImageMetadata(os_release=OS_RELEASE_PARSED)


@pytest.mark.root
def test_dos_partition_table(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree", hostname="dos-host"))
    image = gpt_image(tmp_path / "dos.raw", [{"type": "83", "fs": fs}], label="dos")
    assert rawmeta.read_raw_metadata(str(image)) == expected("dos-host")


@pytest.mark.root
def test_gpt_with_4k_sectors(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree", hostname="4k-host"))
    image = tmp_path / "4k.raw"
    with open(image, "wb") as f:
        f.truncate(10 * MiB)
    dev = run("losetup", "--find", "--show", "--sector-size", "4096", str(image)).strip()
    try:
        run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", dev,
            input=f"label: gpt\nstart=256, size={8 * MiB // 4096}, type={NATIVE_ROOT}\n")
    finally:
        run("losetup", "-d", dev)
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(fs.read_bytes())
    assert rawmeta.read_raw_metadata(str(image)) == expected("4k-host")


@pytest.mark.root
def test_damaged_primary_gpt_falls_back_to_backup(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree", hostname="backup-host"))
    image = gpt_image(tmp_path / "gpt.raw", [{"type": NATIVE_ROOT, "fs": fs}])
    with open(image, "r+b") as f:
        f.seek(512 + 16)
        f.write(b"\xde\xad\xbe\xef")  # the primary header's checksum
    assert rawmeta.read_raw_metadata(str(image)) == expected("backup-host")


# ---------------------------------------------------------------- images that fail


@pytest.mark.root
def test_random_bytes(tmp_path: Path) -> None:
    image = tmp_path / "random.raw"
    image.write_bytes(random.Random(4).randbytes(4 * MiB))
    assert dissect_error(image).endswith("No partition table or file system found")


@pytest.mark.root
def test_gpt_with_only_swap(tmp_path: Path) -> None:
    image = gpt_image(tmp_path / "swap.raw", [{"type": SWAP, "size": 4 * MiB}])
    assert dissect_error(image).endswith(": No root partition found")


@pytest.mark.root
def test_gpt_with_only_a_foreign_root(tmp_path: Path) -> None:
    image = gpt_image(tmp_path / "foreign.raw", [{"type": FOREIGN_ROOT, "size": 4 * MiB}])
    message = dissect_error(image)
    assert f"No root partition for architecture {NATIVE} found" in message


@pytest.mark.root
def test_gpt_with_two_generic_partitions(tmp_path: Path) -> None:
    image = gpt_image(tmp_path / "two.raw", [{"type": GENERIC, "size": MiB}, {"type": GENERIC, "size": MiB}])
    assert "Multiple generic Linux partitions" in dissect_error(image)


def _gpt_header(count: int, entry_size: int = 128, entries_lba: int = 2, entries: bytes = b"",
                last_usable: int = 1000) -> bytes:
    fields = [b"EFI PART", 0x10000, 92, 0, 0, 1, 0, 34, last_usable, bytes(16),
              entries_lba, count, entry_size, zlib.crc32(entries)]
    header = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack("<8sIIIIQQQQ16sQIII", *fields)


@pytest.mark.root
def test_truncated_gpt_with_huge_partition_count(tmp_path: Path) -> None:
    image = tmp_path / "huge.raw"
    pmbr = bytearray(512)
    pmbr[446:462] = struct.pack("<B3xB3xII", 0, 0xEE, 1, 0xFFFFFFFF)
    pmbr[510:512] = b"\x55\xaa"
    image.write_bytes(bytes(pmbr) + _gpt_header(0xFFFFFFFF).ljust(512, b"\0") + bytes(8 * 512))
    message = dissect_error(image)
    assert "Invalid GPT partition table" in message and "4294967295 partition entries" in message


@pytest.mark.root
def test_gpt_entries_beyond_the_end(tmp_path: Path) -> None:
    """Entry array claimed past the end of a truncated file."""
    image = tmp_path / "short.raw"
    image.write_bytes(bytes(512) + _gpt_header(128, entries_lba=2).ljust(512, b"\0") + bytes(1024))
    assert "partition entry array lies outside the image" in dissect_error(image)


@pytest.mark.root
def test_root_partition_beyond_the_end(tmp_path: Path) -> None:
    fs = mkext4(tmp_path / "root.ext4", make_tree(tmp_path / "tree"))
    image = gpt_image(tmp_path / "cut.raw", [{"type": NATIVE_ROOT, "fs": fs}])
    os.truncate(image, 4 * MiB)
    assert dissect_error(image).endswith("Partition 1 extends beyond the end of the image")


@pytest.mark.root
def test_empty_file(tmp_path: Path) -> None:
    image = tmp_path / "empty.raw"
    image.touch()
    assert dissect_error(image).endswith(": Image is empty")


@pytest.mark.root
def test_unsupported_file_system(tmp_path: Path) -> None:
    image = tmp_path / "swap.raw"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    run("mkswap", "-q", str(image))
    assert dissect_error(image).endswith("Unsupported file system 'swap' on the image")


@pytest.mark.root
def test_corrupted_ext4(tmp_path: Path) -> None:
    """A superblock blkid recognises, but the kernel refuses to mount."""
    image = mkext4(tmp_path / "bad.raw", make_tree(tmp_path / "tree"))
    with open(image, "r+b") as f:
        f.seek(1024 + 0x18)  # s_log_block_size: absurd block size
        f.write(struct.pack("<I", 40))
    message = dissect_error(image)
    assert "Failed to mount ext4 file system of the image" in message


def test_not_an_image(tmp_path: Path) -> None:
    assert dissect_error(tmp_path / "missing.raw").endswith(": No such file or directory")
    fifo = tmp_path / "fifo.raw"
    os.mkfifo(fifo)
    assert dissect_error(fifo).endswith(": Not a regular file or block device")


@pytest.mark.root
def test_timeout_kills_the_helper(tmp_path: Path) -> None:
    """Killed at various stages (starting, attaching, mounting): always a
    MetadataError saying so, and nothing left behind (checked by no_leaks)."""
    image = mkext4(tmp_path / "bare.raw", make_tree(tmp_path / "tree"))
    timed_out = 0
    for timeout in (0.001, 0.02, 0.03, 0.035, 0.04, 0.045, 0.05, 0.055, 0.06, 0.07, 0.1, 0.2):
        try:
            md = rawmeta.read_raw_metadata(str(image), timeout=timeout)
        except MetadataError as e:
            assert str(e) == f"Failed to dissect image '{image}': Timed out after {timeout:g} s"
            timed_out += 1
        else:
            assert md == expected()
    assert timed_out >= 1
    # And afterwards the image still works.
    assert rawmeta.read_raw_metadata(str(image)) == expected()


# ---------------------------------------------------------------- pure functions


def test_partition_types() -> None:
    assert str(partitions.PARTITION_TYPES["x86-64"][0]) == ROOT_X86_64
    assert str(partitions.PARTITION_TYPES["arm64"][0]) == ROOT_ARM64
    assert partitions.host_architectures("x86_64", "little") == ("x86-64", "x86")
    assert partitions.host_architectures("aarch64", "little") == ("arm64", "arm")
    assert partitions.host_architectures("ppc64le", "little") == ("ppc64-le", None)


def test_secondary_architecture_root() -> None:
    x86 = partitions.PARTITION_TYPES["x86"][0]
    x86_64 = partitions.PARTITION_TYPES["x86-64"][0]

    def table(*types: object) -> partitions.PartitionTable:
        return partitions.PartitionTable("gpt", 512, tuple(
            partitions.Partition(number=i + 1, type=t, offset=MiB * (i + 1), size=MiB) for i, t in enumerate(types)
        ))

    root, usr = partitions.select_partitions(table(x86), "x86-64", "x86")
    assert root is not None and root.number == 1 and usr is None
    root, _ = partitions.select_partitions(table(x86, x86_64), "x86-64", "x86")
    assert root is not None and root.number == 2
    with pytest.raises(partitions.DissectError, match="only for: x86-64"):
        partitions.select_partitions(table(x86_64), "arm64", "arm")


@pytest.mark.parametrize("a,b,result", [
    ("1.10", "1.9", 1), ("fooOS_1.10", "fooOS_1.9", 1), ("123a", "123", 1), ("123.a", "123.b", -1),
    ("123a", "123.a", 1), ("A", "a", -1), ("", "0", -1), ("0.", "0", 1), ("1~rc1", "1", -1),
    ("1_2_3", "1.3.3", 1), ("1+", "1", 0), ("0", "a", 1), ("1^1", "1", 1), ("", "", 0),
])
def test_compare_versions(a: str, b: str, result: int) -> None:
    got = partitions.compare_versions(a, b)
    assert (got > 0) - (got < 0) == result
    got = partitions.compare_versions(b, a)
    assert (got > 0) - (got < 0) == -result


def test_gpt_parser_survives_garbage(tmp_path: Path) -> None:
    """Random damage to a real GPT (with the checksums fixed up, so the damage
    gets past them): the parser returns partitions inside the image or raises
    DissectError, never anything else."""
    image = gpt_image(tmp_path / "gpt.raw", [{"type": NATIVE_ROOT, "size": MiB}, {"type": SWAP, "size": MiB}])
    pristine = image.read_bytes()[: 34 * 512]
    size = image.stat().st_size
    rng = random.Random(7)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(pristine)
        for _ in range(rng.randint(1, 6)):
            pos = rng.choice([rng.randrange(512, 512 + 92), rng.randrange(1024, 34 * 512)])
            data[pos] = rng.randrange(256)
        if rng.random() < 0.8:  # fix the checksums up
            count, esize = struct.unpack_from("<II", data, 512 + 80)
            if count * esize <= len(data) - 1024:
                struct.pack_into("<I", data, 512 + 88, zlib.crc32(bytes(data[1024:1024 + count * esize])))
            hsize = min(max(struct.unpack_from("<I", data, 512 + 12)[0], 92), 512)
            struct.pack_into("<I", data, 512 + 16, 0)
            struct.pack_into("<I", data, 512 + 16, zlib.crc32(bytes(data[512:512 + hsize])))
        fuzzed = tmp_path / "fuzzed.raw"
        fuzzed.write_bytes(bytes(data))
        os.truncate(fuzzed, size)  # no backup header: the primary one counts
        fd = os.open(fuzzed, os.O_RDONLY)
        try:
            table = partitions.read_gpt(fd, size)
            if table is not None:
                for p in table.partitions:
                    assert p.offset >= 0 and p.size > 0
                try:
                    partitions.select_partitions(table)
                except partitions.DissectError:
                    pass
            outcomes["ok"] += 1
        except partitions.DissectError as e:
            assert str(e).startswith("Invalid GPT partition table: ")
            outcomes["error"] += 1
        finally:
            os.close(fd)
    assert outcomes["ok"] and outcomes["error"]
