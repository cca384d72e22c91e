"""io.systemd.UserDatabase of machined, against real user namespaces, the real
userdbctl (systemd 252), nss-systemd (getent) and a raw Varlink client.

The server runs on the real path /run/systemd/userdb/io.systemd.Machine (our
private /run/systemd tmpfs), in an asyncio loop on a thread of the test.  The
containers are `unshare --user sleep` processes whose uid_map/gid_map we
write ourselves: util-linux 2.38's --map-users needs newuidmap, which is not
installed here.
"""

import asyncio
import contextlib
import errno
import json
import logging
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from imagepool import varlink
from machined.machine import Machine, MachineClass
from machined.userdb import NOLOGIN, SOCKET_PATH, UserDatabase

pytestmark = pytest.mark.root  # containers, user namespaces, mounts

SERVICE = "io.systemd.Machine"
UDB = "io.systemd.UserDatabase"

# ID maps (inside outside count) of the containers' leaders.
WEB_UIDS = "0 200000 65536"
WEB_GIDS = "0 230000 65536"
DB_UIDS = "0 300000 100\n1000 301000 100"   # two ranges with a hole
VM_MAP = "0 400000 65536"


# --- processes ------------------------------------------------------------------------


def start_userns(uid_map: str, gid_map: str) -> subprocess.Popen:
    """A `sleep` in a user namespace of its own with the given ID maps,
    written from outside as root (as nspawn does)."""
    proc = subprocess.Popen(["unshare", "--user", "sleep", "1000"])
    own = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{proc.pid}/ns/user") == own:
        assert time.monotonic() < deadline, "unshare did not create a user namespace"
        time.sleep(0.002)
    with open(f"/proc/{proc.pid}/uid_map", "w") as f:
        f.write(uid_map + "\n")
    with open(f"/proc/{proc.pid}/gid_map", "w") as f:
        f.write(gid_map + "\n")
    return proc


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- the server, on a loop in a thread --------------------------------------------------


class ServerThread:
    def __init__(self, machines: list[Machine], path: str = SOCKET_PATH) -> None:
        self.machines = machines
        self.path = path
        self.db = UserDatabase(lambda: list(self.machines))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="userdb-loop", daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        self.run(self.db.start(self.path))
        return self

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connection_count(self) -> int:
        async def count() -> int:
            return self.db.connection_count
        return self.run(count())

    def wait_idle(self, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.connection_count():
            assert time.monotonic() < deadline, f"{self.connection_count()} connections left"
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            self.run(self.db.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


class World:
    def __init__(self, server: ServerThread, procs: dict[str, subprocess.Popen]) -> None:
        self.server = server
        self.procs = procs

    @property
    def machines(self) -> list[Machine]:
        return self.server.machines


def children() -> set[int]:
    me = str(os.getpid())
    result = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        result.add(int(entry))
    return result


@pytest.fixture(autouse=True)
def no_leftovers(caplog: pytest.LogCaptureFixture):
    """After each test: no child process, no server thread, no socket file or
    descriptor, no error logged by the server or asyncvarlink."""
    children_before = children()
    threads_before = set(threading.enumerate())
    sockets_before = socket_fds()
    yield
    assert children() == children_before
    assert not os.path.exists(SOCKET_PATH)
    assert set(threading.enumerate()) == threads_before
    assert socket_fds() == sockets_before
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def world():
    """Containers web (shifted), db (two ranges), plain (no user namespace),
    a VM with a user-namespaced leader, and the host; machined's userdb
    service on its real socket."""
    procs: dict[str, subprocess.Popen] = {}
    server = None
    try:
        procs["web"] = start_userns(WEB_UIDS, WEB_GIDS)
        procs["db"] = start_userns(DB_UIDS, DB_UIDS)
        procs["vm"] = start_userns(VM_MAP, VM_MAP)
        procs["plain"] = subprocess.Popen(["sleep", "1000"])
        machines = [
            Machine(".host", MachineClass.HOST, 1),
            Machine("web", MachineClass.CONTAINER, procs["web"].pid),
            Machine("db", MachineClass.CONTAINER, procs["db"].pid),
            Machine("plain", MachineClass.CONTAINER, procs["plain"].pid),
            Machine("vm", MachineClass.VM, procs["vm"].pid),
        ]
        server = ServerThread(machines).start()
        yield World(server, procs)
    finally:
        if server is not None:
            server.stop()
        for proc in procs.values():
            stop_proc(proc)


# --- clients ------------------------------------------------------------------------------


class Client:
    """A raw Varlink client: JSON objects, each terminated by NUL."""

    def __init__(self, path: str = SOCKET_PATH) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, obj) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\0")

    def recv(self) -> dict | None:
        """The next message, or None at EOF."""
        while b"\0" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                assert not self.buf, self.buf
                return None
            self.buf += data
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, parameters: dict | None = None, **flags) -> list[dict]:
        """All replies to one call (until one without "continues")."""
        msg = {"method": method, **({"parameters": parameters} if parameters is not None else {}), **flags}
        self.send(msg)
        replies = []
        while True:
            reply = self.recv()
            assert reply is not None, "connection closed"
            replies.append(reply)
            if not reply.get("continues"):
                return replies

    def call1(self, method: str, parameters: dict | None = None, **flags) -> dict:
        replies = self.call(method, parameters, **flags)
        assert len(replies) == 1, replies
        return replies[0]

    def closed_by_server(self) -> bool:
        try:
            return self.recv() is None
        except ConnectionResetError:
            return True


def call(method: str, parameters: dict | None = None, **flags) -> dict:
    with Client() as c:
        return c.call1(method, parameters, **flags)


def user(**params) -> dict:
    return call(f"{UDB}.GetUserRecord", {"service": SERVICE, **params})


def group(**params) -> dict:
    return call(f"{UDB}.GetGroupRecord", {"service": SERVICE, **params})


def error_of(reply: dict) -> str | None:
    return reply.get("error")


def userdbctl(*args: str, user_: str | None = None) -> subprocess.CompletedProcess:
    argv = ["userdbctl", "--no-pager", "--no-legend", *args]
    if user_:
        pw = pwd.getpwnam(user_)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def web_user(inner: int) -> dict:
    return {
        "userName": f"vu-web-{inner}",
        "uid": 200000 + inner,
        "gid": 65534,
        "realName": f"UID {inner} of Container web",
        "homeDirectory": "/",
        "shell": NOLOGIN,
        "locked": True,
        "service": SERVICE,
        "disposition": "container",
    }


def web_group(inner: int) -> dict:
    return {
        "groupName": f"vg-web-{inner}",
        "gid": 230000 + inner,
        "description": f"GID {inner} of Container web",
        "service": SERVICE,
        "disposition": "container",
    }


def fields(output: str) -> dict[str, str]:
    """userdbctl's "Key: value" table."""
    result = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            result[key.strip()] = value.strip()
    return result


# --- userdbctl -----------------------------------------------------------------------------


def test_userdbctl_user_by_name(world):
    r = userdbctl("-s", SERVICE, "user", "vu-web-1000")
    assert r.returncode == 0, r.stderr
    f = fields(r.stdout)
    assert f["User name"] == "vu-web-1000"
    assert f["Disposition"] == "container"
    assert f["UID"] == "201000"
    assert f["GID"].startswith("65534")
    assert f["Real Name"] == "UID 1000 of Container web"
    assert f["Directory"] == "/"
    assert f["Shell"] == NOLOGIN
    assert f["Locked"] == "yes"
    assert f["Service"] == SERVICE


def test_userdbctl_user_by_uid_through_all_services(world):
    # No -s: userdbctl asks every socket in /run/systemd/userdb (and NSS).
    r = userdbctl("user", "201000")
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout)["User name"] == "vu-web-1000"
    r = userdbctl("user", "301005")   # db's second range: 1000 -> 301000
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout)["User name"] == "vu-db-1005"
    assert fields(r.stdout)["Real Name"] == "UID 1005 of Container db"


def test_userdbctl_json_user(world):
    for key in ("vu-web-1000", "201000"):
        r = userdbctl("-j", "-s", SERVICE, "user", key)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == web_user(1000)
    r = userdbctl("-j", "-s", SERVICE, "user", "vu-web-0")
    assert json.loads(r.stdout) == web_user(0)


def test_userdbctl_group(world):
    r = userdbctl("-s", SERVICE, "group", "vg-web-5")
    assert r.returncode == 0, r.stderr
    f = fields(r.stdout)
    assert f["Group name"] == "vg-web-5"
    assert f["GID"] == "230005"          # from gid_map, not uid_map
    assert f["Description"] == "GID 5 of Container web"
    assert f["Disposition"] == "container"
    for key in ("vg-web-5", "230005"):
        r = userdbctl("-j", "group", key)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == web_group(5)


def test_userdbctl_unknown(world):
    for name in ("vu-web-65536", "vu-db-500", "vu-nosuch-1", "vu-web-01000", "nosuchuser"):
        r = userdbctl("-s", SERVICE, "user", name)
        assert r.returncode == 1, (name, r.stdout)
        assert f"User {name} does not exist." in r.stderr
    r = userdbctl("-s", SERVICE, "group", "vg-web-70000")
    assert r.returncode == 1
    assert "Group vg-web-70000 does not exist." in r.stderr
    r = userdbctl("-s", SERVICE, "user", "300500")    # in db's hole
    assert r.returncode == 1
    assert "User 300500 does not exist." in r.stderr


def test_userdbctl_host_range(world):
    # -s only narrows the Varlink services; NSS still answers unless told not to.
    for uid in ("0", "1000", "12345", "65534"):
        r = userdbctl("--with-nss=no", "-s", SERVICE, "user", uid)
        if uid in ("0", "65534"):
            # root and nobody are synthesized by userdbctl itself.
            assert r.returncode == 0 and "intrinsic" in r.stdout
        else:
            assert r.returncode == 1, r.stdout
            assert f"User {uid} does not exist." in r.stderr
    r = userdbctl("--with-nss=no", "-s", SERVICE, "group", "5")
    assert r.returncode == 1


def test_userdbctl_enumeration_and_memberships(world):
    # We answer EnumerationNotSupported; userdbctl lists what else it has.
    r = userdbctl("--with-nss=no", "-s", SERVICE, "user")
    assert r.returncode == 0, r.stderr
    assert "vu-" not in r.stdout
    r = userdbctl("--with-nss=no", "-s", SERVICE, "group")
    assert r.returncode == 0, r.stderr
    assert "vg-" not in r.stdout
    r = userdbctl("-s", SERVICE, "users-in-group", "vg-web-5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""          # "No memberships." is legend, and we pass --no-legend


def test_userdbctl_as_unprivileged_user(world):
    assert stat.S_IMODE(os.stat(SOCKET_PATH).st_mode) == 0o666
    r = userdbctl("-j", "-s", SERVICE, "user", "vu-web-7", user_="nobody")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == web_user(7)


def test_userdbctl_concurrently(world):
    procs = [subprocess.Popen(["userdbctl", "-j", "-s", SERVICE, "user", str(200000 + i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(20)]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert json.loads(out) == web_user(i)
    world.server.wait_idle()


# --- NSS -----------------------------------------------------------------------------------


def getent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["getent", *args], capture_output=True, text=True, timeout=30)


def test_nss_systemd(world):
    with open("/etc/nsswitch.conf") as f:
        conf = {line.split(":")[0]: line.split(":", 1)[1].split() for line in f if ":" in line}
    if "systemd" not in conf.get("passwd", []) or "systemd" not in conf.get("group", []):
        pytest.skip("nss-systemd is not configured in /etc/nsswitch.conf")
    line = f"vu-web-1000:x:201000:65534:UID 1000 of Container web:/:{NOLOGIN}\n"
    assert getent("passwd", "vu-web-1000").stdout == line
    assert getent("passwd", "201000").stdout == line
    assert getent("group", "vg-web-5").stdout == "vg-web-5:x:230005:\n"
    assert getent("group", "230005").stdout == "vg-web-5:x:230005:\n"
    assert getent("passwd", "vu-web-99999").returncode == 2
    assert getent("passwd", "400001").returncode == 2     # the VM's
    assert getent("group", "vg-plain-5").returncode == 2


# --- the lookups, over raw Varlink --------------------------------------------------------


def test_records(world):
    assert user(uid=201000) == {"parameters": {"record": web_user(1000), "incomplete": False}}
    assert user(userName="vu-web-1000") == user(uid=201000)
    assert user(uid=201000, userName="vu-web-1000") == user(uid=201000)
    assert group(gid=230005) == {"parameters": {"record": web_group(5), "incomplete": False}}
    assert group(groupName="vg-web-5") == group(gid=230005)
    # The edges of the maps.
    assert user(uid=200000)["parameters"]["record"]["userName"] == "vu-web-0"
    assert user(uid=265534)["parameters"]["record"]["userName"] == "vu-web-65534"
    assert error_of(user(uid=265536)) == f"{UDB}.NoRecordFound"
    assert user(uid=300099)["parameters"]["record"]["userName"] == "vu-db-99"
    assert error_of(user(uid=300100)) == f"{UDB}.NoRecordFound"
    assert user(userName="vu-db-1099")["parameters"]["record"]["uid"] == 301099
    assert error_of(user(userName="vu-db-1100")) == f"{UDB}.NoRecordFound"
    assert group(gid=301000)["parameters"]["record"]["groupName"] == "vg-db-1000"


def test_no_record(world):
    no = f"{UDB}.NoRecordFound"
    # Host range, whatever maps it.
    for uid in (0, 1000, 65533, 65534):
        assert error_of(user(uid=uid)) == no
        assert error_of(group(gid=uid)) == no
    # Not a container, or no user namespace.
    assert error_of(user(uid=400001)) == no
    assert error_of(user(userName="vu-vm-1")) == no
    assert error_of(group(groupName="vg-vm-1")) == no
    assert error_of(user(userName="vu-plain-1000")) == no     # systemd 252 would say uid 1000
    assert error_of(user(userName="vu-plain-0")) == no
    assert error_of(user(userName="vu-.host-0")) == no
    # Names that are not ours, or not canonical.
    for name in ("root", "vu-web", "vu-web-", "vu--1000", "vu-web-1e3", "vu-web-01000", "vu-web-+1000",
                 "vu-web- 1000", "vu-web-65535", "vu-web-4294967295", "vu-web-99999999999", "vg-web-1000",
                 "vu-nosuch-1000", "VU-web-1000", "", "vu-web-1000\n", "vu-wéb-1000"):
        assert error_of(user(userName=name)) == no, name
    assert error_of(group(groupName="vu-web-5")) == no
    # uid_map says uid 201000, but the group side looks at gid_map.
    assert error_of(group(gid=201000)) == no


def test_names_that_cannot_be_synthesized(world):
    web = world.procs["web"].pid
    # "vu-<28 chars>-5" is longer than 31 characters; dots are not allowed.
    world.machines[:] = [Machine("averyveryverylongmachinename", MachineClass.CONTAINER, web),
                         Machine("web.example", MachineClass.CONTAINER, world.procs["db"].pid)]
    assert error_of(user(uid=200005)) == f"{UDB}.NoRecordFound"
    assert error_of(user(userName="vu-averyveryverylongmachinename-5")) == f"{UDB}.NoRecordFound"
    assert error_of(user(uid=300005)) == f"{UDB}.NoRecordFound"
    assert error_of(user(userName="vu-web.example-5")) == f"{UDB}.NoRecordFound"
    world.machines[:] = [Machine("shortname", MachineClass.CONTAINER, web)]
    assert user(uid=200005)["parameters"]["record"]["userName"] == "vu-shortname-5"


def test_leader_gone(world):
    no = f"{UDB}.NoRecordFound"
    proc = start_userns("0 600000 65536", "0 600000 65536")
    pidfd = os.pidfd_open(proc.pid)
    try:
        world.machines.append(Machine("dying", MachineClass.CONTAINER, proc.pid, pidfd=pidfd))
        assert user(uid=600005)["parameters"]["record"]["userName"] == "vu-dying-5"
        proc.send_signal(signal.SIGKILL)
        assert select.select([pidfd], [], [], 5)[0]
        # A zombie, not reaped: its uid_map still reads the same, but the
        # pidfd says the leader is gone, so the map is not trusted.
        with open(f"/proc/{proc.pid}/uid_map") as f:
            assert f.read().split() == ["0", "600000", "65536"]
        assert error_of(user(uid=600005)) == no
        assert error_of(user(userName="vu-dying-5")) == no
        proc.wait()
        assert error_of(user(uid=600005)) == no
        # A machine whose leader PID does not exist at all.
        world.machines.append(Machine("ghost", MachineClass.CONTAINER, proc.pid))
        assert error_of(user(userName="vu-ghost-5")) == no
    finally:
        os.close(pidfd)
        stop_proc(proc)


def test_bad_service(world):
    bad = f"{UDB}.BadService"
    for method in ("GetUserRecord", "GetGroupRecord", "GetMemberships"):
        for params in ({"service": "io.systemd.Other"}, {}, {"service": None}, {"service": ""}):
            reply = call(f"{UDB}.{method}", {"uid": 201000, "gid": 230005, **params})
            assert reply == {"error": bad, "parameters": {}}     # byte for byte what systemd 252 sends
        assert error_of(call(f"{UDB}.{method}", {"userName": "vu-web-1", "service": "x"}, more=True)) == bad


def test_conflicting(world):
    conflict = f"{UDB}.ConflictingRecordFound"
    assert error_of(user(uid=201000, userName="vu-web-1001")) == conflict
    assert error_of(user(uid=201000, userName="vu-db-1000")) == conflict
    assert error_of(user(uid=201000, userName="nosuch")) == conflict
    assert error_of(group(gid=230005, groupName="vg-web-6")) == conflict
    # As systemd: the UID decides, so a host UID with a good name is simply not found.
    assert error_of(user(uid=1000, userName="vu-web-1000")) == f"{UDB}.NoRecordFound"


def test_enumeration(world):
    for method in ("GetUserRecord", "GetGroupRecord"):
        for flags in ({}, {"more": True}):
            reply = call(f"{UDB}.{method}", {"service": SERVICE}, **flags)
            assert error_of(reply) == f"{UDB}.EnumerationNotSupported", reply
            assert "continues" not in reply
        reply = call(f"{UDB}.{method}", {"service": SERVICE, "uid": None, "gid": None, "userName": None,
                                         "groupName": None})
        assert error_of(reply) == f"{UDB}.EnumerationNotSupported"


def test_memberships(world):
    for params in ({"userName": "vu-web-1000"}, {"groupName": "vg-web-5"}, {}):
        for flags in ({}, {"more": True}):
            reply = call(f"{UDB}.GetMemberships", {"service": SERVICE, **params}, **flags)
            assert error_of(reply) == f"{UDB}.NoRecordFound"


def test_more_and_pipelining(world):
    with Client() as c:
        # A lookup with "more": one final reply, no "continues".
        replies = c.call(f"{UDB}.GetUserRecord", {"uid": 201000, "service": SERVICE}, more=True)
        assert replies == [{"parameters": {"record": web_user(1000), "incomplete": False}}]
        # Oneway: no reply at all, the next call is answered.
        c.send({"method": f"{UDB}.GetUserRecord", "parameters": {"uid": 201001, "service": SERVICE},
                "oneway": True})
        # Three calls in one write, answered in order.
        c.sock.sendall(b"".join(json.dumps({"method": f"{UDB}.GetUserRecord",
                                            "parameters": {"uid": 200000 + i, "service": SERVICE}}).encode() + b"\0"
                                for i in range(3)))
        for i in range(3):
            assert c.recv()["parameters"]["record"]["userName"] == f"vu-web-{i}"
        # Newer clients send filters this service does not know: ignored.
        reply = c.call1(f"{UDB}.GetUserRecord", {"uid": 201000, "service": SERVICE, "fuzzyNames": ["web"],
                                                 "dispositionMask": ["container"]})
        assert reply["parameters"]["record"] == web_user(1000)


def test_service_interface(world):
    with Client() as c:
        info = c.call1("org.varlink.service.GetInfo")["parameters"]
        assert info["interfaces"] == [UDB, "org.varlink.service"]
        assert set(info) == {"vendor", "product", "version", "url", "interfaces"}
        desc = c.call1("org.varlink.service.GetInterfaceDescription", {"interface": UDB})["parameters"]["description"]
        assert "interface io.systemd.UserDatabase" in desc
        assert ("method GetUserRecord(uid: ?int, userName: ?string, service: string)"
                " -> (record: object, incomplete: bool)") in desc
        assert "error EnumerationNotSupported ()" in desc
        reply = c.call1("org.varlink.service.GetInterfaceDescription", {"interface": "io.systemd.Nope"})
        assert reply == {"error": "org.varlink.service.InterfaceNotFound",
                         "parameters": {"interface": "io.systemd.Nope"}}


def test_bad_calls_get_errors(world):
    with Client() as c:
        assert c.call1(f"{UDB}.Frobnicate", {}) == {
            "error": "org.varlink.service.MethodNotFound", "parameters": {"method": f"{UDB}.Frobnicate"}}
        assert c.call1("org.varlink.service.Frobnicate") == {
            "error": "org.varlink.service.MethodNotFound", "parameters": {"method": "org.varlink.service.Frobnicate"}}
        assert c.call1("io.example.Nothing.Here") == {    # as systemd says it
            "error": "org.varlink.service.MethodNotFound", "parameters": {"method": "io.example.Nothing.Here"}}
        for params, bad in (({"uid": "201000"}, "uid"), ({"uid": -1}, "uid"), ({"uid": 2**32}, "uid"),
                            ({"uid": 2**32 - 1}, "uid"), ({"uid": 65535}, "uid"), ({"uid": 1.5}, "uid"),
                            ({"uid": True}, "uid"), ({"userName": 5}, "userName"),
                            ({"userName": ["x"]}, "userName"), ({"service": 1}, "service")):
            reply = c.call1(f"{UDB}.GetUserRecord", {"service": SERVICE, **params})
            assert reply == {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": bad}}, params
        reply = c.call1(f"{UDB}.GetGroupRecord", {"service": SERVICE, "gid": "x"})
        assert reply["parameters"] == {"parameter": "gid"}
        # Still the same connection, still working.
        assert c.call1(f"{UDB}.GetUserRecord", {"uid": 201000, "service": SERVICE})["parameters"]["record"]


GARBAGE = {
    "bad-json": b"{not json\0",
    "array": b"[1, 2]\0",
    "string": b"\"a string\"\0",
    "bad-utf8": b"\xff\xfe\0",
    "no-method": b"{\"parameters\": {}}\0",
    "unqualified-method": b"{\"method\": \"nodots\"}\0",
    "method-not-string": b"{\"method\": 5}\0",
    "parameters-not-object": b"{\"method\": \"io.systemd.UserDatabase.GetUserRecord\", \"parameters\": [1]}\0",
    "more-and-oneway": b"{\"method\": \"io.systemd.UserDatabase.GetUserRecord\", \"more\": true, \"oneway\": true}\0",
    "more-not-bool": b"{\"method\": \"io.systemd.UserDatabase.GetUserRecord\", \"more\": \"yes\"}\0",
    "deep-nesting": b"[" * 20000 + b"\0",
    "deep-parameters": b"{\"method\": \"a.b.C\", \"parameters\": " + b"[" * 20000 + b"\0",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_protocol_violation_drops_connection(world, garbage):
    with Client() as c:
        # An earlier good call in the same write is still answered.
        good = json.dumps({"method": f"{UDB}.GetUserRecord", "parameters": {"uid": 201000, "service": SERVICE}})
        c.sock.sendall(good.encode() + b"\0" + garbage)
        assert c.recv()["parameters"]["record"]["uid"] == 201000
        assert c.closed_by_server()
    assert user(uid=201000)["parameters"]["record"]["userName"] == "vu-web-1000"
    world.server.wait_idle()


def test_message_size_limit(world):
    # Up to MESSAGE_SIZE_MAX is fine (unknown parameters are ignored) ...
    with Client() as c:
        pad = "x" * (varlink.MESSAGE_SIZE_MAX - 200)
        reply = c.call1(f"{UDB}.GetUserRecord", {"uid": 201000, "service": SERVICE, "pad": pad})
        assert reply["parameters"]["record"]["uid"] == 201000
    # ... beyond, the connection is dropped without waiting for the NUL.
    with Client() as c:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(16):
                c.sock.sendall(b" " * (varlink.MESSAGE_SIZE_MAX // 8))
        assert c.closed_by_server()
    world.server.wait_idle()


def test_connections_per_uid(world, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(varlink, "CONNECTIONS_PER_UID_MAX", 5)
    clients = [Client() for _ in range(5)]
    try:
        for c in clients:
            assert c.call1("org.varlink.service.GetInfo")["parameters"]
        with Client() as extra:           # root's sixth: accepted by the kernel, closed by us
            assert extra.closed_by_server()
        r = userdbctl("-j", "-s", SERVICE, "user", "vu-web-3", user_="nobody")   # another UID: fine
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == web_user(3)
    finally:
        for c in clients:
            c.close()
    world.server.wait_idle()
    assert user(uid=201000)["parameters"]["record"]["uid"] == 201000


def test_many_concurrent_clients(world):
    clients = [Client() for _ in range(300)]
    try:
        deadline = time.monotonic() + 5
        while world.server.connection_count() < 300:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for i, c in enumerate(clients):
            c.send({"method": f"{UDB}.GetUserRecord", "parameters": {"uid": 200000 + i, "service": SERVICE},
                    "more": bool(i % 2)})
        for i, c in enumerate(clients):
            assert c.recv()["parameters"]["record"]["userName"] == f"vu-web-{i}"
    finally:
        for c in clients:
            c.close()
    world.server.wait_idle()


def test_client_disconnects(world):
    request = json.dumps({"method": f"{UDB}.GetUserRecord",
                          "parameters": {"uid": 201000, "service": SERVICE}}).encode() + b"\0"
    for i in range(100):
        c = Client()
        if i % 4 == 1:
            c.sock.sendall(request)                  # gone before the reply
        elif i % 4 == 2:
            c.sock.sendall(request * 50)             # many replies nobody reads
        elif i % 4 == 3:
            c.sock.sendall(request[:10])             # gone mid-message
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST where possible
        c.close()
    # Half-close after the calls: every reply still comes, then EOF.
    for n in (1, 30):
        with Client() as c:
            c.sock.sendall(request * n)
            c.sock.shutdown(socket.SHUT_WR)
            for _ in range(n):
                assert c.recv()["parameters"]["record"]["uid"] == 201000
            assert c.closed_by_server()
    world.server.wait_idle()
    assert user(uid=201000)["parameters"]["record"]["userName"] == "vu-web-1000"


def test_stop_drops_clients():
    machines: list[Machine] = []
    server = ServerThread(machines).start()
    try:
        idle = Client()
        busy = Client()
        busy.sock.sendall(b"{\"method\": \"org.varlink.service.GetInfo\"}\0")
        assert busy.recv()["parameters"]["interfaces"]
        assert server.connection_count() == 2
    finally:
        server.stop()
    assert idle.closed_by_server()
    assert busy.closed_by_server()
    idle.close()
    busy.close()
    assert not os.path.exists(SOCKET_PATH)
    with pytest.raises(OSError) as e:
        Client()
    assert e.value.errno in (errno.ENOENT, errno.ECONNREFUSED)


def test_start_socket_and_directory():
    directory = os.path.dirname(SOCKET_PATH)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)
    # A stale socket of an earlier instance is replaced, twice over.
    for _ in range(2):
        server = ServerThread([]).start()
        try:
            st = os.stat(directory)
            assert stat.S_IMODE(st.st_mode) == 0o755
            st = os.lstat(SOCKET_PATH)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
            assert call("org.varlink.service.GetInfo")["parameters"]["product"]
        finally:
            server.stop()
        assert not os.path.exists(SOCKET_PATH)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(SOCKET_PATH)
        stale.close()
    os.unlink(SOCKET_PATH)
    # A path that is not a socket is left alone.
    with open(SOCKET_PATH, "w") as f:
        f.write("not a socket")
    server = ServerThread([])
    try:
        server.thread.start()
        with pytest.raises(OSError):
            server.run(server.db.start(SOCKET_PATH))
        with open(SOCKET_PATH) as f:
            assert f.read() == "not a socket"
    finally:
        server.stop()
        os.unlink(SOCKET_PATH)
