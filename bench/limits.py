"""The machine's limit for an input of bench/import.py or bench/pull.py:
how fast standard tools do the same work here, measured in the same run as
the daemons (it takes its turn in the alternation).

  raw, qcow2, qcow2-c  ``curl -s -f -o POOL/.limit-copy SOURCE`` + syncfs() of
                       the pool; SOURCE is the URL on the same nginx (pulls)
                       or file:///path of the input (imports)
  xz-mt, xz-st         ``xz -d -T2 -c FILE`` and ``xz -d -T1 -c FILE`` to
                       /dev/null (the faster of the two), and the write of
                       the decompressed image: ``cp --sparse=always`` of
                       disk.raw (in the page cache) into the pool + syncfs();
                       the limit is the slower of the two stages
  gz                   ``igzip -d -c FILE`` to /dev/null (package isal,
                       installed with apt-get if missing), and the write
  zst                  ``zstd -d -q -c FILE`` to /dev/null, and the write
  tar-xz, tar-gz       ``tar -x`` of the uncompressed stream (rootfs.tar)
                       into a fresh btrfs subvolume (a directory on a plain
                       pool) + syncfs(), and the decompression of FILE as
                       above; the limit is the slower of the two (a pipeline
                       cannot beat its slowest stage)

Every limit that writes into the pool ends with a syncfs(), so the report
compares it with our time including the sync after machinectl returned
(``ours_with_sync``).  The input is in the page cache (``cat``) before each
tool.  ``Limits.measure``
returns ``{"seconds": limit, "parts": {tool: seconds}, "ok": bool}``; the
report prints our median time as a percentage of the limit's median
(100% = as fast as the tools).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from common import POOL, delete_subvolume, ensure_tool, rm_tree, syncfs, warm

# key: stages; the limit is the slowest stage, a stage the fastest of its tools
RECIPES: dict[str, list[list[str]]] = {
    "raw": [["curl -o + sync"]],
    "qcow2": [["curl -o + sync"]],
    "qcow2-c": [["curl -o + sync"]],
    "xz-mt": [["xz -d -T2", "xz -d -T1"], ["cp --sparse + sync"]],
    "xz-st": [["xz -d -T2", "xz -d -T1"], ["cp --sparse + sync"]],
    "gz": [["igzip -d"], ["cp --sparse + sync"]],
    "zst": [["zstd -d"], ["cp --sparse + sync"]],
    "tar-xz": [["tar -x + sync"], ["xz -d -T2"]],
    "tar-gz": [["tar -x + sync"], ["igzip -d"]],
}

DECOMPRESS = {
    "xz -d -T2": ["xz", "-d", "-T2", "-c"],
    "xz -d -T1": ["xz", "-d", "-T1", "-c"],
    "igzip -d": ["igzip", "-d", "-c"],
    "zstd -d": ["zstd", "-d", "-q", "-c"],
}


def describe(key: str) -> str:
    """The recipe of KEY's limit, as text: min(...) of a stage's tools, max(...) of the stages."""
    st = [s[0] if len(s) == 1 else "min(" + ", ".join(s) + ")" for s in RECIPES[key]]
    return st[0] if len(st) == 1 else "max(" + ", ".join(st) + ")"


class Limits:
    """Runs the tools; NOTES get a line if isal had to be installed."""

    def __init__(self, cache: Path, tar: Path | None, pool_kind: str, notes: list[str]) -> None:
        self.cache = cache
        self.tar = tar
        self.pool_kind = pool_kind
        self.notes = notes
        self.igzip: str | None = None

    def prepare(self, keys: list[str]) -> None:
        if any("igzip -d" in s for k in keys for s in RECIPES.get(k, [])):
            self.igzip = ensure_tool("igzip", ("isal",), self.notes, "igzip, the gzip limit")

    def _run(self, argv: list[str], stdout=subprocess.DEVNULL) -> float:
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=stdout, stdin=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def tool(self, name: str, file: Path, source: str) -> float:
        if name == "curl -o + sync":
            out = POOL / ".limit-copy"
            try:
                t0 = time.perf_counter()
                subprocess.run(["curl", "-s", "-f", "--noproxy", "*", "-o", str(out), source], check=True,
                               stdin=subprocess.DEVNULL)
                syncfs(POOL)
                return time.perf_counter() - t0
            finally:
                out.unlink(missing_ok=True)
        if name == "cp --sparse + sync":
            image, out = self.cache / "disk.raw", POOL / ".limit-copy"
            try:
                warm(image)
                t0 = time.perf_counter()
                subprocess.run(["cp", "--sparse=always", str(image), str(out)], check=True,
                               stdin=subprocess.DEVNULL)
                syncfs(POOL)
                return time.perf_counter() - t0
            finally:
                out.unlink(missing_ok=True)
        if name == "tar -x + sync":
            out = POOL / ".limit-tar"
            if self.pool_kind == "btrfs":
                subprocess.run(["btrfs", "subvolume", "create", str(out)], check=True, stdout=subprocess.DEVNULL)
            else:
                out.mkdir()
            try:
                warm(self.tar)
                t0 = time.perf_counter()
                subprocess.run(["tar", "--numeric-owner", "-x", "-f", str(self.tar), "-C", str(out)], check=True,
                               stdin=subprocess.DEVNULL)
                syncfs(POOL)
                return time.perf_counter() - t0
            finally:
                if self.pool_kind == "btrfs":
                    delete_subvolume(out)
                else:
                    rm_tree(out)
        argv = list(DECOMPRESS[name])
        if argv[0] == "igzip":
            argv[0] = self.igzip or "igzip"
        return self._run([*argv, str(file)])

    def measure(self, key: str, file: Path, source: str | None = None) -> dict:
        """The limit for KEY, whose input is FILE (SOURCE: where curl gets it from)."""
        source = source or f"file://{os.path.abspath(file)}"
        parts: dict[str, float] = {}
        stages = []
        try:
            for stage in RECIPES[key]:
                best = None
                for name in stage:
                    warm(file)
                    parts[name] = round(self.tool(name, file, source), 3)
                    best = parts[name] if best is None else min(best, parts[name])
                stages.append(best)
        except (subprocess.CalledProcessError, OSError) as e:
            return {"seconds": None, "parts": parts, "ok": False, "error": str(e)}
        return {"seconds": round(max(stages), 3), "parts": parts, "ok": True}
