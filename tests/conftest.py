"""Fixtures: a private mount namespace, a private system bus, pools, services.

The suite moves itself into a private mount namespace before anything else, so
that /run/systemd, /var/lib/machines and every loop mount are private to it;
nothing of the host is touched, and the namespace takes any leftover mount
with it when the last process in it exits.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from imagepool import dev as world
from imagepool import syscalls

IS_ROOT = os.geteuid() == 0
# Fixtures that only root can provide: whoever uses one needs root.
ROOT_FIXTURES = frozenset({"bus", "btrfs_mount", "pool", "daemons", "services", "machined", "importd", "chroot"})


def _enter_private_mount_namespace() -> None:
    """unshare(CLONE_NEWNS) in this (still single-threaded) process and make
    every mount private, so nothing mounted here propagates to the host."""
    syscalls.private_mount_namespace()


POOL = Path("/var/lib/machines")


def _setup_namespace() -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/systemd"], check=True)
    for sub in ("system", "machines"):
        os.makedirs(f"/run/systemd/{sub}", exist_ok=True)
    # Nothing of the host's pool or settings may be seen or changed.
    POOL.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(POOL)], check=True)
    # /etc/systemd too: tests put settings files and the import keyring there.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/etc/systemd"], check=True)
    os.makedirs("/etc/systemd/nspawn")


def pytest_report_header(config: pytest.Config) -> str:
    """Which newest systemd the sid tests compare with (sid moves)."""
    from tests import sid

    if not sid.available():
        return f"sid root: missing ({sid.ROOT})"
    return f"sid root: systemd {sid.version()} ({sid.ROOT.resolve()})"


def pytest_configure(config: pytest.Config) -> None:
    if not IS_ROOT:
        if os.environ.get("CI") == "true":
            raise pytest.UsageError("CI runs the whole suite, as root: tests that need root would be skipped")
        return  # only the tests that need no privilege run (pytest_collection_modifyitems)
    _enter_private_mount_namespace()
    _setup_namespace()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """With CI=true nothing may be skipped: make deps installs every tool, and
    CI runs as root; a skip there is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a skip is a failure there): {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked "root" or using a root-only fixture run only as root."""
    skip = pytest.mark.skip(reason="needs root (mounts, namespaces, a private system bus)")
    for item in items:
        if ROOT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
        if not IS_ROOT and item.get_closest_marker("root"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bus():
    """A private system-type dbus-daemon; DBUS_SYSTEM_BUS_ADDRESS points at it.
    Its socket is in our private /run/systemd, reachable by unprivileged users."""
    b = world.PrivateBus(Path("/run/systemd/test-bus")).start()
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = b.address
    yield b
    b.stop()
    if old is None:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    else:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old


@pytest.fixture(scope="session")
def chroot(bus: world.PrivateBus):
    """The Debian sid root (systemd 26x) ready for its daemons (tests.sid)."""
    from tests import sid

    assert sid.available(), f"the sid root is missing ({sid.ROOT}): run make deps"
    root = sid.Chroot().open()
    yield root
    root.close()


@pytest.fixture
def btrfs_mount(tmp_path: Path):
    """A fresh btrfs file system on a loop device; yields its mount point."""
    mnt = tmp_path / "btrfs"
    world.mount_btrfs(tmp_path / "btrfs.img", mnt, "1G")
    yield mnt
    world.umount(mnt)
    (tmp_path / "btrfs.img").unlink()


@pytest.fixture(params=["btrfs", "plain"])
def pool(request: pytest.FixtureRequest, tmp_path: Path):
    """The image pool at /var/lib/machines: btrfs on a loop device, or a
    plain directory on the host's (ext4) file system, bind-mounted there."""
    if request.param == "btrfs":
        world.mount_btrfs(tmp_path / "pool.img", POOL, "2G")
    else:
        plain = tmp_path / "plain-pool"
        plain.mkdir(mode=0o700)
        subprocess.run(["mount", "--bind", str(plain), str(POOL)], check=True)
    yield Pool(POOL, request.param)
    subprocess.run(["umount", "-R", str(POOL)], check=True)
    # Give the space back now, not at the end of the session: a btrfs pool's
    # file holds what the test wrote, and read-only images of a plain pool are
    # immutable (pytest could not even remove them).
    if request.param == "btrfs":
        (tmp_path / "pool.img").unlink()
    else:
        subprocess.run(["chattr", "-R", "-i", str(tmp_path / "plain-pool")], stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", str(tmp_path / "plain-pool")], check=True)
    # Locks and settings live outside the pool; a test must not leak them.
    subprocess.run(["rm", "-rf", "/run/systemd/nspawn"], check=True)
    subprocess.run("rm -rf /etc/systemd/nspawn/* /etc/systemd/import-pubring.* /run/systemd/machines/*",
                   shell=True, check=True)


class Pool:
    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind

    @property
    def btrfs(self) -> bool:
        return self.kind == "btrfs"

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def wipe(self) -> None:
        """Empty the pool, read-only and nested subvolumes included (with the
        btrfs tool, not our code: tests use it to reset between sessions)."""
        for entry in list(self.path.iterdir()):
            subprocess.run(["chattr", "-i", str(entry)], stderr=subprocess.DEVNULL)
            if self.btrfs and subprocess.run(["btrfs", "subvolume", "show", str(entry)],
                                             capture_output=True).returncode == 0:
                subprocess.run(["btrfs", "property", "set", str(entry), "ro", "false"], check=True)
                subprocess.run(["btrfs", "subvolume", "delete", str(entry)], check=True, stdout=subprocess.DEVNULL)
            else:
                subprocess.run(["rm", "-rf", str(entry)], check=True)

    def __str__(self) -> str:
        return str(self.path)


def _service_env(bus: world.PrivateBus) -> dict[str, str]:
    return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(world.SOURCES))


class Daemons:
    """Starts our daemons or the reference ones on the private bus.  One
    machined and one importd at a time, since each claims its bus name."""

    REFERENCE = {
        "machined": ("/lib/systemd/systemd-machined", "org.freedesktop.machine1"),
        "importd": ("/lib/systemd/systemd-importd", "org.freedesktop.import1"),
    }

    def __init__(self, bus: world.PrivateBus, pool: Pool, logdir: Path) -> None:
        self.bus = bus
        self.pool = pool
        self.logdir = logdir
        self.prefix = logdir / "roots"  # where our services keep the other image classes
        self.running: dict[str, tuple[world.Service, bool]] = {}

    def log_of(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start(self, name: str, ours: bool = True, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> world.Service:
        self.stop(name)
        if ours:
            svc = world.Service([*world.service_argv(name, self.pool.path, self.prefix), *extra],
                                {**_service_env(self.bus), **(env or {})}, self.log_of(name))
            svc.start()
        else:
            binary, bus_name = self.REFERENCE[name]
            svc = world.Service([binary], _service_env(self.bus), self.logdir / f"reference-{name}.log")
            svc.start(notify=False, bus_name=bus_name)
        self.running[name] = (svc, ours)
        return svc

    def start_ours(self) -> world.Service:
        return self.start("machined", True)

    def start_reference(self) -> world.Service:
        return self.start("machined", False)

    def stop(self, name: str | None = None) -> None:
        for n in [name] if name else list(self.running):
            entry = self.running.pop(n, None)
            if entry is None:
                continue
            svc, ours = entry
            rc = svc.stop()
            if ours:
                log = self.log_of(n).read_text(errors="replace")
                assert rc == 0, f"{n} exited with {rc}:\n{log}"
                assert "Traceback" not in log, log


@pytest.fixture
def daemons(bus: world.PrivateBus, pool: Pool, tmp_path: Path):
    d = Daemons(bus, pool, tmp_path)
    yield d
    d.stop()


@pytest.fixture
def services(daemons: Daemons):
    """Our machined and importd."""
    daemons.start("machined")
    daemons.start("importd")
    yield daemons
    daemons.stop()


@pytest.fixture
def machined(daemons: Daemons):
    """Our machined on the private bus, serving the pool."""
    yield daemons.start_ours()
    daemons.stop("machined")


@pytest.fixture
def importd(daemons: Daemons):
    """Our importd on the private bus, importing into the pool."""
    yield daemons.start("importd")
    daemons.stop("importd")


def machinectl(*args: str, user: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    argv = ["machinectl", "--no-pager", *args]
    if user:
        pw = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, input=input, timeout=120)


def busctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["busctl", "--system", *args], capture_output=True, text=True, timeout=60)
