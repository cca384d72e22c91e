"""Socket activation, as systemd-importd.socket and systemd-machined.socket
do it (systemd/*.socket): the service is started by the first Varlink
client and serves on the socket it was passed, which it leaves in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagepool import dev as world
from tests import sid
from tests.conftest import Daemons, Pool

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def activated(daemons: Daemons, pool: Pool, module: str, socket: str) -> world.Service:
    """systemd-socket-activate listening on SOCKET for our MODULE."""
    argv = ["systemd-socket-activate", "-l", socket, "--fdname=varlink",
            "-E", "DBUS_SYSTEM_BUS_ADDRESS", "-E", "PYTHONPATH",
            *world.service_argv(module, pool.path, daemons.prefix)]
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=daemons.bus.address, PYTHONPATH=str(world.SOURCES))
    svc = world.Service(argv, env, daemons.logdir / f"{module}-activated.log")
    svc.start(notify=False)
    world.wait_for(lambda: os.path.exists(socket), 10, socket)
    return svc


def unit_setting(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (UNITS / unit).read_text().splitlines() if line.startswith(f"{key}=")]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_importd_socket_activated(pool: Pool, daemons: Daemons) -> None:
    socket = unit_setting("importd-py.socket", "ListenStream")[0]
    assert socket == "/run/systemd/io.systemd.Import"
    assert unit_setting("importd-py.socket", "FileDescriptorName") == ["varlink"]
    svc = activated(daemons, pool, "importd", socket)
    try:
        inode = os.stat(socket).st_ino
        assert svc.proc is not None
        r = sid.varlinkctl("call", "--more", socket, "io.systemd.Import.ListTransfers", "{}")
        assert "io.systemd.Import.NoTransfers" in r.stderr, r.stderr
        info = sid.varlinkctl("info", socket)
        assert "io.systemd.Import" in info.stdout, info.stderr
        assert os.stat(socket).st_ino == inode  # the one systemd made, not one of ours
        # The same process serves D-Bus too.
        world.wait_for(lambda: world.name_has_owner(svc.env, "org.freedesktop.import1"), 10, "import1")
    finally:
        svc.stop()
    log = (daemons.logdir / "importd-activated.log").read_text()
    assert "Traceback" not in log, log
    assert os.path.exists(socket)  # left for systemd, whose it is
    os.unlink(socket)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machined_socket_activated(pool: Pool, daemons: Daemons) -> None:
    socket = unit_setting("machined-py.socket", "ListenStream")[0]
    links = unit_setting("machined-py.socket", "Symlinks")[0].split()
    assert socket == "/run/systemd/machine/io.systemd.Machine"
    assert links[0] == "/run/systemd/machine/io.systemd.MachineImage"
    os.makedirs(os.path.dirname(socket), exist_ok=True)
    svc = activated(daemons, pool, "machined", socket)
    os.symlink(socket, links[0])  # what Symlinks= does
    try:
        for path in (socket, links[0]):
            r = sid.varlinkctl("call", path, "io.systemd.MachineImage.List", '{"name":".host"}')
            assert r.returncode == 0 and '"name":".host"' in r.stdout, r.stdout + r.stderr
        r = sid.varlinkctl("call", "--more", socket, "io.systemd.Machine.List", "{}")
        assert r.returncode == 0 and '"class":"host"' in r.stdout, r.stderr
        assert os.path.islink(links[0])  # not replaced by a socket of ours
    finally:
        svc.stop()
    log = (daemons.logdir / "machined-activated.log").read_text()
    assert "Traceback" not in log, log
    for path in (links[0], socket):
        os.unlink(path)


def test_units_name_our_programs() -> None:
    """The units start what the package installs, with the options it has."""
    for unit in ("importd-py.service", "machined-py.service"):
        exec_start = unit_setting(unit, "ExecStart")[0].split()
        module = unit.split("-")[0]
        assert exec_start[0].endswith(f"/{module}")
        r = subprocess.run([sys.executable, "-m", module, *exec_start[1:], "--help"], capture_output=True, text=True,
                           cwd=world.SOURCES)
        assert r.returncode == 0, r.stderr
    for unit in ("importd-py.socket", "machined-py.socket"):
        assert unit_setting(unit, "SocketMode") == ["0666"]
