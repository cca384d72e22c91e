"""Our machined through real clients only (machinectl 252, busctl, gdbus,
systemd-nspawn): user-namespaced and private-network containers, callers that
are not root, bind mounts, ptys and root directories over the bus, UID/GID
mapping, argument errors, CreateMachine's own cgroup without systemd, and the
arguments of the Manager's signals."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sdbus

from imagepool import dev as world
from tests.conftest import Daemons, Pool, busctl, machinectl
from tests.test_machines import MANAGER, Nspawn, descendants, gdbus, make_root, show
from tests.test_machines import machined_only as machined_only  # noqa: F401  (the fixture)

MACHINE_IFACE = "org.freedesktop.machine1.Machine"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def machine_path(name: str) -> str:
    return f"/org/freedesktop/machine1/machine/{name}"


@contextlib.contextmanager
def running(tmp_path: Path, name: str, *extra: str) -> Iterator[Nspawn]:
    """A registered systemd-nspawn container with a busybox root; stopped
    (every process of it killed) on the way out."""
    c = Nspawn(make_root(tmp_path / f"root-{name}"), name, *extra)
    try:
        c.wait_registered()
        yield c
    finally:
        c.stop()


def leader_of(name: str) -> int:
    return int(show(name, "Leader"))


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def shell(name: str, command: str) -> str:
    """`machinectl shell NAME /bin/sh -c COMMAND` on a pty; its output without
    CRs, and without the "^@" the shell's terminal may echo when script(1)
    passes on the end of its (empty) input."""
    r = subprocess.run(["script", "-qec", f"machinectl shell {name} /bin/sh -c '{command}'", "/dev/null"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.replace("\r", "").replace("^@", "")


def uid_map(pid: int) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in Path(f"/proc/{pid}/uid_map").read_text().splitlines()]


def call_with_fd(method: str, signature: str, *args: object) -> tuple[int, tuple]:
    """Call a Manager method returning a file descriptor from this process
    (busctl and gdbus can't keep one): (a duplicate of the fd, the reply)."""
    bus = sdbus.sd_bus_open_system()
    try:
        message = bus.new_method_call_message(*MANAGER, method)
        message.append_data(signature, *args)
        reply = bus.call(message).get_contents()
        reply = reply if isinstance(reply, tuple) else (reply,)
        return os.dup(reply[0]), reply
    finally:
        bus.close()


# --- 1. a container with its own user namespace ---------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_private_users_container(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    with running(tmp_path, "pu1", "--private-users=pick", "--private-users-ownership=chown"):
        leader = leader_of("pu1")
        # What the kernel says the shift is, and what machined answers.
        [[inner, shift, count]] = uid_map(leader)
        assert inner == 0 and count == 65536 and shift >= 0x10000
        assert gdbus("GetMachineUIDShift", "pu1") == f"(uint32 {shift},)"
        assert gdbus("GetUIDShift", path=machine_path("pu1"), interface=MACHINE_IFACE) == f"(uint32 {shift},)"
        assert busctl("call", *MANAGER, "GetMachineUIDShift", "s", "pu1").stdout.strip() == f"u {shift}"

        r = machinectl("list")
        assert r.returncode == 0, r.stderr
        assert any(line.split()[:3] == ["pu1", "container", "systemd-nspawn"] for line in r.stdout.splitlines())
        # The leader becomes sleep once nspawn's child has exec'd it.
        world.wait_for(lambda: Path(f"/proc/{leader}/comm").read_text() == "sleep\n", 10, "the leader to be sleep")
        r = machinectl("status", "pu1")
        assert r.returncode == 0, r.stderr
        assert re.search(rf"^\s*UID Shift: {shift}$", r.stdout, re.M), r.stdout
        assert re.search(r"^\s*OS: BusyBox$", r.stdout, re.M), r.stdout
        assert re.search(rf"^\s*Leader: {leader} \(sleep\)$", r.stdout, re.M), r.stdout
        r = machinectl("show", "pu1")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        for line in ("Name=pu1", "Class=container", "Service=systemd-nspawn", f"Leader={leader}", "State=running",
                     f"RootDirectory={tmp_path}/root-pu1"):
            assert line in lines, r.stdout

        # A shell runs as the container's root, which is the shift outside.
        assert "\n0\nmarker\n" in shell("pu1", "id -u; echo marker")

        # copy-to: whatever the owner on the host, the copy belongs to the container's root.
        src = tmp_path / "to-pu1.txt"
        src.write_text("for the container\n")
        os.chown(src, 1000, 1000)
        r = machinectl("copy-to", "pu1", str(src), "/tmp/copied.txt")
        assert r.returncode == 0, r.stderr
        copied = Path(f"/proc/{leader}/root/tmp/copied.txt")
        assert copied.read_text() == "for the container\n"
        st = copied.stat()
        assert (st.st_uid, st.st_gid) == (shift, shift)

        # copy-from: a file of the container's UID 1000 (shift + 1000 outside) arrives as root's.
        assert "\nok\n" in shell("pu1", "echo made inside > /tmp/inside.txt; busybox chown 1000:1000 /tmp/inside.txt "
                                 "&& echo ok")
        inside = Path(f"/proc/{leader}/root/tmp/inside.txt").stat()
        assert (inside.st_uid, inside.st_gid) == (shift + 1000, shift + 1000)
        back = tmp_path / "from-pu1.txt"
        r = machinectl("copy-from", "pu1", "/tmp/inside.txt", str(back))
        assert r.returncode == 0, r.stderr
        assert back.read_text() == "made inside\n"
        st = back.stat()
        assert (st.st_uid, st.st_gid) == (0, 0)

        # UID/GID mapping, through busctl, against the kernel's map.
        def answer(*args: str) -> str:
            r = busctl("call", *MANAGER, *args)
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        assert answer("MapFromMachineUser", "su", "pu1", "0") == f"u {shift}"
        assert answer("MapFromMachineUser", "su", "pu1", "1000") == f"u {shift + 1000}"
        assert answer("MapFromMachineGroup", "su", "pu1", "5") == f"u {shift + 5}"
        assert answer("MapToMachineUser", "u", str(shift + 5)) == f'sou "pu1" "{machine_path("pu1")}" 5'
        assert answer("MapToMachineGroup", "u", str(shift + 7)) == f'sou "pu1" "{machine_path("pu1")}" 7'
        assert gdbus("MapFromMachineUser", "pu1", "65536") == (
            "Error: GDBus.Error:org.freedesktop.machine1.NoSuchUserMapping: Machine 'pu1' has no matching user "
            "mappings.")
        assert gdbus("MapFromMachineGroup", "pu1", "65536") == (
            "Error: GDBus.Error:org.freedesktop.machine1.NoSuchUserMapping: Machine 'pu1' has no matching group "
            "mappings.")
        assert gdbus("MapFromMachineUser", "pu1", "65535") == (
            "Error: GDBus.Error:org.freedesktop.DBus.Error.InvalidArgs: Invalid user ID 65535")
        assert gdbus("MapToMachineUser", str(shift + 65536)) == (
            f"Error: GDBus.Error:org.freedesktop.machine1.NoSuchUserMapping: No matching user mapping for "
            f"{shift + 65536}.")
        assert gdbus("MapToMachineGroup", str(shift + 65536)) == (
            f"Error: GDBus.Error:org.freedesktop.machine1.NoSuchGroupMapping: No matching group mapping for "
            f"{shift + 65536}.")
        # The host maps nothing.
        assert gdbus("MapFromMachineUser", ".host", "0") == (
            "Error: GDBus.Error:org.freedesktop.DBus.Error.InvalidArgs: Not supported for non-container machines.")
        assert gdbus("MapToMachineUser", "1000") == (
            "Error: GDBus.Error:org.freedesktop.machine1.NoSuchUserMapping: User 1000 belongs to host UID range")
        assert gdbus("MapToMachineGroup", "1000") == (
            "Error: GDBus.Error:org.freedesktop.machine1.NoSuchGroupMapping: Group 1000 belongs to host GID range")

        # No bind mounts into a user namespace (as systemd).
        share = tmp_path / "share"
        share.mkdir()
        assert gdbus("BindMountMachine", "pu1", str(share), "/mnt", "false", "true") == (
            "Error: GDBus.Error:org.freedesktop.DBus.Error.NotSupported: "
            "Can't bind mount on container with user namespacing applied.")
        r = machinectl("bind", "--mkdir", "pu1", str(share), "/mnt")
        assert r.returncode != 0 and "Can't bind mount on container with user namespacing applied." in r.stderr


# --- 1b, 2. network interfaces; no private networking --------------------------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_network_interfaces_and_no_private_networking(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    with running(tmp_path, "veth1", "--network-veth"), running(tmp_path, "priv1", "--private-network"), \
            running(tmp_path, "hostnet1"):
        # nspawn hands machined the host side of its veth pair.
        ifindex = int(Path("/sys/class/net/ve-veth1/ifindex").read_text())
        r = busctl("get-property", MANAGER[0], machine_path("veth1"), MACHINE_IFACE, "NetworkInterfaces")
        assert r.stdout.strip() == f"ai 1 {ifindex}", r.stdout + r.stderr
        r = machinectl("show", "-p", "NetworkInterfaces", "veth1")
        assert r.returncode == 0 and r.stdout.strip() == "NetworkInterfaces=[unprintable]", r.stdout + r.stderr
        r = machinectl("show", "--all", "veth1")
        assert r.returncode == 0 and "NetworkInterfaces=[unprintable]" in r.stdout.splitlines(), r.stdout
        r = machinectl("status", "veth1")
        assert r.returncode == 0 and re.search(r"^\s*Iface: ve-veth1$", r.stdout, re.M), r.stdout + r.stderr

        # A private network without interfaces handed over: none listed, addresses answered.
        r = busctl("get-property", MANAGER[0], machine_path("priv1"), MACHINE_IFACE, "NetworkInterfaces")
        assert r.stdout.strip() == "ai 0", r.stdout + r.stderr
        assert "Iface:" not in machinectl("status", "priv1").stdout
        assert gdbus("GetMachineAddresses", "priv1") == "(@a(iay) [],)"

        # The host's network namespace: systemd 252's error and text, from the Manager and the Machine.
        no_private = ("Error: GDBus.Error:org.freedesktop.machine1.NoPrivateNetworking: "
                      "Machine hostnet1 does not use private networking")
        assert gdbus("GetMachineAddresses", "hostnet1") == no_private
        assert gdbus("GetAddresses", path=machine_path("hostnet1"), interface=MACHINE_IFACE) == no_private
        r = busctl("call", *MANAGER, "GetMachineAddresses", "s", "hostnet1")
        assert r.returncode != 0 and "Machine hostnet1 does not use private networking" in r.stderr
        # machinectl status shrugs it off.
        r = machinectl("status", "hostnet1")
        assert r.returncode == 0 and "OS: BusyBox" in r.stdout, r.stdout + r.stderr
        assert "Address:" not in r.stdout


# --- 3. callers that are not root ------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_non_root_callers(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        with running(tmp_path, "pu2", "--private-users=pick", "--private-users-ownership=chown"), \
                running(tmp_path, "plain2"):
            leader = leader_of("pu2")
            shift = uid_map(leader)[0][1]
            src = tmp_path / "payload.txt"
            src.write_text("payload\n")
            share = tmp_path / "share"
            share.mkdir()
            Path(f"/proc/{leader}/root/tmp/there.txt").write_text("there\n")
            back = tmp_path / "back.txt"

            refused = [
                ("machinectl", "kill", "pu2"),
                ("machinectl", "kill", "--kill-whom=leader", "--signal=KILL", "pu2"),
                ("machinectl", "shell", "pu2", "/bin/sh", "-c", "echo in"),
                ("machinectl", "copy-to", "pu2", str(src), "/tmp/payload.txt"),
                ("machinectl", "copy-from", "pu2", "/tmp/there.txt", str(back)),
                ("machinectl", "bind", "--mkdir", "plain2", str(share), "/mnt/share"),
                ("busctl", "--system", "call", *MANAGER, "UnregisterMachine", "s", "pu2"),
                ("busctl", "--system", "call", *MANAGER, "CreateMachine", "sayssusa(sv)", "evil", "0", "svc",
                 "container", str(sleeper.pid), "", "0"),
                ("busctl", "--system", "call", *MANAGER, "OpenMachinePTY", "s", "pu2"),
                ("busctl", "--system", "call", *MANAGER, "OpenMachineRootDirectory", "s", "pu2"),
            ]
            for argv in refused:
                r = as_nobody(*argv)
                assert r.returncode != 0 and "Access denied" in r.stderr, (argv, r.stdout, r.stderr)
            # ... and nothing happened.
            assert show("pu2", "State") == "running" and leader_of("pu2") == leader
            assert not Path(f"/proc/{leader}/root/tmp/payload.txt").exists()
            assert not back.exists()
            assert not os.path.exists(f"/proc/{leader_of('plain2')}/root/mnt/share")
            assert machinectl("show", "evil").returncode != 0
            assert sleeper.poll() is None

            # Looking is allowed, but for the os-release, which systemd 262 asks polkit for (inspect-machines:
            # refused here, without polkit; tests/test_polkit.py grants it).
            r = as_nobody("machinectl", "--no-pager", "status", "pu2")
            assert r.returncode == 0, r.stderr
            assert not re.search(r"^\s*OS: ", r.stdout, re.M) and f"UID Shift: {shift}" in r.stdout, r.stdout
            r = as_nobody("busctl", "--system", "call", *MANAGER, "GetMachineOSRelease", "s", "pu2")
            assert r.returncode != 0 and "Access denied" in r.stderr, r.stderr
            r = machinectl("--no-pager", "status", "pu2")  # root
            assert re.search(r"^\s*OS: BusyBox$", r.stdout, re.M), r.stdout
            r = as_nobody("busctl", "--system", "call", *MANAGER, "MapToMachineUser", "u", str(shift + 5))
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == f'sou "pu2" "{machine_path("pu2")}" 5'
    finally:
        sleeper.kill()
        sleeper.wait()


# --- 4. bind mounts, ptys, root directories, argument errors over the bus --------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_bind_pty_root_and_argument_errors(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    with running(tmp_path, "b1") as c:
        leader = leader_of("b1")
        root = tmp_path / "root-b1"
        share = tmp_path / "share"
        share.mkdir()
        (share / "hello.txt").write_text("hello from the host\n")

        # bind: visible in the container's mount namespace, not a copy in its root directory.
        r = machinectl("bind", "--mkdir", "b1", str(share), "/inside/dir")
        assert r.returncode == 0, r.stderr
        assert Path(f"/proc/{leader}/root/inside/dir/hello.txt").read_text() == "hello from the host\n"
        assert (root / "inside/dir").is_dir() and not (root / "inside/dir/hello.txt").exists()
        (share / "later.txt").write_text("later\n")
        assert Path(f"/proc/{leader}/root/inside/dir/later.txt").read_text() == "later\n"
        r = machinectl("bind", "--read-only", "--mkdir", "b1", str(share), "/ro")
        assert r.returncode == 0, r.stderr
        assert Path(f"/proc/{leader}/root/ro/hello.txt").read_text() == "hello from the host\n"
        with pytest.raises(OSError) as e:
            Path(f"/proc/{leader}/root/ro/new.txt").write_text("x")
        assert e.value.strerror == "Read-only file system"
        assert not (share / "new.txt").exists()

        # OpenMachinePTY: a pty of the container's devpts.
        r = busctl("call", *MANAGER, "OpenMachinePTY", "s", "b1")
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r'hs \d+ "/dev/pts/\d+"', r.stdout.strip()), r.stdout
        fd, (_, pty) = call_with_fd("OpenMachinePTY", "s", "b1")
        try:
            assert re.fullmatch(r"/dev/pts/\d+", pty)
            assert stat.S_ISCHR(os.fstat(fd).st_mode)
            slave = os.stat(f"/proc/{leader}/root{pty}")
            assert stat.S_ISCHR(slave.st_mode)
            assert os.stat(f"/proc/{leader}/root/dev/pts/ptmx").st_dev == slave.st_dev
        finally:
            os.close(fd)

        # OpenMachineRootDirectory: the container's root.
        r = busctl("call", *MANAGER, "OpenMachineRootDirectory", "s", "b1")
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r"h \d+", r.stdout.strip()), r.stdout
        fd, _ = call_with_fd("OpenMachineRootDirectory", "s", "b1")
        try:
            st, expected = os.fstat(fd), os.stat(root)
            assert (st.st_dev, st.st_ino) == (expected.st_dev, expected.st_ino)
            assert "ID=busybox" in Path(f"/proc/self/fd/{fd}/etc/os-release").read_text()
        finally:
            os.close(fd)

        # KillMachine's argument checks (systemd's InvalidArgs texts); nothing is signalled.
        invalid = "Error: GDBus.Error:org.freedesktop.DBus.Error.InvalidArgs: "
        assert gdbus("KillMachine", "b1", "bogus", "15") == invalid + "Invalid kill parameter 'bogus'"
        assert gdbus("KillMachine", "b1", "all", "0") == invalid + "Invalid signal 0"
        assert gdbus("KillMachine", "b1", "leader", "65") == invalid + "Invalid signal 65"
        assert gdbus("KillMachine", "b1", "", "int32 -9") == invalid + "Invalid signal -9"
        assert gdbus("Kill", "everyone", "15", path=machine_path("b1"), interface=MACHINE_IFACE) == (
            invalid + "Invalid kill parameter 'everyone'")
        r = busctl("call", *MANAGER, "KillMachine", "ssi", "b1", "all", "99")
        assert r.returncode != 0 and "Invalid signal 99" in r.stderr
        assert c.proc.poll() is None and leader_of("b1") == leader

        # Copy flags other than "replace" (1) are refused, and copy nothing.
        Path(f"/proc/{leader}/root/tmp/src.txt").write_text("new\n")
        dest = tmp_path / "dest.txt"
        dest.write_text("old\n")
        assert gdbus("CopyFromMachineWithFlags", "b1", "/tmp/src.txt", str(dest), "@t 2") == (
            invalid + "Invalid argument")
        assert gdbus("CopyToMachineWithFlags", "b1", str(dest), "/tmp/other.txt", "@t 3") == (
            invalid + "Invalid argument")
        r = busctl("call", *MANAGER, "CopyFromMachineWithFlags", "ssst", "b1", "/tmp/src.txt", str(dest), "2")
        assert r.returncode != 0 and "Invalid argument" in r.stderr
        assert dest.read_text() == "old\n" and not Path(f"/proc/{leader}/root/tmp/other.txt").exists()
        # Without "replace" an existing file stays; with it, it is replaced.
        r = busctl("call", *MANAGER, "CopyFromMachineWithFlags", "ssst", "b1", "/tmp/src.txt", str(dest), "0")
        assert r.returncode != 0 and dest.read_text() == "old\n"
        r = busctl("call", *MANAGER, "CopyFromMachineWithFlags", "ssst", "b1", "/tmp/src.txt", str(dest), "1")
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == "new\n"


# --- 5. CreateMachine without systemd: a cgroup of our own ---------------------------------------------------


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_v2_writable() -> bool:
    procs = CGROUP_ROOT / "cgroup.procs"
    return procs.exists() and os.access(procs, os.W_OK)


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its (new) parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


class StrayingLeader:
    """A leader (sh) that, once released, starts a process that leaves its
    tree (the subshell that started it exits) and becomes sleep itself.
    stop() kills both."""

    def __init__(self, pidfile: Path, ignore_term: bool = False) -> None:
        self.pidfile = pidfile
        trap = "trap '' TERM; " if ignore_term else ""
        self.proc = subprocess.Popen(["sh", "-c", f"read go; ({trap}sleep 1000 & echo $! > {pidfile}); "
                                                  "exec sleep 1000"], stdin=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.stray = 0

    def release(self) -> int:
        """Let the stray go; its PID, once it has left the leader's tree."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        world.wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), 10, "the stray process")
        self.stray = int(self.pidfile.read_text())
        world.wait_for(lambda: Path(f"/proc/{self.pid}/comm").read_text() == "sleep\n"
                       and self.stray not in descendants(self.pid), 10, "the stray to leave the leader's tree")
        return self.stray

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.stray and not process_gone(self.stray):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.stray, signal.SIGKILL)
            world.wait_for(lambda: process_gone(self.stray), 10, "the stray process to die")


def remove_cgroup_dir(path: Path) -> None:
    """Remove a cgroup a test made or left behind, once it is empty."""
    if path.exists():
        world.wait_for(lambda: not (path / "cgroup.procs").read_text().split(), 10, "an empty cgroup")
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def create_and_terminate(tmp_path: Path, name: str, escaped: str, label: str, own_cgroup: bool) -> None:
    """CreateMachine with a leader that, once registered, starts a process
    that leaves the leader's tree (its parent exits; it is reparented); then
    machinectl terminate.  With OWN_CGROUP the leader must be in
    machine.slice/machine-NAME.scope, the stray process too, and terminate
    must kill it; without, no cgroup may appear.  ESCAPED is NAME as in a
    unit name, LABEL as in an object path."""
    unit = f"machine-{escaped}.scope"
    scope = CGROUP_ROOT / "machine.slice" / unit
    leader = StrayingLeader(tmp_path / f"{name}.stray")
    try:
        r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", name, "0", "svc", "container", str(leader.pid),
                   "", "0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f'o "{machine_path(label)}"'
        assert show(name, "Unit") == unit and show(name, "State") == "running"
        assert show(name, "Leader") == str(leader.pid)
        if own_cgroup:
            assert (scope / "cgroup.procs").read_text().split() == [str(leader.pid)]
            assert f"0::/machine.slice/{unit}\n" in Path(f"/proc/{leader.pid}/cgroup").read_text()
        else:
            assert not scope.exists()

        stray = leader.release()
        assert not process_gone(stray)

        if own_cgroup:
            assert sorted(int(p) for p in (scope / "cgroup.procs").read_text().split()) == sorted([leader.pid, stray])
            # machined knows it for one of the machine's processes.
            assert gdbus("GetMachineByPID", str(stray)) == f"(objectpath '{machine_path(label)}',)"

        r = machinectl("terminate", name)
        assert r.returncode == 0, r.stderr
        leader.proc.wait(timeout=15)
        world.wait_for(lambda: machinectl("show", name).returncode != 0, 15, f"{name} to go away")
        assert not Path(f"/run/systemd/machines/{name}").exists()
        if own_cgroup:
            world.wait_for(lambda: process_gone(stray), 15, "the stray process to be killed")
        assert not scope.exists()
    finally:
        leader.stop()
        remove_cgroup_dir(scope)  # only if the test failed


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_create_machine_cgroup_as_found(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    """As the test environment has it: our own cgroup if the cgroup v2
    hierarchy at /sys/fs/cgroup is writable, else still a machine (with the
    scope's name as its unit) but no cgroup."""
    had_slice = (CGROUP_ROOT / "machine.slice").exists()
    try:
        create_and_terminate(tmp_path, "cg-1", "cg\\x2d1", "cg_2d1", cgroup_v2_writable())
    finally:
        if not had_slice:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "machine.slice").rmdir()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_create_machine_own_cgroup(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    """With the cgroup v2 hierarchy at /sys/fs/cgroup."""
    with cgroup_v2_at_root():
        create_and_terminate(tmp_path, "cg-2", "cg\\x2d2", "cg_2d2", True)


@contextlib.contextmanager
def cgroup_v2_at_root() -> Iterator[None]:
    """The cgroup v2 hierarchy at /sys/fs/cgroup (mounted there in the suite's
    private mount namespace if the host has it elsewhere)."""
    mounted = False
    if not cgroup_v2_writable():
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT)], check=True)
        mounted = True
    had_slice = (CGROUP_ROOT / "machine.slice").exists()
    try:
        assert cgroup_v2_writable()
        yield
    finally:
        if not had_slice:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "machine.slice").rmdir()
        if mounted:
            subprocess.run(["umount", str(CGROUP_ROOT)], check=True)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machine_lasts_while_its_cgroup_has_processes(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    """As with systemd's scope: when the leader exits, a machine with a cgroup
    of its own stays while processes are left in it, and goes (its cgroup
    removed) once they are gone.  Terminate answers once SIGTERM is sent, not
    after the SIGKILL that follows for processes ignoring it."""
    with cgroup_v2_at_root():
        scope = CGROUP_ROOT / "machine.slice" / "machine-left.scope"
        leader = StrayingLeader(tmp_path / "stray", ignore_term=True)
        try:
            r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "left", "0", "svc", "container",
                       str(leader.pid), "", "0")
            assert r.returncode == 0, r.stderr
            stray = leader.release()
            leader.proc.kill()
            leader.proc.wait()
            time.sleep(1.5)  # several of machined's looks at the cgroup
            assert show("left", "State") == "running"
            assert gdbus("GetMachineByPID", str(stray)) == f"(objectpath '{machine_path('left')}',)"
            # The stray ignores SIGTERM: terminate answers anyway, at once.
            t0 = time.monotonic()
            r = machinectl("terminate", "left")
            assert r.returncode == 0, r.stderr
            assert time.monotonic() - t0 < 5
            assert not process_gone(stray)
            os.kill(stray, signal.SIGKILL)
            world.wait_for(lambda: machinectl("show", "left").returncode != 0, 10, "left to go away")
            assert not scope.exists()
        finally:
            leader.stop()
            remove_cgroup_dir(scope)  # only if the test failed


# --- 6. the Manager's signals, with their arguments -------------------------------------------------------------------


class Monitor:
    """busctl monitor --json=short on the Manager's signals; lines arrive on a queue."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["busctl", "--system", "monitor", "--json=short", "--match",
             "type='signal',interface='org.freedesktop.machine1.Manager'"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()
        # busctl says so once it is a monitor.
        deadline = time.monotonic() + 10
        try:
            while "Monitoring bus message stream." not in self.err.get(timeout=max(0.1, deadline - time.monotonic())):
                pass
        except BaseException:
            world.stop_process(self.proc)
            raise

    @staticmethod
    def _pump(stream, q: queue.Queue[str]) -> None:
        for line in stream:
            q.put(line)

    def next(self, timeout: float = 10) -> dict:
        return json.loads(self.out.get(timeout=timeout))

    def stop(self) -> list[str]:
        world.stop_process(self.proc)
        rest = []
        with contextlib.suppress(queue.Empty):
            while True:
                rest.append(self.out.get(timeout=0.5))
        return rest


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machine_signals_arguments(pool: Pool, machined_only: Daemons) -> None:
    owner = busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner",
                   "s", MANAGER[0]).stdout.split()[1].strip('"')
    monitor = Monitor()
    sleepers = [subprocess.Popen(["sleep", "1000"]) for _ in range(2)]
    try:
        def expect(member: str, name: str, path: str) -> None:
            message = monitor.next()
            assert message["type"] == "signal" and message["sender"] == owner
            assert message["path"] == MANAGER[1] and message["interface"] == MANAGER[2]
            assert (message["member"], message["payload"]) == (member, {"type": "so", "data": [name, path]})

        # Registered and unregistered over the bus; the path escapes the name.
        r = busctl("call", *MANAGER, "RegisterMachine", "sayssus", "sig-1", "0", "svc", "container",
                   str(sleepers[0].pid), "")
        assert r.returncode == 0, r.stderr
        expect("MachineNew", "sig-1", machine_path("sig_2d1"))
        r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "sig2", "0", "svc", "vm", str(sleepers[1].pid),
                   "", "0")
        assert r.returncode == 0, r.stderr
        expect("MachineNew", "sig2", machine_path("sig2"))
        r = busctl("call", *MANAGER, "UnregisterMachine", "s", "sig-1")
        assert r.returncode == 0, r.stderr
        expect("MachineRemoved", "sig-1", machine_path("sig_2d1"))
        assert sleepers[0].poll() is None
        # A leader that exits takes its machine along.
        sleepers[1].kill()
        sleepers[1].wait()
        expect("MachineRemoved", "sig2", machine_path("sig2"))
    finally:
        for s in sleepers:
            s.kill()
            s.wait()
        rest = monitor.stop()
    assert rest == [], rest  # nothing else was signalled
