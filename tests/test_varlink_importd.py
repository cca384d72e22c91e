"""importd's Varlink interface (io.systemd.Import), driven by sid's
varlinkctl, step by step against systemd 262's own importd (chrooted into the
sid root, its systemd-pull downloading from our loopback HTTP server) on the
same pool and bus."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from imagepool import dev as world
from tests import sid
from tests.conftest import Daemons, Pool
from tests.httpserver import Fault, TestServer
from tests.imagetree import describe_tree, make_os_tree

IMPORT = "/run/systemd/io.systemd.Import"


def call(method: str, params: dict[str, Any] | None = None, *flags: str) -> tuple[int, list[Any], str]:
    return sid.call(IMPORT, f"io.systemd.Import.{method}", params, *flags)


@pytest.fixture
def web(tmp_path: Path):
    www = tmp_path / "www"
    www.mkdir()
    tree = tmp_path / "tree"
    make_os_tree(tree)
    (tree / "data").write_bytes(os.urandom(64 << 10))
    data = subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-c", "."], capture_output=True,
                          check=True).stdout
    (www / "small.tar").write_bytes(data)
    (www / "slow.tar").write_bytes(data)
    with TestServer(www) as server:
        # Nothing for 2 s (the progress is unknown while it is listed), then about 5 s.
        server.faults["slow.tar"] = Fault(delay=2, rate=16 << 10)
        yield server, tree


@pytest.fixture
def both(daemons: Daemons, chroot: sid.Chroot, pool: Pool, tmp_path: Path) -> sid.Both:
    return sid.Both("importd", daemons, chroot, pool, tmp_path, pool.wipe)


def stream(replies: list[Any]) -> list[str]:
    """What a Pull stream consists of: its first reply, whether progress and
    log lines came, its last reply."""
    kinds = []
    for reply in replies:
        kind = "id" if "id" in reply else "progress" if "progress" in reply else "log" if "log" in reply else (
            "{}" if reply == {} else repr(reply))
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
    return [k for i, k in enumerate(kinds) if k not in kinds[:i]]


def pull_result(rc: int, replies: list[Any], err: str) -> tuple[int, list[str], str, bool]:
    progress = [r["progress"] for r in replies if "progress" in r]
    in_range = all(0 <= p <= 1 for p in progress) and progress == sorted(progress)
    return rc, stream(replies), err, in_range


def pool_state(pool: Pool) -> list[str]:
    """The pool's entries, hidden ones by kind only (cache names carry ETags)."""
    return sorted(n if not n.startswith(".") else n.split("-", 1)[0] for n in os.listdir(pool.path))


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_pull_and_list_transfers(both: sid.Both, web, pool: Pool) -> None:
    server, tree = web
    url = server.url

    def while_slow_pull() -> list[tuple[str, Any]]:
        """A slow pull runs in the background while the steps run."""
        out: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: out.update(r=call(
            "Pull", {"remote": url("slow.tar"), "local": "slow", "type": "tar", "class": "machine",
                     "verify": "no"}, "--more")))
        slow.start()
        try:
            world.wait_for(lambda: call("ListTransfers", {}, "--more")[0] == 0, 20, "the slow transfer")
            rc, transfers, err = call("ListTransfers", {}, "--more")
            steps = [
                ("ListTransfers during a pull", (rc, transfers, err)),
                ("ListTransfers of another class", call("ListTransfers", {"class": "sysext"}, "--more")),
                ("Pull of a URL in transfer", call("Pull", {"remote": url("slow.tar"), "local": "other",
                                                            "type": "tar", "class": "machine", "verify": "no"},
                                                   "--more")),
            ]
        finally:
            slow.join(60)
        return [*steps, ("the slow pull", pull_result(*out["r"]))]

    def steps() -> list[tuple[str, Any]]:
        return [
            ("ListTransfers without more", call("ListTransfers")),
            ("ListTransfers, none", call("ListTransfers", {}, "--more")),
            ("ListTransfers bad class", call("ListTransfers", {"class": "bogus"}, "--more")),
            ("Pull bad remote", call("Pull", {"remote": "ftp://x/y.tar", "type": "tar", "class": "machine"})),
            ("Pull bad local", call("Pull", {"remote": url("small.tar"), "local": "bad/name", "type": "tar",
                                             "class": "machine"})),
            ("Pull type oci", call("Pull", {"remote": url("small.tar"), "type": "oci", "class": "machine"})),
            ("Pull bad class", call("Pull", {"remote": url("small.tar"), "type": "tar", "class": "bogus"})),
            ("Pull bad verify", call("Pull", {"remote": url("small.tar"), "type": "tar", "class": "machine",
                                              "verify": "maybe"})),
            ("Pull tar", pull_result(*call("Pull", {"remote": url("small.tar"), "type": "tar", "class": "machine",
                                                    "verify": "no"}, "--more"))),
            ("pool after the pull (no download kept)", pool_state(pool)),
            ("the image", describe_tree(pool.path / "small") == describe_tree(tree)),
            ("Pull onto an existing image", pull_result(*call("Pull", {"remote": url("small.tar"), "type": "tar",
                                                                       "class": "machine", "verify": "no"},
                                                              "--more"))),
            ("Pull with force, keeping the download",
             pull_result(*call("Pull", {"remote": url("small.tar"), "type": "tar", "class": "machine",
                                        "verify": "no", "force": True, "keepDownload": True}, "--more"))),
            ("pool after keeping the download", pool_state(pool)),
            ("Pull 404", pull_result(*call("Pull", {"remote": url("missing.tar"), "local": "m", "type": "tar",
                                                    "class": "machine", "verify": "no"}, "--more"))),
            ("Pull unsigned with verify", pull_result(*call("Pull", {"remote": url("small.tar"), "local": "v",
                                                                     "type": "tar", "class": "machine"},
                                                            "--more"))),
            *while_slow_pull(),
            ("pool at the end", pool_state(pool)),
        ]

    both.compare(steps)
