"""pull-oci benchmark: an image of about 300 MB in 5 layers (--quick: 30 MB)
pulled from Debian's docker-registry over TLS on loopback, side by side in
one run by

  ours      our importd (PullOci, through sid's importctl 262),
  262       systemd 262's systemd-pull oci (chrooted into the sid root),
  skopeo    skopeo copy docker://... oci:DIR + umoci raw unpack (the usual
            tools, no layer store, no sync),

then a second image that shares 4 of the 5 layers (each of ours and 262
keep their layer store from the first pull; skopeo copies into the same OCI
directory, which skips the blobs it has, and unpacks all of it again).

The layers are random data (incompressible, gzip), so the time is transfer,
hashing, unpacking and writing.  Rounds alternate the order.  Prints
medians and ratios and writes JSON (--json FILE).

    .venv/bin/python bench/oci.py --quick      # 30 MB, 1 round
    .venv/bin/python bench/oci.py              # 300 MB, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    POOL,
    REPO,
    Session,
    add_common_args,
    clear_pool,
    fmt,
    median,
    note,
    print_table,
    ratio,
    run,
)
from daemons import OURS, Daemons, SidRoot
from profiling import Profiler

sys.path.insert(0, str(REPO))
from tests.ocienv import CA, Layout, Registry, missing_tools, push, sid_importctl  # noqa: E402

WHO = ("ours", "262", "skopeo")


def build(workdir: Path, total: int) -> Layout:
    """Tag "first": 5 layers of TOTAL/5 random bytes; "second": the first 4
    of them and another one."""
    layout = Layout(workdir / "layout")
    bundle = layout.new("first")
    per = total // 5
    for k in range(5):
        d = bundle / "rootfs" / f"layer{k}"
        d.mkdir(parents=True)
        for i in range(4):
            with open(d / f"blob{i}", "wb") as f:
                f.write(os.urandom(per // 4))
        if k == 0:
            (bundle / "rootfs/etc").mkdir()
            (bundle / "rootfs/etc/os-release").write_text("ID=bench\n")
        layout.repack("first", bundle)
        if k == 3:
            layout.copy_tag("first", "base4")
    extra = layout.new("scratch")  # a fresh bundle for the other 5th layer
    shutil.rmtree(extra)
    run(["umoci", "unpack", "--image", f"{layout.path}:base4", str(extra)], capture_output=True)
    d = extra / "rootfs/other"
    d.mkdir()
    with open(d / "blob", "wb") as f:
        f.write(os.urandom(per))
    layout.repack("base4", extra)
    layout.copy_tag("base4", "second")
    return layout


class Bench:
    def __init__(self, s: Session, workdir: Path, logdir: Path, env: dict[str, str], sid: SidRoot,
                 registry: Registry, ca: CA, profiler: Profiler) -> None:
        self.s, self.workdir, self.env, self.sid, self.registry = s, workdir, env, sid, registry
        self.profiler = profiler
        self.profiled = 0
        self.daemons = Daemons("importd", env, logdir, s.problems, sid)
        self.ca = ca
        self.bundle_bound = False

    def ref(self, tag: str) -> str:
        return f"{self.registry.host}/bench/img:{tag}"

    def ours(self, tag: str, name: str) -> float:
        pid = self.daemons.ensure(OURS)
        self.profiled += 1
        self.profiler.start(pid, f"ours-{tag}-{self.profiled}")
        t0 = time.perf_counter()
        try:
            r = sid_importctl("pull-oci", "-m", self.ref(tag), name, timeout=1800)
            dt = time.perf_counter() - t0
        finally:
            self.profiler.stop()
        if r.returncode != 0:
            raise RuntimeError(f"our pull failed: {r.stderr[-2000:]}")
        return dt

    def ref262(self, tag: str, name: str) -> float:
        if not self.bundle_bound:
            run(["mount", "--bind", str(self.ca.bundle), str(self.sid.root / "etc/ssl/certs/ca-certificates.crt")])
            self.s.cleanups.push("unbind the CA bundle from the sid root",
                                 lambda: run(["umount", str(self.sid.root / "etc/ssl/certs/ca-certificates.crt")]))
            self.bundle_bound = True
        self.daemons.stop()
        self.sid.bind_pool()
        try:
            t0 = time.perf_counter()
            r = subprocess.run(["chroot", str(self.sid.root), "/usr/lib/systemd/systemd-pull", "oci",
                                self.ref(tag), name], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                           "SYSTEMD_LOG_LEVEL": "notice"},
                               capture_output=True, text=True, timeout=1800)
            dt = time.perf_counter() - t0
        finally:
            self.sid.unbind_pool()
        if r.returncode != 0:
            raise RuntimeError(f"systemd-pull 262 failed: {r.stderr[-2000:]}")
        return dt

    def skopeo(self, tag: str, name: str) -> float:
        oci_dir = self.workdir / "skopeo-oci"
        rootfs = POOL / name
        t0 = time.perf_counter()
        run(["skopeo", "copy", "-q", f"docker://{self.ref(tag)}", f"oci:{oci_dir}:{tag}"], capture_output=True)
        run(["umoci", "raw", "unpack", "--image", f"{oci_dir}:{tag}", str(rootfs)], capture_output=True)
        return time.perf_counter() - t0

    def reset(self) -> None:
        self.daemons.stop()
        clear_pool("btrfs")
        shutil.rmtree(self.workdir / "skopeo-oci", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "a 30 MB image, 1 round")
    ap.add_argument("--size-mb", type=int, help="image size in MB (default 300, --quick 30)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy our importd during its pulls (perturbs its times)")
    args = ap.parse_args()
    profiler = Profiler(Path(args.profile) if args.profile else None)  # may pip install py-spy: before unshare
    s = Session(args)
    results: dict[str, dict[str, list[float]]] = {w: {"first": [], "second": []} for w in WHO}
    size = (args.size_mb or (30 if args.quick else 300)) * 1_000_000
    rounds = args.rounds or (1 if args.quick else 3)
    with s.guard():
        if missing_tools():
            raise SystemExit(f"missing: {missing_tools()} (make deps installs them)")
        sid = SidRoot()
        workdir, logdir, env = s.private_world("oci-bench-", sid, pool="btrfs")
        ca = CA(workdir / "ca")
        ca.install()
        s.cleanups.push("remove the CA bundle", ca.uninstall)
        registry = Registry(workdir, ca, workdir / "storage").start()
        s.cleanups.push("stop docker-registry", registry.stop)
        note(f"building a {size // 1_000_000} MB image in 5 layers")
        layout = build(workdir, size)
        for tag in ("first", "second"):
            push(layout.path, tag, registry.host, f"bench/img:{tag}")
        who = ["ours"] + ([] if "262" not in s.refs() or sid.missing("importd") else ["262"]) + ["skopeo"]
        b = Bench(s, workdir, logdir, env, sid, registry, ca, profiler)
        s.cleanups.push("stop py-spy", profiler.stop)
        s.start_measuring()
        for i in range(rounds):
            for w in who if i % 2 == 0 else who[::-1]:
                b.reset()
                fn = {"ours": b.ours, "262": b.ref262, "skopeo": b.skopeo}[w]
                for tag in ("first", "second"):
                    dt = fn(tag, f"{w}-{tag}")
                    results[w][tag].append(dt)
                    note(f"round {i + 1}: {w} {tag}: {dt:.2f} s")
        b.reset()
    s.busy_note()
    print(s.title("pull-oci benchmark", f"{size // 1_000_000} MB in 5 layers, {rounds} round(s)"))
    mb = size / 1e6
    lines = []
    for w in WHO:
        for tag in ("first", "second"):
            m = median(results[w][tag])
            lines.append((w, tag, fmt(m, ".2f", " s"), fmt(mb / m if m and tag == "first" else None, ".0f", " MB/s"),
                          fmt(ratio(m, median(results["262"][tag])), ".2f", "x"),
                          fmt(ratio(m, median(results["skopeo"][tag])), ".2f", "x")))
    print_table(("who", "pull", "median", "rate", "vs 262", "vs skopeo"), lines)
    for label in profiler.written:
        print(f"\nprofile {label}:")
        for line in profiler.top(label):
            print("  " + line)
    s.print_notes()
    return s.report({"size_bytes": size, "rounds": rounds, "results": results})


if __name__ == "__main__":
    raise SystemExit(main())
