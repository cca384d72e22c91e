"""The newest systemd, from the Debian sid root that ``make deps`` builds
(.cache/roots/sid): its clients run on this host through the root's own
dynamic loader, its machined and importd run chrooted into the root, with
our private /run/systemd, bus and pool bound in.

A difference between our answer and theirs fails with the root's systemd
version and the step's name (``Steps``), so that a new sid systemd that
changes an answer says so, and where."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagepool import dev as world

if TYPE_CHECKING:
    from tests.conftest import Daemons, Pool

ROOT = Path(__file__).resolve().parent.parent / ".cache" / "roots" / "sid"
LOADER = ROOT / "usr/lib64/ld-linux-x86-64.so.2"
LIBRARY_PATH = f"{ROOT}/usr/lib/x86_64-linux-gnu/systemd:{ROOT}/usr/lib/x86_64-linux-gnu"


def available() -> bool:
    return (ROOT / ".complete").exists()


def version() -> str:
    """The Debian version of the root's systemd, e.g. 262.1-1."""
    r = subprocess.run(["dpkg-query", f"--admindir={ROOT}/var/lib/dpkg", "-W", "-f=${Version}", "systemd"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def argv(program: str, *args: str) -> list[str]:
    """PROGRAM (a name in the root's /usr/bin, or a path in the root) run on
    the host through the root's loader."""
    path = ROOT / (program.lstrip("/") if program.startswith("/") else f"usr/bin/{program}")
    return [str(LOADER), "--library-path", LIBRARY_PATH, str(path), *args]


def run(program: str, *args: str, timeout: float = 120, user: str | None = None,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """PROGRAM of the root run on the host (as USER, if given)."""
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
    command = argv(program, *args)
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def varlinkctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run("varlinkctl", *args, timeout=timeout)


def replies(result: subprocess.CompletedProcess[str]) -> list[Any]:
    """The replies ``varlinkctl --json=short call`` printed, one per line."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# --- the chroot ---------------------------------------------------------------------


class Chroot:
    """The root prepared for its daemons: its own /run and /tmp, our
    /run/systemd (the bus is in it), /proc, /sys and /dev, empty class
    directories; the pool is bound in by ``pool()``.  Everything is
    unmounted by ``close()``."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []

    def _mount(self, *args: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(target)], check=True)
        self.mounts.append(target)

    def open(self) -> Chroot:
        try:
            self._mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", target=ROOT / "run")
            self._mount("--bind", "/run/systemd", target=ROOT / "run/systemd")
            (ROOT / "run/lock").mkdir(exist_ok=True)
            self._mount("-t", "tmpfs", "tmpfs", target=ROOT / "tmp")
            self._mount("--bind", "/proc", target=ROOT / "proc")
            self._mount("--rbind", "/sys", target=ROOT / "sys")
            self._mount("--rbind", "/dev", target=ROOT / "dev")
            for cls in ("portables", "extensions", "confexts"):
                self._mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", target=ROOT / "var/lib" / cls)
            # /etc/systemd of the tests (keyrings, settings) over the root's.
            self._mount("--bind", "/etc/systemd", target=ROOT / "etc/systemd")
        except BaseException:
            self.close()
            raise
        return self

    def empty_class_directories(self) -> None:
        """What earlier tests left in the root's portables, extensions, confexts."""
        for cls in ("portables", "extensions", "confexts"):
            for entry in (ROOT / "var/lib" / cls).iterdir():
                subprocess.run(["chattr", "-R", "-i", str(entry)], stderr=subprocess.DEVNULL)
                subprocess.run(["rm", "-rf", str(entry)], check=True)

    @contextlib.contextmanager
    def pool(self, path: Path) -> Iterator[None]:
        target = ROOT / "var/lib/machines"
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--rbind", str(path), str(target)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", "-R", str(target)], check=True)

    def close(self) -> None:
        while self.mounts:
            subprocess.run(["umount", "-R", str(self.mounts.pop())], check=False)


def daemon(name: str, bus: world.PrivateBus, log: Path, level: str = "debug") -> world.Service:
    """systemd-NAME of the root, chrooted, on BUS."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
           "SYSTEMD_LOG_LEVEL": level, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_COLOR": "0"}
    return world.Service(["chroot", str(ROOT), f"/usr/lib/systemd/systemd-{name}"], env, log)


# --- comparing ------------------------------------------------------------------------


class Steps:
    """Named comparisons of our answer with systemd's: a difference fails
    with the step's name and the root's systemd version."""

    def __init__(self) -> None:
        self.version = version()

    def differences(self, ours: list[Step], theirs: list[Step],
                    deliberate: dict[str, tuple[Any, Any]] | None = None) -> list[str]:
        """The steps that differ, but for the DELIBERATE differences: those
        must answer (ours, systemd's) exactly as given."""
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        deliberate = deliberate or {}
        found = []
        for (step, a), (_, b) in zip(ours, theirs, strict=True):
            if step in deliberate:
                if (a, b) != deliberate[step]:
                    found.append(f"step {step!r}, a deliberate difference:\n  expected: {deliberate[step]!r}\n"
                                 f"  got:      {(a, b)!r}")
            elif a != b:
                found.append(f"step {step!r}:\n  ours:    {a!r}\n  systemd: {b!r}")
        return found

    def same(self, ours: list[Step], theirs: list[Step], deliberate: dict[str, tuple[Any, Any]] | None = None) -> None:
        found = self.differences(ours, theirs, deliberate)
        if found:
            raise AssertionError(f"systemd {self.version} (Debian sid root) answers {len(found)} of "
                                 f"{len(ours)} steps differently:\n" + "\n".join(found))


def normalize(text: str, substitutions: Sequence[tuple[str, str]] = ()) -> str:
    """Output with what differs between any two runs replaced: times,
    IDs, PIDs."""
    for pattern, repl in substitutions:
        text = re.sub(pattern, repl, text)
    return text


Step = tuple[str, Any]


class Both:
    """The same steps against our daemons NAMES and systemd's (chrooted),
    each time on a freshly prepared pool (PREPARE), compared step by step.
    SOCKETS are the Varlink sockets they create when ready.  systemd's run at
    LEVEL (debug shows what it does, in its log)."""

    BUS_NAMES = {"machined": "org.freedesktop.machine1", "importd": "org.freedesktop.import1"}
    SOCKETS = {"machined": "/run/systemd/machine/io.systemd.MachineImage", "importd": "/run/systemd/io.systemd.Import"}

    def __init__(self, names: str | tuple[str, ...], daemons: Daemons, chroot: Chroot, pool: Pool, tmp: Path,
                 prepare: Callable[[], None], level: str = "debug") -> None:
        self.names = (names,) if isinstance(names, str) else names
        self.daemons, self.chroot, self.pool, self.tmp = daemons, chroot, pool, tmp
        self.prepare = prepare
        self.level = level
        self.steps = Steps()

    def ours(self, steps: Callable[[], list[Step]], extra: tuple[str, ...] = ()) -> list[Step]:
        self.prepare()
        try:
            for name in self.names:
                self.daemons.start(name, extra=extra, env={"SYSTEMD_LOG_LEVEL": self.level})
                world.wait_for(functools.partial(os.path.exists, self.SOCKETS[name]), 10,
                               f"our {name}'s Varlink socket")
            return steps()
        finally:
            self.daemons.stop()

    def theirs(self, steps: Callable[[], list[Step]]) -> list[Step]:
        self.prepare()
        self.chroot.empty_class_directories()
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.SOCKETS[name])  # systemd's daemons leave theirs behind
        services: list[world.Service] = []
        with self.chroot.pool(self.pool.path):
            try:
                for name in self.names:
                    svc = daemon(name, self.daemons.bus, self.tmp / f"sid-{name}.log", self.level)
                    svc.start(notify=False, bus_name=self.BUS_NAMES[name])
                    services.append(svc)
                    world.wait_for(functools.partial(os.path.exists, self.SOCKETS[name]), 10,
                                   f"systemd-{name}'s socket")
                return steps()
            finally:
                for svc in services:
                    svc.stop()
                for name in self.names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.SOCKETS[name])

    def compare(self, steps: Callable[[], list[Step]], extra: tuple[str, ...] = (),
                deliberate: dict[str, tuple[Any, Any]] | None = None) -> None:
        self.steps.same(self.ours(steps, extra), self.theirs(steps), deliberate)


def call(socket: str, method: str, params: dict[str, Any] | None = None, *flags: str,
         timeout: float = 120, user: str | None = None) -> tuple[int, list[Any], str]:
    """varlinkctl call (as USER, if given): (exit status, replies, error text)."""
    r = run("varlinkctl", "--json=short", "call", *flags, socket, method, json.dumps(params or {}),
            timeout=timeout, user=user)
    return r.returncode, replies(r), r.stderr.strip()
