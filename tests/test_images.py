"""Image verbs through real machinectl 252 against our machined: what ends up
on disk, on btrfs and on a plain-directory pool."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imagepool import btrfs, fsutil, ops
from imagepool import dev as world
from tests.conftest import Daemons, Pool, busctl, machinectl
from tests.imagetree import describe_tree, make_os_tree, make_rich_tree, populate

pytestmark = pytest.mark.usefixtures("machined")


def ok(*args: str) -> str:
    """stdout and stderr of a machinectl that must succeed."""
    r = machinectl(*args)
    assert r.returncode == 0, f"machinectl {' '.join(args)}: {r.stderr}"
    return r.stdout + r.stderr


def fails(*args: str, user: str | None = None) -> str:
    r = machinectl(*args, user=user)
    assert r.returncode == 1, f"machinectl {' '.join(args)} should fail: {r.stdout}{r.stderr}"
    return r.stderr.strip()


def no_temp_files(pool: Pool) -> bool:
    return not [p for p in os.listdir(pool.path) if p.startswith(".#")]


def test_list_images_types(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    os.symlink(str(pool / "dir1"), str(pool / "linked"))
    out = ok("list-images", "--no-legend")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert rows == {
        "sv1": "subvolume" if pool.btrfs else "directory",
        "dir1": "directory",
        "linked": "directory",
        "raw1": "raw",
    }
    assert ".hidden1" in ok("list-images", "--all")


def test_clone_keeps_everything(pool: Pool) -> None:
    make_rich_tree(pool / "rich")
    before = describe_tree(pool / "rich")
    ok("clone", "rich", "copy")
    assert describe_tree(pool / "copy") == before
    acl = subprocess.run(["getfacl", "-p", str(pool / "copy/acl")], capture_output=True, text=True).stdout
    assert "user:4321:r--" in acl
    # A sparse file stays sparse (reflinked or copied sparse).
    assert os.stat(pool / "copy/sparse").st_blocks * 512 < 1024 * 1024
    if pool.btrfs:
        # A plain directory cloned on btrfs becomes a subvolume.
        assert btrfs.is_subvolume(str(pool / "copy"))
    assert no_temp_files(pool)


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_clone_btrfs_snapshot_nested(pool: Pool) -> None:
    subprocess.run(["btrfs", "subvolume", "create", str(pool / "outer")], check=True, stdout=subprocess.DEVNULL)
    make_os_tree(pool / "outer")
    subprocess.run(["btrfs", "subvolume", "create", str(pool / "outer/inner")], check=True,
                   stdout=subprocess.DEVNULL)
    (pool / "outer/inner/file").write_text("inner\n")
    ok("clone", "--read-only", "outer", "snap")
    assert btrfs.is_subvolume(str(pool / "snap"))
    assert btrfs.is_subvolume(str(pool / "snap/inner"))
    assert (pool / "snap/inner/file").read_text() == "inner\n"
    assert btrfs.get_read_only(str(pool / "snap"))
    assert "yes" in ok("show-image", "-p", "ReadOnly", "--value", "snap").replace("ReadOnly=", "")
    # Removing it takes the nested, read-only subvolumes too.
    ok("remove", "snap")
    assert not (pool / "snap").exists()
    ok("remove", "outer")
    assert os.listdir(pool.path) == []


def test_clone_raw_is_sparse_and_read_only(pool: Pool) -> None:
    with open(pool / "disk.raw", "wb") as f:
        f.seek(64 * 1024 * 1024)
        f.write(b"tail")
    ok("clone", "--read-only", "disk", "disk2")
    st = os.stat(pool / "disk2.raw")
    assert st.st_size == 64 * 1024 * 1024 + 4
    assert st.st_blocks * 512 < 1024 * 1024
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert (pool / "disk2.raw").read_bytes()[-4:] == b"tail"


def test_settings_follow_image(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    (Path("/etc/systemd/nspawn") / "sv1.nspawn").write_text("[Exec]\nBoot=yes\n")
    (pool / "sv1.roothash").write_text("abc\n")
    ok("clone", "sv1", "sv2")
    assert (pool / "sv2.nspawn").read_text() == "[Exec]\nBoot=no\n"
    ok("rename", "sv2", "sv3")
    assert not (pool / "sv2.nspawn").exists() and (pool / "sv3.nspawn").exists()
    ok("rename", "sv1", "main")
    assert (Path("/etc/systemd/nspawn") / "main.nspawn").exists()
    assert (pool / "main.nspawn").exists() and (pool / "main.roothash").exists()
    ok("remove", "main")
    assert not (Path("/etc/systemd/nspawn") / "main.nspawn").exists()
    assert not (pool / "main.nspawn").exists() and not (pool / "main.roothash").exists()


def test_read_only_on_disk(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    ok("read-only", "dir1")
    assert fsutil.get_immutable(str(pool / "dir1"))
    ok("read-only", "raw1")
    assert os.stat(pool / "raw1.raw").st_mode & 0o222 == 0
    ok("read-only", "sv1")
    if pool.btrfs:
        assert btrfs.get_read_only(str(pool / "sv1"))
    else:
        assert fsutil.get_immutable(str(pool / "sv1"))
    rows = {line.split()[0]: line.split()[2] for line in ok("list-images", "--no-legend").splitlines()}
    assert rows == {"sv1": "yes", "dir1": "yes", "raw1": "yes"}
    # A read-only directory can still be renamed and removed.
    ok("rename", "dir1", "dir2")
    assert fsutil.get_immutable(str(pool / "dir2"))
    ok("remove", "dir2")
    assert not (pool / "dir2").exists()
    for name in ("raw1", "sv1"):
        ok("read-only", name, "false")
    assert os.stat(pool / "raw1.raw").st_mode & 0o200
    assert all(v == "no" for v in
               (line.split()[2] for line in ok("list-images", "--no-legend").splitlines()))


def test_remove_directory_with_immutable_files(pool: Pool) -> None:
    (pool / "img/sub").mkdir(parents=True)
    (pool / "img/sub/file").write_text("x")
    fsutil.set_immutable(str(pool / "img/sub/file"), True)
    fsutil.set_immutable(str(pool / "img"), True)
    ok("remove", "img")
    assert not (pool / "img").exists()


def test_errors(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    assert fails("remove", "nosuch") == "Could not remove image: No image 'nosuch' known"
    assert fails("clone", "sv1", "../evil") == "Could not clone image: Image name '../evil' is invalid."
    assert fails("clone", "sv1", "dir1") == "Could not clone image: File exists"
    assert fails("rename", "sv1", "raw1") == "Could not rename image: Failed to rename image: File exists"  # as 262
    assert not (pool.path.parent / "evil").exists()
    assert no_temp_files(pool)
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "CleanPool", "s", "bogus")
    assert r.returncode != 0 and "Unknown mode 'bogus'." in r.stderr
    # GetImage treats an invalid name as unknown; the verbs refuse it.
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "GetImage", "s", "a/b")
    assert "No image 'a/b' known" in r.stderr
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "RemoveImage", "s", "a/b")
    assert "Image name 'a/b' is invalid." in r.stderr


def test_non_root_refused(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    os.chmod(pool.path, 0o755)
    for verb in (["remove", "dir1"], ["rename", "dir1", "x"], ["clone", "dir1", "x"],
                 ["read-only", "dir1"], ["set-limit", "1G"], ["clean", "--all"]):
        err = fails(*verb, user="nobody")
        assert "Access denied" in err, err
    assert (pool / "dir1").is_dir() and not (pool / "x").exists()
    # Reading is open to everybody.
    r = machinectl("list-images", user="nobody")
    assert r.returncode == 0 and "dir1" in r.stdout


def test_image_metadata(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    out = ok("image-status", "sv1")
    assert "Hostname: myhost" in out
    assert "Machine ID: 0123456789abcdef0123456789abcdef" in out
    assert "OS: Debian GNU/Linux 12 (bookworm)" in out
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "GetImageMachineInfo", "s", "dir1")
    assert 'DEPLOYMENT' in r.stdout and '"testing"' in r.stdout


def test_object_paths_and_introspection(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    (pool / "my-vm").mkdir()
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "GetImage", "s", "my-vm")
    assert r.stdout.strip() == 'o "/org/freedesktop/machine1/image/my_2dvm"'
    # Introspection follows the pool without anybody listing it.
    wanted = {"/org/freedesktop/machine1/image/my_2dvm", "/org/freedesktop/machine1/image/sv1",
              "/org/freedesktop/machine1/image/_2ehost"}
    world.wait_for(lambda: wanted <= set(busctl("tree", "--list", "org.freedesktop.machine1").stdout.split()),
                   5, "image objects")
    shutil.rmtree(pool / "dir1")
    world.wait_for(lambda: "/org/freedesktop/machine1/image/dir1" not in
                   busctl("tree", "--list", "org.freedesktop.machine1").stdout.split(), 5, "dir1 to go")
    r = busctl("get-property", "org.freedesktop.machine1", "/org/freedesktop/machine1/image/raw1",
               "org.freedesktop.machine1.Image", "Limit")
    assert r.stdout.strip() == "t 10485760"


def test_quota(pool: Pool, daemons: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    if not pool.btrfs:
        assert fails("set-limit", "sv1", "1G") == "Could not set limit: Operation not supported"
        assert "Could not set limit" in fails("set-limit", "1G")
        return
    # Quotas are never turned on behind the admin's back (systemd does: full
    # qgroups, for the whole file system) ...
    assert fails("set-limit", "sv1", "100M") == f"Could not set limit: {ops.QUOTAS_OFF}"
    assert fails("set-limit", "1G") == f"Could not set limit: {ops.QUOTAS_OFF}"
    assert btrfs.quota_mode(str(pool.path)) == "off"
    # ... but simple quotas are, when the service is told so.
    daemons.start("machined", extra=("--quota=simple",))
    assert btrfs.quota_mode(str(pool.path)) == "simple"
    (pool / "sv1/filler").write_bytes(os.urandom(1 << 20))
    ok("set-limit", "sv1", "100M")
    assert "Limit: 100.0M" in ok("image-status", "sv1")
    assert ok("show-image", "-p", "Limit", "sv1").strip() == "Limit=104857600"
    with pytest.raises(OSError):
        with open(pool / "sv1/big", "wb") as f:
            for _ in range(200):
                f.write(os.urandom(1024 * 1024))
            f.flush()
            os.fsync(f.fileno())
    # Our client says which limit was hit (and knows the usage now).
    os.sync()
    status = subprocess.run([sys.executable, "-m", "machinedpy_cli", "image-status", "sv1"], capture_output=True,
                            text=True, timeout=60, cwd=world.SOURCES).stdout
    assert "\t   Limit: 100M (reached its limit)" in status.splitlines(), status
    assert "Usage: unknown" not in status
    os.unlink(pool / "sv1/big")
    ok("set-limit", "sv1", "none")
    assert ok("show-image", "-p", "Limit", "sv1").strip() == "Limit=infinity"
    ok("set-limit", "1G")
    assert ok("show-image", "-p", "PoolLimit").strip() == "PoolLimit=1073741824"
    usage = int(ok("show-image", "-p", "PoolUsage", "--value").strip())
    assert 0 < usage < 1 << 30


def test_clean(pool: Pool) -> None:
    populate(pool.path, pool.btrfs)
    out = ok("clean")
    assert "Removed image '.hidden1'" in out
    assert not (pool / ".hidden1").exists() and (pool / "dir1").exists()
    out = ok("clean", "--all")
    assert "Removed 3 images in total." in out
    assert sorted(os.listdir(pool.path)) == ["not-an-image.txt"]


def attached_loops() -> set[str]:
    """The loop devices that are attached, by name."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return {line.split(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_raw_image_metadata_through_machinectl(pool: Pool, tmp_path: Path) -> None:
    """A bare file system image: metadata read through a read-only loop mount."""
    tree = tmp_path / "tree"
    make_os_tree(tree, "rawhost")
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(pool / "fs.raw"), "32M"], check=True)
    out = ok("image-status", "fs")
    assert "Hostname: rawhost" in out and "OS: Debian GNU/Linux 12 (bookworm)" in out
    assert "Machine ID: 0123456789abcdef0123456789abcdef" in out
    # Not an image we can read: a clear error, no crash, nothing left mounted.
    (pool / "junk.raw").write_bytes(os.urandom(1 << 20))
    mounts = subprocess.run(["findmnt", "-rn"], capture_output=True, text=True).stdout
    loops = attached_loops()
    r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "GetImageOSRelease", "s", "junk")
    assert r.returncode != 0 and "junk" in r.stderr
    assert subprocess.run(["findmnt", "-rn"], capture_output=True, text=True).stdout == mounts
    # The kernel lets go of an auto-clearing loop device once nobody holds it
    # (udev's probe of a new device may hold it a moment).
    world.wait_for(lambda: attached_loops() <= loops, 15, "loop devices to be detached")


def test_block_device_image(pool: Pool, tmp_path: Path) -> None:
    backing = tmp_path / "blk.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        st = os.stat(dev)
        os.mknod(pool / "blk", stat.S_IFBLK | 0o600, st.st_rdev)
        out = ok("list-images", "--no-legend")
        row = next(line.split() for line in out.splitlines() if line.startswith("blk "))
        assert row[1] == "block" and row[2] == "no" and row[3] == "8.0M"
        ok("read-only", "blk")
        assert fsutil.block_device_read_only(dev)
        ok("read-only", "blk", "false")
        assert not fsutil.block_device_read_only(dev)
        assert fails("clone", "blk", "blk2") == "Could not clone image: Operation not supported"
        ok("remove", "blk")
        assert not (pool / "blk").exists() and os.path.exists(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_bus_stays_responsive_during_long_work(pool: Pool) -> None:
    """A clone that takes a while runs in a worker: other calls are answered
    while it is still going."""
    src = pool / "big"
    src.mkdir()
    for i in range(200):
        d = src / f"d{i}"
        d.mkdir()
        for j in range(100):
            (d / f"f{j}").write_bytes(b"x" * 512)
    clone = subprocess.Popen(["machinectl", "clone", "big", "big2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    answered_while_running = 0
    try:
        while clone.poll() is None:
            r = busctl("call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                       "org.freedesktop.machine1.Manager", "GetImage", "s", "big")
            assert r.returncode == 0
            if clone.poll() is None:
                answered_while_running += 1
    finally:
        clone.wait()
    assert clone.returncode == 0, clone.stderr.read()
    assert answered_while_running > 0
    assert len(list((pool / "big2").rglob("f*"))) == 20000


def test_daemon_logging_and_readiness(pool: Pool, daemons) -> None:
    # The fixture waited for READY=1 on NOTIFY_SOCKET; the log uses syslog
    # priority prefixes; SIGTERM ends it with status 0 (checked on stop).
    daemons.stop("machined")
    lines = daemons.log_of("machined").read_text().splitlines()
    assert lines and all(line.startswith("<") and line[2] == ">" for line in lines)
    assert "<6>machined ready, pool /var/lib/machines" in lines


def test_importd_claims_its_name(importd) -> None:
    assert world.name_has_owner(dict(os.environ), "org.freedesktop.import1")
