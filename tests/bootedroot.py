"""A Debian root booted with its own systemd as PID 1 under ``systemd-nspawn -b``.

The root is never changed: nspawn boots it with --volatile=overlay (a tmpfs over it, gone at the end).  nspawn
runs in a mount namespace of its own (so nothing it mounts outlives it) and from a cgroup of its own in the unified
hierarchy; the end kills that cgroup (cgroup.kill) and removes it, with its copy in the v1 name=systemd hierarchy
that nspawn 252 makes on this host's layout.  Commands run inside with nsenter, in a clean environment.

tests.bootedsid boots the sid root this way (systemd 26x, with sid's nspawn, the unified hierarchy bound over
/sys/fs/cgroup); tests/test_install.py boots Debian 12 with the host's nspawn 252."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from imagepool import dev as world

UNIFIED = Path("/sys/fs/cgroup/unified")
# Where nspawn 252 mirrors its cgroup on a host with the v1 (hybrid) layout.
NAME_SYSTEMD = Path("/sys/fs/cgroup/systemd")
ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS=0",
       "SYSTEMD_PAGER=", "TERM=dumb", "LANG=C.UTF-8"]


class BootedRoot:
    """ROOT booted by NSPAWN (the command that runs systemd-nspawn) as machine MACHINE; BINDS and RO_BINDS are
    (host path, path inside) pairs; UNIFIED_ROOT: bind the unified hierarchy over /sys/fs/cgroup first (systemd
    26x refuses the v1 layout)."""

    env = ENV

    def __init__(self, root: Path, workdir: Path, machine: str, nspawn: Sequence[str] = ("systemd-nspawn",),
                 binds: Sequence[tuple[Path, str]] = (), ro_binds: Sequence[tuple[Path, str]] = (),
                 unified_root: bool = False, log: Path | None = None) -> None:
        self.root = root
        self.workdir = workdir
        self.machine = machine
        self.nspawn = list(nspawn)
        self.binds = list(binds)
        self.ro_binds = list(ro_binds)
        self.unified_root = unified_root
        self.cgroup = UNIFIED / f"machined-py-{machine}-{os.getpid()}-{time.monotonic_ns()}"
        self.log = log or workdir / f"booted-{machine}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self, timeout: float = 90) -> Self:
        self.cgroup.mkdir()
        binds = [f"--bind={host}:{inside}" for host, inside in self.binds]
        binds += [f"--bind-ro={host}:{inside}" for host, inside in self.ro_binds]
        nspawn = [*self.nspawn, "-b", "-D", str(self.root), "--volatile=overlay", "--register=no", "--keep-unit",
                  "-M", self.machine, "--private-network", *binds]
        if self.unified_root:
            prepare = f"mount --bind {UNIFIED} /sys/fs/cgroup && "
            cgroup_in_ns = Path("/sys/fs/cgroup") / self.cgroup.name
        else:
            prepare, cgroup_in_ns = "", self.cgroup
        script = f"{prepare}echo $$ > {cgroup_in_ns}/cgroup.procs && exec {shlex.join(nspawn)}"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        try:
            world.wait_for(self._find_leader, 30, f"the PID 1 of {self.machine}")
            deadline = time.monotonic() + timeout
            while True:
                state = self.run("systemctl", "is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.machine} did not boot ({state}):\n{self.log.read_text()[-3000:]}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_leader(self) -> bool:
        """The container's PID 1: a systemd whose PID in its namespace is 1, in our cgroup or below it."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nspawn exited:\n{self.log.read_text()[-3000:]}")
        for procs in [self.cgroup / "cgroup.procs", *self.cgroup.rglob("*/cgroup.procs")]:
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                    if nspid[-1] == "1" and len(nspid) > 1 and \
                            Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        self.leader = int(pid)
                        return True
        return False

    def run(self, *argv: str, timeout: float = 60, user: str | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """ARGV inside the container (its root, namespaces and bus), as root or as USER (runuser)."""
        if user:
            argv = ("runuser", "-u", user, "--", *argv)
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *self.env, *argv], capture_output=True,
                              text=True, timeout=timeout, input=input,
                              stdin=subprocess.DEVNULL if input is None else None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        world.wait_for(lambda: not self.cgroup.exists() or not _procs(self.cgroup), 30,
                       f"the cgroup of {self.machine} to empty")
        for top in (self.cgroup, NAME_SYSTEMD / self.cgroup.name):
            _remove_tree(top)


def _procs(cgroup: Path) -> bool:
    return any(p.read_text().strip() for p in cgroup.rglob("cgroup.procs"))


def _remove_tree(cgroup: Path) -> None:
    """rmdir a cgroup and those below it, deepest first."""
    if not cgroup.is_dir():
        return
    for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        cgroup.rmdir()
