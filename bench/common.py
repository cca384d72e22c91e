"""What the benchmarks share: a private mount namespace with its own
/run/systemd, ordered clean-ups, and small process helpers."""

from __future__ import annotations

import ctypes
import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

POOL = Path("/var/lib/machines")
MiB = 1 << 20
_CLONE_NEWNS = 0x00020000


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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    run(["mount", "--make-rprivate", "/"])


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


def umount(path: str) -> None:
    r = subprocess.run(["umount", path], capture_output=True, text=True)
    if r.returncode != 0:
        note(f"umount {path}: {r.stderr.strip()}; detaching lazily")
        subprocess.run(["umount", "-l", path], check=True)


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


# --- measuring --------------------------------------------------------------------


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


def stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    return {"n": len(s), "median": statistics.median(s), "min": s[0], "max": s[-1],
            "samples": [round(x, 3) for x in samples]}


def merge_max(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return out


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


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
