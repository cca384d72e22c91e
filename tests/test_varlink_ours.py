"""What our Varlink front ends do beyond what systemd's daemons show:
a Pull without "more" that is not lost, a client hanging up on a Pull
stream, imageRoot and the image classes kept below --image-prefix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagepool import dev as world
from tests import sid
from tests.conftest import Daemons, Pool
from tests.httpserver import Fault, TestServer
from tests.imagetree import make_os_tree

IMPORT = "/run/systemd/io.systemd.Import"


@pytest.fixture
def site(tmp_path: Path):
    www = tmp_path / "www"
    www.mkdir()
    tree = tmp_path / "tree"
    make_os_tree(tree)
    (tree / "data").write_bytes(os.urandom(256 << 10))
    subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(www / "img.tar"), "."], check=True)
    (www / "slow.tar").write_bytes((www / "img.tar").read_bytes())
    with TestServer(www) as server:
        server.faults["slow.tar"] = Fault(rate=32 << 10)
        yield server


def raw_call(method: str, parameters: dict[str, Any], more: bool = False) -> socket.socket:
    """A call on a connection of its own, left open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(IMPORT)
    message: dict[str, Any] = {"method": method, "parameters": parameters}
    if more:
        message["more"] = True
    sock.sendall(json.dumps(message).encode() + b"\0")
    return sock


def read_reply(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\0"):
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return json.loads(data[:-1].split(b"\0")[0])


def transfers() -> list[Any]:
    rc, replies, err = sid.call(IMPORT, "io.systemd.Import.ListTransfers", {}, "--more")
    return replies if rc == 0 else []


def temporaries(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".#")] if directory.exists() else []


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_pull_without_more_runs_on(pool: Pool, services: Daemons, site: TestServer) -> None:
    """One reply, the id; the transfer goes on as one started over D-Bus
    (systemd 262 drops it: no image)."""
    rc, replies, err = sid.call(IMPORT, "io.systemd.Import.Pull", {
        "remote": site.url("img.tar"), "local": "quiet", "type": "tar", "class": "machine", "verify": "no"})
    assert rc == 0 and len(replies) == 1 and set(replies[0]) == {"id"}, (replies, err)
    world.wait_for(lambda: (pool / "quiet/etc/os-release").exists() and not transfers(), 30, "the image")
    assert temporaries(pool.path) == []


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_hanging_up_on_a_pull_cancels_it(pool: Pool, services: Daemons, site: TestServer) -> None:
    sock = raw_call("io.systemd.Import.Pull", {"remote": site.url("slow.tar"), "local": "gone", "type": "tar",
                                               "class": "machine", "verify": "no"}, more=True)
    first = read_reply(sock)
    assert first["continues"] and set(first["parameters"]) == {"id"}, first
    world.wait_for(lambda: [t for t in transfers() if t["local"] == "gone"], 10, "the transfer")
    sock.close()
    world.wait_for(lambda: not transfers(), 20, "the transfer to be canceled")
    assert not (pool / "gone").exists() and temporaries(pool.path) == []
    assert "canceled" in services.log_of("importd").read_text()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_pull_streams_the_transfer(pool: Pool, services: Daemons, site: TestServer) -> None:
    rc, replies, err = sid.call(IMPORT, "io.systemd.Import.Pull", {
        "remote": site.url("img.tar"), "local": "streamed", "type": "tar", "class": "machine", "verify": "no"},
        "--more")
    assert rc == 0, err
    assert set(replies[0]) == {"id"} and replies[-1] == {}
    lines = [r["log"]["message"] for r in replies if "log" in r]
    assert "Created new local image 'streamed'." in lines and lines[-1] == "Exiting."
    assert all(r["log"]["priority"] == 30 for r in replies if "log" in r)  # daemon.info, as 262's worker lines
    progress = [r["progress"] for r in replies if "progress" in r]
    assert progress and progress == sorted(progress) and 0 < progress[-1] <= 1


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_classes_and_image_root_stay_below_the_prefix(pool: Pool, services: Daemons, site: TestServer) -> None:
    """--image-prefix: every class, and a client's imageRoot, below it."""
    prefix = services.prefix
    host_dirs = {d: set(os.listdir(d)) if os.path.isdir(d) else None
                 for d in ("/var/lib/extensions", "/var/lib/portables", "/var/lib/confexts", "/srv")}
    for cls, name in (("sysext", "ext1"), ("portable", "port1"), ("confext", "conf1")):
        rc, replies, err = sid.call(IMPORT, "io.systemd.Import.Pull", {
            "remote": site.url("img.tar"), "local": name, "type": "tar", "class": cls, "verify": "no"}, "--more")
        assert rc == 0, err
    rc, replies, err = sid.call(IMPORT, "io.systemd.Import.Pull", {
        "remote": site.url("img.tar"), "local": "rooted", "type": "tar", "class": "machine", "verify": "no",
        "imageRoot": "/srv/images"}, "--more")
    assert rc == 0, err
    assert (prefix / "var/lib/extensions/ext1/etc/os-release").exists()
    assert (prefix / "var/lib/portables/port1/etc/os-release").exists()
    assert (prefix / "var/lib/confexts/conf1/etc/os-release").exists()
    assert (prefix / "srv/images/rooted/etc/os-release").exists()
    assert {d: set(os.listdir(d)) if os.path.isdir(d) else None for d in host_dirs} == host_dirs
    # importctl sees them where they are, by class.
    r = sid.run("importctl", "--no-pager", "list-images", "--class=sysext")
    assert f"{prefix}/var/lib/extensions/ext1" in r.stdout, r.stdout + r.stderr
    rc, replies, err = sid.call(IMPORT, "io.systemd.Import.Pull", {
        "remote": site.url("img.tar"), "local": "x", "type": "tar", "class": "machine", "imageRoot": "relative"})
    assert rc == 1 and "imageRoot" in json.dumps(replies) + err


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_vendor_images_below_the_prefix_are_read_only(pool: Pool, daemons: Daemons) -> None:
    vendor = daemons.prefix / "usr/lib/machines/vendor1"
    vendor.mkdir(parents=True)
    daemons.start("machined")
    rc, replies, err = sid.call("/run/systemd/machine/io.systemd.MachineImage", "io.systemd.MachineImage.List",
                                {"name": "vendor1"})
    assert rc == 0 and replies[0]["readOnly"] is True and replies[0]["path"] == str(vendor), (replies, err)
    rc, replies, err = sid.call("/run/systemd/machine/io.systemd.MachineImage", "io.systemd.MachineImage.Remove",
                                {"name": "vendor1"})
    assert rc == 1 and vendor.exists(), err
