#!/usr/bin/env python3
"""Benchmark pulls: our importd against systemd-importd 252 (systemd-pull).

    cd /work/main && .venv/bin/python bench/pull.py [--quick] [--json FILE]
        [--inputs xz-mt,xz-st,...] [--runs N] [--cache DIR] [--profile DIR]
        [--hang-timeout S] [--no-latency] [--no-verify-run] [--ours-only]
        [--keep-logs DIR]

Run as root.  Like bench/import.py (whose approach this follows, and whose
input generator it imports), the benchmark first moves itself into a private
mount namespace (unshare(CLONE_NEWNS) while still single-threaded, then
``mount --make-rprivate /``), puts a tmpfs on /run/systemd (with ``system/``
in it, so machinectl believes it runs under systemd) and on
/etc/systemd/nspawn, starts a private system-type dbus-daemon
(tests.world.PrivateBus) with its socket in that tmpfs, and mounts a fresh
btrfs on a ~12G sparse loop file (tests.world.mount_btrfs) at
/var/lib/machines.  Nothing of the host's /run/systemd or /var/lib/machines
is seen or changed.

The server is a private nginx (installed with ``apt-get install -y
nginx-light`` if there is none; the report says so) on 127.0.0.1:<free
port>, with a temporary config: daemon off, sendfile on, access log off,
pid and temp paths in a temporary directory, root = a directory of hard
links to the inputs plus a SHA256SUMS.  All HTTP traffic stays on
127.0.0.1 (proxy variables are removed from the daemons' environment).

Inputs come from bench/import.py's generator (its cache, default
/var/tmp/importd-bench, is reused; if another process is still generating
into it, this waits), or from a fallback generator here if that module
cannot be imported:

  xz-mt   disk-mt.raw.xz  2 GiB raw image, ~900 MB data, xz -6 -T2 (multi-block)
  xz-st   disk-st.raw.xz  the same, xz -6 -T1 (a single block)
  gz      disk.raw.gz     gzip -6
  zst     disk.raw.zst    zstd -3 (systemd 252 has no zstd: ours only)
  qcow2   disk.qcow2      qemu-img convert -O qcow2
  raw     disk.raw        uncompressed
  tar-xz  rootfs.tar.xz   ~200 MB rootfs tar, xz -6 -T2 (pull-tar)
  tar-gz  rootfs.tar.gz   the same tar, gzip -6 (pull-tar)

For each input and run, the daemons alternate (order flipped every run):
start the daemon (``python -m importd --pool /var/lib/machines``, or
``/lib/systemd/systemd-importd``, which spawns ``/lib/systemd/systemd-pull``);
``cat`` the input (into the page cache, for nginx, for both alike); time
``machinectl pull-raw --verify=no URL NAME`` (or ``pull-tar``) as a whole
command: it returns once the transfer has finished; read the daemon's VmHWM
and CPU time (children included); stop it.  Between runs everything in the
pool is deleted: the image AND the hidden download cache (``.raw-*``,
``.tar-*``), since a second pull of the same URL would otherwise be a
conditional request answered 304, measuring nothing.  Then sync and ``btrfs
subvolume sync``.  The first pull of each input by each daemon is checked
(raw: size and SHA-256 of the content; tar: file, symlink and byte counts).

systemd 252's pulls sometimes hang forever.  Each pull has a timeout
(``--hang-timeout``, default 300 s, 150 s with --quick; once a pull of the
input has finished, 5x the fastest one, at least 60 s).  A timed-out pull
is counted as a hang (with the state of the daemon's children), and the
daemon is restarted for the next run.

Also:

  * one run per daemon with ``--verify=checksum`` (SHA256SUMS on the server)
    of the uncompressed raw and (full run) of the multi-block xz, to show
    what hashing costs;
  * D-Bus latency while 4 pulls run: our machined and our importd on the
    bus, 4 concurrent ``machinectl pull-raw`` of different big images with
    ours, and meanwhile org.freedesktop.machine1.Manager.ListImages and
    org.freedesktop.import1.Manager.ListTransfers called in turn by an
    in-process sd-bus client (sdbus low-level API, as bench/images.py does:
    message built before the clock starts, reply not unpacked in the timed
    region); p50/p99/max, and the same calls idle for comparison.

Targets (PASS/FAIL):

  wall time <= 0.8 x reference  multi-block xz (raw and tar), gzip (raw and
                                tar), qcow2, uncompressed raw
  wall time <= 1.0 x reference  single-stream xz
  peak RSS <= 100 MB            our importd (VmHWM; single pulls, and the
                                4 concurrent pulls)
  D-Bus latency < 50 ms         p99 of each method during the 4 pulls

Our zstd output rate (decompressed MB/s) is reported (no reference).
A table goes to stdout, then the results as JSON (or to --json FILE),
with the load average (the machine may be busy with other work).
Progress goes to stderr.  Everything started is stopped by PID and
everything mounted is unmounted, also on errors and Ctrl-C/SIGTERM.
``--profile DIR`` runs ``py-spy record --idle --threads --format raw`` on
our importd during its timed pulls (its times are then perturbed and
marked so); py-spy is looked for in PATH and /tmp/pyspy/bin (``pip install
--target /tmp/pyspy py-spy``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POOL = Path("/var/lib/machines")
REFERENCE = "/lib/systemd/systemd-importd"
REFERENCE_WORKER = "/lib/systemd/systemd-pull"
IMPORT_BUS = "org.freedesktop.import1"
MACHINE_BUS = "org.freedesktop.machine1"
DEFAULT_CACHE = Path("/var/tmp/importd-bench")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
MiB = 1 << 20

# key: file, pull kind, format, target ("ratio", x) / ("info", None), reference timed?
INPUTS: dict[str, dict] = {
    "xz-mt": dict(file="disk-mt.raw.xz", kind="raw", fmt="xz -T2 (multi-block)", target=("ratio", 0.8), ref=True),
    "xz-st": dict(file="disk-st.raw.xz", kind="raw", fmt="xz -T1 (single block)", target=("ratio", 1.0), ref=True),
    "gz": dict(file="disk.raw.gz", kind="raw", fmt="gzip -6", target=("ratio", 0.8), ref=True),
    "zst": dict(file="disk.raw.zst", kind="raw", fmt="zstd -3", target=("info", None), ref=False),
    "qcow2": dict(file="disk.qcow2", kind="raw", fmt="qcow2", target=("ratio", 0.8), ref=True),
    "raw": dict(file="disk.raw", kind="raw", fmt="uncompressed", target=("ratio", 0.8), ref=True),
    "tar-xz": dict(file="rootfs.tar.xz", kind="tar", fmt="tar, xz -T2 (multi-block)", target=("ratio", 0.8), ref=True),
    "tar-gz": dict(file="rootfs.tar.gz", kind="tar", fmt="tar, gzip -6", target=("ratio", 0.8), ref=True),
}
LATENCY_INPUTS = ("xz-mt", "gz", "zst", "qcow2")  # 4 different big images, pulled at once
RSS_TARGET_MB = 100.0
LATENCY_TARGET_MS = 50.0

FULL = dict(runs=3, hang_timeout=300.0, verify_inputs=("raw", "xz-mt"), idle_calls=100)
QUICK = dict(runs=1, hang_timeout=150.0, verify_inputs=("raw",), idle_calls=40)


from common import (  # noqa: E402
    Cleanups, descendants, enter_private_mount_namespace, fmt, host_load, kb, merge_max, note, proc_status, rm_tree,
    setup_namespace, sha256_file, stats, umount, warm,
)


def mount_pool(workdir: Path, cleanups: Cleanups) -> None:
    from tests import world

    image = workdir / "pool.btrfs"
    world.mount_btrfs(image, POOL, "12G")

    def undo() -> None:
        umount(str(POOL))
        image.unlink(missing_ok=True)

    cleanups.push("umount btrfs pool", undo)


def clear_pool() -> list[str]:
    """Delete everything in the pool: the pulled image, the hidden download
    cache (.raw-*, .tar-*) and any leftover temporary; subvolumes with
    ``btrfs subvolume delete``.  Then sync and wait for the btrfs cleaner."""
    removed = []
    for entry in sorted(os.listdir(POOL)):
        path = POOL / entry
        removed.append(entry)
        if path.is_dir() and not path.is_symlink() and os.stat(path).st_ino == 256:
            subprocess.run(["btrfs", "property", "set", "-ts", str(path), "ro", "false"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = subprocess.run(["btrfs", "subvolume", "delete", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                rm_tree(path)
                if path.exists():
                    subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=True, stdout=subprocess.DEVNULL)
        else:
            subprocess.run(["chattr", "-f", "-i", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rm_tree(path)
    os.sync()
    # BTRFS_IOC_SYNC also wakes the transaction kthread, which pokes the cleaner: without it,
    # `btrfs subvolume sync` waits up to the 30 s commit interval for deleted subvolumes.
    subprocess.run(["btrfs", "filesystem", "sync", str(POOL)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["btrfs", "subvolume", "sync", str(POOL)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.sync()
    leftover = os.listdir(POOL)
    if leftover:
        raise RuntimeError(f"could not empty the pool: {leftover}")
    return removed


# --- inputs: bench/import.py's generator ------------------------------------------


def load_import_bench():
    """bench/import.py as a module (its name is a keyword, so not importable as such)."""
    path = REPO / "bench" / "import.py"
    spec = importlib.util.spec_from_file_location("bench_import_for_pull", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def generator_busy(cache: Path, window: float = 120.0) -> list[str]:
    """Temporary files another generator is writing into CACHE right now."""
    now = time.time()
    busy = []
    try:
        for p in cache.glob("*.tmp"):
            try:
                if now - p.stat().st_mtime < window:
                    busy.append(p.name)
            except OSError:
                pass
    except OSError:
        pass
    return busy


def manifest_complete(cache: Path, keys: list[str]) -> dict | None:
    try:
        m = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if "raw" not in m or "sha256" not in m.get("raw", {}):
        return None
    if any(INPUTS[k]["kind"] == "tar" for k in keys) and "tar" not in m:
        return None
    for k in keys:
        if k not in m.get("files", {}) or not (cache / INPUTS[k]["file"]).exists():
            return None
    return m


def get_inputs(cache: Path, keys: list[str], cleanups: Cleanups, regen: bool, gen_wait: float,
               notes: list[str]) -> dict:
    mod = load_import_bench()
    deadline = time.monotonic() + gen_wait
    while not regen:
        m = manifest_complete(cache, keys)
        busy = generator_busy(cache)
        if m is not None and not busy:
            note(f"reusing the inputs in {cache}")
            return dict(m, cache=str(cache))
        if not busy:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"another process is still generating {busy} in {cache}; gave up after {gen_wait:.0f} s")
        note(f"another process is generating {', '.join(busy)} in {cache}; waiting")
        time.sleep(15)
    m = mod.generate(cache, regen, keys, 2048, cleanups)
    notes.append(f"inputs made/reused by bench/import.py's generator in {cache}")
    return dict(m, cache=str(cache))


# --- nginx -------------------------------------------------------------------------------

NGINX_CONF = """\
user root;
daemon off;
master_process on;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_timeout 30;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {root};
        location / {{ }}
    }}
}}
"""


def ensure_nginx(notes: list[str]) -> str:
    """The nginx binary; installs nginx-light (or nginx) with apt-get if there is none."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found:
        return found
    note("nginx is missing: apt-get install -y nginx-light (the benchmark's HTTP server)")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        # Keep the package from starting a system-wide nginx on port 80.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for pkg in ("nginx-light", "nginx"):
            r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg], env=env,
                                   capture_output=True, text=True)
            if r.returncode == 0 and (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)):
                notes.append(f"installed {pkg} with apt-get install -y {pkg} (this benchmark's HTTP server)")
                note(notes[-1])
                return shutil.which("nginx") or "/usr/sbin/nginx"
        raise RuntimeError(f"could not install nginx: {r.stderr.strip()[-500:]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, binary: str, root: Path, tmp: Path) -> None:
        self.binary, self.root, self.tmp = binary, root, tmp
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> Nginx:
        self.tmp.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = free_port()
            conf = self.tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=self.port, root=self.root))
            log = open(self.tmp / "stderr.log", "ab")
            try:
                self.proc = subprocess.Popen([self.binary, "-e", str(self.tmp / "error.log"), "-p", str(self.tmp),
                                              "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
            finally:
                log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.tmp / 'error.log').read_text(errors='replace')[-500:]}")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        except ProcessLookupError:
            pass
        self.proc = None


def make_www(www: Path, cache: Path, keys: list[str], manifest: dict, verify_keys: list[str]) -> dict[str, str]:
    """Hard links to the inputs (the cache may be rebuilt under us) and a
    SHA256SUMS for the --verify=checksum runs."""
    www.mkdir(parents=True)
    for key in keys:
        src, dst = cache / INPUTS[key]["file"], www / INPUTS[key]["file"]
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src, dst)
    sums = {}
    for key in verify_keys:
        name = INPUTS[key]["file"]
        sums[name] = manifest["raw"]["sha256"] if key == "raw" else sha256_file(www / name)
    (www / "SHA256SUMS").write_text("".join(f"{h} *{n}\n" for n, h in sums.items()))
    return sums


# --- processes -----------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_cpu_seconds(pid: int, children: bool = True) -> float:
    fields = proc_stat(pid)
    if not fields:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def process_snapshot(pid: int) -> list[dict]:
    """State of PID and its descendants (for hang reports)."""
    out = []
    for p in [pid, *descendants(pid)]:
        st = proc_status(p)
        fields = proc_stat(p)
        if not st or not fields:
            continue
        try:
            wchan = Path(f"/proc/{p}/wchan").read_text()
        except OSError:
            wchan = "?"
        out.append({"pid": p, "name": st.get("Name"), "state": st.get("State"), "wchan": wchan,
                    "cpu_s": round((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, 2),
                    "starttime": int(fields[19]), "threads": st.get("Threads")})
    return out


def kill_leftovers(snapshot: list[dict]) -> list[str]:
    """SIGKILL the processes of SNAPSHOT that still exist (same PID and start time)."""
    killed = []
    for p in snapshot:
        fields = proc_stat(p["pid"])
        if fields and int(fields[19]) == p["starttime"]:
            try:
                os.kill(p["pid"], signal.SIGKILL)
                killed.append(f"{p['name']}[{p['pid']}]")
            except ProcessLookupError:
                pass
    return killed


class TreeSampler(threading.Thread):
    """Samples the daemon's descendants every INTERVAL s: peak VmHWM per command name."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self._halt = threading.Event()
        self.child_hwm_kb: dict[str, int] = {}
        self.children_rss_peak_kb = 0
        self.daemon_hwm_kb = 0

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        total = 0
        own = proc_status(self.pid)
        for child in descendants(self.pid):
            st = proc_status(child)
            if not st:
                continue
            name = st.get("Name", "?")
            if name == own.get("Name"):
                continue  # forked, not yet exec()ed
            total += kb(st.get("VmRSS"))
            self.child_hwm_kb[name] = max(self.child_hwm_kb.get(name, 0), kb(st.get("VmHWM")))
        self.children_rss_peak_kb = max(self.children_rss_peak_kb, total)
        self.daemon_hwm_kb = max(self.daemon_hwm_kb, kb(own.get("VmHWM")))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Daemons:
    """One importd at a time on the private bus (ours or the reference), and
    our machined for the latency test."""

    def __init__(self, env: dict[str, str], logdir: Path, problems: list[str]) -> None:
        from tests import world

        self.world = world
        self.env = env
        self.logdir = logdir
        self.problems = problems
        self.current = None
        self.who: str | None = None
        self.log_offset = 0
        self.machined = None

    def start(self, who: str) -> int:
        self.stop()
        self.world.wait_for(lambda: not self.world.name_has_owner(self.env, IMPORT_BUS), 15,
                            f"{IMPORT_BUS} to be released", 0.05)
        if who == "ours":
            log = self.logdir / "ours-importd.log"
            self.log_offset = log.stat().st_size if log.exists() else 0
            svc = self.world.Service(self.world.service_argv("importd", POOL), self.env, log)
            svc.start(timeout=60)  # READY=1 through NOTIFY_SOCKET
        else:
            svc = self.world.Service([REFERENCE], self.env, self.logdir / "reference-importd.log")
            svc.start(timeout=60, notify=False, bus_name=IMPORT_BUS)
        self.current, self.who = svc, who
        return svc.proc.pid

    @property
    def pid(self) -> int | None:
        if self.current and self.current.proc and self.current.proc.poll() is None:
            return self.current.proc.pid
        return None

    def stop(self) -> None:
        if self.current is None:
            return
        svc, who = self.current, self.who
        self.current = self.who = None
        snap = process_snapshot(svc.proc.pid) if svc.proc else []
        rc = svc.stop()
        killed = kill_leftovers(snap[1:])
        if killed:
            self.problems.append(f"{who} importd left children behind, killed: {', '.join(killed)}")
        if who == "ours":
            if rc not in (0, None):
                self.problems.append(f"our importd exited with status {rc} when stopped")
            log = self.logdir / "ours-importd.log"
            if log.exists():
                with open(log, errors="replace") as f:
                    f.seek(self.log_offset)
                    text = f.read()
                if "Traceback" in text:
                    self.problems.append("our importd logged a traceback:\n" + text[-3000:])

    def start_machined(self) -> int:
        svc = self.world.Service(self.world.service_argv("machined", POOL), self.env,
                                 self.logdir / "ours-machined.log")
        svc.start(timeout=60)
        self.machined = svc
        return svc.proc.pid

    def stop_machined(self) -> None:
        if self.machined is not None:
            svc, self.machined = self.machined, None
            rc = svc.stop()
            if rc not in (0, None):
                self.problems.append(f"our machined exited with status {rc} when stopped")


def machinectl(env: dict[str, str], *args: str, timeout: float) -> tuple[float, subprocess.CompletedProcess | None]:
    """Wall time of a machinectl command; (elapsed, None) if it timed out (it is killed)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["machinectl", "--no-pager", *args], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None
    return time.perf_counter() - t0, p


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


class Profiler:
    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.binary = None
        if outdir:
            self.binary = shutil.which("py-spy") or (
                "/tmp/pyspy/bin/py-spy" if os.access("/tmp/pyspy/bin/py-spy", os.X_OK) else None)
            if not self.binary:
                raise SystemExit("--profile: py-spy not found (pip install --target /tmp/pyspy py-spy)")
            outdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int, label: str) -> None:
        if not self.binary:
            return
        self.proc = subprocess.Popen([self.binary, "record", "-p", str(pid), "--idle", "--threads", "--rate", "200",
                                      "--format", "raw", "-o", str(self.outdir / f"{label}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --- checking what was pulled ------------------------------------------------------------


def tree_summary(root: Path) -> dict:
    files = dirs = links = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                links += 1
            elif os.path.isdir(p):
                dirs += 1
            else:
                files += 1
                nbytes += st.st_size
    return {"files": files, "dirs": dirs, "symlinks": links, "bytes": nbytes}


def check_pull(spec: dict, manifest: dict, name: str, full: bool) -> tuple[bool, dict]:
    if spec["kind"] == "raw":
        path = POOL / f"{name}.raw"
        if not path.exists():
            return False, {"error": f"{path} missing"}
        st = path.stat()
        info = {"size": st.st_size, "allocated": st.st_blocks * 512}
        if st.st_size != manifest["raw"]["size"]:
            info["error"] = f"size {st.st_size}, expected {manifest['raw']['size']}"
            return False, info
        if full:
            info["sha256_checked"] = True
            if sha256_file(path) != manifest["raw"]["sha256"]:
                info["error"] = "content differs from disk.raw (SHA-256)"
                return False, info
        return True, info
    path = POOL / name
    if not path.is_dir():
        return False, {"error": f"{path} missing"}
    got = tree_summary(path)
    want = {k: manifest["tar"][k] for k in ("files", "dirs", "symlinks", "bytes")}
    info = dict(got, subvolume=os.stat(path).st_ino == 256)
    ok = got["files"] == want["files"] and got["symlinks"] == want["symlinks"] and got["bytes"] == want["bytes"]
    if not ok:
        info["error"] = f"tree {got}, tar had {want}"
    return ok, info


# --- one timed pull ------------------------------------------------------------------------


def one_pull(key: str, who: str, r: int, verify_mode: str, timeout: float, ctx: dict) -> dict:
    spec = INPUTS[key]
    daemons: Daemons = ctx["daemons"]
    env = ctx["env"]
    url = ctx["nginx"].url(spec["file"])
    suffix = "" if verify_mode == "no" else "-sum"
    name = f"p-{key}{suffix}-{who[:3]}-{r}"
    phases: dict[str, float] = {}
    t_phase = time.perf_counter()

    def phase(what: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phases[what] = round(now - t_phase, 2)
        t_phase = now

    pid = daemons.start(who)
    phase("start_daemon")
    warm(ctx["www"] / spec["file"])
    phase("warm")
    sampler = TreeSampler(pid)
    cpu0 = proc_cpu_seconds(pid)
    load = os.getloadavg()[0]
    profiling = who == "ours" and ctx["profiler"].binary is not None and verify_mode == "no"
    if profiling:
        ctx["profiler"].start(pid, f"{key}-run{r}")
    sampler.start()
    verb = "pull-raw" if spec["kind"] == "raw" else "pull-tar"
    snap: list[dict] = []
    try:
        dt, p = machinectl(env, verb, f"--verify={verify_mode}", url, name, timeout=timeout)
        if p is None:
            snap = process_snapshot(pid)
    finally:
        sampler.stop()
        ctx["profiler"].stop()
    phase("pull")
    res: dict = {"who": who, "run": r, "verify": verify_mode, "seconds": round(dt, 3), "loadavg_1m": round(load, 2),
                 "profiled": profiling, "hung": p is None}
    if p is not None and p.returncode == 0:
        res["sync_after_s"] = round(syncfs(POOL), 3)
    if daemons.pid == pid:
        sampler.sample()
        res["cpu_seconds"] = round(proc_cpu_seconds(pid) - cpu0, 2)
        res["daemon_hwm_mb"] = round(kb(proc_status(pid).get("VmHWM")) * 1024 / MB, 1)
    else:
        res["daemon_hwm_mb"] = round(sampler.daemon_hwm_kb * 1024 / MB, 1)
        if who == "ours" or p is not None:
            ctx["problems"].append(f"{key}/{who} run {r}: the daemon had exited by the end of the pull")
    res["children_hwm_mb"] = {n: round(v * 1024 / MB, 1) for n, v in sampler.child_hwm_kb.items()}
    res["children_rss_peak_mb"] = round(sampler.children_rss_peak_kb * 1024 / MB, 1)
    if p is None:
        res["ok"] = False
        res["hang"] = {"timeout_s": round(timeout, 1), "processes": snap,
                       "pool": sorted(os.listdir(POOL))}
        ctx["hangs"].append({"input": key, "who": who, "run": r, "verify": verify_mode, **res["hang"]})
        states = ", ".join(f"{x['name']}:{x['state']}" for x in snap)
        note(f"{key} {who} run {r}: no result after {timeout:.0f} s: counted as a hang; restarting the daemon "
             f"({states})")
        daemons.stop()
        phase("stop_daemon")
    else:
        daemons.stop()
        phase("stop_daemon")
        out = p.stdout + p.stderr
        if "already downloaded" in out.lower():
            ctx["problems"].append(f"{key}/{who} run {r}: the pull was a cache hit: {out.strip()[-300:]}")
        if p.returncode != 0:
            ctx["problems"].append(f"{key}/{who} run {r} (--verify={verify_mode}): machinectl {verb} failed "
                                   f"({p.returncode}): {out.strip()[-800:]}")
            res["ok"] = False
        else:
            first = (key, who, verify_mode) not in ctx["checked"]
            ctx["checked"].add((key, who, verify_mode))
            # Full content check of the first pull of each input; a size check otherwise
            # (with --quick, the reference's content is not hashed).
            full = first and (who == "ours" or not ctx["quick"])
            ok, info = check_pull(spec, ctx["manifest"], name, full)
            res["check"] = info
            res["ok"] = ok
            if not ok:
                ctx["problems"].append(f"{key}/{who} run {r}: pulled image is wrong: {info}")
    phase("check")
    removed = clear_pool()
    phase("clear_pool")
    res["phases_s"] = phases
    res["cache_entries_removed"] = [e for e in removed if e.startswith((".raw-", ".tar-"))]
    leftovers = [e for e in removed if e.startswith(".#")]
    if leftovers and p is not None:
        ctx["problems"].append(f"{key}/{who} run {r}: temporary files left in the pool: {leftovers}")
    return res


# --- D-Bus latency while 4 pulls run ----------------------------------------------------------


class Client:
    """A blocking sd-bus connection of our own (sdbus low-level API)."""

    def __init__(self) -> None:
        import sdbus

        self.bus = sdbus.sd_bus_open_system()
        try:
            self.bus.method_call_timeout_usec = 120 * 1_000_000
        except (AttributeError, TypeError):
            pass

    def timed(self, dest: str, path: str, iface: str, member: str) -> tuple[float, object]:
        msg = self.bus.new_method_call_message(dest, path, iface, member)
        t0 = time.perf_counter()
        reply = self.bus.call(msg)
        return time.perf_counter() - t0, reply


CALLS = {
    "ListImages (machined)": (MACHINE_BUS, "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager", "ListImages"),
    "ListTransfers (importd)": (IMPORT_BUS, "/org/freedesktop/import1", "org.freedesktop.import1.Manager", "ListTransfers"),
}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    import math

    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def lat_stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "p50_ms": round(pct(samples, 0.5) * 1e3, 2), "p99_ms": round(pct(samples, 0.99) * 1e3, 2),
            "max_ms": round(max(samples) * 1e3, 2), "mean_ms": round(statistics.fmean(samples) * 1e3, 2)}


def latency_test(ctx: dict, cfg: dict) -> dict:
    daemons: Daemons = ctx["daemons"]
    env = ctx["env"]
    keys = [k for k in LATENCY_INPUTS if k in ctx["keys"]]
    result: dict = {"inputs": keys}
    daemons.start_machined()
    pid = daemons.start("ours")
    client = Client()
    idle = {c: [] for c in CALLS}
    for _ in range(cfg["idle_calls"]):
        for c, args in CALLS.items():
            idle[c].append(client.timed(*args)[0])
        time.sleep(0.005)
    for k in keys:
        warm(ctx["www"] / INPUTS[k]["file"])
    sampler = TreeSampler(pid)
    sampler.start()
    procs = []
    logs = []
    busy = {c: [] for c in CALLS}
    concurrency: list[int] = []
    t0 = time.perf_counter()
    try:
        for k in keys:
            log = open(ctx["logdir"] / f"latency-{k}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(["machinectl", "--no-pager", "pull-raw", "--verify=no",
                                           ctx["nginx"].url(INPUTS[k]["file"]), f"lat-{k}"],
                                          env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        deadline = t0 + 900
        i = 0
        while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
            for c, args in CALLS.items():
                dt, reply = client.timed(*args)
                busy[c].append(dt)
                if c.startswith("ListTransfers") and i % 10 == 0:
                    concurrency.append(len(reply.get_contents()))
            i += 1
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        timed_out = [k for k, p in zip(keys, procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        sampler.stop()
    sampler.sample()
    hwm = kb(proc_status(pid).get("VmHWM")) * 1024 / MB if daemons.pid == pid else sampler.daemon_hwm_kb * 1024 / MB
    rcs = {k: p.returncode for k, p in zip(keys, procs)}
    for k, log in zip(keys, logs):
        log.seek(0)
        text = log.read()
        log.close()
        if rcs[k] != 0:
            ctx["problems"].append(f"latency test: pull of {k} failed ({rcs[k]}): {text.strip()[-500:]}")
    if timed_out:
        ctx["problems"].append(f"latency test: pulls of {timed_out} did not finish in 900 s")
    ok_checks = {}
    for k in keys:
        if rcs[k] == 0:
            ok, info = check_pull(INPUTS[k], ctx["manifest"], f"lat-{k}", False)
            ok_checks[k] = ok
            if not ok:
                ctx["problems"].append(f"latency test: lat-{k} is wrong: {info}")
    daemons.stop()
    daemons.stop_machined()
    clear_pool()
    result.update({
        "pulls_wall_s": round(wall, 2), "pull_rc": rcs,
        "max_concurrent_transfers_seen": max(concurrency, default=0),
        "idle": {c: lat_stats(v) for c, v in idle.items()},
        "during_pulls": {c: lat_stats(v) for c, v in busy.items()},
        "importd_hwm_mb": round(hwm, 1),
        "importd_children_hwm_mb": {n: round(v * 1024 / MB, 1) for n, v in sampler.child_hwm_kb.items()},
        "importd_children_rss_peak_mb": round(sampler.children_rss_peak_kb * 1024 / MB, 1),
        "target_ms": LATENCY_TARGET_MS,
    })
    result["pass"] = all(s.get("p99_ms") is not None and s["p99_ms"] < LATENCY_TARGET_MS
                         for s in result["during_pulls"].values()) and all(v == 0 for v in rcs.values())
    return result


# --- report --------------------------------------------------------------------------------


def output_bytes(key: str, manifest: dict) -> int:
    return manifest["raw"]["size"] if INPUTS[key]["kind"] == "raw" else manifest["tar"]["size"]


def make_row(key: str, results: list[dict], manifest: dict, verify_mode: str = "no") -> dict:
    spec = INPUTS[key]
    ours = [x for x in results if x["who"] == "ours"]
    ref = [x for x in results if x["who"] == "reference"]
    so = stats([x["seconds"] for x in ours if x["ok"]])
    sr = stats([x["seconds"] for x in ref if x["ok"]])
    so_sync = stats([x["seconds"] + x.get("sync_after_s", 0) for x in ours if x["ok"]])
    sr_sync = stats([x["seconds"] + x.get("sync_after_s", 0) for x in ref if x["ok"]])
    out = output_bytes(key, manifest)
    cpu = lambda xs: statistics.median([x["cpu_seconds"] for x in xs if "cpu_seconds" in x and x["ok"]]) \
        if any("cpu_seconds" in x and x["ok"] for x in xs) else None  # noqa: E731
    row = {
        "input": key, "verify": verify_mode, "file": spec["file"], "format": spec["fmt"], "kind": spec["kind"],
        "input_bytes": manifest["files"][key]["size"], "output_bytes": out,
        "ours": so, "reference": sr,
        "ratio": so["median"] / sr["median"] if so.get("median") and sr.get("median") else None,
        "ours_with_sync": so_sync, "reference_with_sync": sr_sync,
        "ratio_with_sync": (so_sync["median"] / sr_sync["median"]
                            if so_sync.get("median") and sr_sync.get("median") else None),
        "ours_mbps": out / MB / so["median"] if so.get("median") else None,
        "reference_mbps": out / MB / sr["median"] if sr.get("median") else None,
        "ours_cpu_s": cpu(ours), "reference_cpu_s": cpu(ref),
        "cpu_ratio": cpu(ours) / cpu(ref) if cpu(ours) and cpu(ref) else None,
        "ours_daemon_hwm_mb": max((x["daemon_hwm_mb"] for x in ours), default=None),
        "ours_children_hwm_mb": merge_max([x["children_hwm_mb"] for x in ours]),
        "reference_daemon_hwm_mb": max((x["daemon_hwm_mb"] for x in ref), default=None),
        "reference_children_hwm_mb": merge_max([x["children_hwm_mb"] for x in ref]),
        "hangs": {"ours": sum(x["hung"] for x in ours), "reference": sum(x["hung"] for x in ref)},
        "failures": {"ours": sum(not x["ok"] and not x["hung"] for x in ours),
                     "reference": sum(not x["ok"] and not x["hung"] for x in ref)},
        "loadavg_1m": [x["loadavg_1m"] for x in results],
        "profiled": any(x.get("profiled") for x in ours),
        "runs": results,
    }
    kind, limit = spec["target"]
    if verify_mode != "no":
        kind, limit = "info", None
    row["target"] = {"kind": kind, "limit": limit}
    if kind == "ratio":
        row["pass"] = row["ratio"] is not None and row["ratio"] <= limit
        row["target_text"] = f"ratio <= {limit:.1f}"
    else:
        row["pass"] = None
        row["target_text"] = "-"
    return row


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = ("input", "verify", "ours s", "ref s", "ratio", "ours MB/s", "ref MB/s", "ratio+sync", "ours CPU s",
            "ref CPU s", "CPU ratio", "ours RSS MB", "ours children MB", "ref children MB", "hangs o/r", "n o/r", "load",
            "target", "result")
    lines = []
    for r in rows:
        loads = r["loadavg_1m"]
        lines.append((
            r["input"], r["verify"], fmt(r["ours"].get("median")), fmt(r["reference"].get("median")),
            fmt(r["ratio"], ".2f", "x"), fmt(r["ours_mbps"], ".0f"), fmt(r["reference_mbps"], ".0f"),
            fmt(r["ratio_with_sync"], ".2f", "x"), fmt(r["ours_cpu_s"], ".1f"), fmt(r["reference_cpu_s"], ".1f"),
            fmt(r["cpu_ratio"], ".2f", "x"), fmt(r["ours_daemon_hwm_mb"], ".0f"),
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(r["ours_children_hwm_mb"].items())) or "-",
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(r["reference_children_hwm_mb"].items())) or "-",
            f"{r['hangs']['ours']}/{r['hangs']['reference']}",
            f"{r['ours'].get('n', 0)}/{r['reference'].get('n', 0)}",
            f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-",
            r["target_text"],
            ("info" if r["pass"] is None else "PASS" if r["pass"] else "FAIL") + (" (profiled)" if r["profiled"] else ""),
        ))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt_line = "  ".join(f"{{:{'<' if i < 2 or i in (12, 13, 17, 18) else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt_line.format(*head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print(fmt_line.format(*line), file=out)


def code_state() -> dict:
    """The commit and the uncommitted changes of the code under test (others may be editing it)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in git("status", "--short", "--", "importd", "imagepool", "machined")
                         .splitlines()]}


def clean_env(bus_address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(DBUS_SYSTEM_BUS_ADDRESS=bus_address, PYTHONPATH=str(REPO), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    return env


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run per input and daemon (about 6 minutes)")
    ap.add_argument("--runs", type=int, help="runs per input and daemon (default 3, --quick 1)")
    ap.add_argument("--json", metavar="FILE", help="write the JSON results here instead of to stdout")
    ap.add_argument("--inputs", default=",".join(INPUTS), help="comma-separated inputs (default: %(default)s)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the inputs are kept (default: %(default)s)")
    ap.add_argument("--regen", action="store_true", help="generate the inputs again")
    ap.add_argument("--gen-wait", type=float, default=2400,
                    help="how long to wait for another process generating into the cache (s, default %(default)s)")
    ap.add_argument("--hang-timeout", type=float, help="timeout of a pull before it counts as a hang "
                                                       "(default 300 s, --quick 150 s)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes (host file system)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' and nginx's logs here at the end")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record our importd during its pulls (raw stacks in DIR)")
    ap.add_argument("--ours-only", action="store_true", help="do not run the reference")
    ap.add_argument("--no-latency", action="store_true", help="skip the D-Bus latency test")
    ap.add_argument("--no-verify-run", action="store_true", help="skip the --verify=checksum runs")
    args = ap.parse_args()
    keys = [k for k in args.inputs.split(",") if k]
    if not keys or any(k not in INPUTS for k in keys):
        ap.error(f"--inputs: choose from {', '.join(INPUTS)}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs:
        cfg["runs"] = args.runs
    if args.hang_timeout:
        cfg["hang_timeout"] = args.hang_timeout
    verify_keys = [] if args.no_verify_run else [k for k in cfg["verify_inputs"] if k in keys]

    enter_private_mount_namespace()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = time.monotonic()
    load_start = host_load()
    code = code_state()
    cleanups = Cleanups()
    problems: list[str] = []
    notes: list[str] = []
    rows: list[dict] = []
    verify_rows: list[dict] = []
    hangs: list[dict] = []
    latency: dict = {}
    manifest: dict = {}
    have_ref = os.access(REFERENCE, os.X_OK) and os.access(REFERENCE_WORKER, os.X_OK) and not args.ours_only
    if not have_ref and not args.ours_only:
        notes.append(f"{REFERENCE} or {REFERENCE_WORKER} is missing: only our importd was measured")
        note(notes[-1])
    interrupted = failed = False
    bench_started = None
    nginx_bin = None
    try:
        nginx_bin = ensure_nginx(notes)
        manifest = get_inputs(Path(args.cache), keys, cleanups, args.regen, args.gen_wait, notes)
        cache = Path(manifest["cache"])
        bench_started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="importd-pull-bench-", dir=args.workdir))
        cleanups.push(f"remove {workdir}", lambda: rm_tree(workdir))
        logdir = workdir / "logs"
        logdir.mkdir()
        if args.keep_logs:
            keep = Path(args.keep_logs)
            cleanups.push("keep logs", lambda: shutil.copytree(logdir, keep, dirs_exist_ok=True))
        www = workdir / "www"
        sums = make_www(www, cache, keys, manifest, verify_keys)
        nginx = Nginx(nginx_bin, www, workdir / "nginx")
        cleanups.push("keep nginx log", lambda: shutil.copy(workdir / "nginx" / "error.log", logdir / "nginx-error.log")
                      if (workdir / "nginx" / "error.log").exists() else None)
        nginx.start()
        cleanups.push("stop nginx", nginx.stop)
        note(f"nginx {nginx_bin} serving {www} on 127.0.0.1:{nginx.port} (pid {nginx.proc.pid})")
        setup_namespace(cleanups)
        mount_pool(workdir, cleanups)
        note(f"btrfs pool mounted at {POOL}")

        from tests import world

        bus = world.PrivateBus(Path("/run/systemd/bench-bus")).start()
        cleanups.push("stop dbus-daemon", bus.stop)
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address  # for our in-process sd-bus client
        env = clean_env(bus.address)
        daemons = Daemons(env, logdir, problems)
        cleanups.push("stop machined", daemons.stop_machined)
        cleanups.push("stop importd", daemons.stop)
        profiler = Profiler(Path(args.profile) if args.profile else None)
        cleanups.push("stop py-spy", profiler.stop)
        if args.profile:
            notes.append(f"our importd was profiled with py-spy during its pulls: its times are perturbed "
                         f"(stacks in {args.profile})")
        ctx = {"daemons": daemons, "env": env, "manifest": manifest, "www": www, "nginx": nginx,
               "problems": problems, "checked": set(), "profiler": profiler, "hangs": hangs,
               "quick": args.quick, "keys": keys, "logdir": logdir}

        for key in keys:
            spec = INPUTS[key]
            who_all = ["ours", "reference"] if (spec["ref"] and have_ref) else ["ours"]
            results: list[dict] = []
            for r in range(cfg["runs"]):
                order = who_all if r % 2 == 0 else who_all[::-1]
                for who in order:
                    done = [x["seconds"] for x in results if x["ok"]]
                    timeout = min(cfg["hang_timeout"], max(60.0, 5 * min(done))) if done else cfg["hang_timeout"]
                    res = one_pull(key, who, r, "no", timeout, ctx)
                    results.append(res)
                    ch = ", ".join(f"{k} {v:.0f}" for k, v in sorted(res["children_hwm_mb"].items()))
                    note(f"{key} run {r + 1} {who}: {res['seconds']:.2f} s"
                         f"{' HUNG' if res['hung'] else '' if res['ok'] else ' FAILED'}, "
                         f"cpu {res.get('cpu_seconds', '-')} s, daemon HWM {res['daemon_hwm_mb']:.0f} MB"
                         f"{', children ' + ch + ' MB' if ch else ''}, load {res['loadavg_1m']}, "
                         f"cache entries removed: {len(res['cache_entries_removed'])}")
            row = make_row(key, results, manifest)
            rows.append(row)
            note(f"{key}: ours {fmt(row['ours'].get('median'))} s, reference {fmt(row['reference'].get('median'))} s, "
                 f"ratio {fmt(row['ratio'])}, "
                 f"{'info' if row['pass'] is None else 'PASS' if row['pass'] else 'FAIL'}")

        for key in verify_keys:
            who_all = ["ours", "reference"] if (INPUTS[key]["ref"] and have_ref) else ["ours"]
            results = []
            base = next((x for x in rows if x["input"] == key), None)
            for who in who_all:
                med = (base or {}).get(who, {}).get("median")
                timeout = min(cfg["hang_timeout"], max(60.0, 5 * med)) if med else cfg["hang_timeout"]
                res = one_pull(key, who, 0, "checksum", timeout, ctx)
                results.append(res)
                note(f"{key} --verify=checksum {who}: {res['seconds']:.2f} s"
                     f"{' HUNG' if res['hung'] else '' if res['ok'] else ' FAILED'}")
            vrow = make_row(key, results, manifest, "checksum")
            if base:
                vrow["hashing_cost_s"] = {w: (vrow[w]["median"] - base[w]["median"])
                                          if vrow[w].get("median") and base[w].get("median") else None
                                          for w in ("ours", "reference")}
            vrow["sha256sums"] = {INPUTS[key]["file"]: sums.get(INPUTS[key]["file"])}
            verify_rows.append(vrow)

        if not args.no_latency and [k for k in LATENCY_INPUTS if k in keys]:
            note(f"D-Bus latency: our machined + importd, 4 concurrent pulls of {', '.join(LATENCY_INPUTS)}")
            latency = latency_test(ctx, cfg)
            note(f"D-Bus latency: {json.dumps(latency['during_pulls'])}; 4 pulls took {latency['pulls_wall_s']} s, "
                 f"importd HWM {latency['importd_hwm_mb']} MB")
    except KeyboardInterrupt as e:
        interrupted = True
        note(f"interrupted ({str(e) or 'Ctrl-C'}); cleaning up")
    except Exception:  # noqa: BLE001 - report what we have, then fail
        failed = True
        problems.append("benchmark aborted:\n" + traceback.format_exc())
        note(problems[-1])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanups.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    elapsed = time.monotonic() - started
    bench_elapsed = time.monotonic() - bench_started if bench_started else None
    load_end = host_load()
    busy = max(load_start["loadavg"][0], load_end["loadavg"][0]) > 0.5 * (os.cpu_count() or 1)
    if busy:
        notes.append(f"the machine had other work (load average {load_start['loadavg'][0]} at start, "
                     f"{load_end['loadavg'][0]} at end, on {os.cpu_count()} CPUs): wall times are noisy")

    single_hwm = max((r["ours_daemon_hwm_mb"] for r in rows + verify_rows
                      if r["ours_daemon_hwm_mb"] is not None), default=None)
    conc_hwm = latency.get("importd_hwm_mb")
    peak = max((x for x in (single_hwm, conc_hwm) if x is not None), default=None)
    rss = {
        "ours_importd_peak_mb_single_pull": single_hwm,
        "ours_importd_peak_mb_4_concurrent": conc_hwm,
        "ours_importd_peak_mb": peak,
        "target_mb": RSS_TARGET_MB,
        "pass": peak is not None and peak <= RSS_TARGET_MB,
        "ours_children_peak_mb": merge_max([r["ours_children_hwm_mb"] for r in rows + verify_rows]
                                            + [latency.get("importd_children_hwm_mb", {})]),
        "reference_importd_peak_mb": max((r["reference_daemon_hwm_mb"] for r in rows + verify_rows
                                          if r["reference_daemon_hwm_mb"] is not None), default=None),
        "reference_children_peak_mb": merge_max([r["reference_children_hwm_mb"] for r in rows + verify_rows]),
    }
    hang_counts = {"ours": sum(1 for h in hangs if h["who"] == "ours"),
                   "reference": sum(1 for h in hangs if h["who"] == "reference")}
    zst = next((r for r in rows if r["input"] == "zst"), None)

    print()
    print(f"importd pull benchmark ({'quick' if args.quick else 'full'}, {cfg['runs']} run(s) per daemon), "
          f"{os.cpu_count()} CPUs, {elapsed:.0f} s"
          f"{f' ({bench_elapsed:.0f} s measuring)' if bench_elapsed else ''}"
          f"{' - INTERRUPTED, partial results' if interrupted else ''}{' - FAILED, partial results' if failed else ''}")
    print(f"load average at start {load_start['loadavg']}, at end {load_end['loadavg']}; code under test: "
          f"{code['head']}{' + uncommitted changes in ' + str(len(code['modified'])) + ' file(s)' if code['modified'] else ''}")
    print("times: wall time of the whole `machinectl pull-raw|pull-tar --verify=no URL NAME` (median; nginx on "
          "127.0.0.1, input in the page cache, pool emptied incl. the download cache between runs); MB/s: output "
          "(raw: the 2 GiB virtual disk; tar: the tar stream) per second; CPU s: daemon + children; RSS: VmHWM of "
          "our importd (restarted per pull); children: peak VmHWM per command name; ratio+sync: with a syncfs() of "
          "the pool right after machinectl returned added to both; CPU ratio: ours/reference CPU seconds (less "
          "sensitive to other load than wall time); load: 1-min load average at the runs' starts")
    print_table(rows)
    if verify_rows:
        print()
        print("with --verify=checksum (SHA256SUMS), one run per daemon:")
        print_table(verify_rows)
        for v in verify_rows:
            hc = v.get("hashing_cost_s", {})
            print(f"  {v['input']}: hashing cost (checksum - median --verify=no): ours {fmt(hc.get('ours'), '+.2f', ' s')}, "
                  f"reference {fmt(hc.get('reference'), '+.2f', ' s')}")
    if zst:
        print(f"our zstd pull: {fmt(zst['ours_mbps'], '.0f')} MB/s of output ({fmt(zst['ours'].get('median'))} s for "
              f"{zst['output_bytes'] / MB:.0f} MB; systemd 252 has no zstd)")
    print(f"our importd peak RSS: {fmt(single_hwm, '.1f')} MB single pull, {fmt(conc_hwm, '.1f')} MB with 4 concurrent "
          f"pulls (target <= {RSS_TARGET_MB:.0f} MB): {'PASS' if rss['pass'] else 'FAIL'}; its children: "
          f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['ours_children_peak_mb'].items())) or '-'}; "
          f"reference: systemd-importd {fmt(rss['reference_importd_peak_mb'], '.1f')} MB, children "
          f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['reference_children_peak_mb'].items())) or '-'}")
    if latency:
        print(f"D-Bus latency during {len(latency['inputs'])} concurrent pulls ({', '.join(latency['inputs'])}; "
              f"{latency['pulls_wall_s']} s; up to {latency['max_concurrent_transfers_seen']} transfers seen):")
        for c in CALLS:
            d, i = latency["during_pulls"][c], latency["idle"][c]
            print(f"  {c:24s} p50 {fmt(d.get('p50_ms'), '.1f')} ms, p99 {fmt(d.get('p99_ms'), '.1f')} ms, "
                  f"max {fmt(d.get('max_ms'), '.1f')} ms (n={d['n']}); idle p50 {fmt(i.get('p50_ms'), '.1f')} ms, "
                  f"p99 {fmt(i.get('p99_ms'), '.1f')} ms")
        print(f"  target p99 < {LATENCY_TARGET_MS:.0f} ms: {'PASS' if latency['pass'] else 'FAIL'}")
    print(f"hangs (pull timed out, daemon restarted): ours {hang_counts['ours']}, reference {hang_counts['reference']}")
    for h in hangs:
        procs = ", ".join(f"{p['name']}[{p['state']}, cpu {p['cpu_s']} s, {p['wchan']}]" for p in h["processes"])
        print(f"  {h['input']} --verify={h['verify']} run {h['run']} {h['who']}: after {h['timeout_s']} s: {procs}")
    verdicts = [r["pass"] for r in rows if r["pass"] is not None] + [rss["pass"]]
    if latency:
        verdicts.append(latency["pass"])
    print(f"targets: {sum(bool(v) for v in verdicts)} of {len(verdicts)} met")
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"problem: {p}")
    result = {
        "mode": "quick" if args.quick else "full",
        "interrupted": interrupted,
        "failed": failed,
        "elapsed_s": round(elapsed, 1),
        "measuring_s": round(bench_elapsed, 1) if bench_elapsed else None,
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "load_start": load_start, "load_end": load_end},
        "reference": REFERENCE if have_ref else None,
        "code": code,
        "server": nginx_bin,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "inputs": {k: v for k, v in manifest.items() if k in ("files", "raw", "tar", "xz", "cache", "commands")},
        "timing_method": "wall time of `machinectl --no-pager pull-raw|pull-tar --verify=MODE URL NAME` (returns when "
                         "the transfer is done) from a private nginx on 127.0.0.1; input warmed with cat before each "
                         "run; daemons restarted per run and alternated, order flipped every run; pool emptied "
                         "(image and hidden .raw-*/.tar-* download cache), sync and btrfs subvolume sync between runs "
                         "(untimed)",
        "results": rows,
        "verify_checksum": verify_rows,
        "rss": rss,
        "latency": latency,
        "hangs": {"counts": hang_counts, "details": hangs},
        "notes": notes,
        "problems": problems,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"JSON results written to {args.json}")
    else:
        print(text)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
