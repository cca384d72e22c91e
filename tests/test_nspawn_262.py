"""systemd-nspawn 262 with our machined (sid's nspawn and machinectl on
this host, through the root's loader) and with systemd 262's own (all of
it inside the sid root booted with systemd as PID 1, which machined 262
needs for registrations): it registers over Varlink
(io.systemd.Machine.Register), and machinectl lists, shows, powers off and
terminates the machine through io.systemd.Machine, step by step the same."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from imagepool import dev as world
from tests import sid
from tests.bootedsid import BootedSid
from tests.conftest import Daemons, Pool
from tests.test_machine_clients import cgroup_v2_at_root
from tests.test_machine_scope import FakeSystemd
from tests.test_machines import kill_tree, make_root

MACHINE = "/run/systemd/machine/io.systemd.Machine"


class Nspawn262:
    """sid's systemd-nspawn --keep-unit --register=yes, in a mount namespace
    of its own where the unified cgroup hierarchy is /sys/fs/cgroup (262
    refuses this host's v1 layout)."""

    def __init__(self, root: Path, name: str, *extra: str, log: Path, keep_unit: bool = True) -> None:
        self.name = name
        self.log = log
        nspawn = " ".join(sid.argv("systemd-nspawn", *(["--keep-unit"] if keep_unit else []), "--register=yes", "-q",
                                   "-D", str(root),
                                   "-M", name, *extra, "/bin/sh", "-c", shlex.quote(INIT)))
        script = ("[ -e /sys/fs/cgroup/cgroup.controllers ] || mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup"
                  f" && exec {nspawn}")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def wait_registered(self) -> None:
        def registered() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited: {self.log.read_text()}")
            return sid.call(MACHINE, "io.systemd.Machine.List", {"name": self.name})[0] == 0

        world.wait_for(registered, 30, f"{self.name} to register")
        # nspawn holds its init back until registered: wait for its trap.
        leader = sid.call(MACHINE, "io.systemd.Machine.List", {"name": self.name})[1][0]["leader"]["pid"]
        world.wait_for(lambda: _catches(leader, 38), 30, f"{self.name}'s init")

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> None:
        kill_tree(self.proc)


def _catches(pid: int, signo: int) -> bool:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signo - 1)))
    return False


def entry(name: str) -> Any:
    rc, replies, err = sid.call(MACHINE, "io.systemd.Machine.List", {"name": name})
    if rc != 0:
        return rc, err
    return _normalized_entry(replies[0])


def _normalized_entry(machine: dict[str, Any]) -> dict[str, Any]:
    """The machine as Varlink's List has it, without what differs between
    any two runs (PIDs, IDs, times) and the two places (its root's path)."""
    machine = dict(machine)
    for key in ("id", "timestamp", "rootDirectory"):
        machine[key] = key in machine
    for key in ("leader", "supervisor"):
        if key in machine:
            machine[key] = sorted(machine[key])
    return machine


def normalized(text: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+|\d+(ms|s|min) ago|PID \d+|\b\d{3,}\b", "X", text)


# An init that ends on what systemd ends on: SIGRTMIN+4 (poweroff), SIGRTMIN+3
# (halt, nspawn's word for SIGTERM) and SIGTERM.
INIT = "trap 'exit 0' 15 37 38; while :; do sleep 1; done"


class Ours:
    """sid's nspawn and machinectl on this host, with our machined (and a
    stand-in for systemd, which nspawn asks for its scope)."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.tmp = root, tmp
        self.container: Nspawn262 | None = None

    def start(self, name: str) -> None:
        self.container = Nspawn262(self.root, name, log=self.tmp / f"nspawn-{name}.log", keep_unit=False)
        self.container.wait_registered()

    def machinectl(self, *args: str) -> str:
        r = sid.run("machinectl", "--no-pager", *args)
        return normalized(f"{r.stdout}{r.stderr}rc={r.returncode}")

    def entry(self, name: str) -> Any:
        return entry(name)

    def varlink(self, method: str, params: dict[str, Any]) -> tuple[int, list[Any], str]:
        return sid.call(MACHINE, f"io.systemd.Machine.{method}", params)

    def wait_gone(self) -> int | None:
        assert self.container is not None
        world.wait_for(self.container.ended, 20, "nspawn to end")
        return self.container.proc.returncode

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()


class Theirs:
    """The same inside the booted sid: nspawn as a service of its systemd,
    registering with its machined."""

    def __init__(self, booted: BootedSid) -> None:
        self.booted = booted
        self.unit = ""

    def start(self, name: str) -> None:
        self.unit = f"{name}-{time.monotonic_ns()}-nspawn"
        r = self.booted.run("systemd-run", f"--unit={self.unit}", "-p", "KillMode=mixed", "systemd-nspawn", "-q",
                            "-D", f"/var/lib/machines/{name}", "-M", name, "--register=yes", "/bin/sh", "-c", INIT)
        assert r.returncode == 0, r.stderr
        try:
            world.wait_for(lambda: self._listed(name) and self._init_ready(name), 30, f"{name} in the booted sid")
        except TimeoutError as e:
            journal = self.booted.run("journalctl", "--no-pager", "-n", "60").stdout
            raise TimeoutError(f"{e}; the booted sid's journal:\n{journal}") from None

    def _listed(self, name: str) -> bool:
        return self.booted.run("varlinkctl", "call", MACHINE, "io.systemd.Machine.List",
                               json.dumps({"name": name})).returncode == 0

    def _init_ready(self, name: str) -> bool:
        r = self.booted.run("varlinkctl", "--json=short", "call", MACHINE, "io.systemd.Machine.List",
                            json.dumps({"name": name}))
        leader = json.loads(r.stdout)["leader"]["pid"]
        status = self.booted.run("cat", f"/proc/{leader}/status").stdout
        sigcgt = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
        return bool(int(sigcgt, 16) & (1 << 37))

    def machinectl(self, *args: str) -> str:
        r = self.booted.run("machinectl", "--no-pager", *args)
        return normalized(f"{r.stdout}{r.stderr}rc={r.returncode}")

    def entry(self, name: str) -> Any:
        r = self.booted.run("varlinkctl", "--json=short", "call", MACHINE, "io.systemd.Machine.List",
                            json.dumps({"name": name}))
        if r.returncode != 0:
            return r.returncode, r.stderr.strip()
        return _normalized_entry(json.loads(r.stdout))

    def varlink(self, method: str, params: dict[str, Any]) -> tuple[int, list[Any], str]:
        r = self.booted.run("varlinkctl", "--json=short", "call", MACHINE, f"io.systemd.Machine.{method}",
                            json.dumps(params))
        return r.returncode, sid.replies(r), r.stderr.strip()

    def wait_gone(self) -> int | None:
        def inactive() -> bool:
            state = self.booted.run("systemctl", "is-active", self.unit).stdout.strip()
            return state in ("inactive", "failed")

        world.wait_for(inactive, 20, "nspawn to end")
        result = self.booted.run("systemctl", "show", "-p", "ExecMainStatus", "--value", self.unit).stdout.strip()
        return int(result or "0")

    def stop(self) -> None:
        if not self.unit:
            return
        # nspawn's service, and the scope it made for the container: stopped
        # (nspawn cleans up after itself then), killed if need be.
        units = (self.unit, "c262.scope")
        self.booted.run("systemctl", "stop", *units, timeout=30)
        for unit in units:
            self.booted.run("systemctl", "kill", "--signal=KILL", unit)
        world.wait_for(lambda: all(self.booted.run("systemctl", "is-active", u).stdout.strip() != "active"
                                   for u in units), 20, "the container's units to stop")
        # What a killed nspawn 262 leaves, and refuses to start with again.
        self.booted.run("umount", "-l", "/run/systemd/nspawn/c262/unix-export")
        self.booted.run("rm", "-rf", "/run/systemd/nspawn/c262")


def keys(result: tuple[int, list[Any], str]) -> tuple[int, list[list[str]], str]:
    """A reply with file descriptors or paths: which fields it has."""
    rc, replies, err = result
    return rc, [sorted(r) for r in replies], err


def calls_on_a_container(side: Ours | Theirs) -> list[tuple[str, Any]]:
    """The other io.systemd.Machine methods, on the registered container."""
    name = {"name": "c262"}
    return [
        ("MapFrom UID 0", side.varlink("MapFrom", {**name, "uid": 0})),
        ("MapFrom GID 0", side.varlink("MapFrom", {**name, "gid": 0})),
        ("MapTo UID 0", side.varlink("MapTo", {"uid": 0})),
        ("Kill leader with 0", side.varlink("Kill", {**name, "whom": "leader", "signal": 0})),
        ("Kill all with 28", side.varlink("Kill", {**name, "signal": 28})),
        ("Kill bad whom", side.varlink("Kill", {**name, "whom": "nobody", "signal": 28})),
        ("CopyFrom a missing file", side.varlink("CopyFrom", {**name, "source": "/nonexistent", "destination":
                                                               "/tmp/c262-copy"})),
        ("CopyFrom a relative path", side.varlink("CopyFrom", {**name, "source": "etc/os-release"})),
        ("CopyTo a relative path", side.varlink("CopyTo", {**name, "source": "x", "destination": "/tmp/x"})),
        ("BindMount a missing directory", side.varlink("BindMount", {**name, "source": "/nonexistent"})),
        ("BindMount a relative path", side.varlink("BindMount", {**name, "source": "tmp"})),
        ("OpenRootDirectory", keys(side.varlink("OpenRootDirectory", name))),
        ("Open a pty", keys(side.varlink("Open", {**name, "mode": "tty"}))),
        ("List with metadata", _normalized(side.varlink("List", {**name, "acquireMetadata": "yes"}))),
    ]


def _normalized(result: tuple[int, list[Any], str]) -> Any:
    rc, replies, err = result
    return rc, [_normalized_entry(r) for r in replies], err


def session(side: Ours | Theirs) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    side.start("c262")
    try:
        out += [*calls_on_a_container(side), ("Unregister", side.varlink("Unregister", {"name": "c262"})),
                ("after Unregister", side.entry("c262"))]
    finally:
        side.stop()
    for verb in ("poweroff", "terminate"):
        side.start("c262")
        try:
            out += [
                ("registered over Varlink", side.entry("c262")),
                ("machinectl list", side.machinectl("list")),
                ("machinectl show", side.machinectl("show", "-p", "Class", "-p", "Service", "-p", "Unit", "-p",
                                                    "State", "c262")),
                (f"machinectl {verb}", side.machinectl(verb, "c262")),
            ]
            status = side.wait_gone()
            if verb == "poweroff":  # (after terminate, how nspawn ends is its unit's affair)
                out.append(("nspawn's exit status after poweroff", status))
            out += [
                (f"after {verb}", side.entry("c262")),
                (f"machinectl list after {verb}", side.machinectl("list")),
            ]
        finally:
            side.stop()
    return out


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_nspawn_registration_poweroff_and_terminate(pool: Pool, daemons: Daemons, tmp_path: Path) -> None:
    root = make_root(tmp_path / "c262")
    with cgroup_v2_at_root():
        fake = FakeSystemd(daemons.bus, tmp_path / "fake-systemd1").start()
        (tmp_path / "fake-systemd1/place").write_text("yes")
        try:
            daemons.start("machined")
            ours = session(Ours(root, tmp_path))
            daemons.stop("machined")
        finally:
            fake.stop()
    booted = BootedSid(tmp_path, [(root, "/var/lib/machines/c262")]).start()
    try:
        theirs = session(Theirs(booted))
    finally:
        booted.stop()
    sid.Steps().same(ours, theirs)
