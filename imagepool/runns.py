"""make run's mount namespace (Namespace, used by imagepool.dev's Runtime):
a private /run, so that nothing make run starts writes the host's, and the
record that tools/run-shell (make shell) enters it by."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from imagepool import syscalls


def mount_namespace(pid: int | str = "self") -> str:
    """The mount namespace of PID, as the kernel names it (mnt:[INODE])."""
    return os.readlink(f"/proc/{pid}/ns/mnt")


class AlreadyRunning(RuntimeError):
    pass


class Namespace:
    """make run's mount namespace: the process that enters it (single-threaded
    still) leaves the caller's, makes every mount private and puts STATE/run
    on /run, so that everything the services and the clients write below /run
    (Varlink sockets, locks and machine state files below /run/systemd,
    libmount's /run/mount, gpg's /run/user) lands in the run's directory and
    nothing of the host's /run is written; the pool is mounted in it too.

    STATE/namespace records who is in it, for tools/run-shell (make shell),
    which enters it with nsenter: PID, NAMESPACE (mnt:[INODE]), the bus
    address and the directory of the interpreter (BIN, put first in PATH).
    Leaving ends every process still in the namespace (shells entered with
    make shell), unmounts /run and goes back to the caller's namespace, so
    the namespace is gone with the last of them."""

    def __init__(self, state: Path, bus_address: str) -> None:
        self.state = state
        self.run = state / "run"  # the namespace's /run
        self.file = state / "namespace"
        self.bus_address = bus_address
        self.id = ""
        self._outer: int | None = None
        self._bound = False

    def running(self) -> int | None:
        """The PID of a live run that recorded itself in STATE, if any."""
        try:
            fields = dict(line.split("=", 1) for line in self.file.read_text().splitlines() if "=" in line)
            return int(fields["PID"]) if mount_namespace(fields["PID"]) == fields["NAMESPACE"] else None
        except (OSError, KeyError, ValueError):
            return None

    def enter(self) -> Namespace:
        pid = self.running()
        if pid is not None:
            raise AlreadyRunning(f"make run is already running with {self.state} (pid {pid}); "
                                 "make shell enters it")
        # Where /etc/resolv.conf points, if into /run (systemd-resolved, resolvconf, NetworkManager):
        # that directory of the host's (rewritten by renames) is bound read-only into the new /run, for name
        # resolution; the file itself if it is in /run itself.
        resolv = Path(os.path.realpath("/etc/resolv.conf"))
        if resolv.parent != Path("/run"):
            resolv = resolv.parent
        resolv_rel = resolv.relative_to("/run") if resolv.is_relative_to("/run") and resolv.exists() else None
        self._outer = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.private_mount_namespace()
        except OSError:
            os.close(self._outer)
            self._outer = None
            raise
        self.id = mount_namespace()
        shutil.rmtree(self.run, ignore_errors=True)  # a previous run's (its namespace, mounts and all, is gone)
        for sub, mode in (("", 0o755), ("lock", 0o1777), ("user", 0o755), ("systemd", 0o755),
                          # machinectl refuses to run unless the system looks booted with systemd.
                          ("systemd/system", 0o755)):
            (self.run / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.run / sub, mode)
        (self.run / "shm").symlink_to("/dev/shm")
        if resolv_rel is not None:
            if resolv.is_dir():
                (self.run / resolv_rel).mkdir(parents=True, exist_ok=True)
            else:
                (self.run / resolv_rel).touch()
            subprocess.run(["mount", "--bind", "-o", "ro", str(resolv), str(self.run / resolv_rel)], check=True)
        subprocess.run(["mount", "--rbind", str(self.run), "/run"], check=True)
        self._bound = True
        if resolv_rel is not None:
            subprocess.run(["umount", str(self.run / resolv_rel)], check=True)  # /run has its copy
        (self.state / "tmp").mkdir(exist_ok=True)
        self.file.write_text(f"PID={os.getpid()}\nNAMESPACE={self.id}\nDBUS_SYSTEM_BUS_ADDRESS={self.bus_address}\n"
                             f"BIN={Path(sys.executable).parent}\n")
        return self

    def others(self) -> list[int]:
        """The processes in the namespace other than this one."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != os.getpid() and mount_namespace(pid) == self.id:
                    found.append(int(pid))
            except OSError:
                pass
        return found

    def evict(self, timeout: float = 5) -> None:
        """End every other process in the namespace: SIGHUP and SIGTERM (an
        interactive shell ignores SIGTERM), SIGKILL for what outlives TIMEOUT."""
        if not self.id:
            return
        for sig in (signal.SIGHUP, signal.SIGTERM):
            for pid in self.others():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self._wait_alone(timeout)
        for pid in self.others():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._wait_alone(10):
            raise TimeoutError(f"the processes in the namespace did not end: {self.others()}")

    def _wait_alone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.others():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def leave(self) -> None:
        if not self.id:
            return
        self.evict()
        if self._bound:
            self.file.unlink(missing_ok=True)
            subprocess.run(["umount", "-R", "/run"], check=True)
            self._bound = False
        assert self._outer is not None
        # Back in the caller's namespace, ours has no process left and goes away
        # now (setns needs a single thread: else it goes when this process exits).
        syscalls.libc.setns(self._outer, syscalls.CLONE_NEWNS)
        os.close(self._outer)
        self._outer = None
        self.id = ""
