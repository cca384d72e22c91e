"""make install / make uninstall: our services in place of systemd-machined and systemd-importd (tools/install).

- The D-Bus policy (systemd/*.conf) on a dbus-daemon with the rules of Debian's system.conf: only root owns the
  names and sets properties; everybody else reads and calls, and is refused CreateMachine.
- An installation with DESTDIR into an overlay over the Debian 12 root (make deps builds it): make install-check's
  dry run, what it puts where, systemd-analyze verify, the virtual environment running there, a file of somebody
  else's it won't replace, and an uninstall that leaves the root as it was; the same into the sid root, verified
  by systemd 262's systemd-analyze, with 262's socket units masked too.
- The real thing: Debian 12 booted (systemd 252 as PID 1, the host's systemd-nspawn), make install inside it from
  the checkout (read-only) and the wheels make deps built on the host (no network in the container); systemd
  starts our services through D-Bus and socket activation, machinectl, importctl 262 (sid's, through its loader)
  and a Varlink client use them, systemctl sets their log level, both pull from an HTTP server inside, a user a
  polkit rule grants pulls and one nobody granted is refused; make uninstall gives systemd's daemons back, and
  they refuse that user in the same words (262's where they changed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepool import dev as world
from tests import sid
from tests.bootedroot import BootedRoot

SOURCES = world.SOURCES
BOOKWORM = SOURCES / ".cache" / "roots" / "bookworm"
WHEELHOUSE = SOURCES / ".cache" / "wheels"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
POLICIES = sorted(p.name for p in (SOURCES / "systemd").glob("*.policy"))
UNITS = ["machined-py.service", "importd-py.service", "machined-py.socket", "importd-py.socket"]
# What make install puts in place with the default PREFIX (directories aside).
INSTALLED = {
    "/usr/local/lib/machined-py",
    "/usr/local/bin/machined", "/usr/local/bin/importd", "/usr/local/bin/machined-py",
    *(f"/usr/local/lib/systemd/system/{unit}" for unit in UNITS),
    "/etc/systemd/system/dbus-org.freedesktop.machine1.service",
    "/etc/systemd/system/dbus-org.freedesktop.import1.service",
    "/etc/systemd/system/sockets.target.wants/machined-py.socket",
    "/etc/systemd/system/sockets.target.wants/importd-py.socket",
    "/etc/systemd/system/systemd-machined.service", "/etc/systemd/system/systemd-importd.service",
    "/usr/local/share/dbus-1/system-services/org.freedesktop.machine1.service",
    "/usr/local/share/dbus-1/system-services/org.freedesktop.import1.service",
    "/etc/dbus-1/system.d/machined-py.org.freedesktop.machine1.conf",
    "/etc/dbus-1/system.d/machined-py.org.freedesktop.import1.conf",
    *(f"/usr/share/polkit-1/actions/machined-py.{name}" for name in POLICIES),
}

pytestmark = pytest.mark.root


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(SOURCES), *args], capture_output=True, text=True, timeout=600)


def _prerequisites() -> None:
    assert sid.available(), f"the sid root is missing ({sid.ROOT}): run make deps"
    assert (BOOKWORM / ".complete").exists(), f"the Debian 12 root is missing ({BOOKWORM}): run make deps"
    assert (WHEELHOUSE / ".complete").exists(), f"the wheels are missing ({WHEELHOUSE}): run make deps"


# --- the D-Bus policy ---------------------------------------------------------------------------------------

DEBIAN_SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
DOCTYPE = ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
           ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n')


def policy_bus_config(socket: Path, includes: list[Path]) -> str:
    """Debian's system.conf, rules and all, listening on SOCKET, run by whoever starts it, without service
    directories, and with INCLUDES in place of its includes (system.d, /etc/dbus-1/system.d)."""
    root = ET.fromstring(DEBIAN_SYSTEM_CONF.read_text())
    for tag in ("user", "fork", "pidfile", "syslog", "servicehelper", "standard_system_servicedirs", "include",
                "includedir", "listen"):
        for element in root.findall(tag):
            root.remove(element)
    ET.SubElement(root, "listen").text = f"unix:path={socket}"
    for path in includes:
        ET.SubElement(root, "include").text = str(path)
    return DOCTYPE + ET.tostring(root, encoding="unicode")


@pytest.fixture
def policy_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A dbus-daemon with Debian's rules and our policy files (after systemd-container's, as installed, when the
    parameter says so), and our machined and importd on it as root; yields the environment to reach it."""
    ours = [SOURCES / "systemd" / "org.freedesktop.machine1.conf", SOURCES / "systemd" / "org.freedesktop.import1.conf"]
    theirs = [Path("/usr/share/dbus-1/system.d/org.freedesktop.machine1.conf"),
              Path("/usr/share/dbus-1/system.d/org.freedesktop.import1.conf")]
    if request.param == "with-systemds":
        for path in theirs:
            assert path.exists(), f"{path} is missing (systemd-container: make deps)"
    directory = Path(f"/run/systemd/policy-bus-{os.getpid()}")  # reachable by nobody (tmp_path is not)
    directory.mkdir(mode=0o755)
    socket = directory / "system_bus_socket"
    config = tmp_path / "bus.conf"
    config.write_text(policy_bus_config(socket, (theirs if request.param == "with-systemds" else []) + ours))
    with open(tmp_path / "bus.log", "wb") as log:
        bus = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile", "--nosyslog"],
                               stdin=subprocess.DEVNULL, stderr=log)
    services: list[world.Service] = []
    try:
        world.wait_for(socket.exists, 10, "the bus socket")
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={socket}", PYTHONPATH=str(SOURCES))
        pool = tmp_path / "pool"
        pool.mkdir()
        for module in ("machined", "importd"):
            # Root owns the names: the services start.
            services.append(world.Service(world.service_argv(module, pool, tmp_path / "roots"), env,
                                          tmp_path / f"{module}.log").start())
        yield env
    finally:
        for service in reversed(services):
            service.stop()
        world.stop_process(bus)
        socket.unlink(missing_ok=True)
        directory.rmdir()
    for module in ("machined", "importd"):
        text = (tmp_path / f"{module}.log").read_text()
        assert "Traceback" not in text, text


def busctl_as(env: dict[str, str], nobody: bool, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(NOBODY if nobody else []), "busctl", "--system", *args], env=env, capture_output=True,
                          text=True, timeout=30)


def dbus_send_as(env: dict[str, str], nobody: bool, destination: str, path: str, method: str,
                 *args: str) -> subprocess.CompletedProcess[str]:
    """dbus-send prints the whole error (busctl says "Access denied" for the bus and for a service alike)."""
    return subprocess.run([*(NOBODY if nobody else []), "dbus-send", "--system", "--print-reply",
                           f"--dest={destination}", path, method, *args], env=env, capture_output=True, text=True,
                          timeout=30)


# dbus-daemon's words when its policy refuses a message: the service never saw it.
REJECTED = "org.freedesktop.DBus.Error.AccessDenied: Rejected send message"
ID = "array:byte:" + ",".join(["1"] * 16)


@pytest.mark.parametrize("policy_bus", ["ours", "with-systemds"], indirect=True)
def test_policy_lets_only_root_own_and_set(policy_bus: dict[str, str]) -> None:
    env = policy_bus
    for name in ("org.freedesktop.machine1", "org.freedesktop.import1"):
        r = dbus_send_as(env, True, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                         "org.freedesktop.DBus.RequestName", f"string:{name}", "uint32:0")
        assert r.returncode != 0 and f'is not allowed to own the service "{name}"' in r.stderr, (name, r.stderr)
    for name, path in (("org.freedesktop.machine1", "/org/freedesktop/machine1"),
                       ("org.freedesktop.import1", "/org/freedesktop/import1")):
        # Reading is open, LogControl1 included; setting is root's.
        r = busctl_as(env, True, "get-property", name, "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1",
                      "LogLevel")
        assert r.returncode == 0 and r.stdout.strip() == 's "info"', (name, r.stdout, r.stderr)
        r = dbus_send_as(env, True, name, "/org/freedesktop/LogControl1", "org.freedesktop.DBus.Properties.Set",
                         "string:org.freedesktop.LogControl1", "string:LogLevel", "variant:string:debug")
        assert r.returncode != 0 and REJECTED in r.stderr, (name, r.stdout, r.stderr)
        r = busctl_as(env, False, "set-property", name, "/org/freedesktop/LogControl1",
                      "org.freedesktop.LogControl1", "LogLevel", "s", "debug")
        assert r.returncode == 0, (name, r.stderr)
        r = busctl_as(env, True, "get-property", name, "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1",
                      "LogLevel")
        assert r.stdout.strip() == 's "debug"', (name, r.stdout, r.stderr)
        r = busctl_as(env, True, "introspect", name, path)
        assert r.returncode == 0, (name, r.stderr)
    # The methods: everybody may call them (the services decide), but registration is root's.
    r = busctl_as(env, True, "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                  "org.freedesktop.machine1.Manager", "ListImages")
    assert r.returncode == 0 and r.stdout.startswith("a(ssbttto) "), r.stderr
    r = busctl_as(env, True, "call", "org.freedesktop.import1", "/org/freedesktop/import1",
                  "org.freedesktop.import1.Manager", "ListTransfers")
    assert r.returncode == 0 and r.stdout.startswith("a(usssdo) "), r.stderr
    r = dbus_send_as(env, True, "org.freedesktop.machine1", "/org/machined_py/machine1",
                     "org.machined_py.Images1.UsageStatus", "string:nonexistent")
    assert "org.freedesktop.machine1.NoSuchImage" in r.stderr, r.stderr  # machined's answer
    for method in ("RegisterMachine", "RegisterMachineWithNetwork"):
        args = ["string:x", ID, "string:", "string:container", "uint32:1", "string:/"]
        if method.endswith("WithNetwork"):
            args.append("array:int32:1")
        r = dbus_send_as(env, True, "org.freedesktop.machine1", "/org/freedesktop/machine1",
                         f"org.freedesktop.machine1.Manager.{method}", *args)
        assert r.returncode != 0 and REJECTED in r.stderr, (method, r.stderr)
    # Root's goes through to machined (which finds no such leader).
    r = dbus_send_as(env, False, "org.freedesktop.machine1", "/org/freedesktop/machine1",
                     "org.freedesktop.machine1.Manager.RegisterMachine", "string:x", ID, "string:",
                     "string:container", "uint32:999999999", "string:/")
    assert r.returncode != 0 and REJECTED not in r.stderr, r.stderr
    r = dbus_send_as(env, True, "org.freedesktop.import1", "/org/freedesktop/import1",
                     "org.freedesktop.import1.Manager.PullTar", "string:http://127.0.0.1:1/x.tar", "string:x",
                     "string:no", "boolean:false")
    assert r.returncode != 0 and REJECTED not in r.stderr, r.stderr  # refused by importd, not by the bus


# --- DESTDIR ------------------------------------------------------------------------------------------------


def listing(root: Path) -> dict[str, tuple[str, str, int]]:
    """Every path below ROOT: its kind, link target and mode (not its times)."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
            entries[str(path.relative_to(root))] = (kind, os.readlink(path) if kind == "l" else "", st.st_mode)
    return entries


@contextlib.contextmanager
def overlay_over(lower: Path, tmp_path: Path) -> Iterator[Path]:
    """LOWER under an overlay: what is written goes to tmp_path."""
    merged = tmp_path / "merged"
    for d in ("upper", "work", "merged"):
        (tmp_path / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower.resolve()},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
                    str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    """The Debian 12 root under an overlay."""
    _prerequisites()
    with overlay_over(BOOKWORM, tmp_path) as merged:
        yield merged


def test_install_with_destdir(overlay: Path) -> None:
    root = overlay
    before = listing(root)
    # The dry run lists what the installation puts in place, and changes nothing.
    r = make("install-check", f"DESTDIR={root}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {line.split()[1] for line in r.stdout.splitlines() if line.startswith("install ")} == \
        {f"{root}{path}" for path in INSTALLED}, r.stdout
    assert listing(root) == before
    r = make("install", f"DESTDIR={root}", f"WHEELS={WHEELHOUSE}")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = (root / "usr/local/lib/machined-py/installed-files").read_text().split()
    assert {p for p in manifest if not p.endswith("/")} == INSTALLED
    after = listing(root)
    for path in INSTALLED:
        assert path.lstrip("/") in after, path
    assert os.readlink(root / "etc/systemd/system/dbus-org.freedesktop.machine1.service") == \
        "/usr/local/lib/systemd/system/machined-py.service"
    assert os.readlink(root / "etc/systemd/system/systemd-machined.service") == "/dev/null"
    assert os.readlink(root / "usr/local/bin/machined") == "/usr/local/lib/machined-py/bin/machined"
    unit = (root / "usr/local/lib/systemd/system/machined-py.service").read_text()
    assert "ExecStart=/usr/local/bin/machined --pool /var/lib/machines" in unit
    # Nothing names the staging directory, the byte code included (tracebacks name the installed files).
    assert list((root / "usr/local/lib/machined-py/lib").rglob("machined/__pycache__/__main__.*.pyc"))
    r = subprocess.run(["grep", "-rlF", str(root), str(root / "usr/local"), str(root / "etc")],
                       capture_output=True, text=True)
    assert r.stdout == "", r.stdout
    # systemd 252 (the host's, on that root) finds nothing wrong; ours are enabled, systemd's masked.
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *UNITS], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for unit_name, state in (("machined-py.service", "enabled"), ("importd-py.socket", "enabled"),
                             ("systemd-machined.service", "masked"), ("systemd-importd.service", "masked")):
        r = subprocess.run(["systemctl", f"--root={root}", "is-enabled", unit_name], capture_output=True, text=True)
        assert r.stdout.strip() == state, (unit_name, r.stdout, r.stderr)
    # The environment runs in that root (its python3), and so do the programs.
    for program in ("machined", "importd", "machined-py"):
        r = subprocess.run(["chroot", str(root), f"/usr/local/bin/{program}", "--help"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and program in r.stdout.splitlines()[0], (program, r.stdout, r.stderr)

    r = make("uninstall", f"DESTDIR={root}")
    assert r.returncode == 0, r.stderr
    assert listing(root) == before
    r = subprocess.run(["systemctl", f"--root={root}", "is-enabled", "systemd-machined.service"], capture_output=True,
                       text=True)
    assert r.stdout.strip() == "static", r.stdout

    # Somebody else's file is not replaced, and nothing is installed then (not even what comes before it).
    foreign = sorted(INSTALLED)[-1]
    (root / foreign.lstrip("/")).write_text("somebody else's\n")
    before = listing(root)
    r = make("install", f"DESTDIR={root}", f"WHEELS={WHEELHOUSE}")
    assert r.returncode != 0 and f"{foreign} exists and was not installed by machined-py" in r.stderr, \
        r.stdout + r.stderr
    assert listing(root) == before
    r = make("install-check", f"DESTDIR={root}")
    assert r.returncode != 0 and f"{foreign} exists and was not installed by machined-py" in r.stderr, \
        r.stdout + r.stderr
    # With PREFIX=/usr the activation files would replace systemd-container's: each is named, with its package.
    r = make("install-check", f"DESTDIR={root}", "PREFIX=/usr")
    assert r.returncode != 0, r.stdout + r.stderr
    for name in ("machine1", "import1"):
        assert f"/usr/share/dbus-1/system-services/org.freedesktop.{name}.service exists and was not installed by " \
               "machined-py (it belongs to the package systemd-container)" in r.stderr, r.stderr
    assert listing(root) == before


def test_install_with_destdir_on_sid(tmp_path: Path) -> None:
    """Into the sid root (systemd 262, which has sockets of its own on the paths of ours): sid's systemd-analyze
    verify finds nothing wrong with our units, and systemd's four units are masked while ours are in place."""
    assert sid.available(), f"the sid root is missing ({sid.ROOT}): run make deps"
    with overlay_over(sid.ROOT, tmp_path) as root:
        before = listing(root)
        r = make("install", f"DESTDIR={root}", f"WHEELS={WHEELHOUSE}")
        assert r.returncode == 0, r.stdout + r.stderr
        masks = {"/etc/systemd/system/systemd-machined.socket", "/etc/systemd/system/systemd-importd.socket"}
        manifest = (root / "usr/local/lib/machined-py/installed-files").read_text().split()
        assert {p for p in manifest if not p.endswith("/")} == INSTALLED | masks
        r = sid.run("systemd-analyze", "verify", "--man=no", f"--root={root}", *UNITS)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        for unit_name, state in (("machined-py.service", "enabled"), ("machined-py.socket", "enabled"),
                                 ("importd-py.socket", "enabled"), ("systemd-machined.service", "masked"),
                                 ("systemd-importd.service", "masked"), ("systemd-machined.socket", "masked"),
                                 ("systemd-importd.socket", "masked")):
            r = sid.run("systemctl", f"--root={root}", "is-enabled", unit_name)
            assert r.stdout.strip() == state, (unit_name, r.stdout, r.stderr)
        r = make("uninstall", f"DESTDIR={root}")
        assert r.returncode == 0, r.stderr
        assert listing(root) == before


# --- booted -------------------------------------------------------------------------------------------------

VARLINK_CLIENT = r"""
import json, socket, sys
path, method, parameters, more = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "more"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
call = {"method": method, "parameters": parameters}
if more:
    call["more"] = True
s.sendall(json.dumps(call).encode() + b"\0")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
    while b"\0" in data:
        message, data = data.split(b"\0", 1)
        print(message.decode(), flush=True)
        if not json.loads(message).get("continues"):
            sys.exit(0)
"""
HTTP = "http://127.0.0.1:8080"
POLKIT_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.freedesktop.import1.pull" && subject.user == "alice") {
        return polkit.Result.YES;
    }
});
"""


# systemd 262's words where 252's differ (we answer as 262; tests/newer.py has the others): a polkit challenge the
# caller did not allow (machinectl allows it, but there is no agent to answer it).
INTERACTIVE_252 = "Interactive authentication required."
INTERACTIVE_262 = ("Access denied as the requested operation requires interactive authentication. However, "
                   "interactive authentication has not been enabled by the calling program.")


def as_262(output: str) -> str:
    return output.replace(INTERACTIVE_252, INTERACTIVE_262)


class Bookworm(BootedRoot):
    """Debian 12 booted, the checkout at /src and the wheels at /wheels (read-only), users alice and bob."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(BOOKWORM, workdir, "bookworm-install",
                         ro_binds=[(SOURCES, "/src"), (WHEELHOUSE, "/wheels"), (sid.ROOT.resolve(), "/sid")])
        self.answered_before = ""
        self.uninstalled = False
        # What our services answered a user whom nobody granted anything (argv: exit code and output), to compare
        # with systemd's daemons' answers once they are back.
        self.refused: dict[tuple[str, ...], tuple[int, str]] = {}

    def refuse(self, *argv: str, user: str) -> subprocess.CompletedProcess[str]:
        r = self.run(*argv, user=user)
        assert r.returncode != 0, (argv, r.stdout, r.stderr)
        self.refused[(user, *argv)] = (r.returncode, r.stdout + r.stderr)
        return r

    def ok(self, *argv: str, user: str | None = None, timeout: float = 120) -> str:
        r = self.run(*argv, user=user, timeout=timeout)
        assert r.returncode == 0, f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.journal()}"
        return r.stdout

    def sid(self, program: str, *args: str) -> list[str]:
        """sid's PROGRAM (systemd 262's clients) inside the container, through the sid root's loader (tests.sid)."""
        return ["/sid/usr/lib64/ld-linux-x86-64.so.2", "--library-path",
                "/sid/usr/lib/x86_64-linux-gnu/systemd:/sid/usr/lib/x86_64-linux-gnu", f"/sid/usr/bin/{program}",
                *args]

    def journal(self, *units: str) -> str:
        return self.run("journalctl", "--no-pager", "-n", "40", *(f"--unit={u}" for u in units)).stdout

    def owner_unit(self, bus_name: str) -> str:
        """The unit of the process that owns BUS_NAME."""
        out = self.ok("busctl", "status", bus_name)
        return re.search(r"^Unit=(.*)$", out, re.M).group(1)  # type: ignore[union-attr]

    def state(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit).stdout.strip()

    def varlink(self, socket: str, method: str, parameters: dict[str, object],
                more: bool = False) -> list[dict[str, Any]]:
        out = self.ok("python3", "-c", VARLINK_CLIENT, socket, method, json.dumps(parameters),
                      "more" if more else "once")
        return [json.loads(line) for line in out.splitlines()]

    def serve_http(self) -> None:
        """python3's http.server on the container's loopback, serving a tarball of a tiny tree."""
        if self.state("httpd.service") == "active":
            return
        self.ok("sh", "-c", "mkdir -p /srv/www /tmp/ct/etc && echo ID=pulled > /tmp/ct/etc/os-release && "
                            "tar -C /tmp/ct -cJf /srv/www/ct.tar.xz .")
        self.ok("systemd-run", "--unit=httpd", "-p", "WorkingDirectory=/srv/www", "python3", "-m", "http.server",
                "--bind", "127.0.0.1", "8080")
        world.wait_for(lambda: self.run("python3", "-c", "import socket; socket.create_connection(('127.0.0.1', "
                                        "8080))").returncode == 0, 30, "the HTTP server")


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bookworm]:
    """Debian 12 booted, with machined-py installed by make install inside it (after systemd's machined answered
    once, so that the installation has it to stop)."""
    _prerequisites()
    booted = Bookworm(tmp_path_factory.mktemp("bookworm")).start()
    try:
        booted.ok("machinectl", "list-images")
        booted.answered_before = booted.owner_unit("org.freedesktop.machine1")
        for user in ("alice", "bob"):
            booted.ok("useradd", "--create-home", user)
        booted.ok("make", "-C", "/src", "install", "WHEELS=/wheels", timeout=300)
        yield booted
    finally:
        booted.stop()


def installed(booted: Bookworm) -> Bookworm:
    assert not booted.uninstalled, "make uninstall ran already: the tests of this module run in their order"
    return booted


def test_installed_in_place_of_systemds(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    assert b.answered_before == "systemd-machined.service"
    manifest = b.ok("cat", "/usr/local/lib/machined-py/installed-files").split()
    assert {p for p in manifest if not p.endswith("/")} == INSTALLED
    assert b.ok("systemctl", "show", "-p", "Id", "--value", "dbus-org.freedesktop.machine1.service").strip() == \
        "machined-py.service"
    assert b.ok("systemctl", "show", "-p", "Id", "--value", "dbus-org.freedesktop.import1.service").strip() == \
        "importd-py.service"
    assert b.ok("systemctl", "show", "-p", "LoadState", "--value", "systemd-machined.service",
                "systemd-importd.service").split() == ["masked", "masked"]
    assert b.ok("systemctl", "is-enabled", *UNITS).split() == ["enabled"] * 4
    assert b.ok("systemctl", "is-active", "machined-py.socket", "importd-py.socket").split() == ["active"] * 2
    r = b.run("systemd-analyze", "verify", "--man=no", *UNITS)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert b.ok("systemctl", "--failed", "--plain", "--no-legend").strip() == ""
    # The environment was built aside (machined-py.new) and moved in place: nothing names the temporary place.
    r = b.run("grep", "-rlF", "/usr/local/lib/machined-py.new", "/usr/local/lib/machined-py")
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr


def _hardening(b: Bookworm, unit: str) -> None:
    """The running service has the sandbox of its unit."""
    pid = b.ok("systemctl", "show", "-p", "MainPID", "--value", unit).strip()
    status = dict(line.split(":\t", 1) for line in b.ok("cat", f"/proc/{pid}/status").splitlines() if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    bounding = int(status["CapBnd"], 16)
    assert bounding & (1 << 21), "CAP_SYS_ADMIN"
    assert not bounding & (1 << 16), "CAP_SYS_MODULE"
    assert not bounding & (1 << 12), "CAP_NET_ADMIN"


def test_machined_by_dbus_activation(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.ok("systemctl", "stop", "machined-py.service")
    assert b.state("machined-py.service") == "inactive"
    b.ok("sh", "-c", "mkdir -p /var/lib/machines/base/etc && echo 'PRETTY_NAME=\"Demo OS\"' > "
                     "/var/lib/machines/base/etc/os-release")
    assert re.search(r"^base +directory +no ", b.ok("machinectl", "list-images"), re.M)
    assert b.state("machined-py.service") == "active"
    assert b.owner_unit("org.freedesktop.machine1") == "machined-py.service"
    _hardening(b, "machined-py.service")
    b.ok("machinectl", "clone", "base", "work")
    status = b.ok("machinectl", "image-status", "work")
    assert "OS: Demo OS" in status and "Path: /var/lib/machines/work" in status, status
    b.ok("machinectl", "remove", "work")
    images = b.ok("machinectl", "list-images")
    assert "work" not in images and "1 images listed." in images, images
    # Users read (a user's call starts the service too); they don't remove.
    b.ok("systemctl", "stop", "machined-py.service")
    assert "base" in b.ok("machinectl", "list-images", user="bob")
    assert b.state("machined-py.service") == "active"
    b.refuse("machinectl", "remove", "base", user="bob")
    b.refuse("machinectl", "clone", "base", "bobs", user="bob")
    b.refuse("machinectl", "read-only", "base", user="bob")
    assert b.run("test", "-d", "/var/lib/machines/base").returncode == 0
    # The same service on its Varlink socket (from machined-py.socket, with its symlink).
    [reply] = b.varlink("/run/systemd/machine/io.systemd.MachineImage", "io.systemd.MachineImage.List",
                        {"name": "base"})
    assert reply["parameters"]["name"] == "base" and reply["parameters"]["type"] == "directory", reply
    assert "Traceback" not in b.journal("machined-py.service")


def test_importd_by_socket_activation(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.ok("systemctl", "stop", "importd-py.service")
    assert b.state("importd-py.service") == "inactive"
    assert b.state("importd-py.socket") == "active"
    # Debian 12 has no varlinkctl: a python3 client connects, and systemd starts importd for it.
    [reply] = b.varlink("/run/systemd/io.systemd.Import", "io.systemd.Import.ListTransfers", {}, more=True)
    assert reply == {"error": "io.systemd.Import.NoTransfers"}, reply
    assert b.state("importd-py.service") == "active"
    # The process systemd started on the socket serves D-Bus too.
    assert b.owner_unit("org.freedesktop.import1") == "importd-py.service"
    [pong] = b.varlink("/run/systemd/io.systemd.Import", "io.systemd.service.Ping", {})
    assert "error" not in pong, pong
    _hardening(b, "importd-py.service")


def test_service_log_level(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.ok("machinectl", "list-images")
    b.ok("busctl", "call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
         "ListTransfers")
    for unit in ("machined-py.service", "importd-py.service"):
        assert b.ok("systemctl", "service-log-level", unit).strip() == "info"
        b.ok("systemctl", "service-log-level", unit, "debug")
        assert b.ok("systemctl", "service-log-level", unit).strip() == "debug"
        assert b.ok("systemctl", "service-log-level", unit, user="bob").strip() == "debug"
        r = b.run("systemctl", "service-log-level", unit, "err", user="bob")
        assert r.returncode != 0, r.stdout
        assert b.ok("systemctl", "service-log-level", unit).strip() == "debug"
        b.ok("systemctl", "service-log-level", unit, "info")
    assert "Log level set to debug." in b.journal("machined-py.service")
    for name in ("org.freedesktop.machine1", "org.freedesktop.import1"):
        b.refuse("busctl", "set-property", name, "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1",
                 "LogLevel", "s", "err", user="bob")


def test_pull_tar(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.serve_http()
    b.ok("systemctl", "stop", "importd-py.service")
    # machinectl's D-Bus call starts importd this time.
    out = b.run("machinectl", "pull-tar", "--verify=no", f"{HTTP}/ct.tar.xz", "ct", timeout=120)
    assert out.returncode == 0 and "Created new local image 'ct'." in out.stderr, out.stdout + out.stderr
    assert b.owner_unit("org.freedesktop.import1") == "importd-py.service"
    assert b.ok("cat", "/var/lib/machines/ct/etc/os-release") == "ID=pulled\n"
    images = b.ok("machinectl", "list-images", "--all")
    assert re.search(r"^ct +directory ", images, re.M), images
    # machinectl 252's PullTar keeps no copy of the download (as systemd 262 answers it).
    assert ".tar-" not in images, images
    assert "Operation completed successfully." in b.journal("importd-py.service")
    # Nobody has granted bob anything.
    r = b.refuse("machinectl", "pull-tar", "--verify=no", f"{HTTP}/ct.tar.xz", "bobs", user="bob")
    assert "Failed to transfer image" in r.stderr, r.stdout + r.stderr
    assert b.run("test", "-e", "/var/lib/machines/bobs").returncode != 0


def test_importctl_262(bookworm: Bookworm) -> None:
    """systemd 262's importctl (Debian 12 has none) against the installed importd: a pull, the listings, and a
    user nobody granted anything."""
    b = installed(bookworm)
    b.serve_http()
    b.ok("systemctl", "stop", "importd-py.service")
    r = b.run(*b.sid("importctl", "pull-tar", "--class=machine", "--verify=no", f"{HTTP}/ct.tar.xz", "ct262"),
              timeout=120)
    assert r.returncode == 0 and "Operation completed successfully." in r.stderr, r.stdout + r.stderr
    assert b.state("importd-py.service") == "active"
    assert b.ok("cat", "/var/lib/machines/ct262/etc/os-release") == "ID=pulled\n"
    images = b.ok(*b.sid("importctl", "list-images", "--no-legend"))
    assert re.search(r"^machine +ct262 +directory +/var/lib/machines/ct262 +rw ", images, re.M), images
    assert b.ok(*b.sid("importctl", "list-transfers")).strip() == "No transfers."
    r = b.run(*b.sid("importctl", "pull-tar", "--class=machine", "--verify=no", f"{HTTP}/ct.tar.xz", "bobs262"),
              user="bob")
    assert r.returncode != 0 and INTERACTIVE_262 in r.stderr, r.stdout + r.stderr
    assert b.run("test", "-e", "/var/lib/machines/bobs262").returncode != 0
    b.ok("machinectl", "remove", "ct262")


def our_actions() -> list[str]:
    return sorted(a for name in POLICIES for a in re.findall(r'<action id="([^"]+)"', (SOURCES / "systemd" / name)
                                                              .read_text()))


def actions_only_ours(b: Bookworm) -> set[str]:
    """The actions of our policy files that systemd-container 252's do not have (org.freedesktop.machine1.
    create-machine, say): polkitd knows them only from ours."""
    theirs = b.ok("sh", "-c", "cat /usr/share/polkit-1/actions/org.freedesktop.machine1.policy "
                              "/usr/share/polkit-1/actions/org.freedesktop.import1.policy")
    only_ours = set(our_actions()) - set(re.findall(r'<action id="([^"]+)"', theirs))
    assert only_ours, "our policy files have no action of their own: nothing tells that polkitd reads them"
    return only_ours


def test_polkit_has_our_actions_and_the_rule(bookworm: Bookworm) -> None:
    """polkitd in the container knows the actions of our policy files, and the rule the next test relies on grants
    alice, and only her, pulls."""
    b = installed(bookworm)
    assert actions_only_ours(b)
    for action in our_actions():
        b.ok("pkaction", "--action-id", action)
    with granted(b):
        for user, granted_to in (("alice", True), ("bob", False)):
            r = b.run("sh", "-c", "exec pkcheck --action-id org.freedesktop.import1.pull --process $$", user=user)
            assert (r.returncode == 0) == granted_to, (user, r.returncode, r.stdout, r.stderr)


@contextlib.contextmanager
def granted(b: Bookworm) -> Iterator[None]:
    """The polkit rule that lets alice pull images."""
    b.ok("mkdir", "-p", "/etc/polkit-1/rules.d")
    b.ok("sh", "-c", f"cat > /etc/polkit-1/rules.d/50-machined-py-test.rules <<'EOF'\n{POLKIT_RULE}EOF\n")
    try:
        yield
    finally:
        b.run("rm", "-f", "/etc/polkit-1/rules.d/50-machined-py-test.rules")


def test_pull_as_user_granted_by_polkit(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.serve_http()
    with granted(b):
        r = b.run("machinectl", "pull-tar", "--verify=no", f"{HTTP}/ct.tar.xz", "alices", user="alice", timeout=120)
        assert r.returncode == 0 and "Created new local image 'alices'." in r.stderr, r.stdout + r.stderr
        assert b.ok("cat", "/var/lib/machines/alices/etc/os-release") == "ID=pulled\n"
        # The rule is alice's only.
        r = b.run("machinectl", "pull-tar", "--verify=no", f"{HTTP}/ct.tar.xz", "bobs", user="bob")
        assert r.returncode != 0, r.stdout + r.stderr
        assert b.run("test", "-e", "/var/lib/machines/bobs").returncode != 0


def test_reinstall_restarts_running_services(bookworm: Bookworm) -> None:
    """make install over an installation: the new environment replaces the old, and the services running from
    the old one start again from it."""
    b = installed(bookworm)
    b.ok("machinectl", "list-images")
    b.ok("busctl", "call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
         "ListTransfers")
    pids = {unit: b.ok("systemctl", "show", "-p", "MainPID", "--value", unit).strip()
            for unit in ("machined-py.service", "importd-py.service")}
    inode = b.ok("stat", "-c", "%i", "/usr/local/lib/machined-py/bin/python3")
    # Without WHEELS=: the wheelhouse of the checkout (/src/.cache/wheels), as make deps left it.
    out = b.ok("make", "-C", "/src", "install", timeout=300)
    assert "(from the wheels in /src/.cache/wheels)" in out, out
    assert b.ok("stat", "-c", "%i", "/usr/local/lib/machined-py/bin/python3") != inode
    manifest = b.ok("cat", "/usr/local/lib/machined-py/installed-files").split()
    assert {p for p in manifest if not p.endswith("/")} == INSTALLED
    for unit, pid in pids.items():
        assert b.state(unit) == "active", unit
        assert b.ok("systemctl", "show", "-p", "MainPID", "--value", unit).strip() not in (pid, "0"), unit
    assert "base" in b.ok("machinectl", "list-images")
    assert b.run("test", "-e", "/usr/local/lib/machined-py.new").returncode != 0


def test_uninstall_gives_systemd_back(bookworm: Bookworm) -> None:
    b = installed(bookworm)
    b.ok("machinectl", "list-images")  # ours are running
    b.ok("make", "-C", "/src", "uninstall")
    b.uninstalled = True
    for path in INSTALLED:
        assert b.run("test", "-e", path).returncode != 0 and b.run("test", "-L", path).returncode != 0, path
    assert b.run("test", "-e", "/usr/local/lib/systemd/system").returncode != 0
    for unit in UNITS:
        assert b.state(unit) == "inactive", unit
    # The sockets went with their units.
    assert b.run("test", "-e", "/run/systemd/io.systemd.Import").returncode != 0
    assert b.ok("systemctl", "show", "-p", "Id", "--value", "dbus-org.freedesktop.machine1.service").strip() == \
        "systemd-machined.service"
    assert b.ok("systemctl", "show", "-p", "Id", "--value", "dbus-org.freedesktop.import1.service").strip() == \
        "systemd-importd.service"
    # systemd's own daemons, started through D-Bus, serve the same pool.
    images = b.ok("machinectl", "list-images")
    assert re.search(r"^base +directory ", images, re.M) and re.search(r"^ct +directory ", images, re.M), images
    assert b.owner_unit("org.freedesktop.machine1") == "systemd-machined.service"
    b.ok("busctl", "call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
         "ListTransfers")
    assert b.owner_unit("org.freedesktop.import1") == "systemd-importd.service"
    assert b.ok("systemctl", "--failed", "--plain", "--no-legend").strip() == ""
    # systemd's daemons refuse the user nobody granted anything what ours refused him, in the same words (262's
    # where they changed).
    assert b.refused
    differences = []
    for (user, *argv), (code, output) in b.refused.items():
        r = b.run(*argv, user=user)
        if (r.returncode, as_262(r.stdout + r.stderr)) != (code, output):
            differences.append((argv, (r.returncode, r.stdout + r.stderr), (code, output)))
    assert not differences, differences
    # polkitd forgets the actions only we had.
    def forgotten(action: str) -> bool:
        return b.run("pkaction", "--action-id", action).returncode != 0

    for action in actions_only_ours(b):
        world.wait_for(functools.partial(forgotten, action), 20, f"polkitd to forget {action}")
