"""imagepool.btrfs on a real btrfs (loop device), with btrfs-progs as the oracle."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from imagepool import btrfs
from imagepool.btrfs import UINT64_MAX, Qgroup

MiB = 1 << 20


def cli(*args: str | Path) -> str:
    return subprocess.run(["btrfs", *map(str, args)], check=True, capture_output=True, text=True).stdout


def oracle_id(path: Path) -> int:
    return int(re.search(r"Subvolume ID:\s+(\d+)", cli("subvolume", "show", path)).group(1))


def oracle_read_only(path: Path) -> bool:
    return cli("property", "get", "-ts", path, "ro").strip() == "ro=true"


def oracle_subvolumes(mnt: Path) -> dict[str, int]:
    """Path (relative to the top level) -> id of every subvolume."""
    out = cli("subvolume", "list", mnt)
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^ID (\d+) .* path (.+)$", out, re.M)}


def oracle_qgroups(mnt: Path) -> dict[int, Qgroup]:
    """Level-0 qgroups from `btrfs qgroup show -re --raw`, by subvolume id."""
    groups = {}
    for line in cli("qgroup", "show", "-re", "--raw", mnt).splitlines():
        m = re.match(r"0/(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)", line)
        if m:
            rfer, excl, max_rfer, max_excl = (UINT64_MAX if v == "none" else int(v) for v in m.groups()[1:])
            groups[int(m.group(1))] = Qgroup(rfer, excl, max_rfer, max_excl)
    return groups


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())


def settle(mnt: Path) -> None:
    """Commit, so that the qgroup items in the quota tree are current."""
    os.sync()
    btrfs.quota_rescan_wait(str(mnt))


def make_tree(mnt: Path) -> Path:
    """a (subvolume) / a/b (subvolume) / a/b/c (subvolume), with a file in each."""
    a = mnt / "a"
    for sub in (a, a / "b", a / "b" / "c"):
        btrfs.create_subvolume(str(sub))
        (sub / "file").write_text(sub.name)
    return a


UNKNOWN = Qgroup(UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX)


def test_not_btrfs(tmp_path: Path):
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout
    assert kind.strip() != "btrfs"
    (tmp_path / "file").write_text("x")
    assert btrfs.is_btrfs(str(tmp_path)) is False
    assert btrfs.is_subvolume(str(tmp_path)) is False
    assert btrfs.is_subvolume(str(tmp_path / "missing")) is False
    assert btrfs.is_subvolume(str(tmp_path / "file" / "below")) is False
    assert btrfs.quota_enabled(str(tmp_path)) is False
    assert btrfs.qgroup_of(str(tmp_path)) == UNKNOWN
    assert btrfs.qgroup_of(str(tmp_path / "file")) == UNKNOWN
    calls = [
        lambda: btrfs.subvolume_id(str(tmp_path)),
        lambda: btrfs.create_subvolume(str(tmp_path / "sub")),
        lambda: btrfs.get_read_only(str(tmp_path)),
        lambda: btrfs.delete_subvolume(str(tmp_path)),
        lambda: btrfs.quota_enable(str(tmp_path)),
        lambda: btrfs.set_limit(str(tmp_path), MiB),
    ]
    for call in calls:
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP)
    assert not (tmp_path / "sub").exists()
    with pytest.raises(FileNotFoundError):
        btrfs.is_btrfs(str(tmp_path / "missing"))


def test_subvolumes(btrfs_mount: Path):
    mnt = btrfs_mount
    assert btrfs.is_btrfs(str(mnt))
    # The mount point is the top-level subvolume, id 5.
    assert btrfs.is_subvolume(str(mnt))
    assert btrfs.subvolume_id(str(mnt)) == oracle_id(mnt) == 5
    a = make_tree(mnt)
    (a / "plain").mkdir()
    assert oracle_subvolumes(mnt) == {
        "a": btrfs.subvolume_id(str(a)),
        "a/b": btrfs.subvolume_id(str(a / "b")),
        "a/b/c": btrfs.subvolume_id(str(a / "b" / "c")),
    }
    for sub in (a, a / "b", a / "b" / "c"):
        assert btrfs.is_subvolume(str(sub))
        assert btrfs.subvolume_id(str(sub)) == oracle_id(sub)
    # A directory or file inside a subvolume belongs to it.
    assert not btrfs.is_subvolume(str(a / "plain"))
    assert not btrfs.is_subvolume(str(a / "file"))
    assert not btrfs.is_subvolume(str(a / "missing"))
    assert btrfs.subvolume_id(str(a / "plain")) == btrfs.subvolume_id(str(a / "file")) == oracle_id(a)
    with pytest.raises(FileExistsError):
        btrfs.create_subvolume(str(a))
    with pytest.raises(FileNotFoundError):
        btrfs.create_subvolume(str(mnt / "no" / "such"))
    with pytest.raises(FileNotFoundError):
        btrfs.subvolume_id(str(mnt / "missing"))


def test_read_only(btrfs_mount: Path):
    mnt = btrfs_mount
    sub = mnt / "sub"
    btrfs.create_subvolume(str(sub))
    assert btrfs.get_read_only(str(sub)) is False
    assert btrfs.get_read_only(str(mnt)) is False
    btrfs.set_read_only(str(sub), True)
    assert btrfs.get_read_only(str(sub)) is True and oracle_read_only(sub)
    with pytest.raises(OSError) as exc:
        (sub / "file").write_text("x")
    assert exc.value.errno == errno.EROFS
    btrfs.set_read_only(str(sub), False)
    assert btrfs.get_read_only(str(sub)) is False and not oracle_read_only(sub)
    (sub / "file").write_text("x")
    # A plain directory has no flag of its own: refused, the subvolume untouched.
    (sub / "dir").mkdir()
    for call in (btrfs.get_read_only, lambda p: btrfs.set_read_only(p, True)):
        with pytest.raises(OSError) as exc:
            call(str(sub / "dir"))
        assert exc.value.errno == errno.EINVAL
    assert not oracle_read_only(sub)


@pytest.mark.parametrize("read_only", [False, True])
def test_snapshot_recursive(btrfs_mount: Path, read_only: bool):
    mnt = btrfs_mount
    a = make_tree(mnt)
    btrfs.set_read_only(str(a / "b" / "c"), True)  # a read-only nested source
    before = oracle_subvolumes(mnt)
    snap = mnt / "snap"
    btrfs.snapshot(str(a), str(snap), read_only=read_only)
    after = oracle_subvolumes(mnt)
    assert {k: v for k, v in after.items() if not k.startswith("snap")} == before
    new = {rel: after[f"snap{rel}"] for rel in ("", "/b", "/b/c")}
    assert len(set(new.values())) == 3 and not set(new.values()) & set(before.values())
    for rel, subvol_id in new.items():
        path = Path(f"{snap}{rel}")
        assert btrfs.is_subvolume(str(path))
        assert btrfs.subvolume_id(str(path)) == subvol_id
        assert (path / "file").read_text() == (Path(f"{a}{rel}") / "file").read_text()
    assert btrfs.get_read_only(str(snap)) is read_only and oracle_read_only(snap) is read_only
    if read_only:
        assert all(oracle_read_only(Path(f"{snap}{rel}")) for rel in new)
    # The source is unchanged.
    assert not btrfs.get_read_only(str(a)) and not btrfs.get_read_only(str(a / "b"))
    assert btrfs.get_read_only(str(a / "b" / "c"))
    with pytest.raises(FileExistsError):
        btrfs.snapshot(str(a), str(snap))


def test_delete_recursive_read_only(btrfs_mount: Path):
    mnt = btrfs_mount
    a = make_tree(mnt)
    btrfs.create_subvolume(str(a / "d"))
    for sub in (a / "b" / "c", a / "b", a):
        btrfs.set_read_only(str(sub), True)
    keep = mnt / "keep"
    btrfs.create_subvolume(str(keep))
    btrfs.delete_subvolume(str(a))
    assert not a.exists()
    assert oracle_subvolumes(mnt) == {"keep": btrfs.subvolume_id(str(keep))}
    # Not a subvolume, or missing: refused, nothing removed.
    (keep / "dir").mkdir()
    with pytest.raises(OSError) as exc:
        btrfs.delete_subvolume(str(keep / "dir"))
    assert exc.value.errno == errno.EINVAL and (keep / "dir").is_dir()
    with pytest.raises(FileNotFoundError):
        btrfs.delete_subvolume(str(mnt / "missing"))
    with pytest.raises(OSError) as exc:
        btrfs.delete_subvolume(str(mnt))
    assert exc.value.errno == errno.EBUSY and (keep / "dir").is_dir()


def test_quota_enable_reports_no_stale_usage(btrfs_mount: Path):
    mnt = btrfs_mount
    sub = mnt / "sub"
    btrfs.create_subvolume(str(sub))
    # Many extents, so that the rescan after enabling takes a moment.
    for i in range(1000):
        (sub / f"f{i}").write_bytes(os.urandom(8192))
    os.sync()
    assert not btrfs.quota_enabled(str(mnt))
    assert btrfs.qgroup_of(str(sub)) == UNKNOWN
    btrfs.quota_enable(str(mnt))
    seen = []
    deadline = time.monotonic() + 10
    while (q := btrfs.qgroup_of(str(sub))).referenced == UINT64_MAX and time.monotonic() < deadline:
        seen.append(q)
    btrfs.quota_rescan_wait(str(mnt))
    final = btrfs.qgroup_of(str(sub))
    # While the rescan runs, usage is unknown; once it is known it is final.
    assert all(s == UNKNOWN for s in seen)
    assert q == final
    assert final.referenced > 1000 * 8192
    assert btrfs.quota_enabled(str(mnt))
    btrfs.quota_enable(str(mnt))  # idempotent
    assert btrfs.quota_enabled(str(mnt))
    assert oracle_qgroups(mnt)[btrfs.subvolume_id(str(sub))] == final


def test_qgroup_usage(btrfs_mount: Path):
    mnt = btrfs_mount
    sub = mnt / "sub"
    btrfs.create_subvolume(str(sub))
    btrfs.quota_enable(str(mnt))
    btrfs.quota_rescan_wait(str(mnt))
    write_random(sub / "data", 8 * MiB)
    write_random(mnt / "top", 2 * MiB)
    settle(mnt)
    q = btrfs.qgroup_of(str(sub))
    assert 8 * MiB <= q.referenced < 9 * MiB
    assert q.exclusive == q.referenced
    assert q.max_referenced == q.max_exclusive == UINT64_MAX
    groups = oracle_qgroups(mnt)
    assert groups[btrfs.subvolume_id(str(sub))] == q
    assert btrfs.qgroup_of(str(sub / "data")) == q
    # The top level (the mount point, qgroup 0/5) has its own.
    top = btrfs.qgroup_of(str(mnt))
    assert groups[5] == top
    assert 2 * MiB <= top.referenced < 3 * MiB


def test_limit_needs_quotas(btrfs_mount: Path):
    """Limits are never a way to turn quotas on (systemd's are)."""
    btrfs.create_subvolume(str(btrfs_mount / "a"))
    with pytest.raises(OSError) as exc:
        btrfs.set_limit(str(btrfs_mount / "a"), MiB)
    assert exc.value.errno == errno.ENOTCONN
    assert btrfs.quota_mode(str(btrfs_mount)) == "off"


def test_simple_quotas(btrfs_mount: Path):
    """Simple quotas (Linux 6.7): usage and limits of subvolumes made after."""
    mnt = btrfs_mount
    btrfs.quota_enable(str(mnt), simple=True)
    assert btrfs.quota_mode(str(mnt)) == "simple"
    a = mnt / "a"
    btrfs.create_subvolume(str(a))
    write_random(a / "data", 3 * MiB)
    settle(mnt)
    assert 3 * MiB <= btrfs.qgroup_of(str(a)).referenced < 4 * MiB
    btrfs.set_limit(str(a), 4 * MiB)
    assert btrfs.qgroup_of(str(a)).max_referenced == 4 * MiB
    with pytest.raises(OSError) as exc:
        write_random(a / "big", 8 * MiB)
    assert exc.value.errno == errno.EDQUOT


def test_limit(btrfs_mount: Path):
    mnt = btrfs_mount
    a = mnt / "a"
    btrfs.create_subvolume(str(a))
    btrfs.create_subvolume(str(a / "nested"))
    assert not btrfs.quota_enabled(str(mnt))
    btrfs.quota_enable(str(mnt))
    btrfs.quota_rescan_wait(str(mnt))
    assert btrfs.quota_mode(str(mnt)) == "full"
    btrfs.set_limit(str(a), 4 * MiB)
    btrfs.set_limit(str(a / "nested"), 6 * MiB)
    assert btrfs.quota_enabled(str(mnt))
    a_id = btrfs.subvolume_id(str(a))
    assert oracle_qgroups(mnt)[a_id].max_referenced == 4 * MiB
    q = btrfs.qgroup_of(str(a))
    assert q.max_referenced == 4 * MiB and q.max_exclusive == UINT64_MAX
    assert q.referenced < MiB
    with pytest.raises(OSError) as exc:
        write_random(a / "big", 8 * MiB)
    assert exc.value.errno == errno.EDQUOT
    (a / "big").unlink()
    # A snapshot inherits the limits, nested ones included.
    btrfs.snapshot(str(a), str(mnt / "snap"))
    groups = oracle_qgroups(mnt)
    assert btrfs.qgroup_of(str(mnt / "snap")).max_referenced == 4 * MiB
    assert groups[btrfs.subvolume_id(str(mnt / "snap"))].max_referenced == 4 * MiB
    assert groups[btrfs.subvolume_id(str(mnt / "snap" / "nested"))].max_referenced == 6 * MiB
    # UINT64_MAX lifts the limit.
    btrfs.set_limit(str(a), UINT64_MAX)
    assert oracle_qgroups(mnt)[a_id].max_referenced == UINT64_MAX
    assert btrfs.qgroup_of(str(a)).max_referenced == UINT64_MAX
    write_random(a / "big", 8 * MiB)
    settle(mnt)
    assert btrfs.qgroup_of(str(a)).referenced >= 8 * MiB
    assert btrfs.qgroup_of(str(mnt / "snap")).max_referenced == 4 * MiB


def test_limit_top_level(btrfs_mount: Path):
    """The pool is the mount point itself: qgroup 0/5."""
    mnt = btrfs_mount
    btrfs.quota_enable(str(mnt))
    btrfs.quota_rescan_wait(str(mnt))
    btrfs.set_limit(str(mnt), 16 * MiB)
    assert oracle_qgroups(mnt)[5].max_referenced == 16 * MiB
    assert btrfs.qgroup_of(str(mnt)).max_referenced == 16 * MiB
    with pytest.raises(OSError) as exc:
        write_random(mnt / "big", 32 * MiB)
    assert exc.value.errno == errno.EDQUOT
    (mnt / "big").unlink()
    btrfs.set_limit(str(mnt), UINT64_MAX)
    assert oracle_qgroups(mnt)[5].max_referenced == UINT64_MAX
    write_random(mnt / "big", 32 * MiB)


def test_delete_drops_qgroups(btrfs_mount: Path):
    mnt = btrfs_mount
    a = make_tree(mnt)
    btrfs.quota_enable(str(mnt))
    btrfs.quota_rescan_wait(str(mnt))
    write_random(a / "b" / "data", 2 * MiB)
    ids = {btrfs.subvolume_id(str(p)) for p in (a, a / "b", a / "b" / "c")}
    assert ids <= oracle_qgroups(mnt).keys()
    btrfs.delete_subvolume(str(a))
    assert not a.exists()
    # Older kernels destroy the qgroup at once, newer ones once the cleaner
    # dropped the subvolume: either way it goes away without anyone's help.
    deadline = time.monotonic() + 10
    while ids & oracle_qgroups(mnt).keys() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ids & oracle_qgroups(mnt).keys()
    assert 5 in oracle_qgroups(mnt)
