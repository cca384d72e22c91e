"""The inputs of bench/import.py and bench/pull.py, made once into a cache
directory and reused while its manifest matches.

disk.raw is a sparse raw disk image of ``raw_mib`` MiB (2048 by default),
about 45% of it data in 8 MiB segments (5..7 MiB each of random bytes or of
the contents of /usr files); from it disk-mt.raw.xz (xz -6 -T2, many
blocks), disk-st.raw.xz (xz -6 -T1, one block), disk.raw.gz (gzip -6),
disk.raw.zst (zstd -3), disk.qcow2 and disk-c.qcow2 (qemu-img convert, the
second with -c).  rootfs.tar holds /usr/lib/python3*, /usr/share/{man,perl,
vim} and os-release (~200 MB; with ``tar_mib`` only its first ~N MiB of
files); from it rootfs.tar.xz (xz -6 -T2) and rootfs.tar.gz (gzip -6).
``SPECS`` says what each input is and its goals (``specs(keys)``).

``default_cache(raw_mib, tar_mib)`` is /var/tmp/importd-bench for the
default sizes, a directory of its own for others.  ``get_inputs()`` waits
while another process is generating into the same cache.

The load test of bench/pull.py has its own small set (``load_inputs()``):
load.raw (``mib`` MiB, made like disk.raw) as .raw, .raw.gz, .raw.zst,
.raw.xz, and load.tar (about mib/2 MiB of /usr files) as .tar and .tar.gz,
with the SHA-256 of load.raw and a content digest of load.tar
(``tar_digest``, compared with ``tree_digest`` of what was pulled).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

from common import MB, POOL, Cleanups, MiB, is_subvolume, note, sha256_file, tree_summary

GEN_VERSION = 1
RAW_SIZE = 2 << 30
SEGMENT = 8 * MiB
SEGMENTS_RANDOM = 72
SEGMENTS_USR = 72
USR_SOURCES = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib", "/usr/share")
TAR_MEMBERS = ("etc/os-release", "usr/lib/os-release", "usr/lib/python3", "usr/lib/python3.11",
               "usr/share/man", "usr/share/perl", "usr/share/vim")
DEFAULT_CACHE = Path("/var/tmp/importd-bench")

# key: the file in the cache, and what kind of image it is
FILES = {
    "raw": ("disk.raw", "raw"),
    "xz-mt": ("disk-mt.raw.xz", "raw"),
    "xz-st": ("disk-st.raw.xz", "raw"),
    "gz": ("disk.raw.gz", "raw"),
    "zst": ("disk.raw.zst", "raw"),
    "qcow2": ("disk.qcow2", "raw"),
    "qcow2-c": ("disk-c.qcow2", "raw"),
    "tar-xz": ("rootfs.tar.xz", "tar"),
    "tar-gz": ("rootfs.tar.gz", "tar"),
}

# key: format, ratio goal against each reference, systemd 252 timed?, MB/s goal
SPECS: dict[str, dict] = {
    "raw": dict(fmt="uncompressed", ratio=0.8, ref252=True),
    "xz-mt": dict(fmt="xz -T2 (multi-block)", ratio=0.8, ref252=True),
    "xz-st": dict(fmt="xz -T1 (single block)", ratio=1.0, ref252=True),
    "gz": dict(fmt="gzip -6", ratio=0.8, ref252=True),
    "zst": dict(fmt="zstd -3", ratio=0.8, ref252=False, mbps=400.0),
    "qcow2": dict(fmt="qcow2", ratio=0.8, ref252=True),
    "qcow2-c": dict(fmt="qcow2 -c (zlib)", ratio=0.8, ref252=True),
    "tar-xz": dict(fmt="tar, xz -T2 (multi-block)", ratio=0.8, ref252=True),
    "tar-gz": dict(fmt="tar, gzip -6", ratio=0.8, ref252=True),
}


def specs(keys: list[str]) -> dict[str, dict]:
    """The specs of KEYS, in that order, with their file and kind (raw or tar)."""
    return {k: dict(SPECS[k], file=FILES[k][0], kind=FILES[k][1]) for k in keys}


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


def default_cache(raw_mib: int, tar_mib: int | None) -> Path:
    if raw_mib == RAW_SIZE >> 20 and tar_mib is None:
        return DEFAULT_CACHE
    return DEFAULT_CACHE.with_name(f"{DEFAULT_CACHE.name}-{raw_mib}m-{tar_mib or 'full'}t")


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


def tar_file_list(members: list[str], budget: int | None) -> list[str] | None:
    """The entries of MEMBERS (below /) in walk order, directories first, until
    about BUDGET bytes of file data; None for all of them (no budget)."""
    if budget is None:
        return None
    out: list[str] = []
    total = 0
    for m in members:
        top = "/" + m
        if not os.path.isdir(top) or os.path.islink(top):
            out.append(m)
            continue
        parts = m.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in out:
                out.append(parent)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            out.append(dirpath[1:])
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in sorted(filenames + links):
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out.append(p[1:])
                total += st.st_size
                if total >= budget:
                    return out
    return out


def make_tar(out: Path, gen: Generator, budget: int | None) -> list[str]:
    members = [m for m in TAR_MEMBERS if os.path.lexists("/" + m)]
    listing = tar_file_list(members, budget)
    if listing is None:
        argv = ["tar", "--numeric-owner", "-C", "/", "-cf", "-", *members]
    else:
        lst = out.with_name(out.name + ".list")
        lst.write_bytes(b"".join(x.encode() + b"\0" for x in listing))
        argv = ["tar", "--numeric-owner", "-C", "/", "--no-recursion", "--null", "-T", str(lst), "-cf", "-"]
    try:
        gen.finish(gen.job(argv, out, out.name))
    finally:
        out.with_name(out.name + ".list").unlink(missing_ok=True)
    return members


def generate(cache: Path, regen: bool, keys: list[str], raw_mib: int, cleanups: Cleanups,
             tar_mib: int | None = None) -> dict:
    """The inputs KEYS and the manifest, each built only if missing (all of
    them again with REGEN, or when the cache was made for other sizes)."""
    manifest_path = cache / "manifest.json"
    manifest: dict = {}
    if not regen and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if (manifest.get("version") != GEN_VERSION or manifest.get("raw_mib", 2048) != raw_mib
                or manifest.get("tar_mib") != tar_mib):
            note(f"the inputs in {cache} were made differently: making them again")
            manifest = {}
    if not manifest:
        if cache.exists():
            for name in [*(f for f, _ in FILES.values()), "disk.raw", "rootfs.tar", "manifest.json"]:
                (cache / name).unlink(missing_ok=True)
            for leftover in cache.glob("*.tmp"):
                leftover.unlink()
        manifest = {"version": GEN_VERSION, "raw_mib": raw_mib, "tar_mib": tar_mib, "files": {}, "xz": {},
                    "commands": {k: " ".join(b[1][:-1] if b[3] else b[1]) for k, b in BUILD.items()}}
    manifest.setdefault("files", {})
    manifest.setdefault("xz", {})
    cache.mkdir(parents=True, exist_ok=True)
    missing = [k for k in keys if not (cache / FILES[k][0]).exists() or k not in manifest["files"]]
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
        members = make_tar(tar, gen, tar_mib << 20 if tar_mib else None)
        manifest["tar"] = dict(tar_expectation(tar), size=tar.stat().st_size, members=members)
        for k in ("tar-xz", "tar-gz"):  # made from another tar: stale
            manifest["files"].pop(k, None)
            if k not in missing and k in keys:
                missing.append(k)
        note(f"  rootfs.tar: {tar.stat().st_size / MB:.0f} MB in {time.monotonic() - t0:.0f} s")
    save()

    def start(key: str):
        src, pre, post, to_stdout = BUILD[key]
        out = cache / FILES[key][0]
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


def manifest_complete(cache: Path, keys: list[str], raw_mib: int, tar_mib: int | None) -> dict | None:
    try:
        m = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if m.get("raw_mib", 2048) != raw_mib or m.get("tar_mib") != tar_mib:
        return None
    if "raw" not in m or "sha256" not in m.get("raw", {}):
        return None
    if any(FILES[k][1] == "tar" for k in keys) and "tar" not in m:
        return None
    for k in keys:
        if k not in m.get("files", {}) or not (cache / FILES[k][0]).exists():
            return None
    return m


def get_inputs(cache: Path, keys: list[str], cleanups: Cleanups, regen: bool, raw_mib: int, tar_mib: int | None,
               gen_wait: float = 2400) -> dict:
    """The manifest of the inputs KEYS in CACHE (with "cache" added), made if
    needed; waits (up to GEN_WAIT s) while another process generates into CACHE."""
    deadline = time.monotonic() + gen_wait
    while not regen:
        m = manifest_complete(cache, keys, raw_mib, tar_mib)
        busy = generator_busy(cache)
        if m is not None and not busy:
            note(f"reusing the inputs in {cache} (--regen makes them again)")
            return dict(m, cache=str(cache))
        if not busy:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"another process is still generating {busy} in {cache}; gave up after {gen_wait:.0f} s")
        note(f"another process is generating {', '.join(busy)} in {cache}; waiting")
        time.sleep(15)
    m = generate(cache, regen, keys, raw_mib, cleanups, tar_mib)
    return dict(m, cache=str(cache))


def output_bytes(kind: str, manifest: dict) -> int:
    """What an image of KIND decompresses to: the virtual disk, or the tar stream."""
    return manifest["raw"]["size"] if kind == "raw" else manifest["tar"]["size"]


def check_image(kind: str, manifest: dict, name: str, full: bool = True) -> tuple[bool, dict]:
    """Is the image NAME in the pool what the input was?  raw: size and
    (FULL) SHA-256 of the content; tar: counts of files, symlinks and bytes."""
    if kind == "raw":
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
    info = dict(got, subvolume=is_subvolume(path))
    # The tar's own top directories (usr, usr/lib, ...) are directory entries too.
    ok = got["files"] == want["files"] and got["symlinks"] == want["symlinks"] and got["bytes"] == want["bytes"]
    if not ok:
        info["error"] = f"tree {got}, tar had {want}"
    return ok, info


# --- content digests ----------------------------------------------------------------


def _digest(entries: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(entries):
        h.update(f"{k}\0{entries[k]}\n".encode())
    return h.hexdigest()


def tar_digest(path: Path) -> str:
    """A digest of the regular files (by content) and symlinks (by target) in the tar."""
    entries: dict[str, str] = {}
    with tarfile.open(path, "r:") as t:
        for m in t:
            name = m.name.strip("/")
            if m.isreg():
                h = hashlib.sha256()
                f = t.extractfile(m)
                while chunk := f.read(MiB):
                    h.update(chunk)
                entries[name] = "f" + h.hexdigest()
            elif m.islnk():
                entries[name] = entries.get(m.linkname.strip("/"), "f?")
            elif m.issym():
                entries[name] = "l" + m.linkname
    return _digest(entries)


def tree_digest(root: Path) -> str:
    """tar_digest's counterpart for a tree on disk."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                entries[rel] = "l" + os.readlink(p)
            elif os.path.isfile(p):
                entries[rel] = "f" + sha256_file(Path(p))
    return _digest(entries)


# --- the load test's inputs --------------------------------------------------------------

LOAD_VARIANTS = {
    # variant: (file, kind, how it is made from load.raw / load.tar)
    "raw": ("load.raw", "raw", None),
    "gz": ("load.raw.gz", "raw", ["gzip", "-6", "-c"]),
    "zst": ("load.raw.zst", "raw", ["zstd", "-3", "-q", "-c"]),
    "xz": ("load.raw.xz", "raw", ["xz", "-6", "-T2", "-c"]),
    "tar": ("load.tar", "tar", None),
    "tar-gz": ("load.tar.gz", "tar", ["gzip", "-6", "-c"]),
}


def load_inputs(cache: Path, mib: int, cleanups: Cleanups) -> dict:
    """The load test's inputs in CACHE/load-<MIB>m, made if missing; their manifest."""
    d = cache / f"load-{mib}m"
    manifest_path = d / "manifest.json"
    try:
        m = json.loads(manifest_path.read_text())
        if m.get("version") == GEN_VERSION and all((d / v[0]).exists() for v in LOAD_VARIANTS.values()):
            note(f"reusing the load test's inputs in {d}")
            return dict(m, dir=str(d))
    except (OSError, ValueError):
        pass
    d.mkdir(parents=True, exist_ok=True)
    note(f"generating the load test's inputs in {d}")
    gen = Generator(d, cleanups)
    info = write_raw_image(d / "load.raw", mib << 20)
    make_tar(d / "load.tar", gen, (mib << 20) // 2)
    for file, kind, argv in LOAD_VARIANTS.values():
        if argv:
            gen.finish(gen.job([*argv, str(d / ("load.raw" if kind == "raw" else "load.tar"))], d / file, file))
    m = {"version": GEN_VERSION, "mib": mib, "raw": dict(info, sha256=sha256_file(d / "load.raw")),
         "tar": dict(tar_expectation(d / "load.tar"), size=(d / "load.tar").stat().st_size,
                     digest=tar_digest(d / "load.tar")),
         "files": {v: {"file": f, "kind": k, "size": (d / f).stat().st_size} for v, (f, k, _) in LOAD_VARIANTS.items()}}
    manifest_path.write_text(json.dumps(m, indent=2) + "\n")
    return dict(m, dir=str(d))
