"""A private world for the services: a system-type bus, a pool, the daemons.

This is what ``make run`` runs (``python -m imagepool.dev run``: Runtime,
in a mount namespace of its own (imagepool.runns.Namespace) with the signed demo image of
imagepool.demo on loopback); the tests and the benchmarks build their worlds
from the same pieces.  Everything started here is stopped by PID; everything
mounted is unmounted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from imagepool import demo
from imagepool.runns import AlreadyRunning, Namespace

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
            # In the abstract namespace ("@..."), as systemd allows: no file
            # anywhere, nothing to remove.
            name = f"machined-py/notify/{os.getpid()}/{time.monotonic_ns()}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("\0" + name)
            env["NOTIFY_SOCKET"] = "@" + name
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


class Runtime:
    """What ``make run`` runs: in a mount namespace of its own (Namespace:
    /run is STATE/run there), a private bus, a pool under STATE (btrfs on a
    loop device when one can be mounted, a plain directory otherwise), both
    services (the other image classes below STATE/roots, signatures verified
    with the demo's keyring, temporary files in STATE/tmp) and the signed
    demo image on loopback (imagepool.demo).  tests/test_run_demo.py runs it
    as make run does.  start() must be called while the process has one
    thread (unshare of a mount namespace needs it)."""

    def __init__(self, state: Path, demo_port: int = demo.DEFAULT_PORT) -> None:
        self.state = state
        self.pool = state / "pool"
        self.roots = state / "roots"
        self.demo = demo.Demo(state / "demo")
        self.demo_port = demo_port
        self.bus = PrivateBus(state / "bus")
        self.namespace = Namespace(state, self.bus.address)
        self.services: list[Service] = []
        self.kind = ""
        self._mounted = False

    def start(self) -> Runtime:
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self.namespace.enter()
            self.demo.prepare()
            self.bus.start()
            try:
                mount_btrfs(self.state / "pool.btrfs", self.pool, "4G")
                self._mounted = True
                self.kind = "btrfs on a loop device"
            except subprocess.CalledProcessError:
                self.pool.mkdir(exist_ok=True)
                self.kind = "a plain directory"
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus.address, PYTHONPATH=str(SOURCES),
                       TMPDIR=str(self.state / "tmp"))
            for module, extra in (("machined", []), ("importd", ["--keyring", str(self.demo.keyring)])):
                self.services.append(Service([*service_argv(module, self.pool, self.roots), *extra], env).start())
            self.demo.serve(self.demo_port)
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> str:
        where = ", mounted in the run's namespace only" if self._mounted else ""
        return "\n".join([
            f"pool: {self.pool} ({self.kind}{where})",
            f"images of the other classes: below {self.roots}",
            f"demo image: {self.demo.url} (signed; importd's keyring: {self.demo.keyring})",
            f"bus: {self.bus.address}",
            f"a mount namespace of its own (pid {os.getpid()}): /run there is {self.namespace.run}, "
            "the host's /run is not written",
            "in another shell, to enter it: make shell (or make shell CMD='machinectl list-images'; that is "
            f"{SOURCES / 'tools/run-shell'} {self.state} [COMMAND...]), then:",
            f"machined-py pull-tar --verify=signature {self.demo.url} demo",
        ])

    def stop(self) -> None:
        # Shells entered with make shell first: one sitting in the pool would keep it busy.
        self.namespace.evict()
        self.demo.stop()
        for svc in reversed(self.services):
            svc.stop()
        self.services = []
        self.bus.stop()
        if self._mounted:
            umount(self.pool)
            (self.state / "pool.btrfs").unlink(missing_ok=True)
            self._mounted = False
        self.namespace.leave()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(state: Path) -> int:
    """``make run``: the Runtime in the foreground until SIGINT, SIGTERM or
    SIGHUP (its terminal closed)."""
    runtime = Runtime(state)
    try:
        runtime.start()
    except AlreadyRunning as e:
        print(e, file=sys.stderr)
        return 1
    try:
        print(runtime.describe(), flush=True)
        # Blocked only now: the services must not inherit the mask.
        _block_signals()
        signal.sigwait(_STOP_SIGNALS)
        return 0
    finally:
        runtime.stop()
        print("stopped", flush=True)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) <= 3:
        sys.exit(run(Path(sys.argv[2] if len(sys.argv) == 3 else ".run").absolute()))
    print("usage: python -m imagepool.dev run [STATE-DIRECTORY]", file=sys.stderr)
    sys.exit(2)
