"""machined's Varlink interfaces, driven by sid's varlinkctl, step by step
against systemd 262's own machined (chrooted into the sid root) on the same
pool and bus."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagepool import btrfs, varlink_idl
from tests import imagetree, sid
from tests.conftest import Daemons, Pool

MACHINE = "/run/systemd/machine/io.systemd.Machine"
IMAGE = "/run/systemd/machine/io.systemd.MachineImage"


call = sid.call


@pytest.fixture
def both(daemons: Daemons, chroot: sid.Chroot, pool: Pool, tmp_path: Path) -> sid.Both:
    def populate() -> None:
        pool.wipe()
        imagetree.populate(pool.path, pool.btrfs)
        subprocess.run(["btrfs", "subvolume", "create", str(pool / "ro1")], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["btrfs", "property", "set", "-ts", str(pool / "ro1"), "ro", "true"], check=True)

    assert pool.btrfs
    return sid.Both("machined", daemons, chroot, pool, tmp_path, populate)


TIMES = ("creationTimestamp", "modificationTimestamp")


def image_entry(reply: dict[str, Any]) -> dict[str, Any]:
    """A List reply with the times reduced to whether they are there (a
    subvolume's moves with every read).  .host's creation time is the birth
    time of "/", which is the root's directory for the chrooted daemon and
    this host's root (born at 0 here, so not reported) for ours; that it is
    reported is checked in test_varlink_images.  For the same reason, its
    machine ID and os-release are the root's for the chrooted daemon."""
    entry = {k: (True if k in TIMES else v) for k, v in reply.items()}
    if entry.get("name") == ".host":
        for key in ("creationTimestamp", "machineId", "OSRelease"):
            entry.pop(key, None)
    return entry


def listing(rc: int, replies: list[Any], err: str) -> tuple[int, list[Any], str]:
    return rc, sorted((image_entry(r) for r in replies), key=lambda r: r["name"]), err


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_image_list(both: sid.Both) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [
            ("List --more", listing(*call(IMAGE, "io.systemd.MachineImage.List", {}, "--more"))),
            ("List without more", call(IMAGE, "io.systemd.MachineImage.List")),
            ("List sv1", listing(*call(IMAGE, "io.systemd.MachineImage.List", {"name": "sv1"}))),
            ("List sv1 --more", listing(*call(IMAGE, "io.systemd.MachineImage.List", {"name": "sv1"}, "--more"))),
            ("List missing", call(IMAGE, "io.systemd.MachineImage.List", {"name": "nope"})),
            ("List ../x", call(IMAGE, "io.systemd.MachineImage.List", {"name": "../x"})),
            ("List bad field", call(IMAGE, "io.systemd.MachineImage.List", {"bogus": 1}, "--more")),
            ("List bad enum", call(IMAGE, "io.systemd.MachineImage.List", {"acquireMetadata": "x"}, "--more")),
            ("List sv1 metadata", listing(*call(IMAGE, "io.systemd.MachineImage.List",
                                                {"name": "sv1", "acquireMetadata": "yes"}))),
            ("List dir1 metadata", listing(*call(IMAGE, "io.systemd.MachineImage.List",
                                                 {"name": "dir1", "acquireMetadata": "yes"}))),
            ("List raw1 metadata", call(IMAGE, "io.systemd.MachineImage.List",
                                        {"name": "raw1", "acquireMetadata": "yes"})),
            ("List graceful", listing(*call(IMAGE, "io.systemd.MachineImage.List",
                                            {"acquireMetadata": "graceful"}, "--more"))),
            ("List .host", listing(*call(MACHINE, "io.systemd.MachineImage.List", {"name": ".host"}))),
            ("sv1's modification time is its root item's change time", sv1_mtime_is_ctime()),
        ]

    def sv1_mtime_is_ctime() -> bool:
        _, replies, _ = call(IMAGE, "io.systemd.MachineImage.List", {"name": "sv1"})
        fd = os.open(both.pool / "sv1", os.O_RDONLY | os.O_DIRECTORY)
        try:
            ctime = btrfs.subvolume_info_fd(fd).ctime
        finally:
            os.close(fd)
        return bool(replies[0]["modificationTimestamp"] == ctime)

    both.compare(steps)


def image_call(method: str, params: dict[str, Any] | None = None, *flags: str) -> tuple[int, list[Any], str]:
    return call(IMAGE, f"io.systemd.MachineImage.{method}", params, *flags)


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_image_changes(both: sid.Both) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [
            ("Update rename", image_call("Update", {"name": "sv1", "newName": "sv2"})),
            ("Update read-only", image_call("Update", {"name": "sv2", "readOnly": True})),
            ("Update missing", image_call("Update", {"name": "nope", "readOnly": True})),
            ("Update bad new name", image_call("Update", {"name": "sv2", "newName": "a/b"})),
            ("Update rename onto existing", image_call("Update", {"name": "dir1", "newName": "sv2"})),
            ("Update .host", image_call("Update", {"name": ".host", "readOnly": False})),
            ("Clone", image_call("Clone", {"name": "sv2", "newName": "sv3"})),
            ("Clone read-only", image_call("Clone", {"name": "dir1", "newName": "dir2", "readOnly": True})),
            ("Clone missing", image_call("Clone", {"name": "nope", "newName": "x"})),
            ("Clone bad name", image_call("Clone", {"name": "sv2", "newName": "../x"})),
            ("Clone onto existing", image_call("Clone", {"name": "sv2", "newName": "dir1"})),
            ("Clone without newName", image_call("Clone", {"name": "sv2"})),
            ("Remove", image_call("Remove", {"name": "ro1"})),
            ("Remove missing", image_call("Remove", {"name": "ro1"})),
            ("Remove .host", image_call("Remove", {"name": ".host"})),
            ("CleanPool without more", image_call("CleanPool", {"mode": "hidden"})),
            ("CleanPool bad mode", image_call("CleanPool", {"mode": "bogus"}, "--more")),
            ("CleanPool hidden", image_call("CleanPool", {"mode": "hidden"}, "--more")),
            ("CleanPool hidden again", image_call("CleanPool", {"mode": "hidden"}, "--more")),
            ("List after", listing(*image_call("List", {}, "--more"))),
            ("SetPoolLimit", image_call("SetPoolLimit", {"limit": 1 << 30})),
            ("quotas after SetPoolLimit", btrfs.quota_mode(str(both.pool.path))),
        ]

    # systemd turns full qgroups on for a limit; we never do (--quota=simple
    # would turn simple quotas on: test_images.test_quota).
    both.compare(steps, deliberate={
        "SetPoolLimit": ((1, [{}], "Method call io.systemd.MachineImage.SetPoolLimit() failed: "
                                   "io.systemd.MachineImage.NotSupported"), (0, [{}], "")),
        "quotas after SetPoolLimit": ("off", "full")})


def service_steps(socket: str) -> list[tuple[str, Any]]:
    env = call(socket, "io.systemd.service.GetEnvironment")
    return [
        ("Ping", call(socket, "io.systemd.service.Ping")),
        ("GetLogLevel", call(socket, "io.systemd.service.GetLogLevel")),
        ("SetLogLevel 6", call(socket, "io.systemd.service.SetLogLevel", {"level": 6})),
        ("GetLogLevel after", call(socket, "io.systemd.service.GetLogLevel")),
        ("SetLogLevel 8", call(socket, "io.systemd.service.SetLogLevel", {"level": 8})),
        ("SetLogLevel -1", call(socket, "io.systemd.service.SetLogLevel", {"level": -1})),
        ("SetLogLevel without level", call(socket, "io.systemd.service.SetLogLevel")),
        ("SetLogLevel 7", call(socket, "io.systemd.service.SetLogLevel", {"level": 7})),
        ("Reload", call(socket, "io.systemd.service.Reload")),
        ("GetEnvironment", (env[0], f"DBUS_SYSTEM_BUS_ADDRESS={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}"
                            in env[1][0]["environment"])),
        ("Unknown method", call(socket, "io.systemd.service.Nope")),
        ("Unknown interface", call(socket, "io.systemd.Nope.Nope")),
    ]


def introspection(socket: str) -> list[tuple[str, Any]]:
    """GetInfo's interfaces, and each one's definitions (without comments)."""
    r = sid.varlinkctl("--json=short", "info", socket)
    interfaces = json.loads(r.stdout)["interfaces"] if r.returncode == 0 else r.stderr
    steps: list[tuple[str, Any]] = [("interfaces", interfaces)]
    for name in interfaces:
        r = sid.varlinkctl("introspect", socket, name)
        steps.append((f"introspect {name}", (r.returncode, varlink_idl.strip_comments(r.stdout), r.stderr)))
    return steps


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_service_interface_and_introspection(both: sid.Both) -> None:
    both.compare(lambda: [*service_steps(IMAGE), *introspection(MACHINE), *introspection(IMAGE)])


def machine_entry(reply: dict[str, Any]) -> dict[str, Any]:
    """A Machine.List reply without .host's os-release and machine ID (the
    root's, for the chrooted daemon)."""
    entry = dict(reply)
    entry.pop("OSRelease", None)
    if entry.get("name") == ".host":
        entry.pop("id", None)  # /etc/machine-id: the root's for the chrooted daemon
    if "timestamp" in entry:  # computed from two clocks: to a tenth of a second
        entry["timestamp"] = {k: round(v / 100_000) for k, v in entry["timestamp"].items()}
    return entry


def machines(rc: int, replies: list[Any], err: str) -> tuple[int, list[Any], str]:
    return rc, [machine_entry(r) for r in replies], err


def machine_call(method: str, params: dict[str, Any] | None = None, *flags: str) -> tuple[int, list[Any], str]:
    return call(MACHINE, f"io.systemd.Machine.{method}", params, *flags)


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_machine_methods_on_the_host(both: sid.Both) -> None:
    def steps() -> list[tuple[str, Any]]:
        return [
            ("List --more", machines(*machine_call("List", {}, "--more"))),
            ("List without more", machine_call("List")),
            ("List .host", machines(*machine_call("List", {"name": ".host"}))),
            ("List .host metadata", machines(*machine_call("List", {"name": ".host", "acquireMetadata": "yes"}))),
            ("List by PID 1", machines(*machine_call("List", {"pid": {"pid": 1}}))),
            ("List missing", machine_call("List", {"name": "nope"})),
            ("List bad name", machine_call("List", {"name": "bad/name"})),
            ("MapFrom .host UID 0", machine_call("MapFrom", {"name": ".host", "uid": 0})),
            ("MapFrom .host GID 5", machine_call("MapFrom", {"name": ".host", "gid": 5})),
            ("MapFrom missing", machine_call("MapFrom", {"name": "nope", "uid": 0})),
            ("MapTo UID 0", machine_call("MapTo", {"uid": 0})),
            ("MapTo UID 4711", machine_call("MapTo", {"uid": 4711})),
            ("Kill missing", machine_call("Kill", {"name": "nope", "signal": 15})),
            ("Kill bad signal", machine_call("Kill", {"name": ".host", "signal": 4711})),
            ("Terminate missing", machine_call("Terminate", {"name": "nope"})),
            ("Unregister missing", machine_call("Unregister", {"name": "nope"})),
            ("Register bad name", machine_call("Register", {"name": "a/b", "class": "container"})),
            ("Register bad class", machine_call("Register", {"name": "x", "class": "bogus"})),
            ("Register bad id", machine_call("Register", {"name": "x", "class": "container", "id": "xyz"})),
            ("CopyFrom missing", machine_call("CopyFrom", {"name": "nope", "source": "/etc/hostname"})),
            ("BindMount missing", machine_call("BindMount", {"name": "nope", "source": "/tmp"})),
            ("OpenRootDirectory missing", machine_call("OpenRootDirectory", {"name": "nope"})),
            ("Open missing", machine_call("Open", {"name": "nope", "mode": "tty"})),
            ("Open bad mode", machine_call("Open", {"name": ".host", "mode": "bogus"})),
        ]

    both.compare(steps)


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_unprivileged_callers(both: sid.Both) -> None:
    """Without polkit, only root may change images or machines; anyone may look."""
    def steps() -> list[tuple[str, Any]]:
        nobody = "65534"
        return [(f"{method} as nobody", call(socket, method, params, *flags, user=nobody))
                for socket, method, params, flags in [
            (IMAGE, "io.systemd.MachineImage.Update", {"name": "sv1", "readOnly": True}, ()),
            (IMAGE, "io.systemd.MachineImage.Clone", {"name": "sv1", "newName": "x"}, ()),
            (IMAGE, "io.systemd.MachineImage.Remove", {"name": "dir1"}, ()),
            (IMAGE, "io.systemd.MachineImage.SetPoolLimit", {"limit": 1 << 30}, ()),
            (IMAGE, "io.systemd.MachineImage.CleanPool", {"mode": "all"}, ("--more",)),
            (MACHINE, "io.systemd.Machine.Kill", {"name": ".host", "signal": 0}, ()),
            (MACHINE, "io.systemd.Machine.Register", {"name": "x", "class": "container"}, ()),
            (MACHINE, "io.systemd.Machine.MapFrom", {"name": ".host", "uid": 0}, ()),
        ]] + [
            ("List as nobody", listing(*call(IMAGE, "io.systemd.MachineImage.List", {}, "--more", user=nobody))),
            ("machines as nobody", machines(*call(MACHINE, "io.systemd.Machine.List", {}, "--more", user=nobody))),
        ]

    both.compare(steps)
