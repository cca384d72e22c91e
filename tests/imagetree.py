"""Images for tests, made with real tools, and output normalization."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

OS_RELEASE = 'ID=debian\nVERSION_ID=12\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
MACHINE_ID = "0123456789abcdef0123456789abcdef"


def make_os_tree(root: Path, hostname: str = "myhost") -> None:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "etc/hostname").write_text(hostname + "\n")
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")
    (root / "etc/machine-info").write_text('PRETTY_HOSTNAME="My Host"\nDEPLOYMENT=testing\n')


def make_subvolume_or_dir(path: Path, btrfs: bool) -> None:
    if btrfs:
        subprocess.run(["btrfs", "subvolume", "create", str(path)], check=True, stdout=subprocess.DEVNULL)
    else:
        path.mkdir()


def populate(pool_path: Path, btrfs: bool, raw_data: bool = False) -> None:
    """The standard test pool: a subvolume (a directory off btrfs) with an OS
    tree and settings, a plain directory, a raw file (sparse unless RAW_DATA),
    a hidden image."""
    make_subvolume_or_dir(pool_path / "sv1", btrfs)
    make_os_tree(pool_path / "sv1")
    (pool_path / "sv1.nspawn").write_text("[Exec]\nBoot=no\n")
    (pool_path / "dir1").mkdir()
    make_os_tree(pool_path / "dir1", "dirhost")
    with open(pool_path / "raw1.raw", "wb") as f:
        if raw_data:
            f.write(bytes(range(256)) * 4096 * 10)
        else:
            f.truncate(10 * 1024 * 1024)
    (pool_path / ".hidden1").mkdir()
    (pool_path / "not-an-image.txt").write_text("ignored\n")


def make_rich_tree(root: Path) -> None:
    """Everything a faithful copy must keep: owners, setuid, xattrs, ACLs,
    hardlinks, symlinks, device nodes, a fifo, a sparse file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "usr/bin").mkdir(parents=True)
    suid = root / "usr/bin/suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    owned = root / "owned"
    owned.write_text("owned\n")
    os.chown(owned, 1234, 5678)
    xfile = root / "xattr"
    xfile.write_text("x\n")
    os.setxattr(xfile, "user.test", b"value")
    os.setxattr(xfile, "trusted.test", b"trusted-value")
    acl = root / "acl"
    acl.write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:4321:r", str(acl)], check=True)
    (root / "hard1").write_text("hard\n")
    os.link(root / "hard1", root / "hard2")
    os.symlink("usr/bin/suid", root / "link-rel")
    os.symlink("/etc/os-release", root / "link-abs")
    os.mknod(root / "null", 0o20666, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.seek(50 * 1024 * 1024)
        f.write(b"end")


def describe_tree(root: Path, trusted: bool = True) -> dict[str, tuple]:
    """What a copy must preserve, per path (except inode numbers).  Tar
    runs without CAP_SYS_ADMIN (as in systemd), so trusted.* xattrs don't
    survive a tarball: TRUSTED=False leaves them out."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            link = os.readlink(p) if os.path.islink(p) else None
            xattrs = {}
            if not os.path.islink(p):
                for attr in sorted(os.listxattr(p, follow_symlinks=False)):
                    if trusted or not attr.startswith("trusted."):
                        xattrs[attr] = os.getxattr(p, attr, follow_symlinks=False)
            hard = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 and not os.path.isdir(p) else None
            size = 0 if os.path.isdir(p) and not link else st.st_size  # directory sizes are fs-specific
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, size, link,
                        tuple(xattrs.items()), hard, int(st.st_mtime))
    return out


_TIME = re.compile(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+")
_AGO = re.compile(r"; [\w. ]+ ago")


def normalize(text: str) -> str:
    """Drop what differs from run to run: absolute and relative times, and
    the order in which "clean" reports images (systemd's is hash order)."""
    lines = _AGO.sub("; AGO", _TIME.sub("TIME", text)).splitlines()
    removed = sorted(line for line in lines if line.startswith("Removed image '"))
    it = iter(removed)
    return "\n".join(next(it) if line.startswith("Removed image '") else line for line in lines)
