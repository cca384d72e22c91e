"""The sid root booted, systemd 26x as its PID 1: the reference for what
only a real systemd makes possible (machined allocating scopes for nspawn).

sid's own systemd-nspawn boots the root (--volatile=overlay: nothing is
written to the cached root), in a mount namespace of its own where the
unified cgroup hierarchy is /sys/fs/cgroup (26x refuses this host's v1
layout), from a cgroup of its own that is killed at the end.  Commands run
inside with nsenter, in a clean environment (tests.bootedroot)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tests import sid
from tests.bootedroot import UNIFIED, BootedRoot

__all__ = ["UNIFIED", "ENV", "BootedSid", "copy_root"]

ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "TERM=dumb"]


class BootedSid(BootedRoot):
    env = ENV

    def __init__(self, workdir: Path, binds: Sequence[tuple[Path, str]] = ()) -> None:
        super().__init__(sid.ROOT, workdir, "sidboot", sid.argv("systemd-nspawn"), binds=binds, unified_root=True,
                         log=workdir / "booted-sid.log")


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
