"""py-spy on our daemons, for ``--profile DIR`` of bench/pull.py and bench/import.py.

``Profiler(DIR)`` finds py-spy (the venv's bin/, PATH, /tmp/pyspy/bin) or
installs it into the venv (``python -m pip install py-spy``).
``start(pid, label)`` runs ``py-spy record --threads --rate 200 --format raw``
on PID (on-CPU samples only: no --idle, so the stacks are where the time
goes); ``stop()`` ends it (SIGINT) and writes, from the collapsed stacks
DIR/LABEL.txt:

  DIR/LABEL.svg      a flame graph (self-contained SVG, hover for names)
  DIR/LABEL-top.txt  the top list: functions by self samples and by total
                     (inclusive) samples, with percentages

``top(label)`` returns the first lines of that list for the report.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import note

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def find_py_spy(install: bool = True) -> str | None:
    venv_bin = Path(sys.executable).parent
    for cand in (venv_bin / "py-spy", Path("/tmp/pyspy/bin/py-spy")):
        if os.access(cand, os.X_OK):
            return str(cand)
    if shutil.which("py-spy"):
        return shutil.which("py-spy")
    if not install:
        return None
    note(f"py-spy is missing: {sys.executable} -m pip install py-spy")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--profile: could not install py-spy: {r.stderr.strip()[-500:]}")
    return str(venv_bin / "py-spy") if os.access(venv_bin / "py-spy", os.X_OK) else shutil.which("py-spy")


def read_stacks(path: Path) -> dict[tuple[str, ...], int]:
    stacks: dict[tuple[str, ...], int] = {}
    if not path.exists():
        return stacks
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        frames = tuple(f for f in m.group(1).split(";") if f)
        stacks[frames] = stacks.get(frames, 0) + int(m.group(2))
    return stacks


def _function(frame: str) -> str:
    """'name (file.py:123)' -> 'name (file.py)': lines of a function counted together."""
    return _FRAME_LINE.sub(")", frame)


def top_list(stacks: dict[tuple[str, ...], int], n: int = 40) -> list[str]:
    total = sum(stacks.values())
    if not total:
        return ["no samples"]
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, count in stacks.items():
        # With --threads the first frame is the thread; it is not a function.
        funcs = [_function(f) for f in frames[1:]] if frames and frames[0].startswith("thread ") else \
            [_function(f) for f in frames]
        if not funcs:
            continue
        own[funcs[-1]] = own.get(funcs[-1], 0) + count
        for f in set(funcs):
            incl[f] = incl.get(f, 0) + count
    out = [f"{total} samples", "", "self  %    function"]
    for f, c in sorted(own.items(), key=lambda x: -x[1])[:n]:
        out.append(f"{c:6d} {100 * c / total:5.1f}  {f}")
    out += ["", "total %    function"]
    for f, c in sorted(incl.items(), key=lambda x: -x[1])[:n]:
        out.append(f"{c:6d} {100 * c / total:5.1f}  {f}")
    return out


def flame_svg(stacks: dict[tuple[str, ...], int], title: str, width: int = 1400, row: int = 16) -> str:
    """A flame graph of collapsed STACKS (root at the bottom)."""
    tree: dict = {"n": 0, "kids": {}}
    for frames, count in stacks.items():
        node = tree
        node["n"] += count
        for f in frames:
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}})
            node["n"] += count
    total = tree["n"] or 1
    rects: list[str] = []
    depth_max = 0

    def walk(node: dict, x: float, depth: int) -> None:
        nonlocal depth_max
        for name, kid in sorted(node["kids"].items()):
            w = kid["n"] / total * (width - 20)
            if w >= 0.3:
                depth_max = max(depth_max, depth)
                rects.append((x, depth, w, name, kid["n"]))
                walk(kid, x, depth + 1)
            x += w

    walk(tree, 10.0, 0)
    height = (depth_max + 3) * row + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
           f'font-size="11">', '<rect width="100%" height="100%" fill="#fdfdf6"/>',
           f'<text x="10" y="18" font-size="14">{html.escape(title)} ({total} samples)</text>']
    for x, depth, w, name, n in rects:
        y = height - (depth + 1) * row - 4
        hue = 10 + (hash(name.split(" (")[0]) % 50)
        label = html.escape(name)
        out.append(f'<g><title>{label}: {n} samples ({100 * n / total:.1f}%)</title>'
                   f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" height="{row - 1}" '
                   f'fill="hsl({hue},85%,60%)"/>')
        chars = int(w / 7)
        if chars >= 3:
            text = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + row - 4}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


class Profiler:
    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.binary = None
        self.proc: subprocess.Popen | None = None
        self.label: str | None = None
        self.written: list[str] = []
        if outdir:
            self.binary = find_py_spy()
            if not self.binary:
                raise SystemExit("--profile: py-spy not found and not installable")
            outdir.mkdir(parents=True, exist_ok=True)

    def start(self, pid: int, label: str) -> None:
        if not self.binary:
            return
        self.label = label
        with open(self.outdir / f"{label}.log", "wb") as log:
            self.proc = subprocess.Popen([self.binary, "record", "-p", str(pid), "--threads", "--rate", "200",
                                          "--format", "raw", "-o", str(self.outdir / f"{label}.txt")],
                                         stdout=subprocess.DEVNULL, stderr=log)
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
        label, self.label = self.label, None
        if label:
            stacks = read_stacks(self.outdir / f"{label}.txt")
            (self.outdir / f"{label}-top.txt").write_text("\n".join(top_list(stacks)) + "\n")
            (self.outdir / f"{label}.svg").write_text(flame_svg(stacks, f"py-spy, on-CPU samples: {label}"))
            self.written.append(label)

    def top(self, label: str, n: int = 12) -> list[str]:
        path = self.outdir / f"{label}-top.txt"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return lines[:3 + n]
