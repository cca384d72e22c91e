#!/usr/bin/env python3
"""Benchmark our importd against systemd-importd 252 on local imports.

    cd /work/main && .venv/bin/python bench/import.py [--quick] [--json FILE]
        [--pool btrfs|plain|btrfs,plain] [--cache DIR] [--regen]
        [--inputs raw,xz-mt,...] [--runs N] [--ours-only] [--profile DIR]
        [--keep-logs DIR] [--raw-mib N (smoke tests only, with another --cache)]

Run as root.  The benchmark first moves itself into a private mount namespace
(unshare(CLONE_NEWNS) while still single-threaded, then ``mount
--make-rprivate /``), puts a tmpfs on /run/systemd (with ``system/`` in it, so
machinectl believes it runs under systemd) and on /etc/systemd/nspawn, and
starts a private system-type dbus-daemon (tests.world.PrivateBus) whose socket
lives in that tmpfs.  The pool at /var/lib/machines is a fresh btrfs on a
~12G sparse loop file (tests.world.mount_btrfs) or, with ``--pool plain``, a
directory on the host's file system (ext4) bind-mounted there.  Nothing of
the host's /run/systemd or /var/lib/machines is seen or changed.

Inputs are generated once into the cache directory (default
/var/tmp/importd-bench; reused while its manifest matches, ``--regen``
rebuilds them):

  disk.raw          2 GiB raw disk image, ~900 MB of data: 8 MiB segments
                    holding 5..7 MiB of either incompressible random bytes or
                    compressible bytes (the contents of /usr files), the rest
                    of the image holes
  disk-mt.raw.xz    xz -6 -T2 (multi-block: xz can decompress it in parallel)
  disk-st.raw.xz    xz -6 -T1 (one block: decompression is single-threaded)
  disk.raw.gz       gzip -6
  disk.raw.zst      zstd -3
  disk.qcow2        qemu-img convert -O qcow2
  disk-c.qcow2      qemu-img convert -O qcow2 -c (zlib-compressed clusters)
  rootfs.tar.xz     a ~200 MB tree (/usr/lib/python3*, /usr/share/man,
                    /usr/share/perl, /usr/share/vim, os-release) as tar,
                    xz -6 -T2
  rootfs.tar.gz     the same tar, gzip -6

For each input and run, our importd and the reference alternate (the order
flips every run): start the daemon (``python -m importd --pool
/var/lib/machines``, or ``/lib/systemd/systemd-importd``, which spawns
``/lib/systemd/systemd-import`` workers); ``cat FILE > /dev/null`` (the input
in the page cache for both alike); time ``machinectl import-raw FILE NAME``
(or ``import-tar``) as a whole command, which returns once the transfer has
finished; read the daemon's VmHWM and CPU time; stop it.  The first import of
each input by each daemon is checked (raw: size and SHA-256 of the content;
tar: counts of files, symlinks and bytes).  Then the image is deleted
directly (file, or subvolume with ``btrfs subvolume delete --commit-after``;
not timed), followed by sync and ``btrfs subvolume sync`` (the cleaner is done
before the next run starts).  Medians are reported, and the ratio
ours/reference.  A full run (5 runs each) takes about 10 minutes, --quick
(1 run each) about 2-3 (plus,
the first time, generating the inputs: 5 to 20 minutes, mostly xz -T1).

systemd 252 does not know zstd: for ``.zst`` only ours is timed (its output
rate, decompressed bytes per second, is the target); in a full run the
reference is tried once, untimed, and what it made of the file is noted.

Peak RSS: our importd's VmHWM (from /proc/PID/status just before it is
stopped; the daemon is restarted for every run, so this is per import), and
the peak RSS of its children (xz, tar, ...), sampled every 50 ms from
/proc/PID/task/*/children, reported separately.  The same for the reference
(systemd-importd, and its systemd-import worker and tar).

Also recorded per run: the CPU time of the daemon and its children
(utime+stime+cutime+cstime from /proc/PID/stat), the load average, and how
long a syncfs() of the pool takes right after machinectl returned (systemd-import
252 runs with --sync=yes by default and syncfs()es before it reports success;
our importd does not, so "ratio+sync" adds that time to both).  The host is
often shared: "ratio min" (best run over best run) and "CPU ratio" are less
sensitive to other load than the medians, which the targets are judged on.

A table goes to stdout, with PASS/FAIL against the targets:

  wall time <= 0.8 x reference  uncompressed raw, multi-block xz (raw and
                                tar), gzip (raw and tar), qcow2 (both)
  wall time <= 1.0 x reference  single-stream xz
  output >= 400 MB/s            zstd (ours only)
  peak RSS <= 100 MB            our importd process (VmHWM)

then the results as JSON (or to --json FILE).  Progress goes to stderr.
Everything started is stopped by PID and everything mounted is unmounted,
also on errors and Ctrl-C/SIGTERM.  ``--profile DIR`` runs
``py-spy record --idle --threads --format raw`` on our importd during its
timed imports (collapsed stacks in DIR; those timings are perturbed and are
marked as such).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
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
REFERENCE_WORKER = "/lib/systemd/systemd-import"
BUS_NAME = "org.freedesktop.import1"
DEFAULT_CACHE = Path("/var/tmp/importd-bench")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
MiB = 1 << 20

# --- inputs ----------------------------------------------------------------------

GEN_VERSION = 1
RAW_SIZE = 2 << 30
SEGMENT = 8 * MiB
SEGMENTS_RANDOM = 72
SEGMENTS_USR = 72
USR_SOURCES = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib", "/usr/share")
TAR_MEMBERS = ("etc/os-release", "usr/lib/os-release", "usr/lib/python3", "usr/lib/python3.11",
               "usr/share/man", "usr/share/perl", "usr/share/vim")

# key: file, import kind, compression, target (("ratio", x) or ("mbps", x)), reference timed?
INPUTS: dict[str, dict] = {
    "raw": dict(file="disk.raw", kind="raw", fmt="uncompressed", target=("ratio", 0.8), ref=True),
    "xz-mt": dict(file="disk-mt.raw.xz", kind="raw", fmt="xz -T2 (multi-block)", target=("ratio", 0.8), ref=True),
    "xz-st": dict(file="disk-st.raw.xz", kind="raw", fmt="xz -T1 (single block)", target=("ratio", 1.0), ref=True),
    "gz": dict(file="disk.raw.gz", kind="raw", fmt="gzip -6", target=("ratio", 0.8), ref=True),
    "zst": dict(file="disk.raw.zst", kind="raw", fmt="zstd -3", target=("mbps", 400.0), ref=False),
    "qcow2": dict(file="disk.qcow2", kind="raw", fmt="qcow2", target=("ratio", 0.8), ref=True),
    "qcow2-c": dict(file="disk-c.qcow2", kind="raw", fmt="qcow2 -c (zlib)", target=("ratio", 0.8), ref=True),
    "tar-xz": dict(file="rootfs.tar.xz", kind="tar", fmt="tar, xz -T2 (multi-block)", target=("ratio", 0.8), ref=True),
    "tar-gz": dict(file="rootfs.tar.gz", kind="tar", fmt="tar, gzip -6", target=("ratio", 0.8), ref=True),
}
RSS_TARGET_MB = 100.0

FULL = dict(runs=5)
QUICK = dict(runs=1)


from common import (  # noqa: E402
    Cleanups, descendants, enter_private_mount_namespace, fmt, host_load, kb, merge_max, note, proc_status, rm_tree,
    run, setup_namespace, sha256_file, stats, umount, warm,
)


def mount_pool(kind: str, workdir: Path, cleanups: Cleanups, before=lambda: None) -> int:
    """Mount a fresh pool of KIND at /var/lib/machines; returns the cleanup
    handle.  BEFORE runs first when it is undone (stops what uses the pool)."""
    from tests import world

    if kind == "btrfs":
        image = workdir / "pool.btrfs"
        world.mount_btrfs(image, POOL, "12G")

        def undo() -> None:
            before()
            umount(str(POOL))
            image.unlink(missing_ok=True)

        return cleanups.push("umount btrfs pool", undo)
    plain = workdir / "plain-pool"
    plain.mkdir(mode=0o700)
    run(["mount", "--bind", str(plain), str(POOL)])

    def undo_plain() -> None:
        before()
        umount(str(POOL))
        rm_tree(plain)

    return cleanups.push("umount plain pool", undo_plain)


def clear_pool(kind: str) -> list[str]:
    """Delete everything in the pool (the imported image and any leftover
    temporary); subvolumes with ``btrfs subvolume delete``.  Then sync, and on
    btrfs wait for the cleaner.  Returns what was removed."""
    removed = []
    for entry in sorted(os.listdir(POOL)):
        path = POOL / entry
        removed.append(entry)
        if kind == "btrfs" and path.is_dir() and not path.is_symlink() and os.stat(path).st_ino == 256:
            subprocess.run(["btrfs", "property", "set", "-ts", str(path), "ro", "false"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # --commit-after: the cleaner starts now, not at the next periodic commit (up to 30 s later).
            r = subprocess.run(["btrfs", "subvolume", "delete", "--commit-after", str(path)], capture_output=True,
                               text=True)
            if r.returncode != 0:
                rm_tree(path)
                if path.exists():
                    subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=True, stdout=subprocess.DEVNULL)
        else:
            subprocess.run(["chattr", "-f", "-i", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rm_tree(path)
    os.sync()
    if kind == "btrfs":
        subprocess.run(["btrfs", "subvolume", "sync", str(POOL)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    os.sync()  # the loop file's pages, written back by the first sync
    return removed


# --- generating the inputs ---------------------------------------------------------


class Generator:
    """Builds the inputs in CACHE; children are tracked so that cleanup can kill them."""

    def __init__(self, cache: Path, cleanups: Cleanups) -> None:
        self.cache = cache
        self.procs: list[subprocess.Popen] = []
        cleanups.push("stop generator children", self.kill_all)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()

    def spawn(self, argv: list[str], out: Path | None) -> tuple[subprocess.Popen, Path | None]:
        tmp = out.with_name(out.name + ".tmp") if out else None
        f = open(tmp, "wb") if tmp else None
        try:
            p = subprocess.Popen(argv, stdout=f if f else subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        finally:
            if f:
                f.close()
        self.procs.append(p)
        return p, tmp

    def finish(self, job: tuple[subprocess.Popen, Path | None, Path | None, str]) -> None:
        p, tmp, out, what = job
        rc = p.wait()
        self.procs.remove(p)
        if rc != 0:
            raise RuntimeError(f"generating {what} failed with status {rc}")
        if tmp and out:
            os.replace(tmp, out)

    def job(self, argv: list[str], out: Path | None, what: str):
        p, tmp = self.spawn(argv, out)
        return (p, tmp, out, what) if out else (p, None, None, what)


def _usr_stream():
    """Bytes of files under /usr, in a fixed order, forever."""
    while True:
        for top in USR_SOURCES:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    try:
                        if not os.path.isfile(path) or os.path.islink(path):
                            continue
                        with open(path, "rb") as f:
                            while chunk := f.read(4 * MiB):
                                yield chunk
                    except OSError:
                        continue


def write_raw_image(path: Path, size: int = RAW_SIZE) -> dict:
    rng = random.Random(20240601)
    nseg = size // SEGMENT
    n_random = SEGMENTS_RANDOM * nseg // (RAW_SIZE // SEGMENT)
    n_usr = SEGMENTS_USR * nseg // (RAW_SIZE // SEGMENT)
    slots = list(range(nseg))
    rng.shuffle(slots)
    kinds = {s: "random" for s in slots[:n_random]}
    kinds.update({s: "usr" for s in slots[n_random:n_random + n_usr]})
    usr = _usr_stream()
    usr_buf = bytearray()
    data_bytes = {"random": 0, "usr": 0}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for seg in sorted(kinds):
            kind = kinds[seg]
            length = rng.randint(5 * MiB // 4096, 7 * MiB // 4096) * 4096
            offset = seg * SEGMENT + rng.randrange(0, (SEGMENT - length) // 4096 + 1) * 4096
            if kind == "random":
                data = os.urandom(length)
            else:
                while len(usr_buf) < length:
                    usr_buf += next(usr)
                data = bytes(usr_buf[:length])
                del usr_buf[:length]
            os.pwrite(f.fileno(), data, offset)
            data_bytes[kind] += length
    os.replace(tmp, path)
    return {"size": size, "data_bytes": data_bytes, "segments": {"random": n_random, "usr": n_usr}}


def xz_blocks(path: Path) -> dict:
    r = subprocess.run(["xz", "--robot", "--list", "-v", str(path)], capture_output=True, text=True, check=True)
    for line in r.stdout.splitlines():
        f = line.split("\t")
        if f[0] == "totals":
            return {"streams": int(f[1]), "blocks": int(f[2]), "compressed": int(f[3]), "uncompressed": int(f[4])}
    return {}


def tar_expectation(path: Path) -> dict:
    files = dirs = links = 0
    nbytes = 0
    sizes: dict[str, int] = {}
    with tarfile.open(path, "r:") as t:
        for m in t:
            name = m.name.rstrip("/")
            if m.isreg():
                files += 1
                nbytes += m.size
                sizes[name] = m.size
            elif m.islnk():
                files += 1
                nbytes += sizes.get(m.linkname.rstrip("/"), 0)
            elif m.isdir():
                dirs += 1
            elif m.issym():
                links += 1
    return {"files": files, "dirs": dirs, "symlinks": links, "bytes": nbytes}


def tree_summary(root: Path) -> dict:
    files = dirs = links = 0
    nbytes = 0
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


BUILD = {
    # key: (source, argv before the source file, suffix of argv after it, output through stdout?)
    "xz-mt": ("disk.raw", ["xz", "-6", "-T2", "-c"], [], True),
    "xz-st": ("disk.raw", ["xz", "-6", "-T1", "-c"], [], True),
    "gz": ("disk.raw", ["gzip", "-6", "-c"], [], True),
    "zst": ("disk.raw", ["zstd", "-3", "-q", "-c"], [], True),
    "qcow2": ("disk.raw", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"], ["{out}"], False),
    "qcow2-c": ("disk.raw", ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2"], ["{out}"], False),
    "tar-xz": ("rootfs.tar", ["xz", "-6", "-T2", "-c"], [], True),
    "tar-gz": ("rootfs.tar", ["gzip", "-6", "-c"], [], True),
}


def generate(cache: Path, regen: bool, keys: list[str], raw_mib: int, cleanups: Cleanups) -> dict:
    """The inputs KEYS and the manifest, each built only if missing (all of
    them again with REGEN, or when the cache was made for another size)."""
    manifest_path = cache / "manifest.json"
    manifest: dict = {}
    if not regen and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("version") != GEN_VERSION or manifest.get("raw_mib", 2048) != raw_mib:
            note(f"the inputs in {cache} were made differently: making them again")
            manifest = {}
    if not manifest:
        if cache.exists():
            for name in [*(s["file"] for s in INPUTS.values()), "disk.raw", "rootfs.tar", "manifest.json"]:
                (cache / name).unlink(missing_ok=True)
            for leftover in cache.glob("*.tmp"):
                leftover.unlink()
        manifest = {"version": GEN_VERSION, "raw_mib": raw_mib, "files": {}, "xz": {},
                    "commands": {k: " ".join(b[1][:-1] if b[3] else b[1]) for k, b in BUILD.items()}}
    manifest.setdefault("files", {})
    manifest.setdefault("xz", {})
    cache.mkdir(parents=True, exist_ok=True)
    missing = [k for k in keys if not (cache / INPUTS[k]["file"]).exists() or k not in manifest["files"]]
    if not missing:
        note(f"reusing the inputs in {cache} (--regen makes them again)")
        return manifest
    note(f"generating {', '.join(missing)} in {cache} (once; kept for later runs)")
    t_all = time.monotonic()
    gen = Generator(cache, cleanups)

    def save() -> None:
        manifest["made"] = time.strftime("%Y-%m-%d %H:%M:%S")
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    raw = cache / "disk.raw"
    if any(BUILD.get(k, ("disk.raw",))[0] == "disk.raw" for k in missing) and (
            not raw.exists() or "raw" not in manifest):
        t0 = time.monotonic()
        info = write_raw_image(raw, raw_mib << 20)
        manifest["raw"] = dict(info, sha256=sha256_file(raw))
        manifest["files"].pop("raw", None)
        note(f"  disk.raw: {info} in {time.monotonic() - t0:.0f} s")
    if "raw" in missing:
        manifest["files"]["raw"] = {"file": "disk.raw", "size": raw.stat().st_size}
    tar = cache / "rootfs.tar"
    if any(BUILD[k][0] == "rootfs.tar" for k in missing if k in BUILD) and not tar.exists():
        t0 = time.monotonic()
        members = [m for m in TAR_MEMBERS if os.path.lexists("/" + m)]
        gen.finish(gen.job(["tar", "--numeric-owner", "-C", "/", "-cf", "-", *members], tar, "rootfs.tar"))
        manifest["tar"] = dict(tar_expectation(tar), size=tar.stat().st_size, members=members)
        for k in ("tar-xz", "tar-gz"):  # made from another tar: stale
            manifest["files"].pop(k, None)
            if k not in missing and k in keys:
                missing.append(k)
        note(f"  rootfs.tar: {tar.stat().st_size / MB:.0f} MB in {time.monotonic() - t0:.0f} s")
    save()

    def start(key: str):
        src, pre, post, to_stdout = BUILD[key]
        out = cache / INPUTS[key]["file"]
        if to_stdout:
            return gen.job([*pre, str(cache / src)], out, out.name), out, time.monotonic()
        tmp = out.with_name(out.name + ".tmp")
        argv = [*pre, str(cache / src), *[a.format(out=tmp) for a in post]]
        return gen.job(argv, None, out.name), out, time.monotonic()

    def done(key: str, job, out: Path, t0: float) -> None:
        gen.finish(job)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            os.replace(tmp, out)
        manifest["files"][key] = {"file": out.name, "size": out.stat().st_size}
        if key in ("xz-mt", "xz-st", "tar-xz"):
            manifest["xz"][key] = xz_blocks(out)
        save()
        note(f"  {out.name}: {out.stat().st_size / MB:.0f} MB in {time.monotonic() - t0:.0f} s")

    # The slowest job (single-threaded xz) runs beside all the others.
    slow = None
    if "xz-st" in missing:
        slow = start("xz-st")
    for key in missing:
        if key in BUILD and key != "xz-st":
            done(key, *start(key))
    if slow:
        done("xz-st", *slow)
    note(f"inputs ready in {time.monotonic() - t_all:.0f} s")
    return manifest


# --- processes: the daemons, and watching their memory -------------------------------


def proc_cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime, plus cutime+cstime (children waited for) if CHILDREN."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


class TreeSampler(threading.Thread):
    """Samples the RSS of a process's descendants every INTERVAL seconds:
    the peak VmHWM per command name and the peak of their summed VmRSS."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self._halt = threading.Event()
        self.child_hwm_kb: dict[str, int] = {}
        self.children_rss_peak_kb = 0
        self.daemon_hwm_kb = 0
        self.samples = 0

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        self.samples += 1
        total = 0
        own_name = proc_status(self.pid).get("Name")
        for child in descendants(self.pid):
            st = proc_status(child)
            if not st:
                continue
            name = st.get("Name", "?")
            if name == own_name:
                continue  # forked, not yet exec()ed: the daemon's own pages, shared
            hwm = kb(st.get("VmHWM"))
            total += kb(st.get("VmRSS"))
            if hwm > self.child_hwm_kb.get(name, 0):
                self.child_hwm_kb[name] = hwm
        self.children_rss_peak_kb = max(self.children_rss_peak_kb, total)
        self.daemon_hwm_kb = max(self.daemon_hwm_kb, kb(proc_status(self.pid).get("VmHWM")))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Daemons:
    """One importd at a time on the private bus: ours or the reference."""

    def __init__(self, env: dict[str, str], logdir: Path, problems: list[str]) -> None:
        from tests import world

        self.world = world
        self.env = env
        self.logdir = logdir
        self.problems = problems
        self.current = None
        self.who: str | None = None
        self.log_offset = 0

    def start(self, who: str) -> int:
        self.stop()
        self.wait_name_released()
        if who == "ours":
            log = self.logdir / "ours-importd.log"
            self.log_offset = log.stat().st_size if log.exists() else 0
            svc = self.world.Service(self.world.service_argv("importd", POOL), self.env, log)
            svc.start(timeout=60)  # READY=1 through NOTIFY_SOCKET
        else:
            svc = self.world.Service([REFERENCE], self.env, self.logdir / "reference-importd.log")
            svc.start(timeout=60, notify=False, bus_name=BUS_NAME)
        self.current, self.who = svc, who
        return svc.proc.pid

    @property
    def pid(self) -> int | None:
        if self.current and self.current.proc and self.current.proc.poll() is None:
            return self.current.proc.pid
        return None

    def wait_name_released(self) -> None:
        self.world.wait_for(lambda: not self.world.name_has_owner(self.env, BUS_NAME), 15,
                            f"{BUS_NAME} to be released", 0.05)

    def stop(self) -> None:
        if self.current is None:
            return
        svc, who = self.current, self.who
        self.current = self.who = None
        rc = svc.stop()
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


def machinectl(env: dict[str, str], *args: str, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(["machinectl", "--no-pager", *args], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, p


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> float:
    """syncfs() the file system at PATH; returns how long it took."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


# --- checking what was imported ------------------------------------------------------


def check_import(spec: dict, manifest: dict, name: str) -> tuple[bool, dict]:
    if spec["kind"] == "raw":
        path = POOL / f"{name}.raw"
        if not path.exists():
            return False, {"error": f"{path} missing"}
        st = path.stat()
        info = {"size": st.st_size, "allocated": st.st_blocks * 512}
        if st.st_size != manifest["raw"]["size"]:
            info["error"] = f"size {st.st_size}, expected {manifest['raw']['size']}"
            return False, info
        digest = sha256_file(path)
        if digest != manifest["raw"]["sha256"]:
            info["error"] = "content differs from disk.raw (SHA-256)"
            return False, info
        return True, info
    path = POOL / name
    if not path.is_dir():
        return False, {"error": f"{path} missing"}
    got = tree_summary(path)
    want = {k: manifest["tar"][k] for k in ("files", "dirs", "symlinks", "bytes")}
    info = dict(got, subvolume=os.stat(path).st_ino == 256)
    # The tar's own top directories (usr, usr/lib, ...) are directory entries too.
    ok = got["files"] == want["files"] and got["symlinks"] == want["symlinks"] and got["bytes"] == want["bytes"]
    if not ok:
        info["error"] = f"tree {got}, tar had {want}"
    return ok, info


# --- one timed import -----------------------------------------------------------------


class Profiler:
    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.binary = None
        if outdir:
            self.binary = shutil.which("py-spy") or ("/tmp/pyspy/bin/py-spy" if os.access("/tmp/pyspy/bin/py-spy", os.X_OK) else None)
            if not self.binary:
                raise SystemExit("--profile: py-spy not found (pip install --target /tmp/pyspy py-spy)")
            outdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int, label: str) -> None:
        if not self.binary:
            return
        out = self.outdir / f"{label}.txt"
        self.proc = subprocess.Popen([self.binary, "record", "-p", str(pid), "--idle", "--threads", "--rate", "200",
                                      "--format", "raw", "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

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


def one_import(key: str, spec: dict, who: str, r: int, pool_kind: str, ctx: dict) -> dict:
    daemons: Daemons = ctx["daemons"]
    env = ctx["env"]
    manifest = ctx["manifest"]
    path = ctx["cache"] / spec["file"]
    name = f"bench-{key}-{who[:3]}-{r}"
    pid = daemons.start(who)
    warm(path)
    sampler = TreeSampler(pid)
    cpu0 = proc_cpu_seconds(pid)
    load = os.getloadavg()[0]
    profiling = who == "ours" and ctx["profiler"].binary is not None
    if profiling:
        ctx["profiler"].start(pid, f"{pool_kind}-{key}-run{r}")
    sampler.start()
    cmd = "import-raw" if spec["kind"] == "raw" else "import-tar"
    try:
        dt, p = machinectl(env, cmd, str(path), name)
    finally:
        sampler.stop()
        ctx["profiler"].stop()
    # systemd-import 252 syncfs()es the pool before it reports success (--sync=yes is its default): how
    # long the data written takes to reach the disk after machinectl returned, for both alike.
    sync_after = syncfs(POOL)
    res: dict = {"who": who, "run": r, "seconds": dt, "sync_after_s": round(sync_after, 3), "rc": p.returncode,
                 "loadavg_1m": round(load, 2), "profiled": profiling}
    alive = daemons.pid == pid
    if alive:
        sampler.sample()
        res["cpu_seconds"] = round(proc_cpu_seconds(pid) - cpu0, 2)
        res["daemon_hwm_mb"] = round(kb(proc_status(pid).get("VmHWM")) * 1024 / MB, 1)
    else:
        res["daemon_hwm_mb"] = round(sampler.daemon_hwm_kb * 1024 / MB, 1)
        ctx["problems"].append(f"{pool_kind}/{key}/{who}: the daemon had exited by the end of the import")
    res["children_hwm_mb"] = {n: round(v * 1024 / MB, 1) for n, v in sampler.child_hwm_kb.items()}
    res["children_rss_peak_mb"] = round(sampler.children_rss_peak_kb * 1024 / MB, 1)
    daemons.stop()
    if p.returncode != 0:
        ctx["problems"].append(f"{pool_kind}/{key}/{who} run {r}: machinectl {cmd} failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-800:]}")
        res["ok"] = False
    elif (key, who, pool_kind) not in ctx["checked"]:
        ctx["checked"].add((key, who, pool_kind))
        ok, info = check_import(spec, manifest, name)
        res["check"] = info
        res["ok"] = ok
        if not ok:
            ctx["problems"].append(f"{pool_kind}/{key}/{who}: imported image is wrong: {info}")
    else:
        res["ok"] = True
        if spec["kind"] == "raw":
            st = (POOL / f"{name}.raw").stat() if (POOL / f"{name}.raw").exists() else None
            if st:
                res["check"] = {"size": st.st_size, "allocated": st.st_blocks * 512}
    t0 = time.monotonic()
    clear_pool(pool_kind)
    res["clear_s"] = round(time.monotonic() - t0, 2)
    return res


# --- report ------------------------------------------------------------------------------


def output_bytes(spec: dict, manifest: dict) -> int:
    return manifest["raw"]["size"] if spec["kind"] == "raw" else manifest["tar"]["size"]


def make_row(pool_kind: str, key: str, spec: dict, results: list[dict], manifest: dict) -> dict:
    ours = [x for x in results if x["who"] == "ours"]
    ref = [x for x in results if x["who"] == "reference"]
    so = stats([x["seconds"] for x in ours if x["ok"]])
    sr = stats([x["seconds"] for x in ref if x["ok"]])
    so_sync = stats([x["seconds"] + x["sync_after_s"] for x in ours if x["ok"]])
    sr_sync = stats([x["seconds"] + x["sync_after_s"] for x in ref if x["ok"]])
    out = output_bytes(spec, manifest)
    row = {
        "pool": pool_kind, "input": key, "file": spec["file"], "format": spec["fmt"],
        "input_bytes": manifest["files"][key]["size"], "output_bytes": out,
        "ours": so, "reference": sr,
        "ratio": so["median"] / sr["median"] if so.get("median") and sr.get("median") else None,
        "ratio_min": so["min"] / sr["min"] if so.get("min") and sr.get("min") else None,
        "ratio_cpu": None,
        "ours_with_sync": so_sync, "reference_with_sync": sr_sync,
        "ratio_with_sync": (so_sync["median"] / sr_sync["median"]
                            if so_sync.get("median") and sr_sync.get("median") else None),
        "ours_mbps": out / MB / so["median"] if so.get("median") else None,
        "reference_mbps": out / MB / sr["median"] if sr.get("median") else None,
        "ours_cpu_s": _median([x["cpu_seconds"] for x in ours if "cpu_seconds" in x]),
        "reference_cpu_s": _median([x["cpu_seconds"] for x in ref if "cpu_seconds" in x]),
        "ours_daemon_hwm_mb": max((x["daemon_hwm_mb"] for x in ours), default=None),
        "ours_children_hwm_mb": merge_max([x["children_hwm_mb"] for x in ours]),
        "reference_daemon_hwm_mb": max((x["daemon_hwm_mb"] for x in ref), default=None),
        "reference_children_hwm_mb": merge_max([x["children_hwm_mb"] for x in ref]),
        "runs": results,
    }
    if row["ours_cpu_s"] and row["reference_cpu_s"]:
        row["ratio_cpu"] = row["ours_cpu_s"] / row["reference_cpu_s"]
    kind, limit = spec["target"]
    row["target"] = {"kind": kind, "limit": limit}
    if kind == "ratio":
        row["pass"] = None if row["ratio"] is None else row["ratio"] <= limit
        row["target_text"] = f"ratio <= {limit:.1f}"
    else:
        row["pass"] = row["ours_mbps"] is not None and row["ours_mbps"] >= limit
        row["target_text"] = f">= {limit:.0f} MB/s"
    row["profiled"] = any(x.get("profiled") for x in ours)
    return row


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = ("pool", "input", "ours s", "ref s", "ratio", "ours MB/s", "ref MB/s", "ratio+sync", "ratio min",
            "ours CPU s", "ref CPU s", "CPU ratio", "ours RSS MB", "ours children MB", "ref children MB", "target",
            "result")
    lines = []
    for r in rows:
        ch = r["ours_children_hwm_mb"]
        rch = {k: v for k, v in r["reference_children_hwm_mb"].items()}
        lines.append((
            r["pool"], r["input"], fmt(r["ours"].get("median")), fmt(r["reference"].get("median")),
            fmt(r["ratio"], ".2f", "x"), fmt(r["ours_mbps"], ".0f"), fmt(r["reference_mbps"], ".0f"),
            fmt(r["ratio_with_sync"], ".2f", "x"), fmt(r["ratio_min"], ".2f", "x"),
            fmt(r["ours_cpu_s"], ".1f"), fmt(r["reference_cpu_s"], ".1f"), fmt(r["ratio_cpu"], ".2f", "x"),
            fmt(r["ours_daemon_hwm_mb"], ".0f"),
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(ch.items())) or "-",
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(rch.items())) or "-",
            r["target_text"], {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]] + (" (profiled)" if r["profiled"] else ""),
        ))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt_line = "  ".join(f"{{:{'<' if i < 2 or i >= 13 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt_line.format(*head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print(fmt_line.format(*line), file=out)


def code_state() -> dict:
    """Which code was measured: HEAD, the changed files, and a digest of the daemon's sources."""
    out: dict = {}
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    out["head"] = r.stdout.strip() or None
    r = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "importd", "imagepool"],
                       capture_output=True, text=True)
    out["changed"] = [line[3:] for line in r.stdout.splitlines()]
    h = hashlib.sha256()
    for d in ("importd", "imagepool"):
        for f in sorted((REPO / d).glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    out["sources_sha256"] = h.hexdigest()[:16]
    return out


def reference_probe_zstd(ctx: dict, pool_kind: str) -> str:
    """What systemd-import 252 makes of a .zst (untimed, once)."""
    daemons: Daemons = ctx["daemons"]
    path = ctx["cache"] / INPUTS["zst"]["file"]
    name = "bench-zst-probe"
    daemons.start("reference")
    try:
        dt, p = machinectl(ctx["env"], "import-raw", str(path), name)
    finally:
        daemons.stop()
    out = POOL / f"{name}.raw"
    if p.returncode != 0:
        text = f"machinectl import-raw failed ({p.returncode}) after {dt:.1f} s: {(p.stderr or p.stdout).strip()[-300:]}"
    elif out.exists():
        st = out.stat()
        same = st.st_size == path.stat().st_size
        text = (f"exit 0 after {dt:.1f} s, wrote a {st.st_size} byte image "
                f"({'the compressed bytes as they are' if same else 'not the decompressed disk'})")
    else:
        text = f"exit 0 after {dt:.1f} s but no image"
    clear_pool(pool_kind)
    return text


# --- main ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run per input and daemon (about 5 minutes)")
    ap.add_argument("--runs", type=int, help="runs per input and daemon (default 5, --quick 1)")
    ap.add_argument("--json", metavar="FILE", help="write the JSON results here instead of to stdout")
    ap.add_argument("--pool", default="btrfs", help="comma-separated pool kinds: btrfs, plain (default: %(default)s)")
    ap.add_argument("--inputs", default=",".join(INPUTS), help="comma-separated inputs (default: all: %(default)s)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the inputs are kept (default: %(default)s)")
    ap.add_argument("--regen", action="store_true", help="generate the inputs again")
    ap.add_argument("--raw-mib", type=int, default=RAW_SIZE >> 20,
                    help="size of the raw disk image in MiB, a multiple of 8 (default %(default)s; smaller only for "
                         "smoke tests, with another --cache)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes (host file system)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here at the end")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record our importd during its imports (raw stacks in DIR)")
    ap.add_argument("--ours-only", action="store_true", help="do not run the reference")
    args = ap.parse_args()
    kinds = [k for k in args.pool.split(",") if k]
    if not kinds or any(k not in ("btrfs", "plain") for k in kinds):
        ap.error("--pool: btrfs and/or plain")
    keys = [k for k in args.inputs.split(",") if k]
    if any(k not in INPUTS for k in keys):
        ap.error(f"--inputs: choose from {', '.join(INPUTS)}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs:
        cfg["runs"] = args.runs

    enter_private_mount_namespace()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = time.monotonic()
    load_start = host_load()
    code_start = code_state()
    cleanups = Cleanups()
    problems: list[str] = []
    notes: list[str] = []
    rows: list[dict] = []
    manifest: dict = {}
    have_ref = os.access(REFERENCE, os.X_OK) and os.access(REFERENCE_WORKER, os.X_OK) and not args.ours_only
    if not have_ref and not args.ours_only:
        notes.append(f"{REFERENCE} or {REFERENCE_WORKER} is missing: only our importd was measured")
        note(notes[-1])
    interrupted = failed = False
    bench_started = None
    try:
        cache = Path(args.cache)
        manifest = generate(cache, args.regen, keys, args.raw_mib, cleanups)
        bench_started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="importd-bench-", dir=args.workdir))
        cleanups.push(f"remove {workdir}", lambda: rm_tree(workdir))
        logdir = workdir / "logs"
        logdir.mkdir()
        if args.keep_logs:
            keep = Path(args.keep_logs)
            cleanups.push("keep logs", lambda: shutil.copytree(logdir, keep, dirs_exist_ok=True))
        setup_namespace(cleanups)

        from tests import world

        bus = world.PrivateBus(Path("/run/systemd/bench-bus")).start()
        cleanups.push("stop dbus-daemon", bus.stop)
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(REPO))
        daemons = Daemons(env, logdir, problems)
        cleanups.push("stop importd", daemons.stop)
        profiler = Profiler(Path(args.profile) if args.profile else None)
        cleanups.push("stop py-spy", profiler.stop)
        if args.profile:
            notes.append(f"our importd was profiled with py-spy during its imports: its times are perturbed "
                         f"(stacks in {args.profile})")
        ctx = {"daemons": daemons, "env": env, "manifest": manifest, "cache": cache, "problems": problems,
               "checked": set(), "profiler": profiler}

        for pool_kind in kinds:
            try:
                handle = mount_pool(pool_kind, workdir, cleanups, before=lambda: (profiler.stop(), daemons.stop()))
            except subprocess.CalledProcessError as e:
                problems.append(f"could not set up the {pool_kind} pool ({e}); skipped")
                note(problems[-1])
                continue
            note(f"{pool_kind} pool mounted at {POOL}")
            for key in keys:
                spec = INPUTS[key]
                who_all = ["ours", "reference"] if (spec["ref"] and have_ref) else ["ours"]
                results: list[dict] = []
                for r in range(cfg["runs"]):
                    order = who_all if r % 2 == 0 else who_all[::-1]
                    for who in order:
                        res = one_import(key, spec, who, r, pool_kind, ctx)
                        results.append(res)
                        ch = ", ".join(f"{k} {v:.0f}" for k, v in sorted(res["children_hwm_mb"].items()))
                        note(f"{pool_kind} {key} run {r + 1} {who}: {res['seconds']:.2f} s"
                             f"{'' if res['ok'] else ' FAILED'}, cpu {res.get('cpu_seconds', '-')} s, "
                             f"daemon HWM {res['daemon_hwm_mb']:.0f} MB{', children ' + ch + ' MB' if ch else ''}"
                             f", load {res['loadavg_1m']}")
                row = make_row(pool_kind, key, spec, results, manifest)
                rows.append(row)
                note(f"{pool_kind} {key}: ours {fmt(row['ours'].get('median'))} s, reference "
                     f"{fmt(row['reference'].get('median'))} s, ratio {fmt(row['ratio'])}, "
                     f"{ {True: 'PASS', False: 'FAIL', None: 'n/a'}[row['pass']]}")
            if "zst" in keys and have_ref and not args.quick:
                text = reference_probe_zstd(ctx, pool_kind)
                notes.append(f"{pool_kind}: systemd-import 252 given disk.raw.zst: {text}")
                note(notes[-1])
            cleanups.run_now(handle)
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

    code_end = code_state()
    if code_end["sources_sha256"] != code_start["sources_sha256"]:
        problems.append(f"the sources of importd/imagepool changed while the benchmark ran "
                        f"({code_start['sources_sha256']} -> {code_end['sources_sha256']}, HEAD {code_start['head']} "
                        f"-> {code_end['head']}): later runs measured other code")
    elapsed = time.monotonic() - started
    bench_elapsed = time.monotonic() - bench_started if bench_started else None
    load_end = host_load()
    busy = max(load_start["loadavg"][0], load_end["loadavg"][0]) > 0.5 * (os.cpu_count() or 1)
    if busy:
        notes.append(f"the machine had other work (load average {load_start['loadavg'][0]} at start, "
                     f"{load_end['loadavg'][0]} at end, on {os.cpu_count()} CPUs): wall times are noisy")

    ours_hwm = max((r["ours_daemon_hwm_mb"] for r in rows if r["ours_daemon_hwm_mb"] is not None), default=None)
    rss = {
        "ours_importd_peak_mb": ours_hwm,
        "target_mb": RSS_TARGET_MB,
        "pass": ours_hwm is not None and ours_hwm <= RSS_TARGET_MB,
        "ours_children_peak_mb": merge_max([r["ours_children_hwm_mb"] for r in rows]),
        "reference_importd_peak_mb": max((r["reference_daemon_hwm_mb"] for r in rows
                                          if r["reference_daemon_hwm_mb"] is not None), default=None),
        "reference_children_peak_mb": merge_max([r["reference_children_hwm_mb"] for r in rows]),
    }

    print()
    print(f"importd local-import benchmark ({'quick' if args.quick else 'full'}, {cfg['runs']} run(s) per daemon), "
          f"{os.cpu_count()} CPUs, {elapsed:.0f} s"
          f"{f' ({bench_elapsed:.0f} s measuring)' if bench_elapsed else ''}"
          f"{' - INTERRUPTED, partial results' if interrupted else ''}{' - FAILED, partial results' if failed else ''}")
    print("times: wall time of the whole machinectl import-raw/import-tar command (median); MB/s: decompressed "
          "output (raw: the virtual disk; tar: the tar stream) per second; CPU s: daemon + children, utime+stime; "
          "RSS: VmHWM of our importd; children: peak VmHWM per command name; ratio+sync: with the time a "
          "syncfs() of the pool takes right after machinectl returns added to both (systemd-import 252 syncs "
          "before it finishes, so its own is ~0); ratio min: best run / best run (less sensitive to other load); "
          "CPU ratio: median CPU seconds ours / reference (the least sensitive to other load); "
          "PASS/FAIL: on the median wall times")
    print_table(rows)
    print(f"our importd peak RSS: {fmt(ours_hwm, '.1f')} MB (target <= {RSS_TARGET_MB:.0f} MB): "
          f"{'PASS' if rss['pass'] else 'FAIL'}; its children: "
          f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['ours_children_peak_mb'].items())) or '-'}; "
          f"reference: systemd-importd {fmt(rss['reference_importd_peak_mb'], '.1f')} MB, children "
          f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['reference_children_peak_mb'].items())) or '-'}")
    verdicts = [v for v in [r["pass"] for r in rows] + [rss["pass"]] if v is not None]
    print(f"targets: {sum(verdicts)} of {len(verdicts)} met")
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
        "code": {"start": code_start, "end": code_end},
        "config": cfg,
        "pools": kinds,
        "inputs": manifest,
        "timing_method": "wall time of `machinectl --no-pager import-raw|import-tar FILE NAME` (returns when the "
                         "transfer is done), input warmed with cat before each run; daemons restarted per run and "
                         "alternated, order flipped every run; image deleted, sync and btrfs subvolume sync between "
                         "runs (untimed)",
        "results": rows,
        "rss": rss,
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
