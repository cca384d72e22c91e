"""A private world for the services: a system-type bus, a pool, the daemons.

This is what ``make run`` runs (``python -m imagepool.dev run``); the tests
and the benchmarks build their worlds from the same pieces.  Everything
started here is stopped by PID; everything mounted is unmounted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Where our packages are (a checkout, or site-packages): the services' PYTHONPATH.
SOURCES = Path(__file__).resolve().parent.parent

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
  <limit name="max_replies_per_connection">50000</limit>
</busconfig>
"""


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PrivateBus:
    """A dbus-daemon of type system listening on a socket in DIRECTORY."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateBus:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        config = self.directory / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket))
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile", "--nosyslog"],
            stdin=subprocess.DEVNULL,
        )
        wait_for(self.socket.exists, 10, "the bus socket")
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self.proc = None


class Service:
    """One of our daemons (or a reference daemon) as a child process.

    Readiness comes through NOTIFY_SOCKET, as systemd would see it."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path | None = None) -> None:
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 40, notify: bool = True, bus_name: str | None = None) -> Service:
        env = dict(self.env)
        sock = None
        if notify:
            path = f"/run/notify-{os.getpid()}-{time.monotonic_ns()}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            env["NOTIFY_SOCKET"] = path
        out = open(self.log, "ab") if self.log else None
        try:
            # A session of its own: whatever it leaves behind (workers of the
            # reference daemons, say) is killed with its process group.
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        finally:
            if out:
                out.close()
        try:
            if sock:
                sock.settimeout(timeout)
                deadline = time.monotonic() + timeout
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}")
                    try:
                        msg = sock.recv(4096).decode()
                    except TimeoutError:
                        msg = ""
                    if "READY=1" in msg.split("\n"):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.argv[0]} did not become ready")
            elif bus_name:
                wait_for(lambda: name_has_owner(env, bus_name), timeout, bus_name, 0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            if sock:
                sock.close()
                os.unlink(env["NOTIFY_SOCKET"])
        return self

    def stop(self) -> int | None:
        if not self.proc:
            return None
        stop_process(self.proc)
        rc = self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        return rc


def name_has_owner(env: dict[str, str], name: str) -> bool:
    r = subprocess.run(
        ["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
         "org.freedesktop.DBus", "NameHasOwner", "s", name],
        env=env, capture_output=True, text=True,
    )
    return r.returncode == 0 and r.stdout.strip() == "b true"


def mount_btrfs(image: Path, mountpoint: Path, size: str = "1G") -> None:
    """A fresh btrfs on a sparse file, loop-mounted at MOUNTPOINT."""
    image.parent.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)


def umount(mountpoint: Path) -> None:
    subprocess.run(["umount", str(mountpoint)], check=True)


def service_argv(module: str, pool: Path, prefix: Path) -> list[str]:
    """One of our services, with its machine pool at POOL and the images of
    every class kept below PREFIX (nothing of the host's is touched)."""
    return [sys.executable, "-m", module, "--pool", str(pool), "--image-prefix", str(prefix)]


def run(state: Path) -> int:
    """``make run``: a private bus, a pool under STATE, both services."""
    pool = state / "pool"
    state.mkdir(parents=True, exist_ok=True)
    bus = PrivateBus(state / "bus").start()
    mounted = False
    made_system_dir = False
    services: list[Service] = []
    try:
        try:
            mount_btrfs(state / "pool.btrfs", pool, "4G")
            mounted = True
            kind = "btrfs on a loop device"
        except subprocess.CalledProcessError:
            pool.mkdir(exist_ok=True)
            kind = "a plain directory"
        # machinectl refuses to run unless the system looks booted with systemd.
        if not os.path.isdir("/run/systemd/system"):
            os.makedirs("/run/systemd/system")
            made_system_dir = True
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(SOURCES))
        for module in ("machined", "importd"):
            services.append(Service(service_argv(module, pool, state / "roots"), env).start())
        print(f"pool: {pool} ({kind})", flush=True)
        print(f"images of the other classes: below {state / 'roots'}", flush=True)
        print(f"export DBUS_SYSTEM_BUS_ADDRESS={bus.address}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM}) if _block_signals() else None
        return 0
    finally:
        for svc in reversed(services):
            svc.stop()
        bus.stop()
        if mounted:
            umount(pool)
            (state / "pool.btrfs").unlink(missing_ok=True)
        if made_system_dir:
            shutil.rmtree("/run/systemd/system", ignore_errors=True)
        print("stopped", flush=True)


def _block_signals() -> bool:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return True


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) <= 3:
        sys.exit(run(Path(sys.argv[2] if len(sys.argv) == 3 else ".run").absolute()))
    print("usage: python -m imagepool.dev run [STATE-DIRECTORY]", file=sys.stderr)
    sys.exit(2)
