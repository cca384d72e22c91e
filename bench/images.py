#!/usr/bin/env python3
"""Benchmark our machined against systemd-machined 252 on the same image pools.

    cd /work/main && .venv/bin/python bench/images.py [--quick] [--json FILE]

Run as root.  The benchmark first moves itself into a private mount namespace
(unshare(CLONE_NEWNS) while still single-threaded, then ``mount
--make-rprivate /``), puts a tmpfs on /run/systemd (with ``system/`` in it, so
machinectl believes it runs under systemd) and on /etc/systemd/nspawn, and
starts a private system-type dbus-daemon whose socket lives in that tmpfs.
Nothing of the host's /run/systemd or /var/lib/machines is seen or changed.

For each pool kind, mounted at /var/lib/machines (the reference's pool path is
fixed there):

  btrfs  a fresh btrfs on a sparse loop file (tests.world.mount_btrfs)
  plain  a directory on the host file system (ext4) under a temporary
         directory, bind-mounted there

it measures

  1. ListImages with 1000 images in the pool (btrfs: mostly subvolumes plus
     some directories and .raw files; plain: directories and .raw files):
     the wall time of one org.freedesktop.machine1.Manager.ListImages call,
     made by an in-process sd-bus client (the sdbus binding's low-level
     SdBus.call: the request message is built before the clock starts and
     the reply is not unpacked inside the timed region, so neither process
     start-up nor client-side parsing is measured; only the round trip
     client -> dbus-daemon -> machined -> dbus-daemon -> client).  Also the
     wall time of a whole ``machinectl list-images`` command (process
     start-up included, for both daemons alike), and the CPU time the daemon
     spends per ListImages call (from /proc/PID/stat).
  2. ``machinectl clone bigsrc NAME`` of a 1 GiB directory image (~2000
     files of random data of varying sizes plus ~2000 small files, symlinks,
     ~200 directories), timed as a whole command.  On btrfs the source is a
     subvolume (so the clone is a snapshot), on plain a directory (so the
     clone is a full copy).  Each clone is checked and then removed with
     ``machinectl remove`` (not timed), followed by ``sync``.

Only one daemon can own org.freedesktop.machine1 at a time, so the daemons
alternate in blocks: start ours, k calls, stop; start the reference, k calls,
stop; and so on for several rounds, with the order flipped every round.  Each
block begins with an untimed warm-up call.  Medians are reported, and the
ratio ours/reference.

If /lib/systemd/systemd-machined is missing, only ours runs (and the report
says so).  A table goes to stdout, then the results as JSON (or to --json
FILE).  Progress goes to stderr.  Everything started is stopped by PID and
everything mounted is unmounted, also on errors and Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POOL = Path("/var/lib/machines")
REFERENCE = "/lib/systemd/systemd-machined"
BUS_NAME = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER_IFACE = "org.freedesktop.machine1.Manager"
SOURCE = "bigsrc"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

FULL = dict(images=1000, list_rounds=6, list_calls=40, mc_calls=10, clone_runs=7)
QUICK = dict(images=1000, list_rounds=2, list_calls=15, mc_calls=4, clone_runs=2)
BIG_TOTAL = 1 << 30
BIG_FILES = 2000
SMALL_FILES = 2000


from common import (  # noqa: E402
    Cleanups,
    enter_private_mount_namespace,
    host_load,
    note,
    rm_tree,
    run,
    setup_namespace,
    umount,
)


class Client:
    """A blocking sd-bus connection of our own (sdbus low-level API)."""

    def __init__(self) -> None:
        import sdbus

        self.bus = sdbus.sd_bus_open_system()
        try:
            self.bus.method_call_timeout_usec = 300 * 1_000_000
        except (AttributeError, TypeError):
            pass

    def _call(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args):
        msg = self.bus.new_method_call_message(dest, path, iface, member)
        if sig:
            msg.append_data(sig, *args)
        return self.bus.call(msg)

    def owner_pid(self, name: str) -> int | None:
        try:
            reply = self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                               "GetConnectionUnixProcessID", "s", name)
        except Exception:  # noqa: BLE001 - NameHasNoOwner
            return None
        return int(reply.get_contents())

    def list_images_timed(self) -> tuple[float, object]:
        msg = self.bus.new_method_call_message(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListImages")
        t0 = time.perf_counter()
        reply = self.bus.call(msg)
        return time.perf_counter() - t0, reply


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class Daemons:
    """One machined at a time on the private bus: ours or the reference."""

    def __init__(self, client: Client, env: dict[str, str], logdir: Path, problems: list[str]) -> None:
        from tests import world

        self.world = world
        self.client = client
        self.env = env
        self.logdir = logdir
        self.problems = problems
        self.current = None
        self.who: str | None = None

    def argv(self, who: str) -> list[str]:
        if who == "ours":
            return self.world.service_argv("machined", POOL)
        return [REFERENCE]

    def start(self, who: str) -> int:
        self.stop()
        svc = self.world.Service(self.argv(who), self.env, self.logdir / f"{who}.log")
        # No readiness protocol of either kind: wait for the bus name to be
        # owned by exactly this process (the same test for both daemons).
        svc.start(notify=False)
        self.current, self.who = svc, who
        pid = svc.proc.pid
        deadline = time.monotonic() + 120
        while self.client.owner_pid(BUS_NAME) != pid:
            if svc.proc.poll() is not None:
                self.current = None
                raise RuntimeError(f"{who} machined exited with {svc.proc.returncode} at start-up; "
                                   f"see {self.logdir / (who + '.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{who} machined did not take {BUS_NAME}")
            time.sleep(0.02)
        return pid

    def ensure(self, who: str) -> int:
        """The reference exits after 30 s idle: start it again if it did."""
        if self.who == who and self.current and self.current.proc and self.current.proc.poll() is None:
            return self.current.proc.pid
        if self.who == who and self.current and self.current.proc:
            note(f"{who} machined had exited (rc {self.current.proc.returncode}); starting it again")
            self.current.proc = None
        return self.start(who)

    @property
    def pid(self) -> int:
        return self.current.proc.pid

    def stop(self) -> None:
        if self.current is None:
            return
        svc, who = self.current, self.who
        self.current = self.who = None
        rc = svc.stop()
        if who == "ours" and rc not in (0, None):
            self.problems.append(f"our machined exited with status {rc} when stopped")
        deadline = time.monotonic() + 10
        while self.client.owner_pid(BUS_NAME) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{BUS_NAME} still owned after stopping {who}")
            time.sleep(0.02)


def machinectl(env: dict[str, str], *args: str, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(["machinectl", "--no-pager", *args], env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, p


# --- pools and images ------------------------------------------------------------


def mount_pool(kind: str, workdir: Path, cleanups: Cleanups) -> int:
    """Mount a fresh pool of KIND at /var/lib/machines; returns the cleanup handle."""
    from tests import world

    if kind == "btrfs":
        image = workdir / "pool.btrfs"
        world.mount_btrfs(image, POOL, "6G")

        def undo() -> None:
            umount(str(POOL))
            image.unlink(missing_ok=True)

        return cleanups.push("umount btrfs pool", undo)
    plain = workdir / "plain-pool"
    plain.mkdir(mode=0o700)
    run(["mount", "--bind", str(plain), str(POOL)])

    def undo_plain() -> None:
        umount(str(POOL))
        rm_tree(plain)

    return cleanups.push("umount plain pool", undo_plain)


def populate(kind: str, count: int) -> dict[str, int]:
    """COUNT images in the pool; on btrfs mostly subvolumes plus some
    directories and .raw files, on plain directories and .raw files."""
    import btrfsutil

    if kind == "btrfs":
        mix = {"subvolume": count * 85 // 100, "directory": count * 10 // 100}
    else:
        mix = {"directory": count * 90 // 100}
    mix["raw"] = count - sum(mix.values())
    rng = random.Random(42)
    chunk = os.urandom(4096)
    names = [(t, i) for t, n in mix.items() for i in range(n)]
    rng.shuffle(names)  # interleave the kinds in directory order
    for t, i in names:
        path = POOL / f"img-{t[:3]}-{i:04d}"
        if t == "subvolume":
            btrfsutil.create_subvolume(str(path))
        elif t == "directory":
            path.mkdir()
        if t in ("subvolume", "directory"):
            (path / "etc").mkdir()
            (path / "etc/os-release").write_text(f'ID=bench\nPRETTY_NAME="bench {i}"\n')
        else:
            with open(f"{path}.raw", "wb") as f:
                f.write(chunk)
                f.truncate(64 << 20)
    return mix


def make_big_tree(root: Path, total: int = BIG_TOTAL, nbig: int = BIG_FILES, nsmall: int = SMALL_FILES) -> dict[str, int]:
    """TOTAL bytes of random data in NBIG files of log-uniform sizes, plus
    NSMALL files of 0..4 KiB, 20 symlinks, in 200 directories."""
    rng = random.Random(1234)
    pool = os.urandom(64 << 20)  # slices of this at random offsets: incompressible
    view = memoryview(pool)
    dirs = [root / f"d{a:02d}" / f"e{b:02d}" for a in range(20) for b in range(10)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    small = [rng.randint(0, 4096) for _ in range(nsmall)]
    raw = [2 ** rng.uniform(14, 23) for _ in range(nbig)]  # 16 KiB .. 8 MiB
    budget = total - sum(small)
    scale = budget / sum(raw)
    big = [max(1, int(x * scale)) for x in raw]
    big[-1] += budget - sum(big)
    assert all(0 < s < len(pool) for s in big), "file size out of range"
    nbytes = 0
    for n, size in enumerate(big + small):
        d = dirs[rng.randrange(len(dirs))]
        off = rng.randrange(0, len(pool) - size) if size else 0
        with open(d / f"f{n:05d}.bin", "wb") as f:
            f.write(view[off:off + size])
        nbytes += size
    for n in range(20):
        os.symlink(f"../e{n % 10:02d}", dirs[n] / f"link{n}")
    return {"files": nbig + nsmall, "bytes": nbytes, "directories": len(dirs) + 20, "symlinks": 20}


def tree_summary(root: Path) -> tuple[int, int, int]:
    files = nbytes = links = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:  # symlinks to directories are in dirnames
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
            else:
                files += 1
                nbytes += st.st_size
    return files, nbytes, links


def install_source(kind: str, staging: Path, plain_dir: Path | None) -> None:
    """The 1 GiB clone source in the pool: on btrfs a subvolume filled with
    a copy of STAGING, on plain STAGING itself, renamed into the pool."""
    import btrfsutil

    target = POOL / SOURCE
    if kind == "btrfs":
        btrfsutil.create_subvolume(str(target))
        run(["cp", "-a", "--reflink=never", "--no-target-directory", f"{staging}/.", str(target)])
    else:
        assert plain_dir is not None
        os.rename(staging, plain_dir / SOURCE)


# --- measurements ----------------------------------------------------------------


def stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    return {
        "n": len(s),
        "median": statistics.median(s),
        "mean": statistics.fmean(s),
        "min": s[0],
        "max": s[-1],
        "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "samples": [round(x, 6) for x in samples],
    }


def block_order(i: int, who: list[str]) -> list[str]:
    return who if i % 2 == 0 else who[::-1]


def decode_list(reply) -> list[tuple]:
    return sorted(tuple(x) for x in reply.get_contents())


def compare_listings(kind: str, listings: dict[str, list[tuple]], problems: list[str]) -> dict:
    if "ours" not in listings or "reference" not in listings:
        return {}
    ours = {x[0]: x for x in listings["ours"]}
    ref = {x[0]: x for x in listings["reference"]}
    fields = ["name", "type", "read_only", "crtime", "mtime", "usage", "path"]
    diff: dict[str, int] = {}
    examples: list[str] = []
    for name in ours.keys() | ref.keys():
        a, b = ours.get(name), ref.get(name)
        if a is None or b is None:
            diff["missing"] = diff.get("missing", 0) + 1
            if len(examples) < 5:
                examples.append(f"{name}: {'only reference' if a is None else 'only ours'}")
            continue
        for f, x, y in zip(fields, a, b):
            if x != y:
                diff[f] = diff.get(f, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{name}.{f}: ours={x!r} reference={y!r}")
    if diff:
        problems.append(f"{kind}: ListImages replies differ from the reference: {diff}; e.g. {'; '.join(examples)}")
    return {"images_ours": len(ours), "images_reference": len(ref), "differences": diff, "examples": examples}


def bench_list(kind: str, daemons: Daemons, client: Client, env: dict, who: list[str], cfg: dict,
               problems: list[str]) -> tuple[dict, dict, dict, dict]:
    calls = {w: [] for w in who}
    mcs = {w: [] for w in who}
    cpu = {w: [] for w in who}
    listings: dict[str, list[tuple]] = {}
    for r in range(cfg["list_rounds"]):
        for w in block_order(r, who):
            pid = daemons.start(w)
            _, reply = client.list_images_timed()  # warm-up
            listings.setdefault(w, decode_list(reply))
            _, p = machinectl(env, "list-images")  # warm-up
            if p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl list-images failed: {p.stderr.strip()}")
            c0 = proc_cpu_seconds(pid)
            for _ in range(cfg["list_calls"]):
                dt, _ = client.list_images_timed()
                calls[w].append(dt)
            cpu[w].append((proc_cpu_seconds(pid) - c0) / cfg["list_calls"])
            for _ in range(cfg["mc_calls"]):
                dt, p = machinectl(env, "list-images")
                if p.returncode != 0:
                    problems.append(f"{kind}/{w}: machinectl list-images failed: {p.stderr.strip()}")
                mcs[w].append(dt)
            daemons.stop()
            note(f"{kind} ListImages round {r + 1} {w}: median {statistics.median(calls[w][-cfg['list_calls']:]) * 1e3:.1f} ms"
                 f" (D-Bus), machinectl {statistics.median(mcs[w][-cfg['mc_calls']:]) * 1e3:.1f} ms")
    return calls, mcs, cpu, compare_listings(kind, listings, problems)


def sync() -> None:
    os.sync()


def bench_clone(kind: str, daemons: Daemons, env: dict, who: list[str], cfg: dict, source: tuple,
                problems: list[str]) -> dict:
    times = {w: [] for w in who}
    for r in range(cfg["clone_runs"]):
        for w in block_order(r, who):
            daemons.start(w)
            name = f"clone-{w[:3]}-{r}"
            sync()
            daemons.ensure(w)
            dt, p = machinectl(env, "clone", SOURCE, name)
            target = POOL / name
            if p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl clone failed ({p.returncode}): {p.stderr.strip()}")
            else:
                times[w].append(dt)
                got = tree_summary(target)
                if got != source:
                    problems.append(f"{kind}/{w}: clone {name} has (files, bytes, symlinks) {got}, source {source}")
                snap = os.stat(target).st_ino == 256
                if kind == "btrfs" and not snap:
                    problems.append(f"{kind}/{w}: clone {name} is not a subvolume")
                note(f"{kind} clone run {r + 1} {w}: {dt:.2f} s"
                     f"{' (subvolume)' if snap else ''}")
            daemons.ensure(w)
            _, p = machinectl(env, "remove", name)
            if p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl remove {name} failed: {p.stderr.strip()}")
            if os.path.lexists(target):
                problems.append(f"{kind}/{w}: {target} still there after machinectl remove; removing it by hand")
                if kind == "btrfs" and os.stat(target).st_ino == 256:
                    run(["btrfs", "subvolume", "delete", str(target)], stdout=subprocess.DEVNULL)
                else:
                    rm_tree(target)
            sync()
            daemons.stop()
    return times


# --- report ----------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = ("pool", "test", "ours median", "reference median", "ratio", "n (ours/ref)")
    lines = []
    for r in rows:
        o = r["ours"].get("median")
        f = r["reference"].get("median") if r["reference"] else None
        lines.append((r["pool"], r["test"], fmt_time(o), fmt_time(f),
                      f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                      f"{r['ours'].get('n', 0)}/{r['reference'].get('n', 0) if r['reference'] else 0}"))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print(fmt.format(*line), file=out)


def row(pool: str, test: str, samples: dict[str, list[float]], unit: str = "s") -> dict:
    o = stats(samples.get("ours", []))
    f = stats(samples["reference"]) if "reference" in samples else {}
    ratio = o["median"] / f["median"] if f.get("median") and o.get("median") is not None else None
    return {"pool": pool, "test": test, "unit": unit, "ours": o, "reference": f, "ratio": ratio}


def log_findings(logdir: Path) -> list[str]:
    """Warnings, errors and tracebacks from our machined's log."""
    log = logdir / "ours.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("<0>", "<1>", "<2>", "<3>", "<4>")) or "Traceback" in line or "Error" in line:
            out.append(line)
    return out[:40]


# --- main ------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and runs (about 2 minutes)")
    ap.add_argument("--json", metavar="FILE", help="write the JSON results here instead of to stdout")
    ap.add_argument("--pools", default="btrfs,plain", help="comma-separated pool kinds (default: %(default)s)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes (host file system)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here at the end")
    args = ap.parse_args()
    kinds = [k for k in args.pools.split(",") if k]
    if any(k not in ("btrfs", "plain") for k in kinds):
        ap.error("--pools: btrfs and/or plain")

    enter_private_mount_namespace()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    cfg = QUICK if args.quick else FULL
    started = time.monotonic()
    load_start = host_load()
    cleanups = Cleanups()
    problems: list[str] = []
    notes: list[str] = []
    rows: list[dict] = []
    extra: dict = {}
    have_ref = os.access(REFERENCE, os.X_OK)
    who = ["ours", "reference"] if have_ref else ["ours"]
    if not have_ref:
        notes.append(f"{REFERENCE} is missing: only our machined was measured")
        note(notes[-1])
    interrupted = failed = False
    logdir = None
    findings: list[str] = []
    try:
        workdir = Path(tempfile.mkdtemp(prefix="machined-bench-", dir=args.workdir))
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
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        env = dict(os.environ, PYTHONPATH=str(REPO))
        client = Client()
        daemons = Daemons(client, env, logdir, problems)
        cleanups.push("stop machined", daemons.stop)

        note(f"writing the 1 GiB clone source to {workdir}/staging")
        staging = workdir / "staging"
        t0 = time.monotonic()
        tree = make_big_tree(staging)
        extra["clone_source"] = tree
        source = tree_summary(staging)
        note(f"  {tree['files']} files, {tree['bytes']} bytes in {time.monotonic() - t0:.1f} s")

        for kind in kinds:
            t0 = time.monotonic()
            try:
                handle = mount_pool(kind, workdir, cleanups)
            except subprocess.CalledProcessError as e:
                problems.append(f"could not set up the {kind} pool ({e}); skipped")
                note(problems[-1])
                continue
            mix = populate(kind, cfg["images"])
            sync()
            n_images = cfg["images"] + 1  # and .host
            note(f"{kind}: pool with {mix} ready in {time.monotonic() - t0:.1f} s")
            calls, mcs, cpu, cmp = bench_list(kind, daemons, client, env, who, cfg, problems)
            rows.append(row(kind, f"ListImages D-Bus call ({n_images} images)", calls))
            rows.append(row(kind, "ListImages daemon CPU per call", cpu))
            rows.append(row(kind, f"machinectl list-images ({n_images} images)", mcs))
            extra[f"{kind}_pool"] = {"mix": mix, "listing_comparison": cmp}

            t0 = time.monotonic()
            install_source(kind, staging, workdir / "plain-pool" if kind == "plain" else None)
            sync()
            note(f"{kind}: clone source in the pool in {time.monotonic() - t0:.1f} s")
            clones = bench_clone(kind, daemons, env, who, cfg, source, problems)
            what = "snapshot of a subvolume" if kind == "btrfs" else "copy of a directory"
            rows.append(row(kind, f"machinectl clone, 1 GiB ({what})", clones))
            if kind == "plain":
                # The source was the staging tree itself; bring it back for another pool.
                os.rename(workdir / "plain-pool" / SOURCE, staging)
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
        findings = log_findings(logdir) if logdir else []
        cleanups.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if findings:
        problems.append("our machined logged:\n    " + "\n    ".join(findings))
    elapsed = time.monotonic() - started
    load_end = host_load()
    busy = max(load_start["loadavg"][0], load_end["loadavg"][0]) > 0.5 * (os.cpu_count() or 1)
    if busy:
        notes.append(f"the machine was busy with other work (load average {load_start['loadavg'][0]} at start, "
                     f"{load_end['loadavg'][0]} at end, on {os.cpu_count()} CPUs): wall times are noisy; "
                     "the daemon CPU rows are less affected")
    print()
    print(f"machined benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
          f"{elapsed:.0f} s{' - INTERRUPTED, partial results' if interrupted else ''}{' - FAILED, partial results' if failed else ''}")
    print("ListImages D-Bus call: in-process sd-bus client (sdbus SdBus.call), round trip only, no process "
          "start-up, reply not unpacked; machinectl rows: whole command incl. process start-up")
    print_table(rows)
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"problem: {p}")
    result = {
        "mode": "quick" if args.quick else "full",
        "interrupted": interrupted,
        "failed": failed,
        "elapsed_s": round(elapsed, 1),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "load_start": load_start, "load_end": load_end},
        "reference": REFERENCE if have_ref else None,
        "config": cfg,
        "timing_method": {
            "ListImages": "in-process sd-bus client (sdbus low-level SdBus.call); message built before and reply "
                          "left unparsed outside the timed region; warm-up call per daemon start",
            "machinectl": "wall time of the whole command (subprocess), incl. process start-up",
            "cpu": "daemon utime+stime per ListImages call from /proc/PID/stat (10 ms ticks, averaged per block)",
        },
        "units": "seconds",
        "results": rows,
        "details": extra,
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
