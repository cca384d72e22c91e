"""CreateMachine* with systemd on the bus: machined asks it for a transient
scope and answers once the start job is done; TerminateMachine and
KillMachine go to systemd too.  systemd is played by tests/fake_systemd1.py,
a separate process owning org.freedesktop.systemd1 on the private bus."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepool import dev as world
from tests.conftest import Daemons, Pool, busctl, machinectl
from tests.test_machine_clients import CGROUP_ROOT, StrayingLeader, cgroup_v2_at_root, remove_cgroup_dir

MANAGER = ("org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager")
FAKE = Path(__file__).with_name("fake_systemd1.py")


def systemd_properties(name: str, leader: int, description: str) -> list:
    """What systemd-machined puts first in the scope's properties (as JSON)."""
    return [
        ["Slice", ["s", "machine.slice"]],
        ["Description", ["s", description]],
        ["PIDs", ["au", [leader]]],
        ["Delegate", ["b", True]],
        ["CollectMode", ["s", "inactive-or-failed"]],
        ["AddRef", ["b", True]],
        ["TasksMax", ["t", 16384]],
    ]


class FakeSystemd:
    def __init__(self, bus: world.PrivateBus, directory: Path) -> None:
        self.bus = bus
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(world.SOURCES))

    def start(self) -> FakeSystemd:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(FAKE), str(self.directory)], env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            world.wait_for(lambda: self.proc.poll() is None
                           and world.name_has_owner(self.env, "org.freedesktop.systemd1"), 20, "fake systemd1", 0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            world.stop_process(self.proc)
            self.proc = None
            world.wait_for(lambda: not world.name_has_owner(self.env, "org.freedesktop.systemd1"), 10,
                           "org.freedesktop.systemd1 to go")

    def configure(self, result: str = "done", delay: float = 0.1) -> None:
        (self.directory / "result").write_text(result)
        (self.directory / "delay").write_text(str(delay))

    def calls(self, method: str | None = None) -> list[dict]:
        try:
            calls = json.loads((self.directory / "calls.json").read_text())
        except FileNotFoundError:
            return []
        return [c for c in calls if method is None or c["method"] == method]


@pytest.fixture
def fake_systemd(bus: world.PrivateBus, tmp_path: Path):
    fake = FakeSystemd(bus, tmp_path / "fake-systemd1").start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def machined_only(daemons: Daemons):
    daemons.start("machined")
    yield daemons
    daemons.stop()


def show(name: str, prop: str) -> str:
    r = machinectl("show", "-p", prop, "--value", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def trapping_leader(tmp_path: Path) -> subprocess.Popen:
    """A leader that notes USR1 and USR2 in files (and dies of SIGTERM)."""
    script = (f'trap "echo usr1 >> {tmp_path}/usr1" USR1; trap "echo usr2 >> {tmp_path}/usr2" USR2; '
              "while :; do sleep 0.05; done")
    return subprocess.Popen(["sh", "-c", script])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_create_machine_starts_a_scope(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd,
                                       tmp_path: Path) -> None:
    leader = trapping_leader(tmp_path)
    fake_systemd.configure("done", delay=1.5)
    unit = "machine-sc\\x2d1.scope"
    try:
        call = subprocess.Popen(["busctl", "--system", "call", *MANAGER, "CreateMachine", "sayssusa(sv)", "sc-1",
                                 "0", "svc", "container", str(leader.pid), "",
                                 "2", "MemoryMax", "t", "1000000", "DeviceAllow", "a(ss)", "1", "/dev/null", "rw"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Until systemd reports the start job gone, the machine is "opening",
        # the reply is outstanding, and machined keeps serving everybody else.
        world.wait_for(lambda: machinectl("show", "-p", "State", "--value", "sc-1").stdout.strip() == "opening",
                       10, "sc-1 to be opening")
        assert call.poll() is None
        # The state file names the job meanwhile, as systemd-machined's does.
        assert re.search(r"^SCOPE_JOB=/org/freedesktop/systemd1/job/\d+$",
                         Path("/run/systemd/machines/sc-1").read_text(), re.M)
        t0 = time.monotonic()
        r = busctl("call", *MANAGER, "ListMachines")
        assert r.returncode == 0 and '"sc-1"' in r.stdout, r.stderr
        assert time.monotonic() - t0 < 1.0
        out, err = call.communicate(timeout=30)
        assert call.returncode == 0, err
        assert out.strip() == 'o "/org/freedesktop/machine1/machine/sc_2d1"'
        assert show("sc-1", "State") == "running"
        assert "SCOPE_JOB=" not in Path("/run/systemd/machines/sc-1").read_text()
        assert show("sc-1", "Unit") == unit
        assert show("sc-1", "Leader") == str(leader.pid)

        # Subscribed first, then exactly systemd-machined's scope, with the caller's properties after it.
        methods = [c["method"] for c in fake_systemd.calls()]
        assert methods == ["Subscribe", "StartTransientUnit"]
        (start,) = fake_systemd.calls("StartTransientUnit")
        assert start["args"] == [
            unit, "fail",
            systemd_properties("sc-1", leader.pid, "Container sc-1")
            + [["MemoryMax", ["t", 1000000]], ["DeviceAllow", ["a(ss)", [["/dev/null", "rw"]]]]],
            [],
        ]
        assert start["sender"] == fake_systemd.calls("Subscribe")[0]["sender"]

        # sd-login's view: the state file names the scope, unit:<scope> leads to the machine.
        state = Path("/run/systemd/machines/sc-1").read_text()
        from imagepool.metadata import parse_env_file

        assert parse_env_file(state)["SCOPE"] == "machine-sc\\x2d1.scope"
        assert os.readlink(f"/run/systemd/machines/unit:{unit}") == "sc-1"

        # kill (whom=all) is systemd's KillUnit; whom=leader stays ours.
        r = machinectl("kill", "--signal=USR1", "sc-1")
        assert r.returncode == 0, r.stderr
        assert fake_systemd.calls("KillUnit")[-1]["args"] == [unit, "all", int(signal.SIGUSR1)]
        world.wait_for((tmp_path / "usr1").exists, 10, "the leader to get USR1")
        r = machinectl("kill", "--kill-whom=leader", "--signal=USR2", "sc-1")
        assert r.returncode == 0, r.stderr
        world.wait_for((tmp_path / "usr2").exists, 10, "the leader to get USR2")
        assert len(fake_systemd.calls("KillUnit")) == 1

        # terminate is systemd's StopUnit; the scope's processes die, the machine goes.
        r = machinectl("terminate", "sc-1")
        assert r.returncode == 0, r.stderr
        assert fake_systemd.calls("StopUnit")[-1]["args"] == [unit, "fail"]
        leader.wait(timeout=15)
        world.wait_for(lambda: machinectl("show", "sc-1").returncode != 0, 10, "sc-1 to go away")
        assert not Path("/run/systemd/machines/sc-1").exists()
        assert not os.path.lexists(f"/run/systemd/machines/unit:{unit}")
        assert len(fake_systemd.calls("Subscribe")) == 1
    finally:
        stop(leader)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_failed_start_job(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd) -> None:
    fake_systemd.configure("failed")
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        # gdbus shows the D-Bus error name, busctl only the message.
        r = subprocess.run(["gdbus", "call", "--system", "--dest", MANAGER[0], "--object-path", MANAGER[1],
                            "--method", f"{MANAGER[2]}.CreateMachine", "bad1", "@ay []", "svc", "container",
                            str(sleeper.pid), "", "[('MemoryMax', <uint64 1000>)]"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "org.freedesktop.systemd1.JobFailed" in r.stderr, r.stderr
        assert "Start job for unit machine-bad1.scope failed with 'failed'" in r.stderr, r.stderr
        (start,) = fake_systemd.calls("StartTransientUnit")
        assert start["args"][0] == "machine-bad1.scope"
        assert start["args"][2][-1] == ["MemoryMax", ["t", 1000]]
        assert machinectl("show", "bad1").returncode != 0
        assert not Path("/run/systemd/machines/bad1").exists()
        assert not os.path.lexists("/run/systemd/machines/unit:machine-bad1.scope")
        assert sleeper.poll() is None
        # The name is free again.  (JobRemoved right behind the reply this time.)
        fake_systemd.configure("done", delay=0)
        r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "bad1", "0", "svc", "container",
                   str(sleeper.pid), "", "0")
        assert r.returncode == 0, r.stderr
        assert show("bad1", "State") == "running"
    finally:
        stop(sleeper)
    world.wait_for(lambda: machinectl("show", "bad1").returncode != 0, 10, "bad1 to go away")


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_create_variants_and_fallback(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd) -> None:
    sleepers = [subprocess.Popen(["sleep", "100"]) for _ in range(3)]
    try:
        # CreateMachineEx, class vm: "Virtual Machine <name>", no extra properties.
        pidfd = os.pidfd_open(sleepers[0].pid)
        fd_id = os.fstat(pidfd).st_ino
        os.close(pidfd)
        r = busctl("call", *MANAGER, "CreateMachineEx", "sa(sv)a(sv)", "vm1", "3", "Class", "s", "vm",
                   "LeaderPID", "u", str(sleepers[0].pid), "LeaderPIDFDID", "t", str(fd_id), "0")
        assert r.returncode == 0, r.stderr
        # CreateMachineWithNetwork passes its scope properties along too.
        r = busctl("call", *MANAGER, "CreateMachineWithNetwork", "sayssusaia(sv)", "net1", "0", "svc", "container",
                   str(sleepers[1].pid), "", "1", "1", "1", "CPUWeight", "t", "50")
        assert r.returncode == 0, r.stderr
        starts = fake_systemd.calls("StartTransientUnit")
        assert [s["args"] for s in starts] == [
            ["machine-vm1.scope", "fail", systemd_properties("vm1", sleepers[0].pid, "Virtual Machine vm1"), []],
            ["machine-net1.scope", "fail",
             systemd_properties("net1", sleepers[1].pid, "Container net1") + [["CPUWeight", ["t", 50]]], []],
        ]
        assert show("vm1", "Unit") == "machine-vm1.scope" and show("vm1", "Class") == "vm"
        r = busctl("get-property", MANAGER[0], "/org/freedesktop/machine1/machine/net1",
                   "org.freedesktop.machine1.Machine", "NetworkInterfaces")
        assert r.stdout.strip() == "ai 1 1", r.stdout + r.stderr
        # Without systemd on the bus: no scope asked for, a machine all the same.
        fake_systemd.stop()
        r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "own1", "0", "svc", "container",
                   str(sleepers[2].pid), "", "0")
        assert r.returncode == 0, r.stderr
        assert show("own1", "Unit") == "machine-own1.scope" and show("own1", "State") == "running"
        assert len(fake_systemd.calls("StartTransientUnit")) == 2
        # And terminating it is our business again.
        r = machinectl("terminate", "own1")
        assert r.returncode == 0, r.stderr
        sleepers[2].wait(timeout=15)
    finally:
        for s in sleepers:
            stop(s)
    for name in ("vm1", "net1", "own1"):
        world.wait_for(lambda name=name: machinectl("show", name).returncode != 0, 10, f"{name} to go away")


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_host_shell_and_login_through_systemd(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd) -> None:
    """With systemd on the bus, a shell on .host is its container-shell@N.service
    and a login its container-getty@N.service, on a pty of the host."""
    r = subprocess.run(["script", "-qec", "machinectl shell --setenv=WHERE=unit .host /bin/sh -c 'echo shell-$WHERE'",
                        "/dev/null"], capture_output=True, text=True, timeout=60)
    assert "shell-unit" in r.stdout, r.stdout + r.stderr
    (start,) = fake_systemd.calls("StartTransientUnit")
    unit, mode, properties, aux = start["args"]
    assert unit.startswith("container-shell@") and unit.endswith(".service") and mode == "fail" and aux == []
    values = {key: value for key, (_signature, value) in properties}
    number = unit.removeprefix("container-shell@").removesuffix(".service")
    assert values["TTYPath"] == f"/dev/pts/{number}" and values["UtmpIdentifier"] == f"pts/{number}"
    assert values["Description"] == "Shell for User root" and values["User"] == "root"
    assert values["ExecStart"] == [["/bin/sh", ["/bin/sh", "-c", "echo shell-$WHERE"], False]]
    assert "WHERE=unit" in values["Environment"]
    r = busctl("call", *MANAGER, "OpenMachineLogin", "s", ".host")
    assert r.returncode == 0, r.stderr
    pty = r.stdout.split()[2].strip('"')
    (login,) = fake_systemd.calls("StartUnit")
    assert login["args"] == [f"container-getty@{pty.removeprefix('/dev/pts/')}.service", "replace"]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_scope_unref_and_concurrent_creates(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd) -> None:
    """Two CreateMachine calls for one name while systemd takes its time: one
    machine, the other call gets MachineExists (and no scope); when the
    machine goes, the reference AddRef=true took is dropped (UnrefUnit)."""
    fake_systemd.configure("done", delay=1.0)
    sleepers = [subprocess.Popen(["sleep", "100"]) for _ in range(2)]
    try:
        calls = [subprocess.Popen(["gdbus", "call", "--system", "--dest", MANAGER[0], "--object-path", MANAGER[1],
                                   "--method", f"{MANAGER[2]}.CreateMachine", "twice", "@ay []", "svc", "container",
                                   str(s.pid), "", "@a(sv) []"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for s in sleepers]
        results = [c.communicate(timeout=30) for c in calls]
        outs = sorted(out.strip() or err.strip() for out, err in results)
        assert outs[0] == "(objectpath '/org/freedesktop/machine1/machine/twice',)", outs
        assert "org.freedesktop.machine1.MachineExists: Machine 'twice' already exists" in outs[1], outs
        assert len(fake_systemd.calls("StartTransientUnit")) == 1
        r = busctl("call", *MANAGER, "UnregisterMachine", "s", "twice")
        assert r.returncode == 0, r.stderr
        world.wait_for(lambda: fake_systemd.calls("UnrefUnit"), 10, "UnrefUnit")
        assert [c["args"] for c in fake_systemd.calls("UnrefUnit")] == [["machine-twice.scope"]]
    finally:
        for s in sleepers:
            stop(s)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_systemd_units_of_machines(pool: Pool, machined_only: Daemons, fake_systemd: FakeSystemd,
                                   tmp_path: Path) -> None:
    """With the cgroup v2 hierarchy: a machine registered from a unit of
    systemd's is stopped and signalled through systemd, and every process of
    that unit is the machine's (GetMachineByPID); a machine in a scope lasts
    while its scope has processes, after the leader has gone."""
    with cgroup_v2_at_root():
        service = CGROUP_ROOT / "system.slice" / "fake-nspawn.service"
        scope = CGROUP_ROOT / "machine.slice" / "machine-scoped.scope"
        procs = []
        scoped = StrayingLeader(tmp_path / "stray")
        made_slice = not service.parent.exists()
        try:
            service.mkdir(parents=True)
            leader, helper = (subprocess.Popen(["sleep", "100"]) for _ in range(2))
            procs += [leader, helper]
            for p in (leader, helper):
                (service / "cgroup.procs").write_text(str(p.pid))
            r = busctl("call", *MANAGER, "RegisterMachine", "sayssus", "reg", "0", "svc", "container",
                       str(leader.pid), "")
            assert r.returncode == 0, r.stderr
            assert show("reg", "Unit") == "fake-nspawn.service"
            r = busctl("call", *MANAGER, "GetMachineByPID", "u", str(helper.pid))
            assert r.stdout.strip() == 'o "/org/freedesktop/machine1/machine/reg"', r.stdout + r.stderr
            assert machinectl("kill", "reg", "--signal=CONT").returncode == 0
            assert machinectl("terminate", "reg").returncode == 0
            kills = [c["args"] for c in fake_systemd.calls("KillUnit")]
            assert kills == [["fake-nspawn.service", "all", signal.SIGCONT]]
            assert [c["args"] for c in fake_systemd.calls("StopUnit")] == [["fake-nspawn.service", "fail"]]

            (fake_systemd.directory / "place").write_text("yes")
            r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "scoped", "0", "svc", "container",
                       str(scoped.pid), "", "0")
            assert r.returncode == 0, r.stderr
            assert (scope / "cgroup.procs").read_text().split() == [str(scoped.pid)]
            stray = scoped.release()
            stop(scoped.proc)
            time.sleep(1.5)
            assert show("scoped", "State") == "running"
            os.kill(stray, signal.SIGKILL)
            world.wait_for(lambda: machinectl("show", "scoped").returncode != 0, 10, "scoped to go away")
        finally:
            for p in procs:
                stop(p)
            scoped.stop()
            for path in (scope, service):
                remove_cgroup_dir(path)
            if made_slice:
                service.parent.rmdir()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_host_login_without_systemd(pool: Pool, machined_only: Daemons) -> None:
    """Without systemd on the bus, a login on .host fails as systemd's
    StartUnit call would: the bus's error."""
    r = subprocess.run(["gdbus", "call", "--system", "--dest", MANAGER[0], "--object-path", MANAGER[1],
                        "--method", f"{MANAGER[2]}.OpenMachineLogin", ".host"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "org.freedesktop.DBus.Error.ServiceUnknown" in r.stderr, r.stderr
