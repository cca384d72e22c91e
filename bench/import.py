#!/usr/bin/env python3
"""Benchmark our importd against systemd-importd 252 and 262 on local imports.

    cd /work/main && .venv/bin/python bench/import.py [--quick] [--json FILE]
        [--pool btrfs|plain|btrfs,plain] [--cache DIR] [--regen]
        [--inputs raw,xz-mt,...] [--runs N] [--refs 252,262|252|262|none]
        [--ours-only] [--no-limit] [--sid-root DIR] [--profile DIR]
        [--keep-logs DIR] [--raw-mib N] [--tar-mib N] [--gen-wait S]
        [--workdir DIR]

Run as root.  The benchmark first moves itself into a private mount namespace
(unshare(CLONE_NEWNS) while still single-threaded, then ``mount
--make-rprivate /``), puts a tmpfs on /run/systemd (with ``system/`` in it, so
machinectl believes it runs under systemd) and on /etc/systemd/nspawn, and
starts a private system-type dbus-daemon (imagepool.dev.PrivateBus) whose socket
lives in that tmpfs.  The pool at /var/lib/machines is a fresh btrfs on a
~12G sparse loop file (imagepool.dev.mount_btrfs) or, with ``--pool plain``, a
directory on the host's file system (ext4) bind-mounted there.  Nothing of
the host's /run/systemd or /var/lib/machines is seen or changed.  The
frame (namespace, bus, clean-ups, JSON report) is bench/common.py's, the
daemon controller bench/daemons.py's, the inputs bench/inputs.py's.

Inputs are generated once into the cache directory (default
/var/tmp/importd-bench, or one of its own for other sizes; reused while its
manifest matches, ``--regen`` rebuilds them):

  disk.raw          2 GiB raw disk image (``--raw-mib``), ~900 MB of data:
                    8 MiB segments holding 5..7 MiB of either incompressible
                    random bytes or compressible bytes (the contents of /usr
                    files), the rest of the image holes
  disk-mt.raw.xz    xz -6 -T2 (multi-block: xz can decompress it in parallel)
  disk-st.raw.xz    xz -6 -T1 (one block: decompression is single-threaded)
  disk.raw.gz       gzip -6
  disk.raw.zst      zstd -3
  disk.qcow2        qemu-img convert -O qcow2
  disk-c.qcow2      qemu-img convert -O qcow2 -c (zlib-compressed clusters)
  rootfs.tar.xz     a ~200 MB tree (/usr/lib/python3*, /usr/share/man,
                    /usr/share/perl, /usr/share/vim, os-release) as tar,
                    xz -6 -T2 (``--tar-mib N``: only the first ~N MiB of it)
  rootfs.tar.gz     the same tar, gzip -6

For each input and run, the participants take turns, the order reversed
every run: our importd, systemd-importd 252 (the host's
/lib/systemd/systemd-importd, which spawns /lib/systemd/systemd-import),
systemd-importd 262 (Debian sid's, chrooted into the sid root at
.cache/roots/sid, ``--sid-root``; it spawns its /usr/lib/systemd/systemd-import
by absolute path; it exits after 30 s idle, so it is started right before
each run and started again if it has gone), and the machine's limit (below).
A daemon's turn: start it (``python -m importd --pool /var/lib/machines``,
or the reference); ``cat FILE > /dev/null`` (the input in the page cache for
all alike); time ``machinectl import-raw FILE NAME`` (or ``import-tar``,
Debian 12's machinectl 252 calling ImportRaw/ImportTar over D-Bus, which 262
serves too) as a whole command, which returns once the transfer has
finished; read the daemon's VmHWM and CPU time; stop it.  The first import
of each input by each daemon is checked (raw: size and SHA-256 of the
content; tar: counts of files, symlinks and bytes).  Then the image is
deleted directly (file, or subvolume with ``btrfs subvolume delete
--commit-after``; not timed), followed by sync and ``btrfs subvolume sync``
(the cleaner is done before the next run starts).  Medians are reported,
and the ratios ours/252 and ours/262.  A full run (5 runs each) takes about
15 minutes, --quick (1 run each) about 4 (plus, the first time, generating
the inputs: 5 to 20 minutes, mostly xz -T1).  For a smoke test:
``--quick --raw-mib 64 --tar-mib 16`` (a cache of its own).

systemd 252 does not know zstd: for ``.zst`` only ours and 262 are timed;
in a full run 252 is tried once, untimed, and what it made of the file is
noted.

The machine's limit (bench/limits.py; ``--no-limit`` skips it), the same
work done by standard tools on the local file: raw and qcow2 ``curl -o
POOL/... file://FILE`` + syncfs; xz ``xz -d -T2`` and ``-T1`` (the faster
counts); gzip ``igzip -d`` (package isal, apt-get installed if missing);
zstd ``zstd -d``; each with the write
of the decompressed image, ``cp --sparse=always`` of disk.raw into the pool
+ syncfs (the slower stage counts); tar ``tar -x`` of the uncompressed tar
into a btrfs subvolume + syncfs, and the decompression (the slower
counts).  The limit's median is printed as a percentage of our median time
including the sync after machinectl returned (every limit ends with one).

Peak RSS: our importd's VmHWM (from /proc/PID/status just before it is
stopped; the daemon is restarted for every run, so this is per import), and
the peak RSS of its children (xz, tar, ...), sampled every 50 ms from
/proc/PID/task/*/children, reported separately.  The same for the references
(systemd-importd, and its systemd-import worker and tar).

Also recorded per run: the CPU time of the daemon and its children
(utime+stime+cutime+cstime from /proc/PID/stat), the load average, and how
long a syncfs() of the pool takes right after machinectl returned (systemd-import
252 runs with --sync=yes by default and syncfs()es before it reports success;
"ratio+sync" adds that time to both).  The host is often shared: "ratio min"
(best run over best run) and "CPU ratio" are less sensitive to other load than
the medians, which the goals are judged on.

A table per reference goes to stdout, then the limits, then the goals with
PASS/FAIL:

  wall time <= 0.8 x each reference  uncompressed raw, multi-block xz (raw and
                                     tar), gzip (raw and tar), qcow2 (both),
                                     zstd (262 only)
  wall time <= 1.0 x each reference  single-stream xz
  ours >= 85% of the limit           every input (our time <= limit / 0.85)
  output >= 400 MB/s                 zstd
  peak RSS <= 100 MB                 our importd process (VmHWM)

then the results as JSON (or to --json FILE).  Progress goes to stderr.
Everything started is stopped by PID and everything mounted is unmounted,
also on errors and Ctrl-C/SIGTERM.  ``--profile DIR`` runs py-spy
(bench/profiling.py; installed into the venv if missing) on our importd
during its timed imports: collapsed stacks, a flame graph (.svg) and a top
list per import in DIR; those timings are perturbed and are marked as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import (
    POOL,
    Session,
    add_common_args,
    clear_pool,
    code_state,
    fmt,
    goal,
    machinectl,
    merge_max,
    mount_pool,
    note,
    print_goals,
)
from daemons import LABELS, OURS, REF252, REF262, Daemons, SidRoot, daemon_path, references
from inputs import check_image, default_cache, get_inputs, output_bytes, specs
from limits import Limits
from profiling import Profiler
from transfers import (
    LIMIT,
    add_transfer_args,
    alternate,
    judge,
    print_tables,
    row_note,
    run_transfer,
    summarize,
    transfer_goals,
)

INPUTS = specs(["raw", "xz-mt", "xz-st", "gz", "zst", "qcow2", "qcow2-c", "tar-xz", "tar-gz"])
RSS_TARGET_MB = 100.0
TAG = {OURS: "our", REF252: "252", REF262: "262"}

FULL = dict(runs=5)
QUICK = dict(runs=1)


# --- one timed import -----------------------------------------------------------------


def one_import(key: str, who: str, r: int, pool_kind: str, ctx: dict) -> dict:
    spec = INPUTS[key]
    path = ctx["cache"] / spec["file"]
    name = f"bench-{key}-{TAG[who]}-{r}"
    cmd = "import-raw" if spec["kind"] == "raw" else "import-tar"
    res, p, _ = run_transfer(ctx, who, [cmd, str(path), name], path, 900, f"{pool_kind}-{key}-run{r}")
    res["run"] = r
    if not res["daemon_alive"]:
        ctx["problems"].append(f"{pool_kind}/{key}/{who}: the daemon had exited by the end of the import")
    if p is None or p.returncode != 0:
        why = ("timed out after 900 s" if p is None
               else f"failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}")
        ctx["problems"].append(f"{pool_kind}/{key}/{who} run {r}: machinectl {cmd} {why}")
        res["ok"] = False
    elif (key, who, pool_kind) not in ctx["checked"]:
        ctx["checked"].add((key, who, pool_kind))
        ok, info = check_image(spec["kind"], ctx["manifest"], name)
        res["check"] = info
        res["ok"] = ok
        if not ok:
            ctx["problems"].append(f"{pool_kind}/{key}/{who}: imported image is wrong: {info}")
    else:
        res["ok"] = True
        if spec["kind"] == "raw" and (POOL / f"{name}.raw").exists():
            st = (POOL / f"{name}.raw").stat()
            res["check"] = {"size": st.st_size, "allocated": st.st_blocks * 512}
    clear_pool(pool_kind)
    return res


def one_limit(key: str, r: int, pool_kind: str, ctx: dict) -> dict:
    res = ctx["limits"].measure(key, ctx["cache"] / INPUTS[key]["file"])
    res.update(who=LIMIT, run=r)
    if not res["ok"]:
        ctx["problems"].append(f"{pool_kind}/{key} limit run {r}: {res.get('error')}")
    clear_pool(pool_kind)
    return res


def make_row(pool_kind: str, key: str, results: list[dict], manifest: dict, who: list[str]) -> dict:
    spec = INPUTS[key]
    out = output_bytes(spec["kind"], manifest)
    row = {"pool": pool_kind, "input": key, "file": spec["file"], "format": spec["fmt"],
           "input_bytes": manifest["files"][key]["size"], "output_bytes": out,
           **summarize(results, [w for w in who if w != LIMIT], out), "runs": results}
    judge(row, spec["ratio"], [w for w in who if w in (REF252, REF262)], spec.get("mbps"))
    return row


def reference_probe_zstd(ctx: dict, pool_kind: str) -> str:
    """What systemd-import 252 makes of a .zst (untimed, once)."""
    daemons: Daemons = ctx["daemons"]
    path = ctx["cache"] / INPUTS["zst"]["file"]
    name = "bench-zst-probe"
    daemons.start(REF252)
    try:
        dt, p = machinectl(ctx["env"], "import-raw", str(path), name)
    finally:
        daemons.stop()
    out = POOL / f"{name}.raw"
    if p is None or p.returncode != 0:
        text = (f"machinectl import-raw failed ({'timeout' if p is None else p.returncode}) after {dt:.1f} s: "
                f"{'' if p is None else (p.stderr or p.stdout).strip()[-300:]}")
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
    add_common_args(ap, "one run per input and daemon (about 5 minutes)")
    ap.add_argument("--runs", type=int, help="runs per input and daemon (default 5, --quick 1)")
    ap.add_argument("--pool", default="btrfs", help="comma-separated pool kinds: btrfs, plain (default: %(default)s)")
    ap.add_argument("--inputs", default=",".join(INPUTS), help="comma-separated inputs (default: all: %(default)s)")
    add_transfer_args(ap, "imports")
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
    profiler = Profiler(Path(args.profile) if args.profile else None)  # may pip install py-spy: before unshare

    s = Session(args)
    refs = s.refs()
    code_start = code_state()
    rows: list[dict] = []
    manifest: dict = {}
    sid = SidRoot(Path(args.sid_root))
    who_all = references("importd", refs, sid, s.notes)
    if args.profile:
        s.notes.append(f"our importd was profiled with py-spy during its imports: its times are perturbed "
                       f"(stacks, flame graphs and top lists in {args.profile})")
    with s.guard():
        cache = Path(args.cache) if args.cache else default_cache(args.raw_mib, args.tar_mib)
        manifest = get_inputs(cache, keys, s.cleanups, args.regen, args.raw_mib, args.tar_mib, args.gen_wait)
        s.start_measuring()
        workdir, logdir, env = s.private_world("importd-bench-", sid if REF262 in who_all else None)
        daemons = Daemons("importd", env, logdir, s.problems, sid)
        s.cleanups.push("stop importd", daemons.stop)
        s.cleanups.push("stop py-spy", profiler.stop)
        limits = None if args.no_limit else Limits(cache, cache / "rootfs.tar", "btrfs", s.notes)
        if limits:
            limits.prepare(keys)
        ctx = {"daemons": daemons, "env": env, "manifest": manifest, "cache": cache, "problems": s.problems,
               "checked": set(), "profiler": profiler, "limits": limits}

        for pool_kind in kinds:
            try:
                handle = mount_pool(pool_kind, workdir, s.cleanups, "12G",
                                    before=lambda: (profiler.stop(), daemons.stop()))
            except Exception as e:  # noqa: BLE001 - a pool kind that cannot be set up here is skipped
                s.problems.append(f"could not set up the {pool_kind} pool ({e}); skipped")
                note(s.problems[-1])
                continue
            note(f"{pool_kind} pool mounted at {POOL}")
            if limits:
                limits.pool_kind = pool_kind
            for key in keys:
                results, who = alternate(
                    f"{pool_kind} {key}", INPUTS[key], who_all, cfg["runs"], limits is not None,
                    lambda r, key=key, pool_kind=pool_kind: one_limit(key, r, pool_kind, ctx),
                    lambda w, r, _done, key=key, pool_kind=pool_kind: one_import(key, w, r, pool_kind, ctx))
                row = make_row(pool_kind, key, results, manifest, who)
                rows.append(row)
                row_note(f"{pool_kind} {key}", row)
            if "zst" in keys and REF252 in who_all and not args.quick:
                text = reference_probe_zstd(ctx, pool_kind)
                s.notes.append(f"{pool_kind}: systemd-import 252 given disk.raw.zst: {text}")
                note(s.notes[-1])
            s.cleanups.run_now(handle)

    code_end = code_state()
    if code_end["sources_sha256"] != code_start["sources_sha256"]:
        s.problems.append(f"the sources of importd/imagepool changed while the benchmark ran "
                          f"({code_start['sources_sha256']} -> {code_end['sources_sha256']}, HEAD {code_start['head']} "
                          f"-> {code_end['head']}): later runs measured other code")
    s.busy_note()

    ours_hwm = max((r["ours_daemon_hwm_mb"] for r in rows if r["ours_daemon_hwm_mb"] is not None), default=None)
    rss = {
        "ours_importd_peak_mb": ours_hwm,
        "target_mb": RSS_TARGET_MB,
        "pass": ours_hwm is not None and ours_hwm <= RSS_TARGET_MB,
        "ours_children_peak_mb": merge_max([r["ours_children_hwm_mb"] for r in rows]),
    }
    for ref in (REF252, REF262):
        p = "reference" if ref == REF252 else "reference_262"
        rss[f"{p}_importd_peak_mb"] = max((r[f"{p}_daemon_hwm_mb"] for r in rows
                                           if r[f"{p}_daemon_hwm_mb"] is not None), default=None)
        rss[f"{p}_children_peak_mb"] = merge_max([r[f"{p}_children_hwm_mb"] for r in rows])

    print()
    print(s.title("importd local-import benchmark", f"{cfg['runs']} run(s) per daemon"))
    print("times: wall time of the whole machinectl import-raw/import-tar command (median); MB/s: decompressed "
          "output (raw: the virtual disk; tar: the tar stream) per second; CPU s: daemon + children, utime+stime; "
          "RSS: VmHWM of our importd; children: peak VmHWM per command name; ratio+sync: with the time a "
          "syncfs() of the pool takes right after machinectl returns added to both (systemd-import syncs "
          "before it finishes, so its own is ~0); ratio min: best run / best run (less sensitive to other load); "
          "CPU ratio: median CPU seconds ours / reference (the least sensitive to other load); "
          "PASS/FAIL: on the median wall times")
    refs_ran = [w for w in who_all if w != OURS]
    print_tables(rows, refs_ran, {ref: daemon_path("importd", ref, sid) for ref in refs_ran},
                 [("pool", "pool"), ("input", "input")])
    print()
    print(f"our importd peak RSS: {fmt(ours_hwm, '.1f')} MB (target <= {RSS_TARGET_MB:.0f} MB): "
          f"{'PASS' if rss['pass'] else 'FAIL'}; its children: "
          f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['ours_children_peak_mb'].items())) or '-'}; "
          + "; ".join(f"{LABELS[ref]}: systemd-importd {fmt(rss[p + '_importd_peak_mb'], '.1f')} MB, children "
                      f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss[p + '_children_peak_mb'].items())) or '-'}"
                      for ref, p in ((REF252, "reference"), (REF262, "reference_262")) if ref in who_all))
    goals = transfer_goals(rows, "import", ["pool", "input"])
    goals.append(goal("our importd peak RSS (VmHWM, children separately)", fmt(ours_hwm, ".1f", " MB"),
                      f"<= {RSS_TARGET_MB:.0f} MB", rss["pass"] if ours_hwm is not None else None))
    print()
    print_goals(goals)
    s.print_notes()
    return s.report({
        "reference": {ref: daemon_path('importd', ref, sid) for ref in who_all if ref != OURS},
        "sid": {"root": str(sid.root), "version": sid.version()} if REF262 in who_all else None,
        "code": {"start": code_start, "end": code_end},
        "config": cfg,
        "pools": kinds,
        "inputs": manifest,
        "timing_method": "wall time of `machinectl --no-pager import-raw|import-tar FILE NAME` (returns when the "
                         "transfer is done), input warmed with cat before each run; daemons restarted per run and "
                         "alternated with the limit's tools, order reversed every run; image deleted, sync and "
                         "btrfs subvolume sync between runs (untimed)",
        "results": rows,
        "rss": rss,
        "goals": goals,
    })


if __name__ == "__main__":
    sys.exit(main())
