"""Exports to a file whose name machinectl 252 does not understand (.zst):
with no format given, importd takes it from the target file's name, as newer
clients do themselves, and says so."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.conftest import Daemons, Pool, machinectl
from tests.imagetree import make_os_tree


def test_zst_exports_from_machinectl_252(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    assert machinectl("import-raw", str(raw), "disk").returncode == 0
    out = tmp_path / "out.raw.zst"
    r = machinectl("export-raw", "disk", str(out))
    assert r.returncode == 0, r.stderr
    assert f"No compression format given, using 'zstd' as the name of '{out}' says." in r.stderr
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    plain = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    assert hashlib.sha256(plain).digest() == hashlib.sha256(raw.read_bytes()).digest()

    tree = tmp_path / "tree"
    make_os_tree(tree)
    assert machinectl("import-fs", str(tree), "os").returncode == 0
    for name, magic in (("out.tar.zst", b"\x28\xb5\x2f\xfd"), ("out.tzst", b"\x28\xb5\x2f\xfd")):
        target = tmp_path / name
        r = machinectl("export-tar", "os", str(target))
        assert r.returncode == 0, r.stderr
        assert target.read_bytes()[:4] == magic, name
        listing = subprocess.run(f"zstd -dc {target} | tar -t", shell=True, capture_output=True, text=True)
        assert "./etc/os-release" in listing.stdout.splitlines(), listing.stdout
    # A name without a known suffix stays uncompressed, with nothing said.
    target = tmp_path / "out.image"
    r = machinectl("export-raw", "disk", str(target))
    assert r.returncode == 0 and "No compression format given" not in r.stderr
    assert target.read_bytes() == raw.read_bytes()
