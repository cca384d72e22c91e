"""Crash recovery: a service killed with SIGKILL in the middle of its work
leaves no child running and nothing under the final name, and when it starts
again it removes the temporaries it left; the same transfer then succeeds.
(systemd: its workers die with importd, and systemd-tmpfiles removes
/var/lib/machines/.#* at boot.)"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imagepool import dev as world
from tests.conftest import Daemons, Pool, machinectl
from tests.httpserver import Fault, TestServer
from tests.imagetree import make_os_tree
from tests.test_pull import raw_image, tar_of


def descendants(pid: int) -> dict[int, int]:
    """PID's descendants, with their start times (to tell them from later
    processes that get the same PID)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = int(fields[19])
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def still_running(procs: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in procs.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[19]) == start and fields[0] not in ("Z", "X"):
            alive.append(pid)
    return alive


def kill_hard(daemons: Daemons, name: str) -> dict[int, int]:
    """SIGKILL one of our services; returns the children it had."""
    svc, _ours = daemons.running.pop(name)
    assert svc.proc is not None
    children = descendants(svc.proc.pid)
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait()
    return children


def temporaries(pool: Pool) -> list[str]:
    return sorted(p for p in os.listdir(pool.path) if p.startswith(".#"))


def wait_for_temporary(pool: Pool, prefix: str = ".#", timeout: float = 30) -> None:
    world.wait_for(lambda: any(p.startswith(prefix) for p in os.listdir(pool.path)), timeout, f"a {prefix} entry")


def assert_recovered(pool: Pool, daemons: Daemons, name: str, children: dict[int, int],
                     extra: tuple[str, ...] = ()) -> None:
    """No child outlived the service; its restart removes what it left."""
    world.wait_for(lambda: not still_running(children), 10, "the killed service's children to die")
    assert temporaries(pool), "the test should have caught the service at work"
    daemons.start(name, extra=extra)
    world.wait_for(lambda: not temporaries(pool) and "Removed left-over temporary" in daemons.log_of(name).read_text(),
                   30, "the temporaries to be removed")


@pytest.fixture
def site(tmp_path: Path):
    www = tmp_path / "www"
    www.mkdir()
    server = TestServer(www).start()
    yield www, server
    server.stop()


@pytest.mark.parametrize("kind", ["tar", "raw", "qcow2"])
def test_sigkill_during_pull(pool: Pool, daemons: Daemons, site, tmp_path: Path, kind: str) -> None:
    www, server = site
    if kind == "tar":
        tree = tmp_path / "tree"
        make_os_tree(tree)
        (tree / "big").write_bytes(os.urandom(8 << 20))
        data, file, verb = tar_of(tree, ["gzip", "-1", "-c"]), "img.tar.gz", "pull-tar"
    elif kind == "raw":
        data, file, verb = raw_image(32 << 20), "img.raw", "pull-raw"
    else:
        raw = tmp_path / "disk.raw"
        raw.write_bytes(os.urandom(16 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "d.qcow2")],
                       check=True)
        data, file, verb = (tmp_path / "d.qcow2").read_bytes(), "img.qcow2", "pull-raw"
    (www / file).write_bytes(data)
    server.faults[file] = Fault(stall_after=len(data) // 2)
    daemons.start("machined")
    daemons.start("importd")
    client = subprocess.Popen(["machinectl", "--no-pager", verb, "--verify=no", server.url(file), "img"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_temporary(pool, f".#{'tar' if kind == 'tar' else 'raw'}")
        time.sleep(0.5)  # well into the download
        children = kill_hard(daemons, "importd")
    finally:
        client.kill()
        client.wait()
    assert not [p for p in os.listdir(pool.path) if p.startswith("img")], "nothing under the final name"
    assert_recovered(pool, daemons, "importd", children)
    server.faults.clear()
    r = machinectl(verb, "--verify=no", server.url(file), "img")
    assert r.returncode == 0, r.stderr
    assert (pool / ("img" if kind == "tar" else "img.raw")).exists()
    assert not temporaries(pool)


@pytest.mark.parametrize("verb", ["import-tar", "import-raw"])
def test_sigkill_during_import(pool: Pool, daemons: Daemons, tmp_path: Path, verb: str) -> None:
    if verb == "import-tar":
        tree = tmp_path / "tree"
        make_os_tree(tree)
        (tree / "big").write_bytes(os.urandom(4 << 20))
        data = tar_of(tree, None)
    else:
        data = raw_image(16 << 20)
    daemons.start("machined")
    daemons.start("importd")
    # Half of the stream, then nothing: the import is caught at work.
    r, w = os.pipe()
    client = subprocess.Popen(["machinectl", "--no-pager", verb, "-", "img"], stdin=r,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(r)
    feeder = threading.Thread(target=lambda: os.write(w, data[: len(data) // 2]), daemon=True)
    feeder.start()
    try:
        wait_for_temporary(pool)
        time.sleep(0.5)
        children = kill_hard(daemons, "importd")
    finally:
        os.close(w)
        client.kill()
        client.wait()
    assert not [p for p in os.listdir(pool.path) if p.startswith("img")]
    assert_recovered(pool, daemons, "importd", children)
    archive = tmp_path / ("img.tar" if verb == "import-tar" else "img.raw")
    archive.write_bytes(data)
    r2 = machinectl(verb, str(archive), "img")
    assert r2.returncode == 0, r2.stderr
    assert not temporaries(pool)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_sigkill_machined_during_clone(pool: Pool, daemons: Daemons) -> None:
    src = pool / "src"
    src.mkdir()
    for i in range(400):  # a copy that takes a while: cp -a, file by file
        (src / f"f{i}").write_bytes(os.urandom(256 << 10))
    daemons.start("machined")
    client = subprocess.Popen(["machinectl", "--no-pager", "clone", "src", "dst"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_temporary(pool, ".#dst")
        children = kill_hard(daemons, "machined")
    finally:
        client.kill()
        client.wait()
    assert children, "cp should have been running"
    assert not (pool / "dst").exists()
    assert_recovered(pool, daemons, "machined", children)
    r = machinectl("clone", "src", "dst")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(pool / "dst")) == 400


def test_temporaries_of_a_live_service_are_kept(pool: Pool, daemons: Daemons, site, tmp_path: Path) -> None:
    """A service that starts while another is at work leaves its temporaries
    alone (they are in its live registry), and an unheld stale one goes."""
    www, server = site
    data = raw_image(32 << 20)
    (www / "img.raw").write_bytes(data)
    server.faults["img.raw"] = Fault(stall_after=len(data) // 2, stall_seconds=30)
    stale = pool / ".#stale0123456789abcdef"
    stale.mkdir()
    daemons.start("importd", extra=("--stall-timeout", "60"))
    world.wait_for(lambda: not stale.exists(), 30, "the stale temporary to go")
    client = subprocess.Popen(["machinectl", "--no-pager", "pull-raw", "--verify=no", server.url("img.raw"), "img"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_temporary(pool, ".#raw")
        working = temporaries(pool)
        daemons.start("machined")  # it cleans the same pool when it starts
        time.sleep(2)
        assert set(working) <= set(temporaries(pool))
    finally:
        client.kill()
        client.wait()
        daemons.stop()
    assert not temporaries(pool)
