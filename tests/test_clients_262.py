"""The newest clients, sid's machinectl and importctl (systemd 26x), against
our machined and importd and against systemd's own (chrooted into the sid
root), on identical pools: the same output, messages and exit codes, step
by step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagepool import btrfs
from tests import sid
from tests.conftest import Daemons, Pool
from tests.httpserver import TestServer
from tests.imagetree import make_os_tree, normalize, populate
from tests.test_machinectl_vs_reference import MUTATIONS, READ_VERBS

# Where both importds can read files (file:// URLs, imports): /run/systemd is
# bound into the sid root.
FILES = Path("/run/systemd/test-files")
# Progress lines: how many there are, and at which percentages, is timing.
PROGRESS = re.compile(r"(Got|Imported|Exported) \d+%")
SIDE_FILE = re.compile(r"\.(nspawn|roothash|roothash\.p7s|verity) failed with code 404|could not be retrieved")


def client(program: str, *args: str) -> str:
    r = sid.run(program, "--no-pager", *args)
    return f"$ {program} {' '.join(args)}\n{r.stdout}{r.stderr}rc={r.returncode}\n"


def clean(text: str, pool: Pool, prefix: Path) -> str:
    """Output without what differs between any two runs (times, transfer
    numbers' timing) and between the two setups: ours keeps the other
    classes below its --image-prefix; .host is this host's root for ours and
    the sid root for theirs."""
    text = normalize(text).replace(str(prefix), "")
    lines = [re.sub(r" +", " ", _host_times(line)) for line in text.splitlines()  # columns sized by .host too
             if not PROGRESS.match(line)]
    if lines and lines[0].startswith("$ importctl pull-"):
        # systemd-pull fetches the side files while the image downloads:
        # their lines and the download's come in any order, and when the
        # download fails, whether it got to them is timing.
        if lines[-1] != "rc=0":
            lines = [line for line in lines if not SIDE_FILE.search(line)]
        lines = lines[:1] + sorted(lines[1:])
    return "\n".join(lines)


def _host_times(line: str) -> str:
    """.host's times are those of "/": this host's (born at 0, so none) for
    ours, the sid root's for the chrooted daemon."""
    return line.replace("TIME", "-") if re.search(r"(^|\s)\.host(\s|$)", line) else line


def machinectl_steps(pool: Pool, prefix: Path, verbs: list[list[str]]) -> list[tuple[str, Any]]:
    return [(" ".join(v), clean(client("machinectl", *v), pool, prefix)) for v in verbs]


@pytest.fixture
def machined_both(daemons: Daemons, chroot: sid.Chroot, pool: Pool, tmp_path: Path) -> sid.Both:
    return sid.Both("machined", daemons, chroot, pool, tmp_path,
                    lambda: (pool.wipe(), populate(pool.path, pool.btrfs, raw_data=True)), level="info")


def test_machinectl_read_verbs(machined_both: sid.Both, pool: Pool, daemons: Daemons) -> None:
    machined_both.compare(lambda: machinectl_steps(pool, daemons.prefix, READ_VERBS))


def test_machinectl_mutations(machined_both: sid.Both, pool: Pool, daemons: Daemons) -> None:
    def steps() -> list[tuple[str, Any]]:
        out = machinectl_steps(pool, daemons.prefix, MUTATIONS)
        return [*out, ("the pool after", sorted(p.name for p in pool.path.iterdir()))]

    machined_both.compare(steps)


@pytest.fixture
def files(tmp_path: Path):
    FILES.mkdir(parents=True, exist_ok=True)
    tree = FILES / "tree"
    make_os_tree(tree)
    (tree / "data").write_bytes(os.urandom(64 << 10))
    subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(FILES / "small.tar"), "."], check=True)
    with open(FILES / "disk.raw", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(8 << 20)
    yield FILES
    shutil.rmtree(FILES)


@pytest.fixture
def both(daemons: Daemons, chroot: sid.Chroot, pool: Pool, tmp_path: Path) -> sid.Both:
    return sid.Both(("machined", "importd"), daemons, chroot, pool, tmp_path,
                    lambda: (pool.wipe(), populate(pool.path, pool.btrfs)), level="info")


def test_importctl_verbs(both: sid.Both, pool: Pool, daemons: Daemons, files: Path) -> None:
    with TestServer(files) as server:
        url = server.url

        def ic(*args: str) -> tuple[str, str]:
            return " ".join(args), clean(client("importctl", *args), pool, daemons.prefix)

        def steps() -> list[tuple[str, Any]]:
            return [
                ic("list-images"),
                ic("list-images", "--class=machine"),
                ic("list-images", "--class=sysext"),
                ic("list-transfers"),
                ic("pull-tar", "--class=machine", "--verify=no", url("small.tar"), "small"),
                ic("pull-tar", "--class=machine", "--verify=no", url("small.tar"), "small"),
                ic("pull-tar", "--class=machine", "--verify=no", "--force", url("small.tar"), "small"),
                ic("pull-raw", "--class=machine", "--verify=no", "--keep-download=no", url("disk.raw"), "disk"),
                ("pool after pulls", sorted(n.split("-")[0] if n.startswith(".") else n
                                            for n in os.listdir(pool.path))),
                ic("pull-tar", "--class=sysext", "--verify=no", f"file://{files}/small.tar", "ext1"),
                ic("list-images", "--class=sysext"),
                ic("import-tar", "--class=machine", str(files / "small.tar"), "imp1"),
                ic("import-raw", "--class=machine", str(files / "disk.raw"), "imp2"),
                ic("import-fs", "--class=machine", str(files / "tree"), "imp3"),
                ic("export-tar", "--class=machine", "imp1", str(files / "out.tar")),
                ic("export-raw", "--class=machine", "imp2", str(files / "out.raw")),
                ("exported files", sorted(n for n in os.listdir(files) if n.startswith("out"))),
                ("btrfs quotas after the imports", quotas(pool)),
                ("list-images --class=machine (usage of subvolumes aside)",
                 without_subvolume_usage(ic("list-images", "--class=machine")[1])),
                ic("pull-tar", "--class=bogus", url("small.tar"), "x"),
                ic("pull-tar", "--class=machine", "ftp://x/y.tar", "x"),
                ic("pull-tar", "--class=machine", url("small.tar"), "bad/name"),
                ic("pull-tar", "--class=machine", "--verify=no", url("missing.tar"), "m"),
                ic("cancel-transfer", "4711"),
            ]

        # systemd's import turns btrfs quotas on for the whole file system
        # (and so shows the usage of subvolumes); we never do that implicitly.
        both.compare(steps, deliberate={"btrfs quotas after the imports": ("off", "full")} if pool.btrfs else {})


def quotas(pool: Pool) -> str:
    return btrfs.quota_mode(str(pool.path)) if pool.btrfs else "n/a"


def without_subvolume_usage(listing: str) -> str:
    """importctl's list-images with the USAGE of subvolumes left out."""
    rows = []
    for line in listing.splitlines():
        cells = line.split(" ")
        if len(cells) == 9 and cells[2] == "subvolume":
            cells[7] = "USAGE"
        rows.append(" ".join(cells))
    return "\n".join(rows)
