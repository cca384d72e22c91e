"""The sid root booted, systemd 26x as its PID 1: the reference for what
only a real systemd makes possible (machined allocating scopes for nspawn).

sid's own systemd-nspawn boots the root (--volatile=overlay: nothing is
written to the cached root), in a mount namespace of its own where the
unified cgroup hierarchy is /sys/fs/cgroup (26x refuses this host's v1
layout), from a cgroup of its own that is killed at the end.  Commands run
inside with nsenter, in a clean environment."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from imagepool import dev as world
from tests import sid

UNIFIED = Path("/sys/fs/cgroup/unified")
ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "TERM=dumb"]


class BootedSid:
    def __init__(self, workdir: Path, binds: list[tuple[Path, str]] = ()) -> None:  # type: ignore[assignment]
        self.workdir = workdir
        self.binds = list(binds)
        self.cgroup = UNIFIED / f"machined-py-sid-{os.getpid()}-{time.monotonic_ns()}"
        self.log = workdir / "booted-sid.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self, timeout: float = 90) -> BootedSid:
        self.cgroup.mkdir()
        binds = [f"--bind={host}:{inside}" for host, inside in self.binds]
        nspawn = sid.argv("systemd-nspawn", "-b", "-D", str(sid.ROOT), "--volatile=overlay", "--register=no",
                          "--keep-unit", "-M", "sidboot", "--private-network", *binds)
        cgroup_in_ns = Path("/sys/fs/cgroup") / self.cgroup.name
        script = (f"mount --bind {UNIFIED} /sys/fs/cgroup && echo $$ > {cgroup_in_ns}/cgroup.procs && "
                  f"exec {shlex.join(nspawn)}")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        try:
            world.wait_for(self._find_leader, 30, "the booted sid's PID 1")
            deadline = time.monotonic() + timeout
            while True:
                state = self.run("systemctl", "is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sid container did not boot ({state}):\n{self.log.read_text()[-3000:]}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_leader(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nspawn exited:\n{self.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid[-1] == "1" and len(nspid) > 1 and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    self.leader = int(pid)
                    return True
        # PID 1 may be in a child cgroup already.
        for child in self.cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in child.read_text().split():
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                    if nspid[-1] == "1" and len(nspid) > 1 and \
                            Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        self.leader = int(pid)
                        return True
        return False

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """ARGV inside the container (its root, namespaces and bus)."""
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *ENV, *argv], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        world.wait_for(lambda: not self.cgroup.exists() or not _procs(self.cgroup), 30, "the sid cgroup to empty")
        for directory in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)) if self.cgroup.exists() else []:
            if directory.is_dir():
                with contextlib.suppress(OSError):
                    directory.rmdir()
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()


def _procs(cgroup: Path) -> bool:
    return any(p.read_text().strip() for p in cgroup.rglob("cgroup.procs"))


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
