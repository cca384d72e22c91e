#!/usr/bin/env python3
"""Benchmark our machined against systemd-machined 252 and 262 on the same image pools.

    cd /work/main && .venv/bin/python bench/images.py [--quick] [--json FILE]
        [--pools btrfs,plain] [--refs 252,262|252|262|none] [--ours-only]
        [--images N] [--many-images N] [--clone-mib N] [--clone-copies N]
        [--sid-root DIR] [--workdir DIR] [--keep-logs DIR]

Run as root.  The benchmark first moves itself into a private mount namespace
(unshare(CLONE_NEWNS) while still single-threaded, then ``mount
--make-rprivate /``), puts a tmpfs on /run/systemd (with ``system/`` in it, so
machinectl believes it runs under systemd) and on /etc/systemd/nspawn, and
starts a private system-type dbus-daemon whose socket lives in that tmpfs.
Nothing of the host's /run/systemd or /var/lib/machines is seen or changed.
The frame (namespace, bus, clean-ups, JSON report) is bench/common.py's, the
daemon controller bench/daemons.py's.

The daemons: ours (``python -m machined --pool /var/lib/machines``),
systemd-machined 252 (the host's /lib/systemd/systemd-machined) and
systemd-machined 262 (Debian sid's, chrooted into the sid root at
.cache/roots/sid, ``--sid-root``, with the pool, /run/systemd, /proc, /sys
and /dev bound in, as /work/research/sid/scripts do it).

For each pool kind, mounted at /var/lib/machines (the references' pool path
is fixed there):

  btrfs  a fresh btrfs on a sparse loop file (imagepool.dev.mount_btrfs)
  plain  a directory on the host file system (ext4) under a temporary
         directory, bind-mounted there

it measures

  1. ListImages with 1000 images (``--images``) in the pool (btrfs: mostly
     subvolumes plus some directories and .raw files; plain: directories and
     .raw files): the wall time of one
     org.freedesktop.machine1.Manager.ListImages call, made by an in-process
     sd-bus client (the sdbus binding's low-level SdBus.call: the request
     message is built before the clock starts and the reply is not unpacked
     inside the timed region, so neither process start-up nor client-side
     parsing is measured; only the round trip client -> dbus-daemon ->
     machined -> dbus-daemon -> client).  Also the wall time of a whole
     ``machinectl list-images`` command (process start-up included, for all
     daemons alike), and the CPU time the daemon spends per ListImages call
     (from /proc/PID/stat).
  2. ``machinectl clone bigsrc NAME`` of a 1 GiB directory image
     (``--clone-mib``; ~2000 files of random data of varying sizes plus
     ~2000 small files, symlinks, ~200 directories), timed as a whole
     command.  On btrfs the source is a subvolume (so the clone is a
     snapshot), on plain a directory (so the clone is a full copy).  Each
     clone is checked and then removed with ``machinectl remove`` (not
     timed), followed by ``sync``.
  3. btrfs only: CloneImage in constant time: the same clone of ``big10``,
     a subvolume holding 10 (``--clone-copies``) reflinked copies of
     bigsrc's tree: 10 GiB of written (not sparse) files, 10 times the
     files, that cost only metadata to make.  A snapshot takes the same time
     whatever is in it; a copy would not.
  4. btrfs only: ListImages with 10,000 images (``--many-images``; 0 skips
     it; subvolumes, directories and .raw files mixed as in 1), measured as
     in 1 with fewer calls.

Only one daemon can own org.freedesktop.machine1 at a time, so the daemons
alternate in blocks: start ours, k calls, stop; start 252, k calls, stop;
start 262, k calls, stop; and so on for several rounds, with the order
reversed every round.  Each block begins with an untimed warm-up call.
Medians are reported, and the ratios ours/252 and ours/262.  ListImages
replies are compared with 252's (differences are problems) and with 262's
(differences are noted: 262's .host is the sid root).

Goals (PASS/FAIL): ListImages of 10,000 images <= 1.0 x systemd-machined
262 (D-Bus call, median); our clone of big10 <= 1.5 x our clone of bigsrc
(constant time).

A reference that is missing is left out (and the report says so).  A table
goes to stdout, then the goals, then the results as JSON (or to --json
FILE).  Progress goes to stderr.  Everything started is stopped by PID and
everything mounted is unmounted, also on errors and Ctrl-C/SIGTERM.  For a
smoke test: ``--quick --images 100 --many-images 300 --clone-mib 16``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    POOL,
    Session,
    add_common_args,
    fmt,
    goal,
    machinectl,
    mount_pool,
    note,
    print_goals,
    print_table,
    proc_cpu_seconds,
    rm_tree,
    run,
    stats,
    tree_summary,
)
from daemons import (
    LABELS,
    OURS,
    REF252,
    REF262,
    Client,
    Daemons,
    SidRoot,
    block_order,
    daemon_path,
    log_findings,
    references,
)

BUS_NAME = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER_IFACE = "org.freedesktop.machine1.Manager"
SOURCE = "bigsrc"
BIG10 = "big10"

FULL = dict(images=1000, list_rounds=6, list_calls=40, mc_calls=10, clone_runs=7,
            many_rounds=4, many_calls=10, many_mc_calls=3)
QUICK = dict(images=1000, list_rounds=2, list_calls=15, mc_calls=4, clone_runs=2,
             many_rounds=2, many_calls=4, many_mc_calls=1)
BIG_FILES = 2000
SMALL_FILES = 2000
LIST_GOAL_RATIO = 1.0
CLONE_CONSTANT_RATIO = 1.5
TAG = {OURS: "our", REF252: "252", REF262: "262"}


def list_images_timed(client: Client) -> tuple[float, object]:
    return client.timed(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListImages")


# --- pools and images ------------------------------------------------------------


def image_mix(kind: str, count: int) -> dict[str, int]:
    if kind == "btrfs":
        mix = {"subvolume": count * 85 // 100, "directory": count * 10 // 100}
    else:
        mix = {"directory": count * 90 // 100}
    mix["raw"] = count - sum(mix.values())
    return mix


def populate(kind: str, count: int, have: int = 0) -> dict[str, int]:
    """COUNT images in the pool (of which HAVE, made by an earlier call, are
    there already); on btrfs mostly subvolumes plus some directories and .raw
    files, on plain directories and .raw files."""
    import btrfsutil

    mix, old = image_mix(kind, count), image_mix(kind, have) if have else {}
    rng = random.Random(42 + have)
    chunk = os.urandom(4096)
    names = [(t, i) for t, n in mix.items() for i in range(old.get(t, 0), n)]
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


def make_big_tree(root: Path, total: int, nbig: int = BIG_FILES, nsmall: int = SMALL_FILES) -> dict[str, int]:
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


def summary(root: Path) -> tuple[int, int, int]:
    t = tree_summary(root)
    return t["files"], t["bytes"], t["symlinks"]


def install_source(kind: str, staging: Path, plain_dir: Path | None) -> None:
    """The clone source in the pool: on btrfs a subvolume filled with a copy
    of STAGING, on plain STAGING itself, renamed into the pool."""
    import btrfsutil

    target = POOL / SOURCE
    if kind == "btrfs":
        btrfsutil.create_subvolume(str(target))
        run(["cp", "-a", "--reflink=never", "--no-target-directory", f"{staging}/.", str(target)])
    else:
        assert plain_dir is not None
        os.rename(staging, plain_dir / SOURCE)


def install_big10(copies: int) -> dict:
    """A subvolume with COPIES reflinked copies of bigsrc's tree (btrfs only)."""
    import btrfsutil

    target = POOL / BIG10
    btrfsutil.create_subvolume(str(target))
    for n in range(copies):
        run(["cp", "-a", "--reflink=always", "--no-target-directory", f"{POOL / SOURCE}/.", str(target / f"c{n:02d}")])
    files, nbytes, links = summary(target)
    return {"copies": copies, "files": files, "bytes": nbytes, "symlinks": links}


# --- measurements ----------------------------------------------------------------


def decode_list(reply) -> list[tuple]:
    return sorted(tuple(x) for x in reply.get_contents())


def compare_listings(kind: str, listings: dict[str, list[tuple]], ref: str) -> dict:
    if OURS not in listings or ref not in listings:
        return {}
    ours = {x[0]: x for x in listings[OURS]}
    other = {x[0]: x for x in listings[ref]}
    fields = ["name", "type", "read_only", "crtime", "mtime", "usage", "path"]
    diff: dict[str, int] = {}
    examples: list[str] = []
    for name in ours.keys() | other.keys():
        a, b = ours.get(name), other.get(name)
        if a is None or b is None:
            diff["missing"] = diff.get("missing", 0) + 1
            if len(examples) < 5:
                examples.append(f"{name}: {'only ' + LABELS[ref] if a is None else 'only ours'}")
            continue
        for f, x, y in zip(fields, a, b, strict=False):
            if x != y:
                diff[f] = diff.get(f, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{name}.{f}: ours={x!r} {LABELS[ref]}={y!r}")
    return {"images_ours": len(ours), f"images_{TAG[ref]}": len(other), "differences": diff, "examples": examples}


def bench_list(kind: str, daemons: Daemons, client: Client, env: dict, who: list[str], rounds: int, k: int,
               k_mc: int, problems: list[str], notes: list[str]) -> tuple[dict, dict, dict, dict]:
    calls: dict[str, list[float]] = {w: [] for w in who}
    mcs: dict[str, list[float]] = {w: [] for w in who}
    cpu: dict[str, list[float]] = {w: [] for w in who}
    listings: dict[str, list[tuple]] = {}
    for r in range(rounds):
        for w in block_order(r, who):
            pid = daemons.start(w)
            _, reply = list_images_timed(client)  # warm-up
            listings.setdefault(w, decode_list(reply))
            _, p = machinectl(env, "list-images", timeout=600)  # warm-up
            if p is None or p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl list-images failed: {p.stderr.strip() if p else 'timeout'}")
            c0 = proc_cpu_seconds(pid, children=False)
            for _ in range(k):
                dt, _ = list_images_timed(client)
                calls[w].append(dt)
            cpu[w].append((proc_cpu_seconds(pid, children=False) - c0) / k)
            for _ in range(k_mc):
                dt, p = machinectl(env, "list-images", timeout=600)
                if p is None or p.returncode != 0:
                    problems.append(f"{kind}/{w}: machinectl list-images failed: "
                                    f"{p.stderr.strip() if p else 'timeout'}")
                mcs[w].append(dt)
            daemons.stop()
            note(f"{kind} ListImages round {r + 1} {LABELS[w]}: median "
                 f"{statistics.median(calls[w][-k:]) * 1e3:.1f} ms (D-Bus)"
                 + (f", machinectl {statistics.median(mcs[w][-k_mc:]) * 1e3:.1f} ms" if k_mc else ""))
    cmp = {}
    for ref in (REF252, REF262):
        c = compare_listings(kind, listings, ref)
        if c:
            cmp[TAG[ref]] = c
            if c["differences"]:
                text = (f"{kind}: ListImages replies differ from {LABELS[ref]}'s: {c['differences']}; "
                        f"e.g. {'; '.join(c['examples'])}")
                (problems if ref == REF252 else notes).append(text)
    return calls, mcs, cpu, cmp


def sync() -> None:
    os.sync()


def bench_clone(kind: str, daemons: Daemons, env: dict, who: list[str], runs: int, source: str, expected,
                problems: list[str]) -> dict:
    """Times `machinectl clone SOURCE NAME`; EXPECTED: the (files, bytes, symlinks) of each clone, or None."""
    times: dict[str, list[float]] = {w: [] for w in who}
    for r in range(runs):
        for w in block_order(r, who):
            daemons.start(w)
            name = f"clone-{source}-{TAG[w]}-{r}"
            sync()
            daemons.ensure(w)
            dt, p = machinectl(env, "clone", source, name, timeout=1800)
            target = POOL / name
            if p is None or p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl clone {source} failed "
                                f"({p.returncode if p else 'timeout'}): {p.stderr.strip() if p else ''}")
            else:
                times[w].append(dt)
                if expected is not None:
                    got = summary(target)
                    if got != expected:
                        problems.append(f"{kind}/{w}: clone {name} has (files, bytes, symlinks) {got}, "
                                        f"source {expected}")
                snap = target.is_dir() and os.stat(target).st_ino == 256
                if kind == "btrfs" and not snap:
                    problems.append(f"{kind}/{w}: clone {name} is not a subvolume")
                note(f"{kind} clone {source} run {r + 1} {LABELS[w]}: {dt:.2f} s{' (subvolume)' if snap else ''}")
            daemons.ensure(w)
            _, p = machinectl(env, "remove", name, timeout=1800)
            if p is None or p.returncode != 0:
                problems.append(f"{kind}/{w}: machinectl remove {name} failed: {p.stderr.strip() if p else 'timeout'}")
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


def print_rows(rows: list[dict], out=sys.stdout) -> None:
    head = ("pool", "test", "ours median", "reference median", "ratio", "262 median", "ratio 262",
            "n (ours/252/262)")
    lines = []
    for r in rows:
        lines.append((r["pool"], r["test"], fmt_time(r["ours"].get("median")), fmt_time(r["reference"].get("median")),
                      fmt(r["ratio"], ".2f", "x"), fmt_time(r["reference_262"].get("median")),
                      fmt(r["ratio_262"], ".2f", "x"),
                      f"{r['ours'].get('n', 0)}/{r['reference'].get('n', 0)}/{r['reference_262'].get('n', 0)}"))
    print_table(head, lines, out=out)


def row(pool: str, test: str, samples: dict[str, list[float]], unit: str = "s") -> dict:
    o = stats(samples.get(OURS, []), 6)
    out = {"pool": pool, "test": test, "unit": unit, "ours": o}
    for ref, key, rkey in ((REF252, "reference", "ratio"), (REF262, "reference_262", "ratio_262")):
        f = stats(samples[ref], 6) if ref in samples else {"n": 0}
        out[key] = f
        out[rkey] = o["median"] / f["median"] if f.get("median") and o.get("median") is not None else None
    return out


# --- main ------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "fewer rounds and runs (about 4 minutes, plus the 10,000 images)")
    ap.add_argument("--pools", default="btrfs,plain", help="comma-separated pool kinds (default: %(default)s)")
    ap.add_argument("--images", type=int, help="images in the pool for the ListImages case (default 1000)")
    ap.add_argument("--many-images", type=int, default=10000,
                    help="images for the large ListImages case on btrfs (default %(default)s; 0: skip it)")
    ap.add_argument("--clone-mib", type=int, default=1024, help="size of the clone source in MiB (default %(default)s)")
    ap.add_argument("--clone-copies", type=int, default=10,
                    help="reflinked copies of the clone source in big10 (default %(default)s; 0: skip)")
    ap.add_argument("--sid-root", default=str(SidRoot().link),
                    help="the sid root of systemd 262 (default %(default)s)")
    args = ap.parse_args()
    kinds = [k for k in args.pools.split(",") if k]
    if any(k not in ("btrfs", "plain") for k in kinds):
        ap.error("--pools: btrfs and/or plain")
    cfg = dict(QUICK if args.quick else FULL)
    if args.images:
        cfg["images"] = args.images
    cfg.update(many_images=args.many_images, clone_mib=args.clone_mib, clone_copies=args.clone_copies)

    s = Session(args)
    refs = s.refs()
    rows: list[dict] = []
    goals: list[dict] = []
    extra: dict = {}
    sid = SidRoot(Path(args.sid_root))
    who = references("machined", refs, sid, s.notes)
    logdir = None
    findings: list[str] = []
    with s.guard():
        workdir, logdir, env = s.private_world("machined-bench-", sid if REF262 in who else None)
        client = Client()
        daemons = Daemons("machined", env, logdir, s.problems, sid)
        s.cleanups.push("stop machined", daemons.stop)
        s.start_measuring()

        mib = cfg["clone_mib"]
        note(f"writing the {mib} MiB clone source to {workdir}/staging")
        staging = workdir / "staging"
        t0 = time.monotonic()
        scale = min(1.0, mib / 1024)
        tree = make_big_tree(staging, mib << 20, max(20, int(BIG_FILES * scale)), max(20, int(SMALL_FILES * scale)))
        extra["clone_source"] = tree
        source = summary(staging)
        note(f"  {tree['files']} files, {tree['bytes']} bytes in {time.monotonic() - t0:.1f} s")
        size_text = f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"

        for kind in kinds:
            t0 = time.monotonic()
            try:
                handle = mount_pool(kind, workdir, s.cleanups, "6G", before=daemons.stop)
            except subprocess.CalledProcessError as e:
                s.problems.append(f"could not set up the {kind} pool ({e}); skipped")
                note(s.problems[-1])
                continue
            mix = populate(kind, cfg["images"])
            sync()
            n_images = cfg["images"] + 1  # and .host
            note(f"{kind}: pool with {mix} ready in {time.monotonic() - t0:.1f} s")
            calls, mcs, cpu, cmp = bench_list(kind, daemons, client, env, who, cfg["list_rounds"], cfg["list_calls"],
                                              cfg["mc_calls"], s.problems, s.notes)
            rows.append(row(kind, f"ListImages D-Bus call ({n_images} images)", calls))
            rows.append(row(kind, "ListImages daemon CPU per call", cpu))
            rows.append(row(kind, f"machinectl list-images ({n_images} images)", mcs))
            extra[f"{kind}_pool"] = {"mix": mix, "listing_comparison": cmp}

            t0 = time.monotonic()
            install_source(kind, staging, workdir / "plain-pool" if kind == "plain" else None)
            sync()
            note(f"{kind}: clone source in the pool in {time.monotonic() - t0:.1f} s")
            clones = bench_clone(kind, daemons, env, who, cfg["clone_runs"], SOURCE, source, s.problems)
            what = "snapshot of a subvolume" if kind == "btrfs" else "copy of a directory"
            rows.append(row(kind, f"machinectl clone, {size_text} ({what})", clones))

            if kind == "btrfs" and cfg["clone_copies"] > 1:
                t0 = time.monotonic()
                big = install_big10(cfg["clone_copies"])
                sync()
                extra["big10"] = big
                note(f"btrfs: {BIG10} ({big['bytes'] / (1 << 30):.1f} GiB written, {big['files']} files, reflinked) "
                     f"in {time.monotonic() - t0:.1f} s")
                clones10 = bench_clone(kind, daemons, env, who, cfg["clone_runs"], BIG10, None, s.problems)
                big_text = f"{big['bytes'] / (1 << 30):.0f} GiB" if big["bytes"] >= 1 << 30 else \
                    f"{big['bytes'] >> 20} MiB"
                rows.append(row(kind, f"machinectl clone, {big_text} ({cfg['clone_copies']}x the files)", clones10))
                t1, t10 = stats(clones[OURS]).get("median"), stats(clones10[OURS]).get("median")
                r = t10 / t1 if t1 and t10 else None
                extra["clone_constant_time"] = {"ours_small_s": t1, "ours_big_s": t10, "ratio": r,
                                                "references": {TAG[w]: {"small_s": stats(clones[w]).get("median"),
                                                                        "big_s": stats(clones10[w]).get("median")}
                                                               for w in who if w != OURS}}
                goals.append(goal(f"btrfs CloneImage in constant time: ours {big_text} / {size_text}",
                                  f"{fmt(r, '.2f', 'x')} ({fmt_time(t10)} / {fmt_time(t1)})",
                                  f"<= {CLONE_CONSTANT_RATIO:.1f}x", None if r is None else r <= CLONE_CONSTANT_RATIO))
            if kind == "plain":
                # The source was the staging tree itself; bring it back for another pool.
                os.rename(workdir / "plain-pool" / SOURCE, staging)

            if kind == "btrfs" and cfg["many_images"] > cfg["images"]:
                t0 = time.monotonic()
                mix = populate(kind, cfg["many_images"], cfg["images"])
                sync()
                n_many = cfg["many_images"] + 1 + len([e for e in os.listdir(POOL) if not e.startswith("img-")])
                note(f"btrfs: {n_many} images ({mix} and the clone sources) in {time.monotonic() - t0:.1f} s")
                calls, mcs, cpu, cmp = bench_list(kind, daemons, client, env, who, cfg["many_rounds"],
                                                  cfg["many_calls"], cfg["many_mc_calls"], s.problems, s.notes)
                r_list = row(kind, f"ListImages D-Bus call ({n_many} images)", calls)
                rows.append(r_list)
                rows.append(row(kind, f"ListImages daemon CPU per call ({n_many} images)", cpu))
                rows.append(row(kind, f"machinectl list-images ({n_many} images)", mcs))
                extra["btrfs_many"] = {"mix": mix, "images": n_many, "listing_comparison": cmp}
                ratio = r_list["ratio_262"]
                goals.append(goal(f"ListImages of {n_many} images <= {LIST_GOAL_RATIO:.1f}x systemd-machined 262",
                                  f"{fmt(ratio, '.2f', 'x')} ({fmt_time(r_list['ours'].get('median'))} / "
                                  f"{fmt_time(r_list['reference_262'].get('median'))})",
                                  f"<= {LIST_GOAL_RATIO:.1f}x", None if ratio is None else ratio <= LIST_GOAL_RATIO))
            s.cleanups.run_now(handle)
        findings = log_findings(logdir / "ours-machined.log")

    if findings:
        s.problems.append("our machined logged:\n    " + "\n    ".join(findings))
    s.busy_note("wall times are noisy; the daemon CPU rows are less affected")
    print()
    print(s.title("machined benchmark"))
    print("ListImages D-Bus call: in-process sd-bus client (sdbus SdBus.call), round trip only, no process "
          "start-up, reply not unpacked; machinectl rows: whole command incl. process start-up; reference: "
          "systemd-machined 252, 262: systemd-machined 262 (sid, chrooted)")
    print_rows(rows)
    if goals:
        print()
        print_goals(goals)
    s.print_notes()
    return s.report({
        "reference": {TAG[w]: daemon_path("machined", w, sid) for w in who if w != OURS},
        "sid": {"root": str(sid.root), "version": sid.version()} if REF262 in who else None,
        "config": cfg,
        "timing_method": {
            "ListImages": "in-process sd-bus client (sdbus low-level SdBus.call); message built before and reply "
                          "left unparsed outside the timed region; warm-up call per daemon start",
            "machinectl": "wall time of the whole command (subprocess), incl. process start-up",
            "cpu": "daemon utime+stime per ListImages call from /proc/PID/stat (10 ms ticks, averaged per block)",
        },
        "units": "seconds",
        "results": rows,
        "goals": goals,
        "details": extra,
    })


if __name__ == "__main__":
    sys.exit(main())
