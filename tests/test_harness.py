import os
import subprocess

import pytest

from tests.conftest import POOL

pytestmark = pytest.mark.root  # containers, user namespaces, mounts


def test_private_namespace():
    # /run/systemd is our own tmpfs, with the directory machinectl insists on.
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "/run/systemd"], capture_output=True, text=True)
    assert out.stdout.strip() == "tmpfs"
    assert os.path.isdir("/run/systemd/system")


def test_btrfs_mount(btrfs_mount):
    out = subprocess.run(["stat", "-f", "-c", "%T", str(btrfs_mount)], capture_output=True, text=True)
    assert out.stdout.strip() == "btrfs"


def test_pool(pool):
    assert pool.path == POOL
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(POOL)], capture_output=True, text=True).stdout.strip()
    assert (kind == "btrfs") == pool.btrfs
