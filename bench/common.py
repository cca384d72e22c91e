"""What the benchmarks share: a private mount namespace with its own
/run/systemd, ordered clean-ups, one ``Session`` per benchmark run (signals,
work directory, private bus, notes and problems, the JSON report), the pool
at /var/lib/machines, process and statistics helpers, and the table printer.

The daemons themselves (ours, systemd 252's, systemd 262's chrooted into the
sid root) are started and measured by ``bench/daemons.py``; the inputs of
the import and pull benchmarks are made by ``bench/inputs.py``, the
machine's limits measured by ``bench/limits.py``, py-spy run by
``bench/profiling.py``.

Session API (one per benchmark run)::

    ap = argparse.ArgumentParser(...); add_common_args(ap)   # --quick --json --workdir --keep-logs --refs --ours-only
    s = Session(args)          # enters the private mount namespace, SIGTERM/SIGHUP -> KeyboardInterrupt
    with s.guard():            # Ctrl-C, SIGTERM and errors end up in s.interrupted / s.failed / s.problems
        workdir, logdir, env = s.private_world("prefix-", sid)   # work dir, /run/systemd tmpfs, bus, sid root
        ...
    print(s.title("importd pull benchmark", "..."))
    return s.report({...})     # the JSON (stdout or --json FILE), the exit status
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import stat
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

from imagepool import dev as world  # noqa: E402
from imagepool import fsutil, syscalls  # noqa: E402

POOL = Path("/var/lib/machines")
IMAGE_PREFIX = Path("/run/systemd/bench-images")  # our services' other image classes (in the private /run/systemd)
MB = 1_000_000
MiB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _script() -> str:
    return "bench/" + os.path.basename(sys.argv[0])


def note(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


# --- the private world -----------------------------------------------------------


def enter_private_mount_namespace() -> None:
    """unshare(CLONE_NEWNS) while single-threaded (it fails with EINVAL once
    threads share our fs_struct), then make every mount private."""
    if os.geteuid() != 0:
        raise SystemExit(f"{_script()} must run as root (it mounts file systems)")
    if threading.active_count() != 1:
        raise SystemExit(f"{_script()}: not single-threaded, cannot unshare the mount namespace")
    syscalls.private_mount_namespace()


class Cleanups:
    """Undo actions, run in reverse order; one failing doesn't stop the rest."""

    def __init__(self) -> None:
        self._items: list[tuple[int, str, object]] = []
        self._next = 0

    def push(self, what: str, fn) -> int:
        self._next += 1
        self._items.append((self._next, what, fn))
        return self._next

    def run_now(self, handle: int) -> None:
        for i, (h, what, fn) in enumerate(self._items):
            if h == handle:
                del self._items[i]
                self._call(what, fn)
                return

    @staticmethod
    def _call(what: str, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - keep cleaning up whatever happens
            note(f"cleanup '{what}' failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        while self._items:
            _, what, fn = self._items.pop()
            self._call(what, fn)


def umount(path: str | Path, recursive: bool = False) -> None:
    """imagepool.dev.umount; if the mount is busy, detached lazily instead."""
    try:
        if recursive:
            run(["umount", "-R", str(path)], capture_output=True, text=True)
        else:
            world.umount(Path(path))
    except subprocess.CalledProcessError as e:
        note(f"umount {path}: {(e.stderr or '').strip() or e}; detaching lazily")
        run(["umount", "-l", *(["-R"] if recursive else []), str(path)])


def rm_tree(path: Path) -> None:
    if not os.path.lexists(path):
        return
    if subprocess.run(["rm", "-rf", "--", str(path)], stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["chattr", "-R", "-f", "-i", "-a", str(path)], stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def setup_namespace(cleanups: Cleanups) -> None:
    os.makedirs("/run/systemd", exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/systemd"])
    cleanups.push("umount /run/systemd", lambda: umount("/run/systemd"))
    for sub in ("system", "machines"):
        os.makedirs(f"/run/systemd/{sub}", exist_ok=True)
    if os.path.isdir("/etc/systemd/nspawn"):
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/etc/systemd/nspawn"])
        cleanups.push("umount /etc/systemd/nspawn", lambda: umount("/etc/systemd/nspawn"))
    if not POOL.exists():
        POOL.mkdir(parents=True)
        cleanups.push(f"rmdir {POOL}", lambda: POOL.rmdir())


# --- one benchmark run -----------------------------------------------------------


def add_common_args(ap, quick_help: str = "fewer rounds and runs") -> None:
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", metavar="FILE", help="write the JSON results here instead of to stdout")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes (host file system)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here at the end")
    ap.add_argument("--refs", default="252,262",
                    help="the references to run: 252 (the host's systemd), 262 (sid's, chrooted), both "
                         "(default: %(default)s), or none")
    ap.add_argument("--ours-only", action="store_true", help="do not run the references (--refs none)")


class Session:
    """The frame of one benchmark run; see the module docstring."""

    def __init__(self, args) -> None:
        self.args = args
        self.mode = "quick" if getattr(args, "quick", False) else "full"
        enter_private_mount_namespace()

        def on_term(signum, _frame):
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, on_term)
        self.cleanups = Cleanups()
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.measuring_from: float | None = None
        self.load_start = host_load()
        self.load_end: dict | None = None
        self.interrupted = self.failed = False
        self.ended: float | None = None

    def refs(self) -> list[str]:
        """The references asked for: a subset of ["252", "262"]."""
        if getattr(self.args, "ours_only", False):
            return []
        want = [r.strip() for r in (getattr(self.args, "refs", "") or "").split(",") if r.strip()]
        if want in (["none"], []):
            return []
        bad = [r for r in want if r not in ("252", "262")]
        if bad:
            raise SystemExit(f"--refs: 252 and/or 262, or none (not {', '.join(bad)})")
        return want

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except KeyboardInterrupt as e:
            self.interrupted = True
            note(f"interrupted ({str(e) or 'Ctrl-C'}); cleaning up")
        except Exception:  # noqa: BLE001 - report what we have, then fail
            self.failed = True
            self.problems.append("benchmark aborted:\n" + traceback.format_exc())
            note(self.problems[-1])
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.cleanups.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.ended = time.monotonic()
            self.load_end = host_load()

    def workdir(self, prefix: str) -> tuple[Path, Path]:
        """A temporary directory (removed at the end) and its logs/ (copied to --keep-logs)."""
        workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.args.workdir))
        self.cleanups.push(f"remove {workdir}", lambda: rm_tree(workdir))
        logdir = workdir / "logs"
        logdir.mkdir()
        if self.args.keep_logs:
            keep = Path(self.args.keep_logs)
            self.cleanups.push("keep logs", lambda: shutil.copytree(logdir, keep, dirs_exist_ok=True))
        return workdir, logdir

    def start_bus(self) -> world.PrivateBus:
        """The private system bus, in /run/systemd (setup_namespace first); also our own address."""
        bus = world.PrivateBus(Path("/run/systemd/bench-bus")).start()
        self.cleanups.push("stop dbus-daemon", bus.stop)
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address  # for in-process sd-bus clients
        return bus

    def private_world(self, prefix: str, sid=None, pool: str | None = None) -> tuple[Path, Path, dict[str, str]]:
        """The usual start: work directory and logs, the namespace's tmpfs, a
        pool of kind POOL (if given; btrfs 12G), the private bus, the sid root
        (SID, a daemons.SidRoot, if given).  Returns (workdir, logdir, env)."""
        workdir, logdir = self.workdir(prefix)
        setup_namespace(self.cleanups)
        if pool:
            mount_pool(pool, workdir, self.cleanups, "12G")
            note(f"{pool} pool mounted at {POOL}")
        bus = self.start_bus()
        if sid is not None:
            sid.setup(self.cleanups)
        return workdir, logdir, clean_env(bus.address)

    def start_measuring(self) -> None:
        self.measuring_from = time.monotonic()

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def measuring(self) -> float | None:
        return (self.ended or time.monotonic()) - self.measuring_from if self.measuring_from else None

    def busy_note(self, what: str = "wall times are noisy") -> None:
        end = self.load_end or host_load()
        if max(self.load_start["loadavg"][0], end["loadavg"][0]) > 0.5 * (os.cpu_count() or 1):
            self.notes.append(f"the machine had other work (load average {self.load_start['loadavg'][0]} at start, "
                              f"{end['loadavg'][0]} at end, on {os.cpu_count()} CPUs): {what}")

    def title(self, what: str, detail: str = "") -> str:
        m = self.measuring
        return (f"{what} ({self.mode}{', ' + detail if detail else ''}), {os.cpu_count()} CPUs, {self.elapsed:.0f} s"
                f"{f' ({m:.0f} s measuring)' if m else ''}"
                f"{' - INTERRUPTED, partial results' if self.interrupted else ''}"
                f"{' - FAILED, partial results' if self.failed else ''}")

    def print_notes(self) -> None:
        for n in self.notes:
            print(f"note: {n}")
        for p in self.problems:
            print(f"problem: {p}")

    def report(self, fields: dict) -> int:
        """Writes the JSON results (to --json FILE, or stdout); returns the exit status."""
        result = {
            "mode": self.mode,
            "interrupted": self.interrupted,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed, 1),
            "measuring_s": round(self.measuring, 1) if self.measuring else None,
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                     "load_start": self.load_start, "load_end": self.load_end or host_load()},
            **fields,
            "notes": self.notes,
            "problems": self.problems,
        }
        text = json.dumps(result, indent=2, default=_json_default)
        if self.args.json:
            Path(self.args.json).write_text(text + "\n")
            print(f"JSON results written to {self.args.json}")
        else:
            print(text)
        return 130 if self.interrupted else 1 if self.failed else 0


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def code_state() -> dict:
    """Which code was measured (others may be editing it): HEAD, the changed
    files of the product, and a digest of its sources."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    h = hashlib.sha256()
    for d in ("importd", "imagepool", "machined"):
        for f in sorted((REPO / d).rglob("*.py")):
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return {"head": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in git("status", "--short", "--", "importd", "imagepool", "machined")
                         .splitlines()],
            "sources_sha256": h.hexdigest()[:16]}


def clean_env(bus_address: str) -> dict[str, str]:
    """Our environment for the daemons and clients: the private bus, no proxies."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(DBUS_SYSTEM_BUS_ADDRESS=bus_address, PYTHONPATH=str(REPO), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    return env


def ensure_tool(binary: str, packages: tuple[str, ...], notes: list[str], what: str) -> str:
    """The path of BINARY; apt-get installs the first of PACKAGES that works if
    it is missing (services the package would start are kept from starting)."""
    found = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                          if os.access(p, os.X_OK)), None)
    if found:
        return found
    note(f"{binary} is missing: apt-get install -y {packages[0]} ({what})")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = None
    try:
        for pkg in packages:
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                                 if os.access(p, os.X_OK)), None)
            if r.returncode == 0 and path:
                notes.append(f"installed {pkg} with apt-get install -y {pkg} ({what})")
                note(notes[-1])
                return path
        raise RuntimeError(f"could not install {binary}: {(r.stderr if r else '').strip()[-500:]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


# --- the pool ----------------------------------------------------------------------


def mount_pool(kind: str, workdir: Path, cleanups: Cleanups, size: str = "12G", before=lambda: None) -> int:
    """Mount a fresh pool of KIND (btrfs: imagepool.dev.mount_btrfs on a sparse
    loop file; plain: a directory under WORKDIR bind-mounted) at
    /var/lib/machines; returns the cleanup handle.  BEFORE runs first when it
    is undone (it stops what uses the pool)."""
    if kind == "btrfs":
        image = workdir / "pool.btrfs"
        world.mount_btrfs(image, POOL, size)

        def undo() -> None:
            before()
            umount(POOL)
            image.unlink(missing_ok=True)

        return cleanups.push("umount btrfs pool", undo)
    plain = workdir / "plain-pool"
    plain.mkdir(mode=0o700)
    run(["mount", "--bind", str(plain), str(POOL)])

    def undo_plain() -> None:
        before()
        umount(POOL)
        rm_tree(plain)

    return cleanups.push("umount plain pool", undo_plain)


def is_subvolume(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and os.stat(path).st_ino == 256


def delete_subvolume(path: Path) -> None:
    subprocess.run(["btrfs", "property", "set", "-ts", str(path), "ro", "false"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # --commit-after: the cleaner starts now, not at the next periodic commit (up to 30 s later).
    r = subprocess.run(["btrfs", "subvolume", "delete", "--commit-after", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        rm_tree(path)
        if path.exists():
            subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=True, stdout=subprocess.DEVNULL)


def clear_pool(kind: str = "btrfs", keep: tuple[str, ...] = ()) -> list[str]:
    """Delete everything in the pool but KEEP (images, the hidden download
    caches .raw-*/.tar-*, leftover temporaries); subvolumes with ``btrfs
    subvolume delete``.  Then sync, and on btrfs wait for the cleaner.
    Returns what was removed."""
    removed = []
    for entry in sorted(os.listdir(POOL)):
        if entry in keep:
            continue
        path = POOL / entry
        removed.append(entry)
        if kind == "btrfs" and is_subvolume(path):
            delete_subvolume(path)
        else:
            subprocess.run(["chattr", "-f", "-i", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rm_tree(path)
    os.sync()
    if kind == "btrfs":
        # BTRFS_IOC_SYNC also wakes the transaction kthread, which pokes the cleaner: without it,
        # `btrfs subvolume sync` waits up to the 30 s commit interval for deleted subvolumes.
        subprocess.run(["btrfs", "filesystem", "sync", str(POOL)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["btrfs", "subvolume", "sync", str(POOL)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    os.sync()  # the loop file's pages, written back by the first sync
    leftover = [e for e in os.listdir(POOL) if e not in keep]
    if leftover:
        raise RuntimeError(f"could not empty the pool: {leftover}")
    return removed


def syncfs(path: Path) -> float:
    """syncfs() the file system at PATH; returns how long it took."""
    t0 = time.perf_counter()
    fsutil.syncfs(str(path))
    return time.perf_counter() - t0


def tree_summary(root: Path) -> dict:
    """Counts of files, directories, symlinks and the bytes of the files below ROOT."""
    files = dirs = links = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:  # symlinks to directories are in dirnames
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                links += 1
            elif stat.S_ISDIR(st.st_mode):
                dirs += 1
            else:
                files += 1
                nbytes += st.st_size
    return {"files": files, "dirs": dirs, "symlinks": links, "bytes": nbytes}


def machinectl(env: dict[str, str], *args: str, timeout: float = 900
               ) -> tuple[float, subprocess.CompletedProcess | None]:
    """Wall time of a machinectl command; (elapsed, None) if it timed out (it is killed)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["machinectl", "--no-pager", *args], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None
    return time.perf_counter() - t0, p


# --- processes ---------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime, plus cutime+cstime (children waited for) if CHILDREN."""
    fields = proc_stat(pid)
    if not fields:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def kb(v: str | None) -> int:
    return int(v.split()[0]) if v else 0


def descendants(pid: int) -> list[int]:
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def process_snapshot(pid: int) -> list[dict]:
    """State of PID and its descendants (for hang reports, and to find leftovers)."""
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


# --- statistics and output ------------------------------------------------------------


def stats(samples: list[float], digits: int = 3) -> dict:
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    return {"n": len(s), "median": statistics.median(s), "mean": statistics.fmean(s), "min": s[0], "max": s[-1],
            "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
            "samples": [round(x, digits) for x in samples]}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def lat_stats(samples: list[float]) -> dict:
    """p50/p99/max/mean in milliseconds of latencies in seconds."""
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "p50_ms": round(pct(samples, 0.5) * 1e3, 2),
            "p99_ms": round(pct(samples, 0.99) * 1e3, 2), "max_ms": round(max(samples) * 1e3, 2),
            "mean_ms": round(statistics.fmean(samples) * 1e3, 2)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def merge_max(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return out


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def verdict(v: bool | None, none: str = "n/a") -> str:
    return none if v is None else "PASS" if v else "FAIL"


def print_table(head: tuple[str, ...], lines: list[tuple], left=(0, 1), out=sys.stdout) -> None:
    """Columns aligned; those in LEFT (indices) left-aligned, the rest right-aligned."""
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt_line = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt_line.format(*head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print(fmt_line.format(*[str(x) for x in line]), file=out)


def goal(what: str, measured: str, target: str, ok: bool | None) -> dict:
    """One row of a goals table."""
    return {"goal": what, "measured": measured, "target": target, "pass": ok}


def print_goals(goals: list[dict], out=sys.stdout) -> None:
    print("goals:", file=out)
    print_table(("goal", "measured", "target", "result"),
                [(g["goal"], g["measured"], g["target"], verdict(g["pass"])) for g in goals], left=(0, 1, 2), out=out)
    judged = [g["pass"] for g in goals if g["pass"] is not None]
    print(f"goals: {sum(judged)} of {len(judged)} met"
          f"{f' ({len(goals) - len(judged)} not measured)' if len(judged) < len(goals) else ''}", file=out)


def host_load() -> dict:
    out: dict = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        out["cpu_pressure_some"] = {k: float(v) for k, v in (f.split("=") for f in some.split()[1:4])}
    except (OSError, IndexError, ValueError):
        pass
    return out


def warm(path: Path) -> None:
    run(["cat", str(path)], stdout=subprocess.DEVNULL)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
