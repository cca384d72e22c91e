"""importd.tar and importd.ostree: unpacking through a confined GNU tar child, packing, and
import_mangle_os_tree().  Hostile tarballs are made here with Python's
tarfile module (for *making* them only; unpacking is always GNU tar's)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import signal
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest

from importd import tar as tarball
from importd.context import Canceled, JobContext, TransferError
from importd.ostree import mangle_os_tree
from importd.tar import CHUNK, TarUnpacker, pack_tar
from tests.imagetree import OS_RELEASE, describe_tree, make_rich_tree

# -- helpers ---------------------------------------------------------------


def _children() -> set[tuple[int, str]]:
    """(pid, state) of every child of this process, zombies included."""
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add((int(entry), fields[0]))
    return out


def _new_children(before: set[tuple[int, str]]) -> set[tuple[int, str]]:
    pids = {pid for pid, _ in before}
    return {c for c in _children() if c[0] not in pids}


@pytest.fixture(autouse=True)
def no_leftover_children():
    before = _children()
    yield
    assert not _new_children(before), "tar child left behind (running or zombie)"
    assert not [t for t in threading.enumerate() if t.name == "tar-stderr"], "stderr pump still running"


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ctx = JobContext(log=self.lines.append)

    def __contains__(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def unpack(data: bytes, dest: Path, log: Log | None = None, chunk: int = 65536) -> Log:
    log = log or Log()
    with TarUnpacker(str(dest), log.ctx) as u:
        for i in range(0, len(data), chunk):
            u.write(data[i:i + chunk])
        u.finish()
    return log


def make_tar(*members: tuple) -> bytes:
    """Members: ("file", name[, data]), ("dir", name), ("sym", name, target),
    ("hard", name, target), ("chr"/"blk", name, (major, minor)), ("fifo", name);
    an optional trailing dict sets mode/uid/gid/pax."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            extra = m[-1] if isinstance(m[-1], dict) else {}
            m = m[:-1] if extra else m
            kind, name = m[0], m[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            ti.mode = 0o644
            data = None
            if kind == "file":
                data = m[2] if len(m) > 2 else b"EVIL"
                ti.size = len(data)
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, m[2], 0o777
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, m[2]
            elif kind in ("chr", "blk"):
                ti.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = m[2]
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            ti.mode = extra.get("mode", ti.mode)
            ti.uid, ti.gid = extra.get("uid", 0), extra.get("gid", 0)
            ti.pax_headers = extra.get("pax", {})
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# -- confinement and argv ----------------------------------------------------

# chown dac_override fowner fsetid mknod setfcap
_KEPT = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 27) | (1 << 31)


def _wait_for_tar(pid: int) -> None:
    deadline = time.monotonic() + 10
    while not os.readlink(f"/proc/{pid}/exe").endswith("/tar"):
        assert time.monotonic() < deadline, "tar never exec'd"
        time.sleep(0.01)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.root
def test_unpack_argv_and_confinement(tmp_path: Path):
    log = Log()
    with TarUnpacker(str(tmp_path), log.ctx) as u:
        argv = u.argv
        tar_at = next(i for i, a in enumerate(argv) if a.endswith("/tar"))
        assert argv[tar_at + 1:] == ["--ignore-zeros", "--numeric-owner", "-b", "256", "-B", "-C", str(tmp_path),
                                     "-pxf", "-", "--xattrs", "--xattrs-include=*", "--no-selinux"]
        assert not {"-P", "--absolute-names"} & set(argv)
        # unshare first: it needs CAP_SYS_ADMIN, which setpriv takes away.
        assert argv[0].endswith("/unshare") and argv[1:3] == ["--net", "--"]
        assert argv[3].endswith("/setpriv")
        _wait_for_tar(u.pid)
        st = _status(u.pid)
        assert int(st["CapEff"], 16) == _KEPT
        assert int(st["CapPrm"], 16) == _KEPT
        assert int(st["CapBnd"], 16) == _KEPT
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
        assert os.readlink(f"/proc/{u.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.getpgid(u.pid) == u.pid  # its own process group
        with open(f"/proc/{u.pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if e)
        assert b"TAR_OPTIONS" not in env and env[b"LC_ALL"] == b"C"
        u.write(make_tar(("file", "hello", b"hi\n")))
        u.finish()
    assert u.returncode == 0
    assert (tmp_path / "hello").read_bytes() == b"hi\n"


@pytest.mark.root
def test_pack_is_confined_too(tmp_path: Path):
    (tmp_path / "f").write_bytes(os.urandom(4 * CHUNK))
    before = _children()
    gen = pack_tar(str(tmp_path), JobContext())
    next(gen)
    (child,) = _new_children(before)
    _wait_for_tar(child[0])
    assert int(_status(child[0])["CapEff"], 16) == 1 << 1  # CAP_DAC_OVERRIDE, as systemd
    assert os.readlink(f"/proc/{child[0]}/ns/net") != os.readlink("/proc/self/ns/net")
    gen.close()


@pytest.mark.root
def test_missing_setpriv_falls_back_with_warning(tmp_path: Path, monkeypatch, caplog):
    real = tarball._which
    monkeypatch.setattr(tarball, "_which", lambda name: None if name == "setpriv" else real(name))
    log = unpack(make_tar(("file", "x", b"x")), tmp_path)
    assert "setpriv not found, tar runs with all capabilities." in log
    assert "setpriv not found" in caplog.text
    assert (tmp_path / "x").read_bytes() == b"x"


# -- round trip ----------------------------------------------------------------


def _no_dir_sizes(tree: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v[:4] + (None,) + v[5:] if stat.S_ISDIR(v[0]) else v for k, v in tree.items()}


@pytest.mark.root
@pytest.mark.parametrize("target", ["plain", "btrfs"])
def test_round_trip_rich_tree(tmp_path: Path, request: pytest.FixtureRequest, target: str):
    src = tmp_path / "src"
    make_rich_tree(src)
    dest = (request.getfixturevalue("btrfs_mount") if target == "btrfs" else tmp_path) / "dest"
    dest.mkdir()
    log = Log()
    sizes = []
    stream = io.BytesIO()
    with TarUnpacker(str(dest), log.ctx) as u:
        for chunk in pack_tar(str(src), log.ctx):
            sizes.append(len(chunk))
            stream.write(chunk)
            u.write(chunk)
        u.finish()
    assert log.lines == []
    assert sizes and max(sizes) <= CHUNK

    # trusted.* needs CAP_SYS_ADMIN, which tar does not keep (neither does
    # systemd's): the packing tar cannot even see it.  Everything else is kept.
    want = describe_tree(src)
    xattrs = dict(want["xattr"][6])
    assert xattrs.pop("trusted.test") == b"trusted-value"
    want["xattr"] = want["xattr"][:6] + (tuple(xattrs.items()),) + want["xattr"][7:]
    got = describe_tree(dest)
    assert _no_dir_sizes(got) == _no_dir_sizes(want)  # directory sizes are the file system's
    assert stat.S_IMODE(got["usr/bin/suid"][0]) == 0o4755
    assert got["owned"][1:3] == (1234, 5678)
    assert stat.S_ISCHR(got["null"][0]) and got["null"][3] == os.makedev(1, 3)
    assert stat.S_ISFIFO(got["fifo"][0])
    assert got["hard2"][7] == "hard1"
    assert dict(got["acl"][6]).get("system.posix_acl_access")
    assert os.stat(dest / "sparse").st_blocks * 512 < 1024 * 1024  # 50 MiB file, still sparse

    # A POSIX archive with numeric owners only and pax sparse headers.
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tf:
        members = tf.getmembers()
        assert all(m.uname == "" and m.gname == "" for m in members)
        assert {m.name for m in members} >= {"./owned", "./sparse", "./usr/bin/suid"}
        sparse = tf.getmember("./sparse")
        assert sparse.pax_headers.get("GNU.sparse.major") == "1"


@pytest.mark.root
def test_trusted_xattrs_are_dropped_with_a_warning(tmp_path: Path):
    data = make_tar(("file", "f", b"f", {"pax": {"SCHILY.xattr.trusted.t": "tv", "SCHILY.xattr.user.u": "uv"}}))
    log = unpack(data, tmp_path)  # tar warns but exits 0, as under systemd
    assert "Cannot set 'trusted.t' extended attribute" in log
    assert os.listxattr(tmp_path / "f") == ["user.u"]


@pytest.mark.root
def test_device_nodes_setuid_and_owners_are_kept(tmp_path: Path):
    data = make_tar(
        ("dir", "dev"), ("chr", "dev/null", (1, 3), {"mode": 0o666}),
        ("blk", "dev/fakeblk", (7, 200), {"mode": 0o660, "gid": 6}),
        ("fifo", "dev/fifo"),
        ("dir", "usr"), ("dir", "usr/bin"),
        ("file", "usr/bin/su", b"#!/bin/sh\n", {"mode": 0o4755}),
        ("file", "usr/bin/sg", b"#!/bin/sh\n", {"mode": 0o6755, "uid": 1234, "gid": 5678}),
        ("file", "usr/bin/sticky", b"", {"mode": 0o1777, "uid": 99}),
    )
    unpack(data, tmp_path)
    st = os.lstat(tmp_path / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(tmp_path / "dev/fakeblk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200) and st.st_gid == 6
    assert stat.S_ISFIFO(os.lstat(tmp_path / "dev/fifo").st_mode)
    st = os.lstat(tmp_path / "usr/bin/su")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0
    st = os.lstat(tmp_path / "usr/bin/sg")  # chown() clears set-id bits; tar sets the mode after it
    assert stat.S_IMODE(st.st_mode) == 0o6755 and (st.st_uid, st.st_gid) == (1234, 5678)
    st = os.lstat(tmp_path / "usr/bin/sticky")
    assert stat.S_IMODE(st.st_mode) == 0o1777 and st.st_uid == 99
    assert os.lstat(tmp_path / "usr/bin/su").st_mtime == 1_700_000_000


@pytest.mark.root
def test_merged_usr_symlinks_work(tmp_path: Path):
    data = make_tar(
        ("sym", "lib", "usr/lib"),  # dangling when it is created
        ("dir", "usr"), ("dir", "usr/bin"), ("dir", "usr/lib"),
        ("sym", "bin", "usr/bin"),
        ("file", "bin/foo", b"foo"), ("file", "lib/libfoo.so", b"lib"),
        ("sym", "usr/bin/awk", "mawk"), ("sym", "sbin", "usr/bin"),
    )
    unpack(data, tmp_path)
    assert (tmp_path / "usr/bin/foo").read_bytes() == b"foo"
    assert (tmp_path / "usr/lib/libfoo.so").read_bytes() == b"lib"
    assert os.readlink(tmp_path / "bin") == "usr/bin" and os.readlink(tmp_path / "lib") == "usr/lib"
    assert os.path.isdir(tmp_path / "usr/bin") and not os.path.islink(tmp_path / "usr/bin")


# -- hostile input ---------------------------------------------------------------

OUT = "{outside}"  # replaced by the absolute path of the outside directory

HOSTILE = {
    # name: (members, tar fails)
    "dotdot": ([("file", "../../outside/dotdot")], True),
    "dotdot-inner": ([("file", "a/../../../outside/inner")], True),
    "absolute": ([("file", OUT + "/absolute")], False),  # stripped to a path inside
    "absolute-symlink-then-write": ([("sym", "etc", OUT), ("file", "etc/passwd")], True),
    "absolute-symlink-then-mkdir": ([("sym", "d", OUT), ("dir", "d/sub")], True),
    "relative-symlink-escape": ([("sym", "up", "../../outside"), ("file", "up/target"), ("file", "up/new")], True),
    "symlink-chain": ([("dir", "a"), ("sym", "a/b", "../.."), ("sym", "a/c", "b/../../outside"),
                       ("file", "a/c/x"), ("file", "a/b/outside/target")], True),
    "symlink-to-escaping-symlink": ([("dir", "a"), ("sym", "a/b", "../.."), ("sym", "x", "a/b"),
                                     ("file", "x/outside/new")], True),
    "symlink-then-file": ([("sym", "victim", OUT + "/target"), ("file", "victim")], False),
    "relative-symlink-then-file": ([("sym", "victim", "../../outside/target"), ("file", "victim")], False),
    "symlink-hardlink-then-file": ([("sym", "x", OUT + "/target"), ("hard", "y", "x"), ("file", "y")], False),
    "symlink-then-dir": ([("sym", "x", OUT), ("dir", "x"), ("file", "x/y")], True),
    "hardlink-absolute": ([("hard", "hl", OUT + "/target")], True),
    "hardlink-dotdot": ([("hard", "hl", "../../outside/target")], True),
    "hardlink-through-symlink": ([("sym", "l", OUT), ("hard", "hl", "l/target")], True),
    "pax-path-dotdot": ([("file", "innocent", b"EVIL", {"pax": {"path": "../../outside/paxpath"}})], True),
    "pax-sparse-name-dotdot": ([("file", "innocent", b"EVIL", {"pax": {
        "GNU.sparse.name": "../../outside/sparse", "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
        "GNU.sparse.realsize": "4"}})], True),
}


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            content = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content, link)
    return out


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball(tmp_path: Path, case: str):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("ORIGINAL")
    dest = tmp_path / "jail" / "dest"  # so that ../../outside is the outside directory
    dest.mkdir(parents=True)
    members, fails = HOSTILE[case]
    members = [tuple(x.replace(OUT, str(outside)) if isinstance(x, str) else x for x in m) for m in members]
    before = _snapshot(tmp_path, dest)
    parent_before = sorted(os.listdir(tmp_path.parent))

    log = Log()
    if fails:
        with pytest.raises(TransferError, match=r"^tar failed with exit status 2\.") as exc:
            unpack(make_tar(*members), dest, log)
        assert exc.value.tar_messages == log.lines
    else:
        unpack(make_tar(*members), dest, log)

    assert (outside / "target").read_text() == "ORIGINAL"
    assert _snapshot(tmp_path, dest) == before
    assert sorted(os.listdir(tmp_path.parent)) == parent_before
    if case.startswith("dotdot") or case == "pax-path-dotdot":
        assert "Member name contains '..'" in log
    if case == "absolute":
        assert "tar: Removing leading `/' from member names" in log
        assert (dest / str(outside).lstrip("/") / "absolute").read_bytes() == b"EVIL"
    for dirpath, _, filenames in os.walk(dest):  # what tar left inside holds no outside data
        for name in filenames:
            p = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(p).st_mode):
                assert p.read_bytes() in (b"", b"EVIL")


# -- failures, cancellation, cleanup ------------------------------------------------


@pytest.mark.root
def test_garbage_input_fails(tmp_path: Path):
    log = Log()
    with pytest.raises(TransferError, match=r"^tar failed with exit status 2\. Last messages: .*"
                                            r"This does not look like a tar archive"):
        unpack(os.urandom(200_000), tmp_path, log)
    assert "tar: This does not look like a tar archive" in log


@pytest.mark.root
@pytest.mark.parametrize("data", [b"", b"hello world\n"], ids=["empty", "text"])
def test_empty_or_text_input_fails(tmp_path: Path, data: bytes):
    with pytest.raises(TransferError, match=r"^tar failed with exit status 2\."):
        unpack(data, tmp_path)


@pytest.mark.root
def test_truncated_archive_fails(tmp_path: Path):
    data = make_tar(("file", "big", os.urandom(100_000)))
    log = Log()
    with pytest.raises(TransferError, match=r"exit status 2"):
        unpack(data[:50_000], tmp_path, log)
    assert "Unexpected EOF in archive" in log


@pytest.mark.root
def test_tar_dying_early_fails_the_write(tmp_path: Path):
    """A compressed stream makes GNU tar give up at once; the next writes hit
    a closed pipe and report tar's status and messages."""
    data = gzip.compress(make_tar(("file", "f", os.urandom(1 << 20))), compresslevel=1)
    log = Log()
    u = TarUnpacker(str(tmp_path), log.ctx)
    with pytest.raises(TransferError, match=r"^tar failed with exit status 2\. .*Archive is compressed"):
        u.write(data)
        for _ in range(64):
            u.write(bytes(CHUNK))
    assert u.returncode == 2
    with pytest.raises(TransferError):
        u.finish()
    u.abort()


@pytest.mark.root
def test_cancel_while_unpacking_large_stream(tmp_path: Path):
    """A 4 GiB member, fed in 1 MiB chunks: cancel after 16 MiB."""
    header = tarfile.TarInfo("huge")
    header.size = 4 << 30
    log = Log()
    before = _children()
    u = TarUnpacker(str(tmp_path), log.ctx)
    u.write(header.tobuf(tarfile.PAX_FORMAT))
    zeros = bytes(CHUNK)
    for _ in range(16):
        u.write(zeros)
    log.ctx.cancel.set()
    with pytest.raises(Canceled):
        u.write(zeros)
    assert u.returncode == -signal.SIGKILL  # killed and reaped before Canceled came out
    assert not _new_children(before)
    u.abort()  # idempotent


@pytest.mark.root
def test_cancel_while_write_blocks(tmp_path: Path):
    """tar stops reading (SIGSTOP): the pipe fills and write() waits; a cancel
    from another thread still ends it promptly."""
    log = Log()
    u = TarUnpacker(str(tmp_path), log.ctx)
    os.kill(u.pid, signal.SIGSTOP)
    timer = threading.Timer(0.3, log.ctx.cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Canceled):
        u.write(bytes(16 * CHUNK))
    assert time.monotonic() - t0 < 3
    timer.join()
    assert u.returncode == -signal.SIGKILL


@pytest.mark.root
def test_cancel_while_finish_waits(tmp_path: Path):
    log = Log()
    u = TarUnpacker(str(tmp_path), log.ctx)
    u.write(make_tar(("file", "f", b"f")))
    os.kill(u.pid, signal.SIGSTOP)
    timer = threading.Timer(0.3, log.ctx.cancel.set)
    timer.start()
    with pytest.raises(Canceled):
        u.finish()
    timer.join()
    assert u.returncode == -signal.SIGKILL


@pytest.mark.root
def test_context_manager_kills_unless_finished(tmp_path: Path):
    with pytest.raises(RuntimeError):
        with TarUnpacker(str(tmp_path), JobContext()) as u:
            u.write(make_tar(("file", "f", b"f"))[:1024])
            raise RuntimeError("boom")
    assert u.returncode == -signal.SIGKILL
    with TarUnpacker(str(tmp_path), JobContext()) as u2:
        u2.write(b"")  # left without finish(): not a complete import
    assert u2.returncode == -signal.SIGKILL
    with pytest.raises(TransferError):
        u2.finish()
    with pytest.raises(TransferError):
        u2.write(b"x")
    with TarUnpacker(str(tmp_path), JobContext()) as u3:
        u3.write(make_tar(("file", "g", b"g")))
        u3.finish()
        u3.finish()  # idempotent
    assert u3.returncode == 0 and (tmp_path / "g").read_bytes() == b"g"


@pytest.mark.root
def test_pack_cancel_and_early_close_kill_tar(tmp_path: Path):
    (tmp_path / "big").write_bytes(os.urandom(8 * CHUNK))
    ctx = JobContext()
    before = _children()
    gen = pack_tar(str(tmp_path), ctx)
    next(gen)
    assert _new_children(before)
    ctx.cancel.set()
    with pytest.raises(Canceled):
        next(gen)
    assert not _new_children(before)

    gen = pack_tar(str(tmp_path), JobContext())
    next(gen)
    assert _new_children(before)
    gen.close()
    assert not _new_children(before)


@pytest.mark.root
def test_pack_failure(tmp_path: Path):
    log = Log()
    with pytest.raises(TransferError, match=r"^tar failed with exit status 2\."):
        list(pack_tar(str(tmp_path / "missing"), log.ctx))
    assert "Cannot open: No such file or directory" in log


# -- mangle_os_tree ------------------------------------------------------------------


def _os_tree(root: Path, where: str = "etc/os-release") -> None:
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).write_text(OS_RELEASE)


@pytest.mark.root
def test_mangle_moves_wrapped_tree_up(tmp_path: Path):
    top = tmp_path / "img"
    inner = top / "rootfs"
    _os_tree(inner)
    (inner / ".hidden").write_text("h")
    (inner / "usr").mkdir()
    os.chmod(inner, 0o750)
    os.chown(inner, 1000, 1001)
    os.utime(inner, (1_600_000_000, 1_600_000_000))
    log = Log()
    assert mangle_os_tree(str(top), log.ctx)
    assert sorted(os.listdir(top)) == [".hidden", "etc", "usr"]
    assert (top / "etc/os-release").read_text() == OS_RELEASE
    st = os.stat(top)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 1000, 1001, 1_600_000_000)
    assert log.lines == [f"Rearranging '{inner}', moving OS tree one directory up.", "Successfully rearranged OS tree."]


def test_mangle_usr_lib_os_release_and_symlinks_inside(tmp_path: Path):
    top = tmp_path / "img"
    _os_tree(top / ".x", "usr/lib/os-release")  # a hidden name is a child like any other
    assert mangle_os_tree(str(top))
    assert os.listdir(top) == ["usr"]
    top2 = tmp_path / "img2"
    _os_tree(top2 / "root", "usr/lib/os-release")
    (top2 / "root/etc").mkdir()
    os.symlink("/usr/lib/os-release", top2 / "root/etc/os-release")  # resolved inside the tree
    assert mangle_os_tree(str(top2))
    assert sorted(os.listdir(top2)) == ["etc", "usr"]


@pytest.mark.parametrize("layout", ["os-tree", "two-children", "dot-file-too", "file-only", "no-os-release",
                                    "symlink-to-dir", "empty", "inner-etc-is-file", "os-release-escapes"])
def test_mangle_leaves_other_trees_alone(tmp_path: Path, layout: str):
    top = tmp_path / "img"
    top.mkdir()
    if layout == "os-tree":
        _os_tree(top)
        (top / "sub").mkdir()
    elif layout == "two-children":
        _os_tree(top / "a")
        (top / "b").mkdir()
    elif layout == "dot-file-too":
        _os_tree(top / "a")
        (top / ".keep").write_text("")
    elif layout == "file-only":
        (top / "rootfs.tar").write_text("x")
    elif layout == "no-os-release":
        (top / "a/etc").mkdir(parents=True)
    elif layout == "symlink-to-dir":
        _os_tree(tmp_path / "real")
        os.symlink(tmp_path / "real", top / "a")
    elif layout == "inner-etc-is-file":
        (top / "a").mkdir()
        (top / "a/etc").write_text("not a directory")
    elif layout == "os-release-escapes":
        (tmp_path / "os-release").write_text(OS_RELEASE)  # exists only outside the tree
        (top / "a/etc").mkdir(parents=True)
        os.symlink("../../../os-release", top / "a/etc/os-release")
    before = _snapshot(top, top / "nothing")
    assert not mangle_os_tree(str(top))
    assert _snapshot(top, top / "nothing") == before


def test_mangle_fails_when_top_cannot_be_checked(tmp_path: Path):
    (tmp_path / "etc").write_text("a file where a directory should be")  # ENOTDIR, as in systemd
    with pytest.raises(TransferError, match="Failed to determine whether"):
        mangle_os_tree(str(tmp_path))
