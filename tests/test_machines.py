"""The machine registry with real clients: systemd-nspawn --register=yes,
machinectl, busctl and libsystemd's sd-login, on a machine without systemd
as PID 1."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sdbus
from sdbus.sd_bus_internals import SdBusUnmappedMessageError

from imagepool import dev as world
from machined.procs import cgroup_unit
from tests.conftest import Daemons, Pool, busctl, machinectl

MANAGER = ("org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager")


def make_root(path: Path, name: str = "BusyBox") -> Path:
    """A minimal container root: static busybox, os-release, passwd."""
    for d in ("bin", "usr", "etc", "dev", "proc", "sys", "tmp", "run", "root"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", path / "bin/busybox")
    for tool in ("sh", "sleep", "ls", "cat", "echo", "id", "ip", "hostname", "mount", "touch"):
        os.symlink("busybox", path / "bin" / tool)
    (path / "etc/os-release").write_text(f'ID=busybox\nVERSION_ID=1.35\nPRETTY_NAME="{name}"\n')
    (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "etc/group").write_text("root:x:0:\n")
    (path / "etc/machine-id").write_text("")
    return path


class Nspawn:
    """A running systemd-nspawn --register=yes container."""

    def __init__(self, root: Path, name: str, *extra: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--keep-unit", "--register=yes", "-q", "-D", str(root), "-M", name, *extra,
             "/bin/sleep", "1000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    def wait_registered(self) -> None:
        def registered() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited: {self.proc.stderr.read()}")
            return machinectl("show", "-p", "Name", self.name).returncode == 0

        world.wait_for(registered, 30, f"{self.name} to register")

    def stop(self) -> None:
        kill_tree(self.proc)


def kill_tree(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Kill a systemd-nspawn and its container: the container's init runs in
    a session of its own, so every descendant, not just the process group."""
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def machined_only(daemons: Daemons):
    daemons.start("machined")
    yield daemons
    daemons.stop()


@pytest.fixture
def container(pool: Pool, machined_only: Daemons, tmp_path: Path):
    root = make_root(tmp_path / "root")
    c = Nspawn(root, "c1")
    try:
        c.wait_registered()
        yield c
    finally:
        c.stop()


def show(name: str, prop: str) -> str:
    r = machinectl("show", "-p", prop, "--value", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_nspawn_registers_and_is_listed(pool: Pool, container: Nspawn) -> None:
    r = machinectl("list")
    assert r.returncode == 0
    assert any(line.split()[:3] == ["c1", "container", "systemd-nspawn"] for line in r.stdout.splitlines())
    assert show("c1", "Class") == "container"
    assert show("c1", "Service") == "systemd-nspawn"
    assert show("c1", "State") == "running"
    leader = int(show("c1", "Leader"))
    assert os.path.exists(f"/proc/{leader}")
    state = Path("/run/systemd/machines/c1").read_text()
    assert "CLASS=container" in state and f"LEADER={leader}" in state
    # .host is always there.
    assert ".host" in machinectl("list", "--all").stdout
    r = busctl("call", *MANAGER, "GetMachineByPID", "u", str(leader))
    assert r.stdout.strip() == 'o "/org/freedesktop/machine1/machine/c1"'


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_sd_login_sees_machines(pool: Pool, container: Nspawn) -> None:
    libsystemd = ctypes.CDLL("libsystemd.so.0")
    names = ctypes.POINTER(ctypes.c_char_p)()
    n = libsystemd.sd_get_machine_names(ctypes.byref(names))
    assert n >= 1
    found = [names[i].decode() for i in range(n)]
    assert "c1" in found
    cls = ctypes.c_char_p()
    assert libsystemd.sd_machine_get_class(b"c1", ctypes.byref(cls)) == 0
    assert cls.value == b"container"


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_leader_exit_removes_machine(pool: Pool, container: Nspawn) -> None:
    leader = int(show("c1", "Leader"))
    os.kill(leader, signal.SIGKILL)
    world.wait_for(lambda: machinectl("show", "c1").returncode != 0, 10, "c1 to go away")
    assert not Path("/run/systemd/machines/c1").exists()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_restart_keeps_running_machines(pool: Pool, container: Nspawn, machined_only: Daemons) -> None:
    leader = show("c1", "Leader")
    assert f"LEADER_PIDFDID={pidfd_id_of(int(leader))}" in Path("/run/systemd/machines/c1").read_text()
    # A stale state file of a machine whose leader is gone is cleaned up; so
    # is one whose leader's PID now belongs to another process.
    Path("/run/systemd/machines/ghost").write_text("NAME=ghost\nLEADER=999999\nCLASS=container\n")
    Path("/run/systemd/machines/recycled").write_text(
        f"NAME=recycled\nLEADER={os.getpid()}\nLEADER_PIDFDID=1\nCLASS=container\n")
    machined_only.start("machined")
    assert show("c1", "Leader") == leader
    assert machinectl("show", "ghost").returncode != 0
    assert not Path("/run/systemd/machines/ghost").exists()
    assert machinectl("show", "recycled").returncode != 0
    assert not Path("/run/systemd/machines/recycled").exists()
    # And it still notices when the leader exits.
    os.kill(int(leader), signal.SIGKILL)
    world.wait_for(lambda: machinectl("show", "c1").returncode != 0, 10, "c1 to go away")


def pidfd_id_of(pid: int) -> int:
    fd = os.pidfd_open(pid)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def call_ex(method: str, name: str, properties: list) -> tuple[str, str]:
    """RegisterMachineEx/CreateMachineEx from this process (busctl can't send
    a pidfd): ("ok", path) or (error name, message)."""
    bus = sdbus.sd_bus_open_system()
    try:
        message = bus.new_method_call_message(*MANAGER, method)
        if method == "CreateMachineEx":
            message.append_data("sa(sv)a(sv)", name, properties, [])
        else:
            message.append_data("sa(sv)", name, properties)
        try:
            return "ok", bus.call(message).get_contents()
        except sdbus.DbusFailedError as e:
            return e.dbus_error_name, str(e.args[0]) if e.args else ""
        except SdBusUnmappedMessageError as e:
            return str(e.args[0]), str(e.args[1])
    finally:
        bus.close()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_register_machine_ex(pool: Pool, machined_only: Daemons) -> None:
    """The key/value registration (systemd 259): the leader by pidfd or by PID
    and pidfd id, the caller as supervisor, VSOCK and SSH data kept."""
    sleeper = subprocess.Popen(["sleep", "100"])
    other = subprocess.Popen(["sleep", "100"])
    pidfd = os.pidfd_open(sleeper.pid)
    try:
        pid, fd_id = sleeper.pid, os.fstat(pidfd).st_ino
        errors = [
            ([("Foo", ("s", "x"))], "org.freedesktop.DBus.Error.InvalidArgs", "Unknown property 'Foo'"),
            ([("Id", ("ay", b"12"))], "org.freedesktop.DBus.Error.InvalidArgs", "Invalid machine ID parameter"),
            ([("NetworkInterfaces", ("ai", [0]))], "org.freedesktop.DBus.Error.InvalidArgs",
             "Invalid network interface index 0"),
            ([("VSockCID", ("u", 2))], "org.freedesktop.DBus.Error.InvalidArgs",
             "JSON field 'vSockCid' is not a regular VSOCK CID."),
            ([("Class", ("s", "toaster"))], "org.freedesktop.DBus.Error.InvalidArgs",
             "Invalid machine class parameter"),
            ([("LeaderPID", ("u", pid))], "org.freedesktop.DBus.Error.InvalidArgs",
             "Both LeaderPID and LeaderPIDFDID must be specified to identify the leader process by PIDFDID"),
            ([("LeaderPID", ("u", pid)), ("LeaderPIDFDID", ("t", fd_id + 1))],
             "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
             f"Failed to pin process {pid} by PIDFDID {fd_id + 1}: No such process"),
            ([("LeaderPIDFD", ("h", pidfd)), ("LeaderPID", ("u", other.pid))], "org.freedesktop.DBus.Error.InvalidArgs",
             "LeaderPID and LeaderPIDFD refer to different processes"),
            ([("LeaderPIDFD", ("h", pidfd)), ("LeaderPIDFDID", ("t", fd_id + 1))],
             "org.freedesktop.DBus.Error.InvalidArgs", "LeaderPIDFDID does not match the inode number of LeaderPIDFD"),
        ]
        for properties, name, text in errors:
            assert call_ex("RegisterMachineEx", "ex1", properties) == (name, text), properties
        assert call_ex("RegisterMachineEx", "bad name", []) == ("org.freedesktop.DBus.Error.InvalidArgs",
                                                               "Invalid machine name")
        r = call_ex("RegisterMachineEx", "ex1", [
            ("Class", ("s", "vm")), ("Service", ("s", "qemu")), ("LeaderPIDFD", ("h", pidfd)),
            ("LeaderPIDFDID", ("t", fd_id)), ("VSockCID", ("u", 42)), ("SSHAddress", ("s", "vsock/42")),
            ("SSHPrivateKeyPath", ("s", "/run/ex1/key"))])
        assert r == ("ok", "/org/freedesktop/machine1/machine/ex1")
        assert show("ex1", "Leader") == str(pid) and show("ex1", "LeaderPIDFDId") == str(fd_id)
        assert show("ex1", "Supervisor") == str(os.getpid())
        assert show("ex1", "SupervisorPIDFDId") == str(pidfd_id_of(os.getpid()))
        assert show("ex1", "VSockCID") == "42" and show("ex1", "Class") == "vm"
        assert gdbus("GetMachineSSHInfo", "ex1") == "('vsock/42', '/run/ex1/key')"
        assert gdbus("GetSSHInfo", path="/org/freedesktop/machine1/machine/ex1",
                     interface="org.freedesktop.machine1.Machine") == "('vsock/42', '/run/ex1/key')"
        state = Path("/run/systemd/machines/ex1").read_text().splitlines()
        for line in (f"LEADER={pid}", f"LEADER_PIDFDID={fd_id}", f"SUPERVISOR={os.getpid()}", "VSOCK_CID=42",
                     "SSH_ADDRESS=vsock/42", "SSH_PRIVATE_KEY_PATH=/run/ex1/key", "CLASS=vm"):
            assert line in state, state
        # By PID and pidfd id; no VSOCK or SSH data.
        r = call_ex("CreateMachineEx", "ex2", [("Class", ("s", "container")), ("LeaderPID", ("u", other.pid)),
                                               ("LeaderPIDFDID", ("t", pidfd_id_of(other.pid)))])
        assert r == ("ok", "/org/freedesktop/machine1/machine/ex2")
        assert show("ex2", "Unit") == "machine-ex2.scope" and show("ex2", "VSockCID") == str(0xFFFFFFFF)
        assert "org.freedesktop.DBus.Error.FileNotFound: No such file or directory" in gdbus("GetMachineSSHInfo", "ex2")
        assert call_ex("RegisterMachineEx", "ex1", []) == ("org.freedesktop.machine1.MachineExists",
                                                          "Machine 'ex1' already exists")
    finally:
        os.close(pidfd)
        for proc in (sleeper, other):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_register_argument_checks(pool: Pool, machined_only: Daemons) -> None:
    """What the reference can't show without systemd as PID 1 (see
    test_registry_errors_match_reference for the rest), as systemd 252's code
    answers it: classes machine_start() refuses, dead and taken leaders."""
    sleeper = subprocess.Popen(["sleep", "100"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        pid = str(sleeper.pid)

        def register(name: str, cls: str, leader: str, method: str = "RegisterMachine") -> str:
            extra = ["@a(sv) []"] if method == "CreateMachine" else []
            return gdbus(method, name, "@ay []", "svc", cls, leader, "", *extra)

        not_supported = "org.freedesktop.DBus.Error.NotSupported: Operation not supported"
        assert not_supported in register("m1", "", pid)
        assert not_supported in register("m1", "host", pid)
        assert not_supported in register("m1", "", pid, "CreateMachine")
        assert (f"org.freedesktop.DBus.Error.UnixProcessIdUnknown: Failed to determine unit of process "
                f"{dead.pid} : No such process") in register("m1", "container", str(dead.pid))
        assert (f"org.freedesktop.DBus.Error.UnixProcessIdUnknown: Process with ID {dead.pid} does not exist."
                in register("m1", "container", str(dead.pid), "CreateMachine"))
        assert register("m1", "vm", pid) == "(objectpath '/org/freedesktop/machine1/machine/m1',)"
        assert "org.freedesktop.machine1.MachineExists: Machine 'm1' already exists" in register("m1", "vm", pid)
        assert "org.freedesktop.DBus.Error.FileExists: File exists" in register("m2", "container", pid)
        assert "org.freedesktop.DBus.Error.FileExists: File exists" in register("m2", "container", pid,
                                                                                 "CreateMachine")
        assert machinectl("show", "m2").returncode != 0
        assert gdbus("GetMachineByPID", pid) == "(objectpath '/org/freedesktop/machine1/machine/m1',)"
        assert "NoMachineForPID" in gdbus("GetMachineByPID", "0")  # gdbus itself is in no machine
        # Non-root callers may look, not register or kill.
        r = machinectl("list", user="nobody")
        assert r.returncode == 0 and "m1" in r.stdout
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busctl", "--system",
                            "call", *MANAGER, "RegisterMachine", "sayssus", "m2", "0", "svc", "container", pid, ""],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Access denied" in r.stderr
        r = machinectl("terminate", "m1", user="nobody")
        assert r.returncode != 0 and "Access denied" in r.stderr
        # The host can't be stopped; "unregistering" it changes nothing.
        assert gdbus("UnregisterMachine", ".host") == "()"
        assert show(".host", "Class") == "host"
        assert busctl("call", *MANAGER, "UnregisterMachine", "s", "m1").returncode == 0
        assert machinectl("show", "m1").returncode != 0
        assert sleeper.poll() is None  # unregistering doesn't stop anything
    finally:
        sleeper.kill()
        sleeper.wait()


def gdbus(method: str, *args: str, path: str = MANAGER[1], interface: str = MANAGER[2]) -> str:
    """Call METHOD; gdbus shows the D-Bus error name (busctl only the message)."""
    r = subprocess.run(["gdbus", "call", "--system", "--dest", MANAGER[0], "--object-path", path,
                        "--method", f"{interface}.{method}", *args], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else r.stderr.splitlines()[0]


# Calls that systemd-machined 252 answers without systemd as PID 1 (they fail
# before it would look up a unit); ours must give the same error names and texts.
REGISTRY_ERRORS = [
    ("RegisterMachine", "bad name", "@ay []", "svc", "container", "{pid}", ""),
    ("RegisterMachine", "a" * 65, "@ay []", "svc", "container", "{pid}", ""),
    ("RegisterMachine", "m1", "[byte 1, 2]", "svc", "container", "{pid}", ""),
    ("RegisterMachine", "m1", "@ay []", "svc", "toaster", "{pid}", ""),
    ("RegisterMachine", "m1", "@ay []", "svc", "container", "1", ""),
    ("RegisterMachine", "m1", "@ay []", "svc", "container", "{pid}", "relative"),
    ("RegisterMachineWithNetwork", "m1", "@ay []", "svc", "container", "{pid}", "", "[0]"),
    ("RegisterMachineWithNetwork", "m1", "@ay []", "svc", "vm", "{pid}", "", "[1, -3]"),
    ("CreateMachine", "bad/name", "@ay []", "svc", "container", "{pid}", "", "@a(sv) []"),
    ("CreateMachine", "m1", "@ay []", "svc", "container", "1", "", "@a(sv) []"),
    ("GetMachine", "nope"),
    ("GetMachine", "bad name"),
    ("GetMachineByPID", "1"),
    ("GetMachineByPID", "{pid}"),
    ("TerminateMachine", ".host"),
    ("TerminateMachine", "nope"),
    ("KillMachine", ".host", "all", "15"),
    ("KillMachine", "nope", "all", "15"),
    ("GetMachineOSRelease", "nope"),
    ("CopyFromMachine", ".host", "/etc/hostname", "/tmp/x"),
    ("BindMountMachine", ".host", "/tmp", "/tmp", "false", "false"),
    ("OpenMachineRootDirectory", "nope"),
    ("GetMachineUIDShift", ".host"),
    ("MapFromMachineUser", ".host", "0"),
    ("MapToMachineUser", "4000000"),
    ("MapFromMachineGroup", "nope", "0"),
    ("OpenMachineLogin", ".host"),
]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_registry_errors_match_reference(pool: Pool, daemons: Daemons) -> None:
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        def run_all() -> list[str]:
            return [gdbus(method, *(a.format(pid=sleeper.pid) for a in args)) for method, *args in REGISTRY_ERRORS]

        daemons.start_reference()
        reference = run_all()
        daemons.start("machined")
        ours = run_all()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sum("GDBus.Error" in line for line in reference) == len(REGISTRY_ERRORS) - 1, reference
    for call, theirs, mine in zip(REGISTRY_ERRORS, reference, ours, strict=True):
        assert mine == theirs, call


HOST_MACHINE = ("/org/freedesktop/machine1/machine/_2ehost", "org.freedesktop.machine1.Machine")
IMPORT1 = ("org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager")

# What a caller that is not root gets, without polkit: the argument checks
# systemd makes before asking polkit, polkit's "Permission denied", and
# sd-bus's own refusal of the methods systemd does not open to everybody.
UNPRIVILEGED_CALLS = [
    (MANAGER, "KillMachine", ".host", "all", "15"),
    (MANAGER, "KillMachine", ".host", "bogus", "15"),
    (MANAGER, "KillMachine", ".host", "all", "0"),
    (MANAGER, "TerminateMachine", ".host"),
    (MANAGER, "UnregisterMachine", ".host"),
    (MANAGER, "OpenMachinePTY", ".host"),
    (MANAGER, "OpenMachinePTY", "nope"),
    (MANAGER, "OpenMachineLogin", ".host"),
    (MANAGER, "OpenMachineShell", ".host", "", "", "@as []", "@as []"),
    (MANAGER, "OpenMachineRootDirectory", ".host"),
    (MANAGER, "BindMountMachine", ".host", "/tmp", "/x", "false", "false"),
    (MANAGER, "CopyFromMachine", ".host", "/a", "/b"),
    (MANAGER, "CreateMachine", "x", "@ay []", "", "container", "0", "", "@a(sv) []"),
    (MANAGER, "RegisterMachine", "x", "@ay []", "", "container", "0", ""),
    (MANAGER, "RegisterMachineWithNetwork", "x", "@ay []", "", "container", "0", "", "@ai []"),
    (MANAGER, "SetPoolLimit", "1000000"),
    (MANAGER, "CleanPool", "all"),
    (MANAGER, "GetMachineOSRelease", ".host"),
    ((MANAGER[0], *HOST_MACHINE), "OpenPTY"),
    ((MANAGER[0], *HOST_MACHINE), "Kill", "all", "15"),
    ((MANAGER[0], *HOST_MACHINE), "BindMount", "/tmp", "/x", "false", "false"),
    (IMPORT1, "PullTar", "http://127.0.0.1:1/x.tar", "x", "no", "false"),
    (IMPORT1, "PullRaw", "ftp://x", "x", "no", "false"),
    (IMPORT1, "CancelTransfer", "5"),
    (IMPORT1, "ExportTar", "x", "1", ""),
]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_unprivileged_errors_match_reference(pool: Pool, daemons: Daemons) -> None:
    def run_all() -> list[str]:
        out = []
        for (dest, path, interface), method, *args in UNPRIVILEGED_CALLS:
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "gdbus", "call",
                                "--system", "--dest", dest, "--object-path", path, "--method", f"{interface}.{method}",
                                *args], capture_output=True, text=True, timeout=60)
            out.append(r.stdout.strip() if r.returncode == 0 else r.stderr.splitlines()[0])
        return out

    daemons.start_reference()
    daemons.start("importd", ours=False)
    reference = run_all()
    daemons.stop()
    daemons.start("machined")
    daemons.start("importd")
    ours = run_all()
    assert sum("Permission denied" in line for line in reference) >= 10, reference
    for call, theirs, mine in zip(UNPRIVILEGED_CALLS, reference, ours, strict=True):
        if call[1] == "GetMachineOSRelease":  # systemd 262 asks polkit (inspect-machines) for it; 252 did not
            theirs = "Error: GDBus.Error:org.freedesktop.DBus.Error.AccessDenied: Permission denied"
        assert mine == theirs, call


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_create_machine_and_signals(pool: Pool, machined_only: Daemons) -> None:
    monitor = subprocess.Popen(["busctl", "--system", "monitor", "--match",
                                "type='signal',interface='org.freedesktop.machine1.Manager'"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        time.sleep(0.5)
        r = busctl("call", *MANAGER, "CreateMachine", "sayssusa(sv)", "made", "0", "svc", "container",
                   str(sleeper.pid), "", "0")
        assert r.returncode == 0, r.stderr
        assert show("made", "Unit") == "machine-made.scope"
        r = machinectl("terminate", "made")
        assert r.returncode == 0, r.stderr
        sleeper.wait(timeout=15)
        world.wait_for(lambda: machinectl("show", "made").returncode != 0, 10, "made to go away")
    finally:
        sleeper.kill()
        sleeper.wait()
        time.sleep(0.5)
        monitor.terminate()
        out = monitor.communicate(timeout=10)[0]
    assert "MachineNew" in out and "MachineRemoved" in out


SELF = ("org.freedesktop.machine1", "/org/freedesktop/machine1/machine/self", "org.freedesktop.machine1.Machine")


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machine_self(pool: Pool, machined_only: Daemons) -> None:
    """machine/self answers for the machine of the calling process: its
    leader, or a descendant of it; anybody else gets UnknownObject."""
    bus = "busctl --system"
    script = (f"read x; {bus} get-property {' '.join(SELF)} Name; {bus} call {' '.join(SELF)} GetUIDShift; "
              f"{bus} call {SELF[0]} {SELF[1]} org.freedesktop.DBus.Properties GetAll s {SELF[2]}; "
              f"exec {bus} get-property {' '.join(SELF)} Leader Class")
    leader = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        r = busctl("call", *MANAGER, "RegisterMachine", "sayssus", "selfie", "0", "svc", "container",
                   str(leader.pid), "")
        assert r.returncode == 0, r.stderr
        out, err = leader.communicate("\n", timeout=60)
        assert leader.returncode == 0, err
        lines = out.splitlines()
        assert lines[0] == 's "selfie"'  # from a child of the leader
        assert lines[1] == "u 0"
        assert '"Name" s "selfie"' in lines[2] and f'"Leader" u {leader.pid}' in lines[2]
        assert lines[3:] == [f"u {leader.pid}", 's "container"']  # from the leader itself
    finally:
        leader.kill()
        leader.wait()
    # The test process is in no machine; failed getters must not stall the bus.
    for _ in range(3):
        r = busctl("get-property", *SELF, "Name")
        assert r.returncode != 0
    r = busctl("call", *SELF, "GetUIDShift")
    assert r.returncode != 0 and "Unknown object '/org/freedesktop/machine1/machine/self'." in r.stderr
    r = subprocess.run(["dbus-send", "--system", "--print-reply", f"--dest={SELF[0]}", SELF[1],
                        "org.freedesktop.DBus.Properties.Get", f"string:{SELF[2]}", "string:Name"],
                       capture_output=True, text=True, timeout=60)
    assert "org.freedesktop.DBus.Error.UnknownObject" in r.stderr
    r = busctl("call", *MANAGER, "ListMachines")
    assert r.returncode == 0 and '".host"' in r.stdout


def leader_of(name: str) -> int:
    return int(show(name, "Leader"))


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_status_shell_copy_kill(pool: Pool, container: Nspawn, tmp_path: Path) -> None:
    r = machinectl("status", "c1")
    assert r.returncode == 0, r.stderr
    assert "OS: BusyBox" in r.stdout and "Leader:" in r.stdout
    assert show("c1", "RootDirectory").endswith("/root")
    # A shell in the container, through a pty of the container.
    r = subprocess.run(["script", "-qec", "machinectl shell c1 /bin/sh -c 'echo hello-from-$(hostname)'",
                        "/dev/null"], capture_output=True, text=True, timeout=60)
    assert "hello-from-c1" in r.stdout, r.stdout + r.stderr
    # copy-to and copy-from.
    src = tmp_path / "payload.txt"
    src.write_text("payload\n")
    r = machinectl("copy-to", "c1", str(src), "/tmp/payload.txt")
    assert r.returncode == 0, r.stderr
    leader = leader_of("c1")
    assert Path(f"/proc/{leader}/root/tmp/payload.txt").read_text() == "payload\n"
    r = machinectl("copy-to", "c1", str(src), "/tmp/payload.txt")
    assert r.returncode != 0
    assert machinectl("copy-to", "--force", "c1", str(src), "/tmp/payload.txt").returncode == 0
    back = tmp_path / "back.txt"
    r = machinectl("copy-from", "c1", "/etc/os-release", str(back))
    assert r.returncode == 0, r.stderr
    assert "BusyBox" in back.read_text()
    # kill: the leader gets the signal, the machine goes away with it.
    r = machinectl("kill", "--signal=KILL", "c1")
    assert r.returncode == 0, r.stderr
    world.wait_for(lambda: machinectl("show", "c1").returncode != 0, 15, "c1 to go away")


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_terminate(pool: Pool, container: Nspawn) -> None:
    r = machinectl("terminate", "c1")
    assert r.returncode == 0, r.stderr
    world.wait_for(lambda: machinectl("show", "c1").returncode != 0, 20, "c1 to go away")
    container.proc.wait(timeout=20)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_private_network_addresses_and_nss(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    c = Nspawn(root, "net1", "--private-network")
    try:
        c.wait_registered()
        leader = leader_of("net1")
        # An address inside the container's own network namespace (no traffic leaves it).
        # (a veth pair inside it: this kernel has no dummy links).
        for cmd in (["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["ip", "addr", "add", "10.251.7.2/24", "dev", "v0"], ["ip", "link", "set", "v0", "up"]):
            subprocess.run(["nsenter", "-t", str(leader), "-n", *cmd], check=True)
        r = machinectl("status", "net1")
        assert "10.251.7.2" in r.stdout, r.stdout + r.stderr
        assert "10.251.7.2" in machinectl("list").stdout
        r = subprocess.run(["getent", "-s", "hosts:mymachines", "hosts", "net1"], capture_output=True, text=True)
        assert r.returncode == 0 and "10.251.7.2" in r.stdout, r.stdout + r.stderr
        # The host's own network namespace: no private networking.
    finally:
        c.stop()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_private_users_and_userdb(pool: Pool, machined_only: Daemons, tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    c = Nspawn(root, "pu1", "--private-users=pick", "--private-users-ownership=chown")
    try:
        c.wait_registered()
        r = busctl("call", *MANAGER, "GetMachineUIDShift", "s", "pu1")
        shift = int(r.stdout.split()[1])
        assert shift >= 0x10000
        r = subprocess.run(["userdbctl", "--no-pager", "user", "vu-pu1-0"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert str(shift) in r.stdout
        r = subprocess.run(["userdbctl", "--no-pager", "user", str(shift + 1000)], capture_output=True, text=True)
        assert r.returncode == 0 and "vu-pu1-1000" in r.stdout
        r = busctl("call", *MANAGER, "MapToMachineUser", "u", str(shift + 5))
        assert r.stdout.split()[1:] == ['"pu1"', '"/org/freedesktop/machine1/machine/pu1"', "5"]
    finally:
        c.stop()


@pytest.mark.parametrize(("path", "unit"), [
    ("/user.slice/user-1000.slice/session-1.scope/payload/init.scope", "session-1.scope"),
    ("/system.slice/nspawn.service", "nspawn.service"),
    ("/machine.slice/machine-c1.scope/payload", "machine-c1.scope"),
    ("/init.scope", "init.scope"),
    ("/", ""),
    ("/user.slice", ""),
    ("/lxc/payload.service", ""),
])
def test_unit_of_cgroup(path: str, unit: str) -> None:
    """As systemd's cg_path_get_unit(): the first component below the slices."""
    assert cgroup_unit(path) == unit
