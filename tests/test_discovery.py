"""Image discovery as systemd-machined 252 does it: ListImages and the Image
properties of ours against the reference on a pool of corner cases, creation
times to the microsecond, and changes showing at the very next listing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from imagepool import btrfs, fsutil
from imagepool.image import UINT64_MAX, ImageType, make_image
from imagepool.image import Pool as ImagePool
from tests import newer
from tests.conftest import Daemons, Pool, busctl
from tests.imagetree import make_subvolume_or_dir, populate

MACHINED = "org.freedesktop.machine1"
MANAGER = [MACHINED, "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"]
IMAGE_PROPERTIES = ["Name", "Path", "Type", "ReadOnly", "CreationTimestamp", "ModificationTimestamp",
                    "Usage", "Limit", "UsageExclusive", "LimitExclusive"]


def list_images() -> dict[str, list]:
    r = busctl("--json=short", "call", *MANAGER, "ListImages")
    assert r.returncode == 0, r.stderr
    return {row[0]: row for row in json.loads(r.stdout)["data"][0]}


def image_properties(object_path: str) -> list:
    r = busctl("--json=short", "get-property", MACHINED, object_path, "org.freedesktop.machine1.Image",
               *IMAGE_PROPERTIES)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["data"] for line in r.stdout.splitlines()]


def snapshot_of_everything() -> tuple[dict, dict]:
    listing = list_images()
    return listing, {name: image_properties(row[6]) for name, row in listing.items()}


def mount_read_only(source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], check=True)


def make_corner_cases(pool: Pool, outside: Path) -> None:
    """Beyond the standard pool: symlinks, immutable and read-only things,
    read-only bind mounts, names that need escaping; on btrfs also a
    read-only subvolume with links into it, a snapshot made a second after its
    origin, and quota with a limit."""
    populate(pool.path, pool.btrfs, raw_data=True)
    (pool / "imm").mkdir()
    fsutil.set_immutable(str(pool / "imm"), True)
    os.symlink("imm", pool / "linked")  # followed: read-only through the target
    (pool / "ro.raw").write_bytes(b"x" * 5000)
    os.chmod(pool / "ro.raw", 0o444)
    os.symlink("raw1.raw", pool / "lraw.raw")
    os.symlink("/nonexistent", pool / "dangling")
    (pool / "my-vm").mkdir()
    (pool / "ünïcödé").mkdir()
    outside.mkdir()
    (outside / "dir").mkdir()
    (outside / "file.raw").write_bytes(b"y" * 3000)
    (pool / "robind").mkdir()
    mount_read_only(outside / "dir", pool / "robind")
    (pool / "robind-raw.raw").touch()
    mount_read_only(outside / "file.raw", pool / "robind-raw.raw")
    if not pool.btrfs:
        return
    make_subvolume_or_dir(pool / "rosv", True)
    (pool / "rosv/inner").mkdir()
    (pool / "rosv/inner.raw").write_bytes(b"z" * 1000)
    btrfs.set_read_only(str(pool / "rosv"), True)
    os.symlink("rosv/inner", pool / "in-rosv")  # a directory in a read-only subvolume
    os.symlink("rosv/inner.raw", pool / "in-rosv-raw.raw")
    make_subvolume_or_dir(pool / "imm-sv", True)
    fsutil.set_immutable(str(pool / "imm-sv"), True)  # no matter for a subvolume
    time.sleep(1.1)
    btrfs.snapshot(str(pool / "sv1"), str(pool / "snap"))
    btrfs.quota_enable(str(pool.path))
    btrfs.quota_rescan_wait(str(pool.path))
    btrfs.set_limit(str(pool / "sv1"), 64 << 20)
    os.sync()
    btrfs.quota_rescan_wait(str(pool.path))


def undo_corner_cases(pool: Pool) -> None:
    for name in ("imm", "imm-sv"):
        if (pool / name).exists():
            fsutil.set_immutable(str(pool / name), False)
    for name in ("robind", "robind-raw.raw"):
        subprocess.run(["umount", str(pool / name)], stderr=subprocess.DEVNULL)


def test_listing_matches_reference(pool: Pool, daemons: Daemons, tmp_path: Path) -> None:
    make_corner_cases(pool, tmp_path / "outside")
    try:
        daemons.start_reference()
        reference = snapshot_of_everything()
        daemons.stop()
        daemons.start_ours()
        ours = snapshot_of_everything()
        again = snapshot_of_everything()  # from the reused facts of the first scan
        daemons.stop()
    finally:
        undo_corner_cases(pool)
    assert newer.image_rows(ours[0], ours=True) == newer.image_rows(reference[0], ours=False)
    assert newer.image_properties(ours[1], ours=True) == newer.image_properties(reference[1], ours=False)
    assert again == ours
    assert all(row[4] > 0 for row in ours[0].values() if row[1] == "subvolume")  # modification times
    listing = ours[0]
    # The corner cases are really there, and really differ.
    assert listing["linked"][2] and listing["robind"][2] and listing["robind-raw"][2] and listing["ro"][2]
    assert not listing["dir1"][2] and not listing["lraw"][2]
    assert listing["ünïcödé"][6] == "/org/freedesktop/machine1/image/_c3_bcn_c3_afc_c3_b6d_c3_a9"
    assert "dangling" not in listing
    if pool.btrfs:
        assert listing["rosv"][2] and listing["in-rosv"][2] and listing["in-rosv-raw"][2]
        assert not listing["imm-sv"][2]
        assert listing["sv1"][1] == "subvolume" and listing["sv1"][5] != UINT64_MAX
        assert ours[1]["sv1"][IMAGE_PROPERTIES.index("Limit")] == 64 << 20


def creation_second(path: Path) -> int:
    """The subvolume's creation time as btrfs-progs shows it (to the second)."""
    out = subprocess.run(["btrfs", "subvolume", "show", str(path)], check=True, capture_output=True,
                         text=True).stdout
    when = re.search(r"Creation time:\s+(.+)", out).group(1).strip()
    return int(datetime.strptime(when, "%Y-%m-%d %H:%M:%S %z").timestamp())


def test_creation_timestamps_to_the_microsecond(pool: Pool, daemons: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    if pool.btrfs:
        time.sleep(1.1)
        btrfs.snapshot(str(pool / "sv1"), str(pool / "snap"))
    daemons.start_reference()
    reference = list_images()
    daemons.stop()
    daemons.start_ours()
    listing = list_images()
    daemons.stop()
    assert {n: row[3] for n, row in listing.items()} == {n: row[3] for n, row in reference.items()}
    # Directories and raw files: the birth time of the inode (statx).
    for name, file in [("dir1", "dir1"), ("raw1", "raw1.raw")] + ([] if pool.btrfs else [("sv1", "sv1")]):
        assert listing[name][3] == fsutil.statx(str(pool / file)).btime_usec != 0
    if not pool.btrfs:
        return
    # Subvolumes: the otime of the root item, as systemd reads it; not the
    # birth time of the root directory, which a snapshot copies from its origin.
    for name in ("sv1", "snap"):
        assert listing[name][3] // 1_000_000 == creation_second(pool / name)
        assert listing[name][3] % 1_000_000 != 0  # not whole seconds (one chance in a million)
    assert fsutil.statx(str(pool / "snap")).btime_usec == fsutil.statx(str(pool / "sv1")).btime_usec
    assert listing["snap"][3] - listing["sv1"][3] >= 1_000_000


def discover(pool: Pool, search: ImagePool) -> dict:
    """Pool.discover(), checked against inspecting every image afresh."""
    images = search.discover()
    for name, image in images.items():
        if name != ".host":
            assert make_image(name, image.path) == image
            assert search.find(name) == image
    return images


def test_changes_show_at_once(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    search = ImagePool(str(pool.path), [str(pool.path)])
    before = discover(pool, search)
    assert discover(pool, search) == before
    assert not any(i.read_only for n, i in before.items() if not n.startswith("."))
    assert before[".hidden1"].read_only and before[".host"].read_only  # always, as systemd 262 has them

    fsutil.set_immutable(str(pool / "dir1"), True)
    os.chmod(pool / "raw1.raw", 0o444)
    images = discover(pool, search)
    assert images["dir1"].read_only and images["raw1"].read_only
    fsutil.set_immutable(str(pool / "dir1"), False)
    os.chmod(pool / "raw1.raw", 0o644)
    with open(pool / "raw1.raw", "r+b") as f:
        f.write(b"data")
        os.fsync(f.fileno())
    images = discover(pool, search)
    assert not images["dir1"].read_only and not images["raw1"].read_only
    assert images["raw1"].usage > before["raw1"].usage

    os.rmdir(pool / ".hidden1")
    os.mkdir(pool / ".hidden1")
    assert discover(pool, search)[".hidden1"].crtime > before[".hidden1"].crtime

    # A read-only mount makes every image read-only, and only while it lasts.
    subprocess.run(["mount", "-o", "remount,bind,ro", str(pool.path)], check=True)
    try:
        assert all(i.read_only for n, i in discover(pool, search).items() if n != ".host")
    finally:
        subprocess.run(["mount", "-o", "remount,bind,rw", str(pool.path)], check=True)
    assert discover(pool, search) == before | {"raw1": images["raw1"], ".hidden1": search.find(".hidden1")}

    if pool.btrfs:
        btrfs.set_read_only(str(pool / "sv1"), True)
        assert discover(pool, search)["sv1"].read_only
        btrfs.set_read_only(str(pool / "sv1"), False)
        assert not discover(pool, search)["sv1"].read_only
        btrfs.quota_enable(str(pool.path))
        btrfs.quota_rescan_wait(str(pool.path))
        btrfs.set_limit(str(pool / "sv1"), 32 << 20)
        assert discover(pool, search)["sv1"].limit == 32 << 20


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_qgroups_read_at_once(pool: Pool) -> None:
    search = ImagePool(str(pool.path), [str(pool.path)])
    for i in range(40):
        make_subvolume_or_dir(pool / f"sv{i}", True)
        (pool / f"sv{i}/data").write_bytes(os.urandom(4096 * i))
    (pool / "plain").mkdir()
    subvolumes = [i for i in discover(pool, search).values() if i.type == ImageType.SUBVOLUME]
    assert len(subvolumes) == 40
    assert all(i.usage == i.limit == UINT64_MAX for i in subvolumes)  # quota off

    btrfs.quota_enable(str(pool.path))
    btrfs.quota_rescan_wait(str(pool.path))
    for i in range(0, 40, 3):
        btrfs.set_limit(str(pool / f"sv{i}"), (i + 1) << 20)
    os.sync()
    images = discover(pool, search)
    for i in range(40):
        image = images[f"sv{i}"]
        q = btrfs.qgroup_of(image.path)
        assert (image.usage, image.usage_exclusive, image.limit, image.limit_exclusive) == (
            q.referenced, q.exclusive, q.max_referenced, q.max_exclusive)
        assert image.limit == ((i + 1) << 20 if i % 3 == 0 else UINT64_MAX)
        assert image.usage >= 4096 * i
    assert images["plain"].usage == UINT64_MAX
