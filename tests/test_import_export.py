"""importd's local transfers through real machinectl 252: import-tar,
import-raw, import-fs, export-tar, export-raw, list-transfers and
cancel-transfer, on btrfs and plain pools."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imagepool import btrfs, fsutil
from imagepool import dev as world
from importd.local import sync_default
from tests import newer
from tests.conftest import Daemons, Pool, machinectl
from tests.imagetree import describe_tree, make_os_tree, make_rich_tree

COMPRESSORS = {
    "": None,
    ".xz": ["xz", "-T2", "-c"],
    ".gz": ["gzip", "-c"],
    ".bz2": ["bzip2", "-c"],
    ".zst": ["zstd", "-q", "-c"],
}


def mc(*args: str, input: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    r = machinectl(*args, input=input)
    if ok:
        assert r.returncode == 0, f"machinectl {' '.join(args)}:\n{r.stdout}{r.stderr}"
    return r


def compress(src: Path, suffix: str) -> Path:
    if not suffix:
        return src
    dst = src.with_name(src.name + suffix)
    with open(dst, "wb") as out:
        subprocess.run([*COMPRESSORS[suffix], str(src)], stdout=out, check=True)
    return dst


def make_tar(tree: Path, dest: Path) -> Path:
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse",
                    "-C", str(tree), "-cf", str(dest), "."], check=True)
    return dest


def leftovers(pool: Pool) -> list[str]:
    return [p for p in os.listdir(pool.path) if p.startswith(".#")]


def image_names(pool: Pool) -> set[str]:
    return {p for p in os.listdir(pool.path) if not p.startswith(".")}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_import_tar_every_compression(pool: Pool, services: Daemons, tmp_path: Path, suffix: str) -> None:
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    make_os_tree(tree)
    archive = compress(make_tar(tree, tmp_path / "image.tar"), suffix)
    r = mc("import-tar", str(archive), "img")
    assert f"Importing '{archive}', saving as 'img'." in r.stderr
    assert "Operation completed successfully." in r.stderr
    assert describe_tree(pool / "img", trusted=False) == describe_tree(tree, trusted=False)
    assert btrfs.is_subvolume(str(pool / "img")) == pool.btrfs
    assert leftovers(pool) == []
    # machinectl derives the name from the file name when none is given
    # (252 doesn't know the .zst suffix, so it keeps it).
    mc("import-tar", str(archive))
    assert ("image.tar.zst" if suffix == ".zst" else "image") in image_names(pool)


def test_import_tar_read_only_force_and_errors(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    archive = make_tar(tree, tmp_path / "t.tar")
    mc("import-tar", "--read-only", str(archive), "ro")
    if pool.btrfs:
        assert btrfs.get_read_only(str(pool / "ro"))
    else:
        assert fsutil.get_immutable(str(pool / "ro"))
    r = mc("import-tar", str(archive), "ro", ok=False)
    assert r.returncode == 1 and "Image 'ro' already exists." in r.stderr
    (tree / "new-file").write_text("new\n")
    make_tar(tree, archive)
    mc("import-tar", "--force", str(archive), "ro")
    assert (pool / "ro/new-file").read_text() == "new\n"
    r = mc("import-tar", str(archive), "../bad", ok=False)
    assert r.returncode == 1 and "Local name ../bad is not a suitable machine name." in r.stderr
    r = mc("import-tar", str(tmp_path / "missing.tar"), "x", ok=False)
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    assert image_names(pool) == {"ro"} and leftovers(pool) == []


def test_round_trip_keeps_everything(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "rich"
    make_rich_tree(tree)
    mc("import-fs", str(tree), "rich")
    assert describe_tree(pool / "rich") == describe_tree(tree)
    expected = describe_tree(tree, trusted=False)
    # machinectl 252 refuses --format=zstd; zstd exports are tested over D-Bus.
    for fmt, suffix in (("uncompressed", ".tar"), ("xz", ".tar.xz"), ("gzip", ".tar.gz"), ("bzip2", ".tar.bz2")):
        out = tmp_path / f"export{suffix}"
        r = mc("export-tar", f"--format={fmt}", "rich", str(out))
        assert f"with compression '{fmt}'" in r.stderr
        name = "back-" + fmt
        mc("import-tar", str(out), name)
        assert describe_tree(pool / name, trusted=False) == expected, fmt
    # Without --format the suffix chooses the compression.
    mc("export-tar", "rich", str(tmp_path / "auto.tar.xz"))
    assert (tmp_path / "auto.tar.xz").read_bytes()[:6] == b"\xfd7zXZ\x00"
    acl = subprocess.run(["getfacl", "-p", str(pool / "back-gzip/acl")], capture_output=True, text=True).stdout
    assert "user:4321:r--" in acl
    assert leftovers(pool) == []


def make_raw(path: Path) -> bytes:
    """A 64 MiB disk image: data, holes, a zero run, a tail."""
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.write(os.urandom(3 << 20))
        f.seek(20 << 20)
        f.write(bytes(4 << 20))
        f.seek((64 << 20) - 4096)
        f.write(b"\x5a" * 4096)
    return hashlib.sha256(path.read_bytes()).digest()


@pytest.mark.parametrize("suffix", list(COMPRESSORS) + [".qcow2"])
def test_import_raw(pool: Pool, services: Daemons, tmp_path: Path, suffix: str) -> None:
    raw = tmp_path / "disk.raw"
    digest = make_raw(raw)
    if suffix == ".qcow2":
        src = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(src)], check=True)
        oracle = tmp_path / "oracle.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(oracle)], check=True)
        digest = hashlib.sha256(oracle.read_bytes()).digest()
    else:
        src = compress(raw, suffix)
    r = mc("import-raw", str(src), "disk")
    assert "Wrote 64M." in r.stderr
    st = os.stat(pool / "disk.raw")
    assert st.st_size == 64 << 20
    assert hashlib.sha256((pool / "disk.raw").read_bytes()).digest() == digest
    assert st.st_blocks * 512 < 12 << 20, "not sparse"
    assert leftovers(pool) == []


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_export_to_a_pipe_ends(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    """``machinectl export-raw NAME - | ...``: the reader sees the end once the
    export is done (importd holds no copy of the output descriptor)."""
    digest = make_raw(pool / "disk.raw")
    r = subprocess.run(["machinectl", "--no-pager", "export-raw", "--format=uncompressed", "disk", "-"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).digest() == digest
    importd = services.running["importd"][0].proc
    assert importd is not None
    fds = [os.readlink(f"/proc/{importd.pid}/fd/{n}") for n in os.listdir(f"/proc/{importd.pid}/fd")]
    assert not [fd for fd in fds if fd.startswith("pipe:")], fds


def test_import_raw_read_only_and_export(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    digest = make_raw(raw)
    mc("import-raw", "--read-only", str(raw), "disk")
    assert os.stat(pool / "disk.raw").st_mode & 0o222 == 0
    for fmt, suffix in (("uncompressed", ""), ("xz", ".xz"), ("gzip", ".gz"), ("bzip2", ".bz2")):
        out = tmp_path / f"out.raw{suffix}"
        mc("export-raw", "disk", str(out))
        plain = tmp_path / f"check{suffix}.raw"
        if suffix:
            with open(plain, "wb") as f:
                subprocess.run([COMPRESSORS[suffix][0], "-dc", str(out)], stdout=f, check=True)
        else:
            plain = out
        assert hashlib.sha256(plain.read_bytes()).digest() == digest, fmt
    r = mc("export-tar", "disk", str(tmp_path / "x.tar"), ok=False)
    assert r.returncode == 1 and "Failed to export image: Not a directory" in r.stderr
    (pool / "dir").mkdir()
    r = mc("export-raw", "dir", str(tmp_path / "x.raw"), ok=False)
    assert r.returncode == 1 and "Failed to export image: Is a directory" in r.stderr
    r = mc("export-raw", "nosuch", str(tmp_path / "y.raw"), ok=False)
    assert r.returncode == 1 and "Machine image nosuch not found." in r.stderr


def hostile_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as tar:
        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add(tarfile.TarInfo("innocent"), b"fine\n")
        if kind == "dotdot":
            add(tarfile.TarInfo("../../../../../../../tmp/escape-dotdot"), b"evil\n")
        elif kind == "symlink":
            link = tarfile.TarInfo("etc")
            link.type, link.linkname = tarfile.SYMTYPE, "/tmp"
            add(link)
            add(tarfile.TarInfo("etc/escape-symlink"), b"evil\n")


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_hostile_tarball_fails_cleanly(pool: Pool, services: Daemons, tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "evil.tar"
    hostile_tar(archive, kind)
    r = mc("import-tar", str(archive), "evil", ok=False)
    assert r.returncode == 1
    assert not Path(f"/tmp/escape-{kind}").exists()
    assert "evil" not in image_names(pool) and leftovers(pool) == []


def test_list_and_cancel_transfer(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    """A transfer fed from a pipe that stays open keeps running; it shows in
    list-transfers, and cancel-transfer ends it and removes its traces."""
    tree = tmp_path / "tree"
    make_os_tree(tree)
    data = make_tar(tree, tmp_path / "t.tar").read_bytes()
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(["machinectl", "--no-pager", "import-tar", "-", "stuck"], stdin=read_end,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(read_end)
    try:
        os.write(write_end, data[:4096])
        world.wait_for(lambda: "stuck" in mc("list-transfers").stdout, 10, "the transfer to show")
        listing = mc("list-transfers").stdout
        row = next(line for line in listing.splitlines() if "stuck" in line)
        transfer_id = row.split()[0]
        assert "import-tar" in row
        # A second transfer to the same name is refused while this one runs.
        r = mc("import-tar", str(tmp_path / "t.tar"), "stuck", ok=False)
        assert r.returncode == 1 and "Transfer for stuck already in progress." in r.stderr
        started = time.monotonic()
        mc("cancel-transfer", transfer_id)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        os.close(write_end)
        proc.wait(timeout=10)
    assert proc.returncode != 0
    world.wait_for(lambda: "No transfers." in mc("list-transfers").stderr + mc("list-transfers").stdout, 10,
                   "the transfer list to empty")
    assert "stuck" not in image_names(pool) and leftovers(pool) == []
    r = mc("cancel-transfer", "99", ok=False)
    assert "Could not cancel transfer: No transfer by id 99" in r.stderr


def test_import_from_pipe(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    archive = compress(make_tar(tree, tmp_path / "t.tar"), ".zst")
    with open(archive, "rb") as f:
        r = subprocess.run(["machinectl", "--no-pager", "import-tar", "-", "piped"], stdin=f,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (pool / "piped/etc/os-release").exists()


def strip_progress(text: str) -> str:
    text = re.sub(r"(?m)^(Imported|Exported) \d+%\.\n", "", text)
    return text


IMPORT_SCENARIO = [
    ["import-tar", "{t}/t.tar"],
    ["import-tar", "{t}/t.tar"],
    ["import-tar", "--force", "{t}/t.tar.xz", "t"],
    ["import-tar", "{t}/t.tar.gz", "tgz"],
    ["import-tar", "--read-only", "{t}/t.tar.bz2", "ro1"],
    ["import-tar", "{t}/t.tar", "../bad"],
    ["import-raw", "{t}/r.raw"],
    ["import-raw", "{t}/r.raw.xz", "rx"],
    ["import-raw", "--read-only", "{t}/r.raw.gz", "rgz"],
    ["import-fs", "{t}/tree", "fs1"],
    ["import-fs", "{t}/tree", "fs1"],
    ["export-tar", "t", "{t}/out.tar.gz"],
    ["export-tar", "r", "{t}/out2.tar"],
    ["export-raw", "r", "{t}/out.raw.xz"],
    ["export-raw", "t", "{t}/out3.raw"],
    ["export-tar", "nosuch", "{t}/o.tar"],
    ["list-transfers"],
    ["cancel-transfer", "99"],
]


def test_machinectl_matches_reference_importd(pool: Pool, daemons: Daemons, tmp_path: Path) -> None:
    """The same session against systemd-importd 252 and against ours."""
    src = tmp_path / "src"
    tree = src / "tree"
    make_os_tree(tree)
    make_tar(tree, src / "t.tar")
    for suffix in (".xz", ".gz", ".bz2"):
        compress(src / "t.tar", suffix)
    make_raw(src / "r.raw")
    compress(src / "r.raw", ".xz")
    compress(src / "r.raw", ".gz")

    def session(ours: bool) -> tuple[list[str], set[str]]:
        daemons.start("importd", ours)
        outputs = []
        for verb in IMPORT_SCENARIO:
            args = [a.format(t=src) for a in verb]
            r = machinectl(*args)
            outputs.append(f"$ machinectl {' '.join(verb)}\n{strip_progress(r.stdout + r.stderr)}rc={r.returncode}\n")
        daemons.stop("importd")
        names = {p for p in os.listdir(pool.path) if not p.startswith(".#")}
        pool.wipe()
        for p in src.glob("out*"):
            p.unlink()
        for p in src.glob("o.tar"):
            p.unlink()
        return outputs, names

    reference, ref_names = session(False)
    ours, our_names = session(True)
    mismatches = [f"--- reference (as 262 would say it)\n{r}--- ours\n{o}" for o, r in
                  zip(ours, [newer.transfer_output(r, ours=False) for r in reference], strict=True) if o != r]
    assert not mismatches, "\n".join(mismatches)
    assert our_names == ref_names
    assert "t" in our_names and "fs1" in our_names


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
@pytest.mark.parametrize("kind", ["raw", "tar"])
def test_decompression_bomb_stops_at_free_space(pool: Pool, services: Daemons, tmp_path: Path, kind: str) -> None:
    """3 GiB of zeros, compressed to almost nothing, into a 2 GiB pool."""
    bomb = tmp_path / f"bomb.{kind}.zst"
    if kind == "raw":
        cmd = f"head -c 3G /dev/zero | zstd -q -1 -T2 > {bomb}"
    else:
        zeros = tmp_path / "zeros"
        subprocess.run(["truncate", "-s", "3G", str(zeros)], check=True)
        cmd = f"tar -C {tmp_path} -c zeros | zstd -q -1 -T2 > {bomb}"
    subprocess.run(cmd, shell=True, check=True)
    assert bomb.stat().st_size < 10 << 20
    r = mc(f"import-{kind}", str(bomb), "bomb", ok=False)
    assert r.returncode == 1
    assert "bomb" not in image_names(pool) and leftovers(pool) == []
    # btrfs frees a deleted subvolume's space in the background, and counts
    # it free only after a later transaction commit.
    subprocess.run(["btrfs", "subvolume", "sync", str(pool.path)], check=True, capture_output=True)

    def space_back() -> bool:
        subprocess.run(["btrfs", "filesystem", "sync", str(pool.path)], check=True, capture_output=True)
        free = os.statvfs(pool.path)
        return free.f_bavail * free.f_frsize > 1 << 30

    world.wait_for(space_back, 30, "the pool's space to come back", 0.5)


@pytest.mark.root
def test_size_cap_is_configurable(tmp_path: Path) -> None:
    from imagepool.image import Pool as ImagePool
    from importd import local
    from importd.context import JobContext, TransferError

    src = tmp_path / "zeros.raw.zst"
    subprocess.run(f"head -c 64M /dev/zero | zstd -q -c > {src}", shell=True, check=True)
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    with open(src, "rb") as f, pytest.raises(TransferError, match="size limit"):
        local.import_raw(JobContext(), f.fileno(), ImagePool(str(pool_dir), []), "b", False, False,
                         max_size=16 << 20)
    assert os.listdir(pool_dir) == []


@pytest.mark.root
@pytest.mark.parametrize("sync", [True, False])
def test_import_syncs_before_install(tmp_path: Path, sync: bool) -> None:
    """As systemd-import's --sync=yes (the default): the image's file system
    is synced (syncfs) before the image gets its final name; not with
    --no-sync.  Seen with strace on a real import."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(1 << 20))
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    script = (
        "import sys\n"
        "from imagepool.image import Pool\n"
        "from importd import local\n"
        "from importd.context import JobContext\n"
        f"with open({str(src)!r}, 'rb') as f:\n"
        f"    local.import_raw(JobContext(), f.fileno(), Pool({str(pool_dir)!r}, []), 'disk', False, False,"
        f" sync={sync})\n"
    )
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=syncfs,rename,renameat2", "-o", str(trace),
                        sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=world.SOURCES)
    assert r.returncode == 0, r.stderr
    assert (pool_dir / "disk.raw").read_bytes() == src.read_bytes()
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if "(" in line]
    syncs = [i for i, c in enumerate(calls) if c.startswith("syncfs(")]
    installs = [i for i, c in enumerate(calls) if c.startswith("rename") and "disk.raw\"" in c]
    assert installs, calls
    if sync:
        assert syncs and syncs[0] < installs[-1], calls
    else:
        assert not syncs, calls


def test_sync_default_follows_systemd_import_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("", True), ("1", True), ("yes", True), ("0", False), ("no", False), ("off", False)):
        monkeypatch.setenv("SYSTEMD_IMPORT_SYNC", value)
        assert sync_default() is expected

