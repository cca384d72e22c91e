"""The per-machine operations (machined.ops) against real containers.

A "container" is a busybox tree under tmp_path run by util-linux unshare in
new PID, mount, UTS, IPC and network namespaces (variants: with a user
namespace shifted by 100000, sharing the host's network, without a PID
namespace), with its own devpts instance.  One test runs a real
systemd-nspawn container.  Machine objects are made directly, as machined
would make them for registered containers.

Every container is killed when its test ends, and each test checks that no
process it started is left over: no new child of ours (so the helper
processes were reaped), nothing in the PID namespaces of its containers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepool import dev as world
from imagepool.errors import (
    Errno,
    InvalidArgs,
    InvalidForMachine,
    NoPrivateNetworking,
    NoSuchGroupMapping,
    NoSuchUserMapping,
    NotSupported,
    PoolError,
    dbus_name,
)
from machined import nsexec, ops, procs
from machined.machine import Machine, MachineClass
from machined.ops.mounts import PROPAGATE_DIR
from machined.ops.shell import DEFAULT_PATH

BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)
pytestmark = [pytest.mark.root,  # containers, user namespaces, mounts
              pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is not installed")]

APPLETS = ["sh", "ls", "cat", "sleep", "id", "echo", "mount", "hostname", "tty", "readlink", "touch", "mkdir",
           "printf", "kill", "env", "pwd", "true", "test", "stat", "head"]
SHIFT = 100000
OS_RELEASE = 'ID=busyboxtest\nNAME="Busybox Test"\nVERSION_ID="1.0"\n'
DEVPTS = "mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts"

# Starts a process in a new user namespace, waits for its ID maps (written
# by the test), changes to the root directory given first (while still the
# host's root, who may traverse tmp_path) and becomes the namespace's root
# before exec'ing the rest of its arguments: unshare(1) then runs with
# root's capabilities in there, and is given --root=. .
USERNS_LAUNCHER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:
    raise OSError(ctypes.get_errno(), "unshare")
os.read(0, 1)
os.chdir(sys.argv[1])
os.setgroups([])
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
os.execvp(sys.argv[2], sys.argv[2:])
"""

# A stand-in for systemd's manager on a container's system bus.
FAKE_SYSTEMD = r"""
import asyncio, fcntl, json, os, subprocess, sys, termios
import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async

class Manager(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Manager"):
    @dbus_method_async(input_signature="ss", result_signature="o")
    async def start_unit(self, name: str, mode: str) -> str:
        print(name, mode, flush=True)
        return "/org/freedesktop/systemd1/job/42"

    @dbus_method_async(input_signature="ssa(sv)a(sa(sv))", result_signature="o")
    async def start_transient_unit(self, name, mode, properties, aux):
        # Run ExecStart (here, outside the container) on the fd, as the unit would.
        values = {key: value for key, (signature, value) in properties}
        tty = os.dup(values["StandardInputFileDescriptor"])
        path, argv, _ = values["ExecStart"][0]
        env = dict(item.split("=", 1) for item in values.get("Environment", []))
        def session():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        subprocess.Popen(argv, executable=path, stdin=tty, stdout=tty, stderr=tty, env=env, preexec_fn=session)
        os.close(tty)
        null = os.open(os.devnull, os.O_RDWR)  # no copy of the terminal kept, as systemd
        for key in ("StandardInputFileDescriptor", "StandardOutputFileDescriptor", "StandardErrorFileDescriptor"):
            os.dup2(null, values[key])
        os.close(null)
        shown = {key: value for key, value in values.items() if not key.endswith("FileDescriptor")}
        fds = [values[key] >= 0 for key in values if key.endswith("FileDescriptor")]
        print(json.dumps([name, mode, shown, fds, aux]), flush=True)
        return "/org/freedesktop/systemd1/job/43"

async def main():
    bus = sdbus.sd_bus_open_system()
    sdbus.set_default_bus(bus)
    manager = Manager()
    manager.export_to_dbus("/org/freedesktop/systemd1", bus)
    await bus.request_name_async("org.freedesktop.systemd1", 0)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# --- building and running containers -------------------------------------------------------


def make_root(path: Path, shift: int = 0, gid_shift: int | None = None) -> Path:
    """A small OS tree: busybox, users root and alice (1000, also in group
    wheel), os-release in /usr/lib with /etc/os-release an absolute symlink
    to it, /dev/ptmx -> pts/ptmx and /dev/null."""
    path.mkdir()
    for d in ("bin", "etc", "usr/lib", "dev/pts", "proc", "run", "tmp", "root", "home/alice", "mnt", "srv", "sys"):
        (path / d).mkdir(parents=True)
    os.chmod(path / "tmp", 0o1777)
    os.chmod(path / "root", 0o700)
    shutil.copy2(BUSYBOX, path / "bin/busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n")
    (path / "etc/group").write_text("root:x:0:\ntty:x:5:\nwheel:x:10:alice\nalice:x:1000:\n")
    (path / "usr/lib/os-release").write_text(OS_RELEASE)
    (path / "etc/os-release").symlink_to("/usr/lib/os-release")
    (path / "dev/ptmx").symlink_to("pts/ptmx")
    os.mknod(path / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(path / "dev/null", 0o666)
    os.chown(path / "home/alice", 1000, 1000)
    gid_shift = shift if gid_shift is None else gid_shift
    if shift or gid_shift:
        for dirpath, dirnames, filenames in os.walk(path):
            links = [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
            for name in [dirpath, *(os.path.join(dirpath, n) for n in filenames + links)]:
                st = os.lstat(name)
                os.chown(name, st.st_uid + shift, st.st_gid + gid_shift, follow_symlinks=False)
    return path


def children_of(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def pidns_members(ns: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") == ns and alive(int(name)):
                    out.append(int(name))
    return out


class Container:
    """An unshare(1) container; .leader is the PID of its init."""

    def __init__(self, root: Path, name: str, init: str, *, comm: str = "sleep", userns: tuple[str, str] | None = None,
                 netns: bool = True, pidns: bool = True) -> None:
        self.root = root
        self.name = name
        self.log = root.with_suffix(".log")
        argv = ["unshare", "--fork", "--mount", "--uts", "--ipc", "--root", "." if userns else str(root)]
        if netns:
            argv.append("--net")
        if pidns:
            argv += ["--pid", "--mount-proc"]
        argv += ["/bin/sh", "-c", init]
        if userns:
            argv = [sys.executable, "-c", USERNS_LAUNCHER, str(root), *argv]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if userns else subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        try:
            if userns:
                mine = os.readlink("/proc/self/ns/user")
                world.wait_for(lambda: os.readlink(f"/proc/{self.proc.pid}/ns/user") != mine, 10, "the user namespace")
                Path(f"/proc/{self.proc.pid}/uid_map").write_text(userns[0])
                Path(f"/proc/{self.proc.pid}/gid_map").write_text(userns[1])
                self.proc.stdin.write(b"\n")
                self.proc.stdin.close()
            try:
                world.wait_for(lambda: (root / "run/ready").exists(), 10, "the container")
            except TimeoutError:
                raise TimeoutError(f"container {name} did not start: {self.log.read_text()}") from None
            world.wait_for(lambda: len(children_of(self.proc.pid)) == 1, 10, "the container's init")
            self.leader = children_of(self.proc.pid)[0]
            world.wait_for(lambda: Path(f"/proc/{self.leader}/comm").read_text().strip() == comm, 10, comm)
            self.pidns = os.readlink(f"/proc/{self.leader}/ns/pid")
        except BaseException:
            self.stop()
            raise

    def machine(self, cls: MachineClass = MachineClass.CONTAINER) -> Machine:
        return Machine(self.name, cls, self.leader)

    def processes(self) -> list[int]:
        """Everything of this container still alive: its PID namespace (if
        its own), its process group, the unshare process."""
        found = set()
        if getattr(self, "pidns", None) and self.pidns != os.readlink("/proc/self/ns/pid"):
            found.update(pidns_members(self.pidns))
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.getpgid(int(name)) == self.proc.pid and alive(int(name)):
                        found.add(int(name))
        return sorted(found)

    def stop(self) -> None:
        for _ in range(100):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Whatever a test starts ends with it: helpers of machine_ops included
    (reaped by a thread of machine_ops, hence the moment of patience)."""
    before = set(children_of(os.getpid()))
    yield
    world.wait_for(lambda: not (set(children_of(os.getpid())) - before), 10, "no children left")


@pytest.fixture
def containers(tmp_path: Path):
    """A factory of containers, all stopped at the end; then nothing may be
    left alive in their PID namespaces or process groups."""
    made: list[Container] = []
    count = 0

    def make(init: str = "exec sleep 1000", *, comm: str = "sleep", shift: int = 0,
             maps: tuple[str, str] | None = None, netns: bool = True, pidns: bool = True, setup: str = DEVPTS,
             name: str | None = None) -> Container:
        """A container; with SHIFT or MAPS (uid_map, gid_map text) in a user
        namespace, its tree owned by who is root in there."""
        nonlocal count
        count += 1
        userns = maps or ((f"0 {shift} 65536\n",) * 2 if shift else None)
        if userns:
            uid_shift, gid_shift = (int(text.split()[1]) for text in userns)
        else:
            uid_shift = gid_shift = 0
        root = make_root(tmp_path / f"root{count}", uid_shift, gid_shift)
        c = Container(root, name or f"c{count}", f"{setup} && hostname box{count} && touch /run/ready && {init}",
                      comm=comm, userns=userns, netns=netns, pidns=pidns)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
    for c in made:
        assert c.processes() == [], f"left over in {c.name}"


def read_pty(fd: int, until: bytes | None = None, timeout: float = 10) -> bytes:
    """Read the master until UNTIL was seen, or until the other side is
    closed (EIO) when UNTIL is None."""
    buf = b""
    deadline = time.monotonic() + timeout
    while until is None or until not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"read so far: {buf!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            if until is None:
                break
            time.sleep(0.02)  # no slave open (yet)
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def lines(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode(errors="replace").replace("\r", "").split("\n") if line.strip()]


def nsenter(c: Container, script: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", "-t", str(c.leader), "-a", "-r", "-w", "/bin/sh", "-c", script],
                            start_new_session=True, **kw)


def host_machine() -> Machine:
    return Machine(".host", MachineClass.HOST, 1, root_directory="/")


# --- addresses -----------------------------------------------------------------------------------


def test_addresses_of_private_network(containers):
    c = containers()
    m = c.machine()
    net = ["nsenter", f"--net=/proc/{c.leader}/ns/net", "ip"]
    subprocess.run([*net, "link", "set", "lo", "up"], check=True)
    # Only loopback addresses: systemd lists none of them.
    assert ops.get_addresses(m) == []
    subprocess.run([*net, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    subprocess.run([*net, "addr", "add", "10.1.2.3/24", "dev", "v0"], check=True)
    subprocess.run([*net, "addr", "add", "10.1.2.1/24", "dev", "v1"], check=True)
    subprocess.run([*net, "-6", "addr", "add", "fd00::7/64", "dev", "v0", "nodad"], check=True)
    subprocess.run([*net, "addr", "add", "192.0.2.9/32", "dev", "lo", "scope", "host"], check=True)
    subprocess.run([*net, "addr", "add", "198.51.100.1/24", "dev", "v0", "preferred_lft", "0"], check=True)
    got = ops.get_addresses(m)
    assert all(isinstance(a, bytes) for _, _, a in got)
    shown = [(family, str(ipaddress.ip_address(a))) for _, family, a in got]
    # IPv4 first, then by interface index; host scope and deprecated addresses left out.
    links = json.loads(subprocess.run([*net, "-j", "link"], capture_output=True, text=True, check=True).stdout)
    index = {link["ifname"]: link["ifindex"] for link in links}
    v4 = sorted([("v0", "10.1.2.3"), ("v1", "10.1.2.1")], key=lambda a: index[a[0]])
    assert shown == [(socket.AF_INET, v4[0][1]), (socket.AF_INET, v4[1][1]), (socket.AF_INET6, "fd00::7")]
    assert [ifindex for ifindex, _, _ in got] == [index[v4[0][0]], index[v4[1][0]], index["v0"]]
    # None of it leaked into our own namespace.
    assert "10.1.2.3" not in subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout


def test_addresses_of_host_match_ip():
    got = {str(ipaddress.ip_address(a)) for _, _, a in ops.get_addresses(host_machine())}
    shown = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    want = {a["local"] for link in shown for a in link.get("addr_info", [])
            if a.get("scope") not in ("host", "nowhere") and not a.get("deprecated")}
    assert got == want


def test_addresses_shared_network_and_vm(containers):
    c = containers(netns=False)
    with pytest.raises(NoPrivateNetworking) as e:
        ops.get_addresses(c.machine())
    assert e.value.message == f"Machine {c.name} does not use private networking"
    assert dbus_name(e.value) == "org.freedesktop.machine1.NoPrivateNetworking"
    with pytest.raises(NotSupported, match="^Requesting IP address data is only supported on container machines.$"):
        ops.get_addresses(c.machine(MachineClass.VM))


# --- os-release ------------------------------------------------------------------------------------


def test_os_release(containers):
    c = containers()
    # /etc/os-release is an absolute symlink: it resolves inside the root, not to the host's.
    assert ops.get_os_release(c.machine()) == {"ID": "busyboxtest", "NAME": "Busybox Test", "VERSION_ID": "1.0"}
    (c.root / "etc/os-release").unlink()
    (c.root / "usr/lib/os-release").write_text("ID=fallback\n")
    assert ops.get_os_release(c.machine()) == {"ID": "fallback"}
    (c.root / "usr/lib/os-release").unlink()
    with pytest.raises(PoolError) as e:
        ops.get_os_release(c.machine())
    assert e.value.message == "Machine does not contain OS release information"
    assert dbus_name(e.value) == "org.freedesktop.DBus.Error.Failed"
    with pytest.raises(NotSupported, match="^Requesting OS release data is only supported on container machines.$"):
        ops.get_os_release(c.machine(MachineClass.VM))
    host = ops.get_os_release(host_machine())
    assert host["ID"] and host != {"ID": "busyboxtest"}


def test_os_release_of_dead_leader(containers):
    c = containers()
    m = c.machine()
    c.stop()
    with pytest.raises(Errno) as e:
        ops.get_os_release(m)
    assert e.value.errno == errno.ESRCH


# --- UID shift and mapping ------------------------------------------------------------------------


def test_uid_shift(containers):
    plain = containers()
    shifted = containers(shift=SHIFT)
    assert ops.get_uid_shift(plain.machine()) == 0
    assert ops.get_uid_shift(shifted.machine()) == SHIFT
    assert ops.get_uid_shift(host_machine()) == 0
    with pytest.raises(NotSupported, match="^UID/GID shift may only be determined for container machines.$"):
        ops.get_uid_shift(plain.machine(MachineClass.VM))


@pytest.mark.parametrize("maps", [
    ("0 100000 1000\n",) * 2,  # nobody not mapped
    ("0 100000 1000\n1000 300000 64536\n",) * 2,  # two ranges
    ("0 100000 65536\n", "0 200000 65536\n"),  # groups shifted differently
], ids=["short", "two-ranges", "uneven"])
def test_uid_shift_complex(containers, maps):
    c = containers(maps=maps)
    with pytest.raises(NotSupported) as e:
        ops.get_uid_shift(c.machine())
    assert e.value.message == f"Machine {c.name} uses a complex UID/GID mapping, cannot determine shift"


def test_map_users_and_groups(containers):
    plain = containers()
    shifted = containers(shift=SHIFT)
    two = containers(maps=("0 200000 1000\n1000 300000 1000\n",) * 2)
    m, p, t = shifted.machine(), plain.machine(), two.machine()
    assert ops.map_from_machine_user(m, 0) == SHIFT
    assert ops.map_from_machine_user(m, 1000) == SHIFT + 1000
    assert ops.map_from_machine_group(m, 5) == SHIFT + 5
    assert ops.map_from_machine_user(p, 1000) == 1000  # identity mapping
    assert ops.map_from_machine_user(t, 1500) == 300500
    with pytest.raises(NoSuchUserMapping, match=r"^Machine 'c\d' has no matching user mappings\.$"):
        ops.map_from_machine_user(m, 70000)
    # systemd answers an unmapped group with NoSuchUserMapping too.
    with pytest.raises(NoSuchUserMapping, match=r"^Machine 'c\d' has no matching group mappings\.$"):
        ops.map_from_machine_group(t, 2000)
    with pytest.raises(InvalidArgs, match="^Invalid user ID 4294967295$"):
        ops.map_from_machine_user(m, 0xFFFFFFFF)
    with pytest.raises(InvalidArgs, match="^Invalid group ID 65535$"):
        ops.map_from_machine_group(m, 0xFFFF)
    with pytest.raises(InvalidForMachine, match="^Not supported for non-container machines.$"):
        ops.map_from_machine_user(host_machine(), 0)

    machines = [host_machine(), p, m, t, plain.machine(MachineClass.VM)]
    assert ops.map_to_machine_user(machines, SHIFT + 1000) == (m, 1000)
    assert ops.map_to_machine_group(machines, SHIFT + 10) == (m, 10)
    assert ops.map_to_machine_user(machines, 300999) == (t, 1999)
    with pytest.raises(NoSuchUserMapping, match="^User 1000 belongs to host UID range$"):
        ops.map_to_machine_user(machines, 1000)
    with pytest.raises(NoSuchUserMapping, match=r"^No matching user mapping for 500000\.$"):
        ops.map_to_machine_user(machines, 500000)
    with pytest.raises(NoSuchGroupMapping, match="^Group 65000 belongs to host GID range$"):
        ops.map_to_machine_group(machines, 65000)
    with pytest.raises(NoSuchGroupMapping, match=r"^No matching group mapping for 250000\.$"):
        ops.map_to_machine_group(machines, 250000)
    with pytest.raises(InvalidArgs, match="^Invalid group ID 4294967295$"):
        ops.map_to_machine_group(machines, 0xFFFFFFFF)


# --- ptys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0, SHIFT])
def test_open_pty(containers, shift):
    c = containers(shift=shift)
    master, name = ops.open_pty(c.machine())
    try:
        assert name.startswith("/dev/pts/")
        # The pty is in the container's devpts instance.
        peer = nsexec.pty_peer(master)
        inside = os.stat(f"/proc/{c.leader}/root{name}")
        assert (os.fstat(peer).st_dev, os.fstat(peer).st_rdev) == (inside.st_dev, inside.st_rdev)
        assert inside.st_dev != os.stat("/dev/pts").st_dev
        os.close(peer)
        # In a user namespace the container's root owns it, so root in there can open it.
        assert inside.st_uid == shift
        prog = nsenter(c, f'exec 3<>{name}; echo ready >&3; read line <&3; echo "got:$line" >&3')
        read_pty(master, b"ready")
        os.write(master, b"ping\n")
        assert "got:ping" in lines(read_pty(master, b"got:ping"))
        assert prog.wait(10) == 0
    finally:
        os.close(master)


def test_open_pty_host_and_vm(containers):
    master, name = ops.open_pty(host_machine())
    try:
        assert os.path.exists(name) and stat.S_ISCHR(os.stat(name).st_mode)
        slave = os.open(name, os.O_RDWR | os.O_NOCTTY)
        os.write(slave, b"hi\n")
        assert b"hi" in read_pty(master, b"hi")
        os.close(slave)
    finally:
        os.close(master)
    c = containers()
    with pytest.raises(Errno) as e:
        ops.open_pty(c.machine(MachineClass.VM))
    assert e.value.errno == errno.EOPNOTSUPP
    assert dbus_name(e.value) == "org.freedesktop.DBus.Error.NotSupported"


def test_open_pty_refuses_other_devices(containers):
    c = containers()
    (c.root / "dev/ptmx").unlink()
    (c.root / "dev/ptmx").symlink_to("/dev/null")
    with pytest.raises(Errno) as e:
        ops.open_pty(c.machine())
    assert e.value.errno == errno.ENODEV


# --- shells ------------------------------------------------------------------------------------------


SHELL_REPORT = ('echo hello; id -u; id -G; echo "env:$FOO:$HOME:$USER:$LOGNAME:$SHELL:$TERM:$PATH"; pwd; hostname; '
                'tty; for n in pid mnt net; do readlink /proc/self/ns/$n; done; touch /tmp/mark-$(id -u)')


@pytest.mark.parametrize("shift", [0, SHIFT])
@pytest.mark.parametrize("user", ["", "alice"])
def test_open_shell(containers, shift, user):
    c = containers(shift=shift)
    m = c.machine()
    master, name = ops.open_shell(m, user, "/bin/sh", ["sh", "-c", SHELL_REPORT], ["FOO=bar baz", "TERM=xterm"])
    try:
        out = lines(read_pty(master))
    finally:
        os.close(master)
    uid, home, account = (1000, "/home/alice", "alice") if user else (0, "/root", "root")
    ns = [os.readlink(f"/proc/{c.leader}/ns/{kind}") for kind in ("pid", "mnt", "net")]
    assert out == [
        "hello",
        str(uid),
        "1000 10" if user else "0",
        f"env:bar baz:{home}:{account}:{account}:/bin/sh:xterm:{DEFAULT_PATH}",
        home,
        f"box{c.name[1:]}",
        name,
        *ns,
    ]
    # The program ran with the container's IDs: shifted ones seen from here.
    mark = os.stat(c.root / f"tmp/mark-{uid}")
    assert mark.st_uid == uid + shift


def test_open_shell_default_is_login_shell(containers):
    c = containers()
    master, _name = ops.open_shell(c.machine(), "alice", "", [], [])
    try:
        os.write(master, b"echo $((6*7)) $0 $HOME; exit\n")
        out = read_pty(master)
    finally:
        os.close(master)
    assert "42 /bin/sh /home/alice" in lines(out)  # exec'd as "$shell -l" by the default command


def test_open_shell_on_host():
    master, name = ops.open_shell(host_machine(), "", "/bin/sh", ["sh", "-c", "tty; echo $HOME; id -u"], [])
    try:
        out = lines(read_pty(master))
    finally:
        os.close(master)
    assert out == [name, "/root", "0"]


def test_open_shell_invalid(containers):
    c = containers()
    m = c.machine()
    with pytest.raises(InvalidArgs, match="^Specified path 'bin/sh' is not absolute$"):
        ops.open_shell(m, "", "bin/sh", [], [])
    for env in (["FOO"], ["1A=x"], ["A=1", "A=2"], ["A=\x01"], ["=x"]):
        with pytest.raises(InvalidArgs, match="^Invalid environment assignments$"):
            ops.open_shell(m, "", "/bin/sh", [], env)
    with pytest.raises(InvalidArgs, match="^Invalid user name: a:b$"):
        ops.open_shell(m, "a:b", "/bin/sh", [], [])
    with pytest.raises(PoolError, match=r"^Failed to look up user 'bob' in machine c\d\.$"):
        ops.open_shell(m, "bob", "/bin/sh", [], [])
    with pytest.raises(Errno) as e:
        ops.open_shell(m, "", "/bin/nonexistent", [], [])
    assert e.value.errno == errno.ENOENT
    assert e.value.message == "Failed to execute /bin/nonexistent: No such file or directory"
    with pytest.raises(Errno) as e:
        ops.open_shell(c.machine(MachineClass.VM), "", "/bin/sh", [], [])
    assert e.value.errno == errno.EOPNOTSUPP


# --- logins --------------------------------------------------------------------------------------------


def test_open_login_without_bus(containers):
    c = containers()
    with pytest.raises(Errno) as e:
        ops.open_login(c.machine())
    assert e.value.message == f"There is no system bus in container {c.name}."
    assert e.value.errno == errno.ENOENT
    with pytest.raises(NotSupported, match="^Opening a login on the host is not supported.$"):
        ops.open_login(host_machine())
    with pytest.raises(Errno) as e:
        ops.open_login(c.machine(MachineClass.VM))
    assert e.value.errno == errno.EOPNOTSUPP


def test_open_login_through_container_bus(containers):
    c = containers()
    bus = world.PrivateBus(c.root / "run/dbus").start()
    try:
        # A bus without systemd on it: the error comes back from in there.
        with pytest.raises(PoolError) as e:
            ops.open_login(c.machine())
        assert dbus_name(e.value) == "org.freedesktop.DBus.Error.ServiceUnknown"
        fake = subprocess.Popen([sys.executable, "-c", FAKE_SYSTEMD], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        try:
            assert fake.stdout.readline().strip() == "ready"
            master, name = ops.open_login(c.machine())
            os.close(master)
            assert fake.stdout.readline().split() == [f"container-getty@{name.removeprefix('/dev/pts/')}.service",
                                                      "replace"]
        finally:
            world.stop_process(fake)
    finally:
        bus.stop()


def test_open_shell_through_container_systemd(containers):
    """A container whose bus has systemd on it gets container-shell@N.service
    from that systemd, with systemd's properties; without systemd on the bus,
    the direct shell."""
    c = containers()
    bus = world.PrivateBus(c.root / "run/dbus").start()
    try:
        master, name = ops.open_shell(c.machine(), "", "/bin/sh", ["sh", "-c", "echo direct"], [])
        assert "direct" in lines(read_pty(master))
        os.close(master)
        fake = subprocess.Popen([sys.executable, "-c", FAKE_SYSTEMD], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        try:
            assert fake.stdout.readline().strip() == "ready"
            master, name = ops.open_shell(c.machine(), "alice", "/bin/sh", ["sh", "-c", "echo unit $GREETING"],
                                          ["GREETING=hello"])
            try:
                assert "unit hello" in lines(read_pty(master))
            finally:
                os.close(master)
            unit, mode, properties, fds, aux = json.loads(fake.stdout.readline())
            number = name.removeprefix("/dev/pts/")
            assert (unit, mode, fds, aux) == (f"container-shell@{number}.service", "fail", [True] * 3, [])
            assert properties == {
                "Description": "Shell for User alice", "SendSIGHUP": True, "IgnoreSIGPIPE": False,
                "KillMode": "mixed", "TTYPath": name, "TTYReset": True, "UtmpIdentifier": f"pts/{number}",
                "UtmpMode": "user", "PAMName": "login", "WorkingDirectory": "-~", "User": "alice",
                "Environment": ["GREETING=hello"],
                "ExecStart": [["/bin/sh", ["sh", "-c", "echo unit $GREETING"], False]],
            }
            # The default: the user's login shell, found by systemd's script.
            master, name = ops.open_shell(c.machine(), "", "", [], [])
            os.close(master)
            unit, mode, properties, fds, aux = json.loads(fake.stdout.readline())
            path, argv, _ = properties["ExecStart"][0]
            assert path == "/bin/sh" and argv[:2] == ["sh", "-c"] and "getent passwd root " in argv[2]
            assert properties["User"] == "root" and "Environment" not in properties
        finally:
            world.stop_process(fake)
    finally:
        bus.stop()


# --- copies -----------------------------------------------------------------------------------------------


def make_tree(top: Path, owner: int = 0) -> None:
    (top / "sub/deeper").mkdir(parents=True)
    (top / "a.txt").write_text("alpha\n")
    os.chmod(top / "a.txt", 0o640)
    (top / "sub/b.txt").write_text("beta\n")
    (top / "sub/deeper/exe").write_text("#!/bin/sh\n")
    os.chmod(top / "sub/deeper/exe", 0o4755)
    os.chmod(top / "sub", 0o750)
    (top / "rel").symlink_to("a.txt")
    (top / "abs").symlink_to("/etc/os-release")
    os.link(top / "a.txt", top / "sub/hard")
    os.mkfifo(top / "fifo", 0o600)
    os.chown(top / "a.txt", owner + 1234, owner + 4321)
    os.setxattr(top / "sub/b.txt", "user.note", b"kept")
    os.utime(top / "sub/b.txt", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))


def check_tree(top: Path, owner: int | None) -> None:
    """The tree as make_tree made it; OWNER None: a.txt's owner kept,
    else every file owned by OWNER:OWNER."""
    assert (top / "a.txt").read_text() == "alpha\n"
    assert stat.S_IMODE(os.stat(top / "a.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(top / "sub").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(top / "sub/deeper/exe").st_mode) == 0o4755
    assert (top / "sub/b.txt").read_text() == "beta\n"
    assert os.getxattr(top / "sub/b.txt", "user.note") == b"kept"
    assert os.stat(top / "sub/b.txt").st_mtime_ns == 1_000_000_000_000_000_000
    assert os.readlink(top / "rel") == "a.txt"
    assert os.readlink(top / "abs") == "/etc/os-release"
    assert os.stat(top / "sub/hard").st_ino == os.stat(top / "a.txt").st_ino
    assert stat.S_ISFIFO(os.lstat(top / "fifo").st_mode)
    st = os.stat(top / "a.txt")
    if owner is None:
        assert (st.st_uid % SHIFT, st.st_gid % SHIFT) == (1234, 4321)
    else:
        for path in [top, *top.rglob("*")]:
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid) == (owner, owner), path


def test_copy_from_and_to(containers, tmp_path):
    c = containers()
    m = c.machine()
    make_tree(c.root / "srv/data")
    # A directory reached through an absolute symlink inside the container.
    (c.root / "link-to-srv").symlink_to("/srv")
    host = tmp_path / "host"
    host.mkdir()
    ops.copy_from(m, "/link-to-srv/data", str(host / "data"), False)
    check_tree(host / "data", None)
    ops.copy_from(m, "/etc/os-release", str(host / "osr"), False)
    assert os.readlink(host / "osr") == "/usr/lib/os-release"  # the symlink itself, not followed
    ops.copy_to(m, str(host / "data"), "/tmp/copied", False)
    check_tree(c.root / "tmp/copied", None)
    # Destination "" is the source path.
    (tmp_path / "only-here").write_text("x")
    with pytest.raises(Errno) as e:
        ops.copy_from(m, str(tmp_path / "only-here"), "", False)
    assert e.value.errno == errno.ENOENT


def test_copy_exists_and_replace(containers, tmp_path):
    c = containers()
    m = c.machine()
    (tmp_path / "f").write_text("new\n")
    (c.root / "tmp/f").write_text("old\n")
    with pytest.raises(Errno) as e:
        ops.copy_to(m, str(tmp_path / "f"), "/tmp/f", False)
    assert e.value.errno == errno.EEXIST
    assert dbus_name(e.value) == "org.freedesktop.DBus.Error.FileExists"
    assert (c.root / "tmp/f").read_text() == "old\n"
    ops.copy_to(m, str(tmp_path / "f"), "/tmp/f", True)
    assert (c.root / "tmp/f").read_text() == "new\n"
    # Directories merge: existing files stay without replace, are replaced with it.
    (tmp_path / "d").mkdir()
    (tmp_path / "d/one").write_text("1 new\n")
    (tmp_path / "d/two").write_text("2 new\n")
    (c.root / "tmp/d").mkdir()
    (c.root / "tmp/d/one").write_text("1 old\n")
    (c.root / "tmp/d/other").write_text("untouched\n")
    ops.copy_to(m, str(tmp_path / "d"), "/tmp/d", False)
    assert sorted(p.name for p in (c.root / "tmp/d").iterdir()) == ["one", "other", "two"]
    assert (c.root / "tmp/d/one").read_text() == "1 old\n"
    ops.copy_from(m, "/tmp/d", str(tmp_path / "d"), True)
    assert (tmp_path / "d/one").read_text() == "1 old\n"
    assert (tmp_path / "d/other").read_text() == "untouched\n"
    # A symlink in the way is replaced, not followed; symlinks on the way
    # resolve inside the container's root.
    host_passwd = Path("/etc/passwd").read_bytes()
    (c.root / "tmp/victim").symlink_to("/etc/passwd")
    ops.copy_to(m, str(tmp_path / "f"), "/tmp/victim", True)
    assert (c.root / "tmp/victim").read_text() == "new\n" and not (c.root / "tmp/victim").is_symlink()
    (c.root / "tmp/escape").symlink_to("/")
    (c.root / "tmp/up").symlink_to("../../../../../../../..")
    ops.copy_to(m, str(tmp_path / "f"), "/tmp/escape/etc/passwd", True)
    ops.copy_to(m, str(tmp_path / "f"), "/tmp/up/etc/dropped", False)
    assert (c.root / "etc/passwd").read_text() == "new\n"
    assert (c.root / "etc/dropped").read_text() == "new\n"
    assert Path("/etc/passwd").read_bytes() == host_passwd and not Path("/etc/dropped").exists()


def test_copy_with_uid_shift(containers, tmp_path):
    c = containers(shift=SHIFT)
    m = c.machine()
    make_tree(tmp_path / "in")
    ops.copy_to(m, str(tmp_path / "in"), "/srv/in", False)
    check_tree(c.root / "srv/in", SHIFT)  # owned by the container's root
    make_tree(c.root / "srv/out", SHIFT)
    ops.copy_from(m, "/srv/out", str(tmp_path / "out"), False)
    check_tree(tmp_path / "out", 0)  # owned by the host's root


def test_copy_invalid(containers, tmp_path):
    c = containers()
    m = c.machine()
    with pytest.raises(InvalidArgs, match="^Source path must be absolute.$"):
        ops.copy_from(m, "etc/os-release", "/tmp/x", False)
    with pytest.raises(InvalidArgs, match="^Destination path must be absolute.$"):
        ops.copy_to(m, "/etc/os-release", "tmp/x", False)
    for machine in (c.machine(MachineClass.VM), host_machine()):
        with pytest.raises(NotSupported, match="^Copying files is only supported on container machines.$"):
            ops.copy_from(machine, "/etc/os-release", "/tmp/x", False)
    with pytest.raises(Errno) as e:
        ops.copy_to(m, "/etc/os-release", "/nonexistent/dir/x", False)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(Errno) as e:
        ops.copy_to(m, str(tmp_path / "nope"), "/tmp/x", False)
    assert e.value.errno == errno.ENOENT


# --- bind mounts ---------------------------------------------------------------------------------------------


def test_bind_mount_directly(containers, tmp_path):
    c = containers()
    m = c.machine()
    src = tmp_path / "share"
    src.mkdir()
    (src / "file").write_text("shared\n")
    ops.bind_mount(m, str(src), "/mnt/share", False, True)
    inside = Path(f"/proc/{c.leader}/root/mnt/share")
    assert (inside / "file").read_text() == "shared\n"
    (inside / "new").write_text("from inside\n")
    assert (src / "new").read_text() == "from inside\n"
    assert not any((c.root / "mnt/share").iterdir())  # not mounted on the host
    # Read-only, of a file, on a new mount point, seen from a process inside.
    ops.bind_mount(m, str(src / "file"), "/srv/deep/file", True, True)
    prog = nsenter(c, "cat /srv/deep/file; echo x > /srv/deep/file || echo refused", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    out, err = prog.communicate(timeout=10)
    assert out.split("\n")[:2] == ["shared", "refused"] and "Read-only" in err
    with pytest.raises(OSError) as oe:
        Path(f"/proc/{c.leader}/root/srv/deep/file").write_text("no")
    assert oe.value.errno == errno.EROFS
    # Destination "" is the source path; without mkdir a missing mount point fails.
    with pytest.raises(Errno) as e:
        ops.bind_mount(m, str(src), "", False, False)
    assert e.value.errno == errno.ENOENT
    assert e.value.message.startswith(f"Failed to mount {src} on {src} in machine's namespace: ")


def test_bind_mount_invalid(containers, tmp_path):
    c = containers()
    m = c.machine()
    for bad in ("relative", "/a/../b", "/a//b", "/a/./b"):
        with pytest.raises(InvalidArgs, match="^Source path must be absolute and normalized.$"):
            ops.bind_mount(m, bad, "/mnt", False, False)
        with pytest.raises(InvalidArgs, match="^Destination path must be absolute and normalized.$"):
            ops.bind_mount(m, "/tmp", bad, False, False)
    with pytest.raises(NotSupported, match="^Bind mounting is only supported on container machines.$"):
        ops.bind_mount(c.machine(MachineClass.VM), "/tmp", "/mnt", False, False)
    shifted = containers(shift=SHIFT)
    with pytest.raises(NotSupported, match="^Can't bind mount on container with user namespacing applied.$"):
        ops.bind_mount(shifted.machine(), str(tmp_path), "/mnt", False, False)
    with pytest.raises(Errno) as e:
        ops.bind_mount(m, str(tmp_path / "missing"), "/mnt", False, False)
    assert e.value.errno == errno.ENOENT


# --- root directory -------------------------------------------------------------------------------------------


def test_open_root_directory(containers):
    c = containers()
    fd = ops.open_root_directory(c.machine())
    try:
        st, want = os.fstat(fd), os.stat(f"/proc/{c.leader}/root")
        assert (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECTORY and os.get_inheritable(fd) is False
        assert "busybox" in os.listdir(f"/proc/self/fd/{fd}/bin")
    finally:
        os.close(fd)
    fd = ops.open_root_directory(host_machine())
    try:
        assert os.path.samestat(os.fstat(fd), os.stat("/"))
    finally:
        os.close(fd)
    with pytest.raises(NotSupported, match="^Opening the root directory is only supported on container machines.$"):
        ops.open_root_directory(c.machine(MachineClass.VM))


# --- kill and terminate -------------------------------------------------------------------------------------------


TRAPS = ("trap 'echo usr1 >> /run/log' USR1; trap 'echo term >> /run/log; exit 0' TERM; "
         "while :; do sleep 0.05; done")


def test_kill_leader_and_all(containers):
    c = containers(TRAPS, comm="sh")
    m = c.machine()
    ops.kill(m, "leader", signal.SIGUSR1)
    world.wait_for(lambda: (c.root / "run/log").exists(), 5, "the trap")
    assert (c.root / "run/log").read_text() == "usr1\n"
    assert alive(c.leader)
    # A shell started into the container is one of its processes too.
    master, _name = ops.open_shell(m, "", "/bin/sleep", ["sleep", "1000"], [])
    try:
        shell = [p for p in pidns_members(c.pidns) if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x001000\x00"]
        assert len(shell) == 1
        ops.kill(m, "", signal.SIGKILL)
        world.wait_for(lambda: not pidns_members(c.pidns), 5, "all processes to die")
        read_pty(master)  # hung up
    finally:
        os.close(master)


def test_kill_all_without_pid_namespace(containers):
    c = containers("sleep 1001 & sleep 1002 & wait", comm="sh", pidns=False)
    m = c.machine()
    world.wait_for(lambda: len(children_of(c.leader)) == 2, 5, "the children")
    sleepers = children_of(c.leader)
    ops.kill(m, "all", signal.SIGKILL)
    world.wait_for(lambda: not any(alive(p) for p in [c.leader, *sleepers]), 5, "all processes to die")


def test_kill_cgroup(containers, monkeypatch):
    unified = "/sys/fs/cgroup/unified"
    top = "/sys/fs/cgroup"
    if os.path.exists(f"{top}/cgroup.subtree_control"):
        root = top
    elif os.path.exists(f"{unified}/cgroup.procs"):
        root = unified
    else:
        pytest.skip("no cgroup v2 hierarchy")
    c = containers(pidns=False)
    m = c.machine()
    rel = f"/machine-ops-test-{os.getpid()}"
    os.mkdir(root + rel)
    stray = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        Path(root + rel, "cgroup.procs").write_text(str(stray.pid))
        monkeypatch.setattr(procs, "CGROUP_ROOT", root)
        m.cgroup = rel
        ops.kill(m, "all", signal.SIGKILL)
        assert stray.wait(5) == -signal.SIGKILL
        world.wait_for(lambda: not alive(c.leader), 5, "the leader to die")
    finally:
        stray.kill()
        stray.wait()
        world.wait_for(lambda: not Path(root + rel, "cgroup.procs").read_text().strip(), 5, "an empty cgroup")
        os.rmdir(root + rel)


def test_kill_invalid(containers):
    c = containers()
    m = c.machine()
    with pytest.raises(InvalidArgs, match="^Invalid kill parameter 'bogus'$"):
        ops.kill(m, "bogus", signal.SIGTERM)
    for signo in (0, -1, 65):
        with pytest.raises(InvalidArgs, match=f"^Invalid signal {signo}$"):
            ops.kill(m, "all", signo)
    with pytest.raises(Errno) as e:
        ops.kill(host_machine(), "leader", signal.SIGTERM)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(Errno) as e:
        ops.terminate(host_machine())
    assert e.value.errno == errno.EOPNOTSUPP
    assert alive(c.leader)


def test_terminate_gracefully(containers):
    c = containers(TRAPS, comm="sh")
    start = time.monotonic()
    ops.terminate(c.machine())
    assert time.monotonic() - start < 5
    assert (c.root / "run/log").read_text() == "term\n"
    assert not pidns_members(c.pidns)


def test_terminate_escalates(containers):
    c = containers()  # sleep as PID 1 of its namespace: SIGTERM does not reach it
    master, _name = ops.open_shell(c.machine(), "", "/bin/sleep", ["sleep", "1000"], [])
    start = time.monotonic()
    try:
        ops.terminate(c.machine(), timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        assert not pidns_members(c.pidns)
        read_pty(master)
    finally:
        os.close(master)


# --- systemd-nspawn -------------------------------------------------------------------------------------------------


@pytest.fixture(params=["shared-run", "private-run"])
def nspawn(request: pytest.FixtureRequest, tmp_path: Path):
    """A systemd-nspawn container running sleep as its PID 1.  nspawn's
    propagation directory reaches the container only if the host's
    /run/systemd is a shared mount (as under systemd); the suite's private
    namespace has it private, "shared-run" makes it shared for the test."""
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not installed")
    shared = request.param == "shared-run"
    before = set(children_of(os.getpid()))
    had_state = os.path.exists("/run/systemd/nspawn")
    subprocess.run(["mount", "--make-shared" if shared else "--make-private", "/run/systemd"], check=True)
    root = make_root(tmp_path / "nspawn-root")
    name = f"mo-{os.getpid()}"
    log = open(tmp_path / "nspawn.log", "wb")
    proc = subprocess.Popen(["systemd-nspawn", "--keep-unit", "--register=no", "-q", "-D", str(root), "-M", name,
                             "/bin/sleep", "1000"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    log.close()

    def leader() -> int | None:
        todo = [proc.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                if len(nspid) > 1 and nspid[-1] == "1" and Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return pid
            todo += children_of(pid)
        return None

    try:
        world.wait_for(lambda: leader() is not None or proc.poll() is not None, 20, "nspawn's container")
        if proc.poll() is not None:
            pytest.skip(f"systemd-nspawn does not run here: {(tmp_path / 'nspawn.log').read_text()}")
        m = Machine(name, MachineClass.CONTAINER, leader())
        yield m, shared
    finally:
        pidns = None
        with contextlib.suppress(Exception):
            pidns = os.readlink(f"/proc/{m.leader}/ns/pid")
            os.kill(m.leader, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["mount", "--make-private", "/run/systemd"], check=True)
        if not had_state:  # nspawn's locks and propagation directories
            shutil.rmtree("/run/systemd/nspawn", ignore_errors=True)
        if pidns:
            assert not pidns_members(pidns)
        world.wait_for(lambda: not (set(children_of(os.getpid())) - before), 10, "no children left")


def test_nspawn_container(nspawn, tmp_path, caplog):
    m, shared = nspawn
    assert ops.get_os_release(m)["ID"] == "busyboxtest"
    assert ops.get_uid_shift(m) == 0
    with pytest.raises(NoPrivateNetworking):
        ops.get_addresses(m)  # nspawn without --private-network
    # Bind mounts go through nspawn's propagation directory.
    assert os.path.isdir(f"{PROPAGATE_DIR}/{m.name}")
    src = tmp_path / "share"
    src.mkdir()
    (src / "file").write_text("via propagation\n")
    with caplog.at_level(logging.DEBUG, logger="machined.ops.mounts"):
        ops.bind_mount(m, str(src), "/srv/share", True, True)
    # Moved in from /run/host/incoming/ if the mount propagated there, else attached directly.
    assert ("through nspawn's propagation directory" in caplog.text) == shared
    assert Path(f"/proc/{m.leader}/root/srv/share/file").read_text() == "via propagation\n"
    assert os.listdir(f"{PROPAGATE_DIR}/{m.name}") == []  # the staging mount is gone
    master, name = ops.open_shell(m, "", "/bin/sh", ["sh", "-c", "cat /srv/share/file; echo x > /srv/share/y; tty"],
                                  [])
    try:
        out = lines(read_pty(master))
    finally:
        os.close(master)
    assert out[0] == "via propagation" and out[-1] == name and "Read-only" in " ".join(out)
    ops.copy_to(m, str(src / "file"), "/tmp/copied", False)
    inside = subprocess.run(["nsenter", "-t", str(m.leader), "-m", "-r", "/bin/cat", "/tmp/copied"],
                            capture_output=True, text=True, check=True)
    assert inside.stdout == "via propagation\n"  # where the container sees it, whatever is mounted on /tmp
    ops.copy_from(m, "/tmp/copied", str(tmp_path / "back"), False)
    assert (tmp_path / "back").read_text() == "via propagation\n"
    ops.terminate(m, timeout=1)
    assert not alive(m.leader)
