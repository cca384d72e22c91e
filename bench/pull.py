#!/usr/bin/env python3
"""Benchmark pulls: our importd against systemd-importd 252 and 262 (systemd-pull).

    cd /work/main && .venv/bin/python bench/pull.py [--quick] [--json FILE]
        [--inputs xz-mt,xz-st,...] [--runs N] [--cache DIR] [--regen]
        [--raw-mib N] [--tar-mib N] [--gen-wait S] [--refs 252,262|252|262|none]
        [--ours-only] [--no-limit] [--sid-root DIR] [--hang-timeout S]
        [--no-latency] [--no-verify-run] [--keep-logs DIR] [--workdir DIR]
    .venv/bin/python bench/pull.py --profile DIR [--inputs raw] [--ours-only] ...
    .venv/bin/python bench/pull.py --load [--load-pulls 24] [--load-mib 128]
        [--load-drop-every 3] [--load-timeout S] ...

Run as root.  Like bench/import.py (whose frame and inputs it shares:
bench/common.py, bench/daemons.py, bench/inputs.py), the benchmark first
moves itself into a private mount namespace (unshare(CLONE_NEWNS) while
still single-threaded, then ``mount --make-rprivate /``), puts a tmpfs on
/run/systemd (with ``system/`` in it, so machinectl believes it runs under
systemd) and on /etc/systemd/nspawn, starts a private system-type
dbus-daemon (imagepool.dev.PrivateBus) with its socket in that tmpfs, and
mounts a fresh btrfs on a ~12G sparse loop file (imagepool.dev.mount_btrfs)
at /var/lib/machines.  Nothing of the host's /run/systemd or
/var/lib/machines is seen or changed.

The server is a private nginx (installed with ``apt-get install -y
nginx-light`` if there is none; the report says so) on 127.0.0.1:<free
port>, with a temporary config: daemon off, sendfile on, access log off,
pid and temp paths in a temporary directory, root = a directory of hard
links to the inputs plus a SHA256SUMS.  All HTTP traffic stays on
127.0.0.1 (proxy variables are removed from the daemons' environment).

Inputs come from bench/inputs.py (the cache, default /var/tmp/importd-bench,
is shared with bench/import.py; if another process is still generating into
it, this waits; ``--raw-mib``/``--tar-mib`` make smaller ones in a cache of
their own, for smoke tests: ``--quick --raw-mib 64 --tar-mib 16``):

  xz-mt   disk-mt.raw.xz  2 GiB raw image, ~900 MB data, xz -6 -T2 (multi-block)
  xz-st   disk-st.raw.xz  the same, xz -6 -T1 (a single block)
  gz      disk.raw.gz     gzip -6
  zst     disk.raw.zst    zstd -3 (systemd 252 has no zstd: ours and 262 only)
  qcow2   disk.qcow2      qemu-img convert -O qcow2
  raw     disk.raw        uncompressed
  tar-xz  rootfs.tar.xz   ~200 MB rootfs tar, xz -6 -T2 (pull-tar)
  tar-gz  rootfs.tar.gz   the same tar, gzip -6 (pull-tar)

For each input and run, the participants take turns (the order reversed
every run): our importd (``python -m importd --pool /var/lib/machines``),
systemd-importd 252 (``/lib/systemd/systemd-importd``, which spawns
``/lib/systemd/systemd-pull``), systemd-importd 262 (Debian sid's, chrooted
into the sid root at .cache/roots/sid, ``--sid-root``, as
/work/research/sid/scripts do it; it spawns its /usr/lib/systemd/systemd-pull
by absolute path; it exits after 30 s idle, so it is started right before
each run and again if it has gone) and the machine's limit (below).  A
daemon's turn: start it; ``cat`` the input (into the page cache, for nginx,
for all alike); time ``machinectl pull-raw --verify=no URL NAME`` (or
``pull-tar``; Debian 12's machinectl 252, calling PullRaw/PullTar over
D-Bus, which 262 serves too) as a whole command: it returns once the
transfer has finished; read the daemon's VmHWM and CPU time (children
separately); stop it.  Between runs everything in the pool is deleted: the
image AND the hidden download cache (``.raw-*``, ``.tar-*``), since a second
pull of the same URL would otherwise be a conditional request answered 304,
measuring nothing.  Then sync and ``btrfs subvolume sync``.  The first pull
of each input by each daemon is checked (raw: size and SHA-256 of the
content; tar: file, symlink and byte counts).

The machine's limit (bench/limits.py; ``--no-limit`` skips it): raw and
qcow2 ``curl -o`` from the same nginx into the pool + syncfs; xz ``xz -d
-T2`` and ``-T1`` of the same file (the faster counts); gzip ``igzip -d``
(package isal, apt-get installed if missing); zstd ``zstd -d``; each with the write
of the decompressed image, ``cp --sparse=always`` of disk.raw into the pool
+ syncfs (the slower stage counts); tar ``tar -x`` of the uncompressed tar
into a btrfs subvolume + syncfs, and the decompression (the slower
counts).  The limit's median is printed as a percentage of our median time
including the sync after machinectl returned (every limit ends with one).

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
    region); p50/p99/max, and the same calls idle for comparison; our
    importd's VmHWM over the 4 pulls, its children separately (and the xz
    children's peak on their own: the largest one, and all of them summed).

``--load``: latency under load, instead of the above.  24 concurrent pulls
(``--load-pulls``) with our machined and importd, of small inputs made for
it (bench/inputs.py load_inputs: a raw image of ``--load-mib`` MiB as .raw,
.raw.gz, .raw.zst, .raw.xz, and a tar of half that as .tar and .tar.gz; each
pull has a URL of its own), served by tests/httpserver.py's fault-injecting
server (bench/faultserver.py, a process of its own), which resets the
connection once mid-body (after half of it) for every ``--load-drop-every``-th
pull.  Every pull must succeed with the right content (raw: SHA-256; tar: a
digest of every file's content and every symlink's target).  Meanwhile a
prober calls, in turn and continuously, machined's ListImages, GetImage of
an image in the pool, the machine1 Manager's properties (GetAll), importd's
ListTransfers and the properties (GetAll) of one of its live transfers,
and reports p50/p99/max per method.

``--profile DIR``: py-spy (bench/profiling.py; ``pip install py-spy`` into
the venv if it is missing) records our importd during its timed pulls
(default inputs: raw only; no latency test, no checksum runs): per pull
DIR/LABEL.txt (collapsed stacks), DIR/LABEL.svg (a flame graph) and
DIR/LABEL-top.txt (functions by self and by total samples), whose head is
printed.  Those times are perturbed and marked so.

Goals (PASS/FAIL, in a goals table):

  wall time <= 0.8 x each reference  multi-block xz (raw and tar), gzip (raw
                                     and tar), qcow2, uncompressed raw, zstd
                                     (262 only)
  wall time <= 1.0 x each reference  single-stream xz
  ours >= 85% of the limit           every input (our time <= limit / 0.85)
  output >= 400 MB/s                 zstd
  peak RSS <= 100 MB                 our importd (VmHWM, children apart) with
                                     4 concurrent pulls; single pulls too
  D-Bus latency < 50 ms              p99 of each method during the 4 pulls;
                                     with --load: during the 24 pulls, and
                                     all 24 right

Tables go to stdout (one per reference), then the limits and the goals,
then the results as JSON (or to --json FILE), with the load average (the
machine may be busy with other work).  Progress goes to stderr.
Everything started is stopped by PID and everything mounted is unmounted,
also on errors and Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import (
    MB,
    POOL,
    Session,
    add_common_args,
    clear_pool,
    code_state,
    ensure_tool,
    fmt,
    goal,
    lat_stats,
    merge_max,
    note,
    print_goals,
    print_table,
    sha256_file,
    verdict,
    warm,
)
from daemons import LABELS, OURS, REF252, REF262, Client, Daemons, SidRoot, daemon_path, references
from inputs import check_image, default_cache, get_inputs, load_inputs, output_bytes, specs, tree_digest
from limits import Limits
from profiling import Profiler
from transfers import (
    LIMIT,
    add_transfer_args,
    alternate,
    judge,
    print_against,
    print_tables,
    row_note,
    run_transfer,
    summarize,
    transfer_goals,
)

IMPORT_BUS = "org.freedesktop.import1"
MACHINE_BUS = "org.freedesktop.machine1"

INPUTS = specs(["xz-mt", "xz-st", "gz", "zst", "qcow2", "raw", "tar-xz", "tar-gz"])
LATENCY_INPUTS = ("xz-mt", "gz", "zst", "qcow2")  # 4 different big images, pulled at once
RSS_TARGET_MB = 100.0
LATENCY_TARGET_MS = 50.0
TAG = {OURS: "our", REF252: "252", REF262: "262"}

FULL = dict(runs=3, hang_timeout=300.0, verify_inputs=("raw", "xz-mt"), idle_calls=100)
QUICK = dict(runs=1, hang_timeout=150.0, verify_inputs=("raw",), idle_calls=40)


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
        for _attempt in range(5):
            self.port = free_port()
            conf = self.tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=self.port, root=self.root))
            with open(self.tmp / "stderr.log", "ab") as log:
                self.proc = subprocess.Popen([self.binary, "-e", str(self.tmp / "error.log"), "-p", str(self.tmp),
                                              "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
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


def link_into(www: Path, src: Path, name: str) -> None:
    """A hard link (the cache may be rebuilt under us), or a symlink across file systems."""
    try:
        os.link(src, www / name)
    except OSError:
        os.symlink(src, www / name)


def make_www(www: Path, cache: Path, keys: list[str], manifest: dict, verify_keys: list[str]) -> dict[str, str]:
    """Links to the inputs and a SHA256SUMS for the --verify=checksum runs."""
    www.mkdir(parents=True)
    for key in keys:
        link_into(www, cache / INPUTS[key]["file"], INPUTS[key]["file"])
    sums = {}
    for key in verify_keys:
        name = INPUTS[key]["file"]
        sums[name] = manifest["raw"]["sha256"] if key == "raw" else sha256_file(www / name)
    (www / "SHA256SUMS").write_text("".join(f"{h} *{n}\n" for n, h in sums.items()))
    return sums


# --- one timed pull ------------------------------------------------------------------------


def one_pull(key: str, who: str, r: int, verify_mode: str, timeout: float, ctx: dict) -> dict:
    spec = INPUTS[key]
    url = ctx["nginx"].url(spec["file"])
    suffix = "" if verify_mode == "no" else "-sum"
    name = f"p-{key}{suffix}-{TAG[who]}-{r}"
    verb = "pull-raw" if spec["kind"] == "raw" else "pull-tar"
    label = f"{key}-run{r}" if verify_mode == "no" else None
    t0 = time.perf_counter()
    res, p, snap = run_transfer(ctx, who, [verb, f"--verify={verify_mode}", url, name], ctx["www"] / spec["file"],
                                timeout, label)
    t_pull = time.perf_counter()
    res.update(run=r, verify=verify_mode)
    if not res["daemon_alive"] and (who == OURS or p is not None):
        ctx["problems"].append(f"{key}/{who} run {r}: the daemon had exited by the end of the pull")
    if p is None:
        res["ok"] = False
        res["hang"] = {"timeout_s": round(timeout, 1), "processes": snap, "pool": sorted(os.listdir(POOL))}
        ctx["hangs"].append({"input": key, "who": who, "run": r, "verify": verify_mode, **res["hang"]})
        states = ", ".join(f"{x['name']}:{x['state']}" for x in snap)
        note(f"{key} {LABELS[who]} run {r}: no result after {timeout:.0f} s: counted as a hang; the daemon was "
             f"restarted ({states})")
    else:
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
            # (with --quick, the references' content is not hashed).
            full = first and (who == OURS or not ctx["quick"])
            ok, info = check_image(spec["kind"], ctx["manifest"], name, full)
            res["check"] = info
            res["ok"] = ok
            if not ok:
                ctx["problems"].append(f"{key}/{who} run {r}: pulled image is wrong: {info}")
    t_check = time.perf_counter()
    removed = clear_pool()
    res["phases_s"] = {"pull_incl_start_stop": round(t_pull - t0, 2), "check": round(t_check - t_pull, 2),
                       "clear_pool": round(time.perf_counter() - t_check, 2)}
    res["cache_entries_removed"] = [e for e in removed if e.startswith((".raw-", ".tar-"))]
    leftovers = [e for e in removed if e.startswith(".#")]
    if leftovers and p is not None:
        ctx["problems"].append(f"{key}/{who} run {r}: temporary files left in the pool: {leftovers}")
    return res


def one_limit(key: str, r: int, ctx: dict) -> dict:
    file = INPUTS[key]["file"]
    warm(ctx["www"] / file)
    res = ctx["limits"].measure(key, ctx["www"] / file, ctx["nginx"].url(file))
    res.update(who=LIMIT, run=r)
    if not res["ok"]:
        ctx["problems"].append(f"{key} limit run {r}: {res.get('error')}")
    clear_pool()
    return res


def make_row(key: str, results: list[dict], manifest: dict, who: list[str], verify_mode: str = "no") -> dict:
    spec = INPUTS[key]
    out = output_bytes(spec["kind"], manifest)
    daemons = [w for w in who if w != LIMIT]
    row = {"input": key, "verify": verify_mode, "file": spec["file"], "format": spec["fmt"], "kind": spec["kind"],
           "input_bytes": manifest["files"][key]["size"], "output_bytes": out,
           **summarize(results, daemons, out),
           "hangs": {w: sum(x.get("hung", False) for x in results if x["who"] == w) for w in daemons},
           "failures": {w: sum(not x["ok"] and not x.get("hung") for x in results if x["who"] == w) for w in daemons},
           "loadavg_1m": [x["loadavg_1m"] for x in results if "loadavg_1m" in x],
           "runs": results}
    judge(row, spec["ratio"], [w for w in who if w in (REF252, REF262)],
          spec.get("mbps") if verify_mode == "no" else None)
    if verify_mode != "no":
        row["target_text"], row["pass"] = "-", None
        for a in row["against"].values():
            a["pass"] = None
    return row


def tail_columns(ref: str) -> list:
    def hangs(r: dict) -> str:
        return f"{r['hangs'].get(OURS, 0)}/{r['hangs'].get(ref, 0)}"

    def n(r: dict) -> str:
        return f"{r['ours'].get('n', 0)}/{r['against'][ref]['reference'].get('n', 0)}"

    def load(r: dict) -> str:
        return f"{min(r['loadavg_1m']):.1f}-{max(r['loadavg_1m']):.1f}" if r["loadavg_1m"] else "-"

    return [("hangs o/r", hangs), ("n o/r", n), ("load", load)]


LEAD = [("input", "input"), ("verify", "verify")]


# --- D-Bus latency while 4 pulls run ----------------------------------------------------------


CALLS = {
    "ListImages (machined)": (MACHINE_BUS, "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
                              "ListImages"),
    "ListTransfers (importd)": (IMPORT_BUS, "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
                                "ListTransfers"),
}


def concurrent(cmds: list[list[str]], logs: list[Path], env: dict, probe, timeout: float) -> dict:
    """Runs the machinectl commands CMDS at once (output to LOGS), calling
    PROBE() every 10 ms until they have all ended (or TIMEOUT s); kills what
    is left.  Returns wall_s, rcs, outputs and timed_out (indices)."""
    procs = []
    t0 = time.perf_counter()
    try:
        for argv, log in zip(cmds, logs, strict=True):
            with open(log, "wb") as f:
                procs.append(subprocess.Popen(["machinectl", "--no-pager", *argv], env=env, stdin=subprocess.DEVNULL,
                                              stdout=f, stderr=subprocess.STDOUT))
        deadline = t0 + timeout
        while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
            probe()
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        timed_out = [i for i, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return {"wall_s": round(wall, 2), "rcs": [p.returncode for p in procs], "timed_out": timed_out,
            "outputs": [log.read_text(errors="replace") for log in logs]}


def xz_peak(children_hwm: dict, by_name_rss: dict) -> dict:
    return {"largest_hwm_mb": children_hwm.get("xz"), "all_summed_rss_mb": by_name_rss.get("xz")}


def latency_test(ctx: dict, cfg: dict) -> dict:
    daemons: Daemons = ctx["daemons"]
    machined: Daemons = ctx["machined"]
    env = ctx["env"]
    keys = [k for k in LATENCY_INPUTS if k in ctx["keys"]]
    result: dict = {"inputs": keys}
    machined.start(OURS)
    daemons.start(OURS)
    client = Client(120)
    idle = {c: [] for c in CALLS}
    for _ in range(cfg["idle_calls"]):
        for c, args in CALLS.items():
            idle[c].append(client.timed(*args)[0])
        time.sleep(0.005)
    for k in keys:
        warm(ctx["www"] / INPUTS[k]["file"])
    usage = daemons.measure()
    busy: dict[str, list[float]] = {c: [] for c in CALLS}
    concurrency: list[int] = []
    rounds = [0]

    def probe() -> None:
        for c, args in CALLS.items():
            dt, reply = client.timed(*args)
            busy[c].append(dt)
            if c.startswith("ListTransfers") and rounds[0] % 10 == 0:
                concurrency.append(len(reply.get_contents()))
        rounds[0] += 1

    try:
        run = concurrent([["pull-raw", "--verify=no", ctx["nginx"].url(INPUTS[k]["file"]), f"lat-{k}"] for k in keys],
                         [ctx["logdir"] / f"latency-{k}.log" for k in keys], env, probe, 900)
    finally:
        u = usage.finish()
    wall = run["wall_s"]
    rcs = dict(zip(keys, run["rcs"], strict=True))
    for k, text in zip(keys, run["outputs"], strict=True):
        if rcs[k] != 0:
            ctx["problems"].append(f"latency test: pull of {k} failed ({rcs[k]}): {text.strip()[-500:]}")
    if run["timed_out"]:
        ctx["problems"].append(f"latency test: pulls of {[keys[i] for i in run['timed_out']]} did not finish in "
                               "900 s")
    for k in keys:
        if rcs[k] == 0:
            ok, info = check_image("raw", ctx["manifest"], f"lat-{k}", False)
            if not ok:
                ctx["problems"].append(f"latency test: lat-{k} is wrong: {info}")
    daemons.stop()
    machined.stop()
    clear_pool()
    result.update({
        "pulls_wall_s": round(wall, 2), "pull_rc": rcs,
        "max_concurrent_transfers_seen": max(concurrency, default=0),
        "idle": {c: lat_stats(v) for c, v in idle.items()},
        "during_pulls": {c: lat_stats(v) for c, v in busy.items()},
        "importd_hwm_mb": u["daemon_hwm_mb"],
        "importd_children_hwm_mb": u["children_hwm_mb"],
        "importd_children_rss_peak_mb": u["children_rss_peak_mb"],
        "importd_children_rss_peak_by_name_mb": u["children_rss_peak_by_name_mb"],
        "xz_children_peak_mb": xz_peak(u["children_hwm_mb"], u["children_rss_peak_by_name_mb"]),
        "target_ms": LATENCY_TARGET_MS,
    })
    result["pass"] = all(s.get("p99_ms") is not None and s["p99_ms"] < LATENCY_TARGET_MS
                         for s in result["during_pulls"].values()) and all(v == 0 for v in rcs.values())
    return result


# --- latency under load: 24 pulls, some of them cut off once ------------------------------------


PROBES = {
    "machined ListImages": (MACHINE_BUS, "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
                            "ListImages", ""),
    "machined GetImage": (MACHINE_BUS, "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
                          "GetImage", "s", "probe"),
    "machined Manager properties": (MACHINE_BUS, "/org/freedesktop/machine1", "org.freedesktop.DBus.Properties",
                                    "GetAll", "s", "org.freedesktop.machine1.Manager"),
    "importd ListTransfers": (IMPORT_BUS, "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
                              "ListTransfers", ""),
    "importd Transfer properties": (IMPORT_BUS, None, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                    "org.freedesktop.import1.Transfer"),
}


class FaultServer:
    """bench/faultserver.py (tests/httpserver.py's TestServer) in a process of its own."""

    def __init__(self, root: Path, faults: dict, tmp: Path) -> None:
        self.root, self.faults, self.tmp = root, faults, tmp
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.stats: dict = {}

    def start(self) -> FaultServer:
        conf = self.tmp / "faults.json"
        conf.write_text(json.dumps(self.faults))
        with open(self.tmp / "faultserver.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("faultserver.py")),
                                          str(self.root), str(conf)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the fault server did not start (see {self.tmp / 'faultserver.log'})")
        self.port = int(line)
        return self

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            out, _ = proc.communicate("", timeout=30)
            self.stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def load_test(ctx: dict, args, cleanups) -> dict:
    daemons: Daemons = ctx["daemons"]
    machined: Daemons = ctx["machined"]
    env = ctx["env"]
    m = load_inputs(ctx["cache_root"], args.load_mib, cleanups)
    src = Path(m["dir"])
    www = ctx["workdir"] / "load-www"
    www.mkdir()
    variants = list(m["files"])
    pulls = []
    faults: dict = {}
    for i in range(args.load_pulls):
        v = variants[i % len(variants)]
        f = m["files"][v]
        name = f"{i:02d}-{f['file']}"
        link_into(www, src / f["file"], name)
        drop = args.load_drop_every > 0 and i % args.load_drop_every == args.load_drop_every - 1
        if drop:
            faults[name] = {"drop_after": f["size"] // 2, "drop_times": 1}
        pulls.append({"i": i, "variant": v, "kind": f["kind"], "file": name, "image": f"load-{i:02d}", "drop": drop})
    server = FaultServer(www, faults, ctx["workdir"]).start()
    cleanups.push("stop the fault server", server.stop)
    (POOL / "probe" / "etc").mkdir(parents=True)
    (POOL / "probe" / "etc" / "os-release").write_text('ID=probe\nPRETTY_NAME="probe"\n')
    machined.start(OURS)
    daemons.start(OURS)
    for f in {x["file"] for x in pulls}:
        warm(www / f)
    client = Client(120)
    lat: dict[str, list[float]] = {c: [] for c in PROBES}
    errors: dict[str, int] = {c: 0 for c in PROBES}
    usage = daemons.measure()
    state = {"paths": [], "seen_max": 0, "round": 0}

    def probe() -> None:
        for c, spec in PROBES.items():
            dest, path, iface, member, sig, *a = spec
            if path is None:
                if not state["paths"]:
                    continue
                path = state["paths"][state["round"] % len(state["paths"])]
            try:
                dt, reply = client.timed(dest, path, iface, member, sig, *a)
            except Exception:  # noqa: BLE001 - e.g. the transfer has just ended
                errors[c] += 1
                continue
            lat[c].append(dt)
            if member == "ListTransfers":
                transfers = reply.get_contents()
                state["paths"] = [t[5] for t in transfers]
                state["seen_max"] = max(state["seen_max"], len(transfers))
        state["round"] += 1

    try:
        run = concurrent([["pull-raw" if x["kind"] == "raw" else "pull-tar", "--verify=no", server.url(x["file"]),
                           x["image"]] for x in pulls], [ctx["logdir"] / f"load-{x['i']:02d}.log" for x in pulls],
                         env, probe, args.load_timeout)
    finally:
        u = usage.finish()
        server.stop()
    wall, seen_max = run["wall_s"], state["seen_max"]
    results = []
    for x, rc, text in zip(pulls, run["rcs"], run["outputs"], strict=True):
        res = dict(x, rc=rc)
        if rc != 0:
            res["ok"] = False
            ctx["problems"].append(f"load test: pull {x['i']} ({x['file']}) failed ({rc}): {text.strip()[-400:]}")
        elif x["kind"] == "raw":
            path = POOL / f"{x['image']}.raw"
            res["ok"] = path.exists() and sha256_file(path) == m["raw"]["sha256"]
        else:
            path = POOL / x["image"]
            res["ok"] = path.is_dir() and tree_digest(path) == m["tar"]["digest"]
        if rc == 0 and not res["ok"]:
            ctx["problems"].append(f"load test: pull {x['i']} ({x['file']}) has the wrong content")
        st = server.stats.get(x["file"], {})
        res["gets"], res["drops"] = st.get("gets"), st.get("drops")
        results.append(res)
    daemons.stop()
    machined.stop()
    clear_pool()
    per = {c: dict(lat_stats(v), errors=errors[c]) for c, v in lat.items()}
    ok_all = all(r["ok"] for r in results)
    return {
        "pulls": args.load_pulls, "load_mib": args.load_mib, "wall_s": round(wall, 2),
        "dropped": sum(1 for x in pulls if x["drop"]), "drops_done": sum(r["drops"] or 0 for r in results),
        "all_right": ok_all, "max_concurrent_transfers_seen": seen_max, "latency": per,
        "pass": all(s.get("p99_ms") is not None and s["p99_ms"] < LATENCY_TARGET_MS for s in per.values()),
        "importd": u, "inputs": {k: v for k, v in m.items() if k != "dir"}, "results": results,
    }


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "one run per input and daemon (about 8 minutes)")
    ap.add_argument("--runs", type=int, help="runs per input and daemon (default 3, --quick 1)")
    ap.add_argument("--inputs", help=f"comma-separated inputs (default: {','.join(INPUTS)}; with --profile: raw)")
    add_transfer_args(ap, "pulls")
    ap.add_argument("--hang-timeout", type=float, help="timeout of a pull before it counts as a hang "
                                                       "(default 300 s, --quick 150 s)")
    ap.add_argument("--no-latency", action="store_true", help="skip the D-Bus latency test")
    ap.add_argument("--no-verify-run", action="store_true", help="skip the --verify=checksum runs")
    ap.add_argument("--load", action="store_true", help="only the latency-under-load test (see above)")
    ap.add_argument("--load-pulls", type=int, default=24, help="concurrent pulls of --load (default %(default)s)")
    ap.add_argument("--load-mib", type=int, default=128,
                    help="size of --load's raw image in MiB, a multiple of 8 (default %(default)s)")
    ap.add_argument("--load-drop-every", type=int, default=3,
                    help="every N-th pull of --load has its connection reset once mid-body (default %(default)s)")
    ap.add_argument("--load-timeout", type=float, default=900, help="how long --load's pulls may take (s)")
    args = ap.parse_args()
    keys = [k for k in (args.inputs or ("raw" if args.profile else ",".join(INPUTS))).split(",") if k]
    if not keys or any(k not in INPUTS for k in keys):
        ap.error(f"--inputs: choose from {', '.join(INPUTS)}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs:
        cfg["runs"] = args.runs
    if args.hang_timeout:
        cfg["hang_timeout"] = args.hang_timeout
    no_extras = bool(args.profile) or args.load
    verify_keys = [] if (args.no_verify_run or no_extras) else [k for k in cfg["verify_inputs"] if k in keys]
    profiler = Profiler(Path(args.profile) if args.profile else None)  # may pip install py-spy: before unshare

    s = Session(args)
    refs = [] if args.load else s.refs()
    code = code_state()
    rows: list[dict] = []
    verify_rows: list[dict] = []
    hangs: list[dict] = []
    latency: dict = {}
    load: dict = {}
    manifest: dict = {}
    sid = SidRoot(Path(args.sid_root))
    who_all = references("importd", refs, sid, s.notes)
    nginx_bin = None
    if args.profile:
        s.notes.append(f"our importd was profiled with py-spy during its pulls: its times are perturbed "
                       f"(stacks, flame graphs and top lists in {args.profile})")
    with s.guard():
        cache_root = Path(args.cache) if args.cache else default_cache(args.raw_mib, args.tar_mib)
        if not args.load:
            nginx_bin = ensure_tool("nginx", ("nginx-light", "nginx"), s.notes, "this benchmark's HTTP server")
            manifest = get_inputs(cache_root, keys, s.cleanups, args.regen, args.raw_mib, args.tar_mib,
                                  args.gen_wait)
        cache = Path(manifest["cache"]) if manifest else cache_root
        s.start_measuring()
        workdir, logdir, env = s.private_world("importd-pull-bench-", sid if REF262 in who_all else None, "btrfs")
        daemons = Daemons("importd", env, logdir, s.problems, sid)
        machined = Daemons("machined", env, logdir, s.problems, sid)
        s.cleanups.push("stop machined", machined.stop)
        s.cleanups.push("stop importd", daemons.stop)
        s.cleanups.push("stop py-spy", profiler.stop)
        ctx = {"daemons": daemons, "machined": machined, "env": env, "manifest": manifest, "problems": s.problems,
               "checked": set(), "profiler": profiler, "hangs": hangs, "quick": args.quick, "keys": keys,
               "logdir": logdir, "workdir": workdir, "cache_root": cache_root}
        if args.load:
            note(f"load test: {args.load_pulls} concurrent pulls of {args.load_mib} MiB inputs, every "
                 f"{args.load_drop_every}rd cut off once mid-body; prober on our machined and importd")
            load = load_test(ctx, args, s.cleanups)
        else:
            www = workdir / "www"
            sums = make_www(www, cache, keys, manifest, verify_keys)
            nginx = Nginx(nginx_bin, www, workdir / "nginx")
            def keep_nginx_log() -> None:
                if (workdir / "nginx" / "error.log").exists():
                    shutil.copy(workdir / "nginx" / "error.log", logdir / "nginx-error.log")

            s.cleanups.push("keep nginx log", keep_nginx_log)
            nginx.start()
            s.cleanups.push("stop nginx", nginx.stop)
            note(f"nginx {nginx_bin} serving {www} on 127.0.0.1:{nginx.port} (pid {nginx.proc.pid})")
            limits = None if args.no_limit else Limits(cache, cache / "rootfs.tar", "btrfs", s.notes)
            if limits:
                limits.prepare(keys)
            ctx.update(www=www, nginx=nginx, limits=limits)
            run_pulls(ctx, keys, who_all, cfg, rows, limits is not None)
            for key in verify_keys:
                verify_rows.append(verify_run(ctx, key, who_all, cfg, rows, sums))
            if not args.no_latency and not no_extras and [k for k in LATENCY_INPUTS if k in keys]:
                note(f"D-Bus latency: our machined + importd, 4 concurrent pulls of {', '.join(LATENCY_INPUTS)}")
                latency = latency_test(ctx, cfg)
                note(f"D-Bus latency: {json.dumps(latency['during_pulls'])}; 4 pulls took {latency['pulls_wall_s']} s,"
                     f" importd HWM {latency['importd_hwm_mb']} MB")

    s.busy_note()
    return report(s, args, cfg, code, sid, who_all, rows, verify_rows, hangs, latency, load, manifest, nginx_bin,
                  profiler)


def run_pulls(ctx: dict, keys: list[str], who_all: list[str], cfg: dict, rows: list[dict], with_limit: bool) -> None:
    def pull(key: str, w: str, r: int, results: list[dict]) -> dict:
        done = [x["seconds"] for x in results if x["ok"] and x["who"] != LIMIT]
        timeout = min(cfg["hang_timeout"], max(60.0, 5 * min(done))) if done else cfg["hang_timeout"]
        return one_pull(key, w, r, "no", timeout, ctx)

    for key in keys:
        results, who = alternate(key, INPUTS[key], who_all, cfg["runs"], with_limit,
                                 lambda r, key=key: one_limit(key, r, ctx),
                                 lambda w, r, done, key=key: pull(key, w, r, done),
                                 lambda res: f", cache entries removed: {len(res['cache_entries_removed'])}")
        row = make_row(key, results, ctx["manifest"], who)
        rows.append(row)
        row_note(key, row)


def verify_run(ctx: dict, key: str, who_all: list[str], cfg: dict, rows: list[dict], sums: dict) -> dict:
    who = [w for w in who_all if w != REF252 or INPUTS[key]["ref252"]]
    results = []
    base = next((x for x in rows if x["input"] == key), None)
    for w in who:
        med = ((base or {}).get("ours") if w == OURS else (base or {}).get("against", {}).get(w, {})
               .get("reference", {})) or {}
        timeout = min(cfg["hang_timeout"], max(60.0, 5 * med["median"])) if med.get("median") else cfg["hang_timeout"]
        res = one_pull(key, w, 0, "checksum", timeout, ctx)
        results.append(res)
        note(f"{key} --verify=checksum {LABELS[w]}: {res['seconds']:.2f} s"
             f"{' HUNG' if res['hung'] else '' if res['ok'] else ' FAILED'}")
    vrow = make_row(key, results, ctx["manifest"], who, "checksum")
    if base:
        def cost(a: dict, b: dict) -> float | None:
            return a["median"] - b["median"] if a.get("median") and b.get("median") else None

        vrow["hashing_cost_s"] = {OURS: cost(vrow["ours"], base["ours"])}
        for ref in (REF252, REF262):
            vrow["hashing_cost_s"][ref] = cost(vrow["against"][ref]["reference"],
                                               base["against"][ref]["reference"])
    vrow["sha256sums"] = {INPUTS[key]["file"]: sums.get(INPUTS[key]["file"])}
    return vrow


def report(s: Session, args, cfg: dict, code: dict, sid: SidRoot, who_all: list[str], rows: list[dict],
           verify_rows: list[dict], hangs: list[dict], latency: dict, load: dict, manifest: dict,
           nginx_bin: str | None, profiler: Profiler) -> int:
    refs_ran = [w for w in who_all if w != OURS]
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
        "ours_xz_children_peak_mb_4_concurrent": latency.get("xz_children_peak_mb"),
    }
    for p in ("reference", "reference_262"):
        rss[f"{p}_importd_peak_mb"] = max((r[f"{p}_daemon_hwm_mb"] for r in rows + verify_rows
                                           if r[f"{p}_daemon_hwm_mb"] is not None), default=None)
        rss[f"{p}_children_peak_mb"] = merge_max([r[f"{p}_children_hwm_mb"] for r in rows + verify_rows])
    hang_counts = {w: sum(1 for h in hangs if h["who"] == w) for w in who_all}
    zst = next((r for r in rows if r["input"] == "zst"), None)

    print()
    what = "importd pull benchmark" + (", latency under load" if args.load else "")
    print(s.title(what, "" if args.load else f"{cfg['runs']} run(s) per daemon"))
    print(f"load average at start {s.load_start['loadavg']}, at end {(s.load_end or {}).get('loadavg')}; code under "
          f"test: {code['head']}"
          f"{' + uncommitted changes in ' + str(len(code['modified'])) + ' file(s)' if code['modified'] else ''}")
    goals: list[dict] = []
    if rows:
        print("times: wall time of the whole `machinectl pull-raw|pull-tar --verify=no URL NAME` (median; nginx on "
              "127.0.0.1, input in the page cache, pool emptied incl. the download cache between runs); MB/s: output "
              "(raw: the virtual disk; tar: the tar stream) per second; CPU s: daemon + children; RSS: VmHWM of "
              "our importd (restarted per pull); children: peak VmHWM per command name; ratio+sync: with a syncfs() "
              "of the pool right after machinectl returned added to both; CPU ratio: ours/reference CPU seconds "
              "(less sensitive to other load than wall time); load: 1-min load average at the runs' starts")
        print_tables(rows, refs_ran, {ref: daemon_path("importd", ref, sid) for ref in refs_ran}, LEAD, tail_columns)
        if verify_rows:
            print()
            print("with --verify=checksum (SHA256SUMS), one run per daemon:")
            for ref in refs_ran or [REF252]:
                print(f"against {LABELS[ref]}:")
                print_against([r for r in verify_rows if ref in r["refs"]], ref, LEAD, tail_columns(ref))
            for v in verify_rows:
                hc = v.get("hashing_cost_s", {})
                print(f"  {v['input']}: hashing cost (checksum - median --verify=no): "
                      + ", ".join(f"{LABELS[w]} {fmt(hc.get(w), '+.2f', ' s')}" for w in who_all))
        if zst:
            print(f"our zstd pull: {fmt(zst['ours_mbps'], '.0f')} MB/s of output ({fmt(zst['ours'].get('median'))} s "
                  f"for {zst['output_bytes'] / MB:.0f} MB)")
        print(f"our importd peak RSS: {fmt(single_hwm, '.1f')} MB single pull, {fmt(conc_hwm, '.1f')} MB with 4 "
              f"concurrent pulls (target <= {RSS_TARGET_MB:.0f} MB): {verdict(rss['pass'])}; its children: "
              f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss['ours_children_peak_mb'].items())) or '-'}"
              + "".join(f"; {LABELS[ref]}: systemd-importd {fmt(rss[p + '_importd_peak_mb'], '.1f')} MB, children "
                        f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(rss[p + '_children_peak_mb'].items()))}"
                        for ref, p in ((REF252, "reference"), (REF262, "reference_262")) if ref in who_all))
        goals += transfer_goals(rows, "pull", ["input"])
        n_conc = len(latency.get("inputs", LATENCY_INPUTS))
        goals.append(goal(f"our importd peak RSS with {n_conc} concurrent pulls (VmHWM, children separately)",
                          fmt(conc_hwm, ".1f", " MB"), f"<= {RSS_TARGET_MB:.0f} MB",
                          None if conc_hwm is None else conc_hwm <= RSS_TARGET_MB))
        goals.append(goal("our importd peak RSS, single pulls", fmt(single_hwm, ".1f", " MB"),
                          f"<= {RSS_TARGET_MB:.0f} MB", None if single_hwm is None else single_hwm <= RSS_TARGET_MB))
    if latency:
        xz = latency["xz_children_peak_mb"]
        print(f"D-Bus latency during {len(latency['inputs'])} concurrent pulls ({', '.join(latency['inputs'])}; "
              f"{latency['pulls_wall_s']} s; up to {latency['max_concurrent_transfers_seen']} transfers seen; "
              f"importd VmHWM {fmt(latency['importd_hwm_mb'], '.1f')} MB, its xz children: largest "
              f"{fmt(xz['largest_hwm_mb'], '.0f')} MB, all at once {fmt(xz['all_summed_rss_mb'], '.0f')} MB):")
        for c in CALLS:
            d, i = latency["during_pulls"][c], latency["idle"][c]
            print(f"  {c:24s} p50 {fmt(d.get('p50_ms'), '.1f')} ms, p99 {fmt(d.get('p99_ms'), '.1f')} ms, "
                  f"max {fmt(d.get('max_ms'), '.1f')} ms (n={d['n']}); idle p50 {fmt(i.get('p50_ms'), '.1f')} ms, "
                  f"p99 {fmt(i.get('p99_ms'), '.1f')} ms")
            goals.append(goal(f"D-Bus {c} during {len(latency['inputs'])} concurrent pulls, p99",
                              fmt(d.get("p99_ms"), ".1f", " ms"),
                              f"< {LATENCY_TARGET_MS:.0f} ms",
                              None if d.get("p99_ms") is None else d["p99_ms"] < LATENCY_TARGET_MS))
    if load:
        print(f"{load['pulls']} concurrent pulls ({load['load_mib']} MiB raw images as raw/gz/zst/xz, tars as "
              f"tar/tar.gz) in {load['wall_s']} s, {load['dropped']} of them cut off once mid-body "
              f"({load['drops_done']} resets done); right content: "
              f"{sum(r['ok'] for r in load['results'])} of {load['pulls']}; up to "
              f"{load['max_concurrent_transfers_seen']} transfers seen; importd VmHWM "
              f"{fmt(load['importd']['daemon_hwm_mb'], '.1f')} MB")
        print_table(("method", "n", "errors", "p50 ms", "p99 ms", "max ms", "goal", "result"),
                    [(c, st["n"], st["errors"], fmt(st.get("p50_ms"), ".1f"), fmt(st.get("p99_ms"), ".1f"),
                      fmt(st.get("max_ms"), ".1f"), f"p99 < {LATENCY_TARGET_MS:.0f} ms",
                      verdict(None if st.get("p99_ms") is None else st["p99_ms"] < LATENCY_TARGET_MS))
                     for c, st in load["latency"].items()], left=(0, 6, 7))
        goals.append(goal(f"load: all {load['pulls']} pulls right (SHA-256 / tree digest)",
                          f"{sum(r['ok'] for r in load['results'])} of {load['pulls']}", "all", load["all_right"]))
        for c, st in load["latency"].items():
            goals.append(goal(f"load: D-Bus {c}, p99", fmt(st.get("p99_ms"), ".1f", " ms"),
                              f"< {LATENCY_TARGET_MS:.0f} ms",
                              None if st.get("p99_ms") is None else st["p99_ms"] < LATENCY_TARGET_MS))
    if profiler.written:
        print()
        for label in profiler.written:
            print(f"py-spy, our importd, {label}: {args.profile}/{label}.svg (flame graph), "
                  f"{args.profile}/{label}-top.txt:")
            for line in profiler.top(label):
                print(f"  {line}")
    if rows:
        print("hangs (pull timed out, daemon restarted): "
              + ", ".join(f"{LABELS[w]} {n}" for w, n in hang_counts.items()))
        for h in hangs:
            procs = ", ".join(f"{p['name']}[{p['state']}, cpu {p['cpu_s']} s, {p['wchan']}]" for p in h["processes"])
            print(f"  {h['input']} --verify={h['verify']} run {h['run']} {LABELS[h['who']]}: after {h['timeout_s']} s:"
                  f" {procs}")
    if goals:
        print()
        print_goals(goals)
    s.print_notes()
    return s.report({
        "reference": {ref: daemon_path("importd", ref, sid) for ref in refs_ran},
        "sid": {"root": str(sid.root), "version": sid.version()} if REF262 in who_all else None,
        "code": code,
        "server": nginx_bin,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "inputs": {k: v for k, v in manifest.items() if k in ("files", "raw", "tar", "xz", "cache", "commands")},
        "timing_method": "wall time of `machinectl --no-pager pull-raw|pull-tar --verify=MODE URL NAME` (returns when "
                         "the transfer is done) from a private nginx on 127.0.0.1; input warmed with cat before each "
                         "run; daemons restarted per run and alternated with the limit's tools, order reversed every "
                         "run; pool emptied (image and hidden .raw-*/.tar-* download cache), sync and btrfs "
                         "subvolume sync between runs (untimed)",
        "results": rows,
        "verify_checksum": verify_rows,
        "rss": rss,
        "latency": latency,
        "load": load,
        "profile": {"dir": args.profile, "pulls": profiler.written} if args.profile else None,
        "hangs": {"counts": hang_counts, "details": hangs},
        "goals": goals,
    })


if __name__ == "__main__":
    sys.exit(main())
