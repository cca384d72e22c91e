"""Raw and tar imports through importd.local against systemd-import 252 (the
worker tool behind systemd-importd), run on the same files into the same
pool: how sparse the raw image is, and what happens to data after the end of
a compressed stream, zero padding and truncated streams."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagepool.image import Pool as ImagePool
from importd import local
from importd.context import JobContext, TransferError
from tests.conftest import Pool
from tests.imagetree import describe_tree, make_os_tree

COMPRESSORS = {
    ".xz": ["xz", "-T2", "-c"],
    ".gz": ["gzip", "-c"],
    ".bz2": ["bzip2", "-c"],
    ".zst": ["zstd", "-q", "-c"],
}
FORMATS = {".xz": "xz", ".gz": "gzip", ".bz2": "bzip2", ".zst": "zstd"}


def compress(src: Path, suffix: str) -> Path:
    dst = src.with_name(src.name + suffix)
    with open(dst, "wb") as out:
        subprocess.run([*COMPRESSORS[suffix], str(src)], stdout=out, check=True)
    return dst


def leftovers(pool: Pool) -> list[str]:
    return [p for p in os.listdir(pool.path) if p.startswith(".#")]


def image_names(pool: Pool) -> set[str]:
    return {p for p in os.listdir(pool.path) if not p.startswith(".")}


SYSTEMD_IMPORT = "/lib/systemd/systemd-import"


def systemd_import(kind: str, src: Path, name: str) -> subprocess.CompletedProcess:
    """The reference: systemd-import 252 itself, into /var/lib/machines (the
    pool fixture's mount point), killed if it hangs."""
    return subprocess.run(["timeout", "-s", "KILL", "120", SYSTEMD_IMPORT, "--sync=no", kind, str(src), name],
                          capture_output=True, text=True, timeout=180)


def local_import(kind: str, src: Path, pool: Pool, name: str) -> list[str]:
    """Import SRC through importd.local into the pool; returns the log lines."""
    lines: list[str] = []
    ctx = JobContext(log=lines.append)
    job = local.import_raw if kind == "raw" else local.import_tar
    with open(src, "rb") as f:
        job(ctx, f.fileno(), ImagePool(str(pool.path), []), name, False, False, sync=False)
    return lines


def make_ext4_image(path: Path) -> None:
    """A fresh ext4 file system on a sparse 48 MiB file, as mkfs.ext4 makes it."""
    subprocess.run(["truncate", "-s", "48M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)


@pytest.mark.parametrize("source", ["dense", "xz", "gz", "zst"])
def test_sparse_like_systemd_import(pool: Pool, tmp_path: Path, source: str) -> None:
    """A raw image of a fresh ext4 file system, imported from a copy with all
    its zeros written (dense) or compressed, takes no more space in the pool
    than systemd-import 252 gives it: holes wherever a file system block
    (4 KiB) is all zeros, as its sparse_write() leaves them (it skips every
    run of 64 zero bytes or more).  (252 doesn't know zstd: the reference
    for the zstd copy is its import of the xz one.)"""
    raw = tmp_path / "fs.raw"
    make_ext4_image(raw)
    if source == "dense":
        src = tmp_path / "dense.raw"
        src.write_bytes(raw.read_bytes())
        assert src.stat().st_blocks * 512 == 48 << 20
    else:
        src = compress(raw, "." + source)
    local_import("raw", src, pool, "ours")
    ours = pool / "ours.raw"
    assert ours.read_bytes() == raw.read_bytes()
    r = systemd_import("raw", src if source != "zst" else compress(raw, ".xz"), "reference")
    assert r.returncode == 0, r.stderr
    reference = pool / "reference.raw"
    assert reference.read_bytes() == raw.read_bytes()
    assert ours.stat().st_blocks <= reference.stat().st_blocks, (ours.stat().st_blocks, reference.stat().st_blocks)
    assert leftovers(pool) == []


def tar_and_raw(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    tarball = tmp_path / "t.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(tree, arcname=".")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(4096))
    return tarball, raw


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
@pytest.mark.parametrize("suffix", [".xz", ".gz", ".bz2", ".zst"])
@pytest.mark.parametrize("kind", ["tar", "raw"])
def test_trailing_garbage_is_refused(pool: Pool, tmp_path: Path, kind: str, suffix: str) -> None:
    """Garbage after a complete compressed stream: refused, with a message
    that says so, and nothing is left in the pool.  systemd-import 252
    refuses it too (xz, bzip2: "Failed to decode and write: Input/output
    error"); with gzip it never finishes (inflate() keeps returning
    Z_STREAM_END with the garbage unread: it spins), and it does not know
    zstd: there it is not asked."""
    tarball, raw = tar_and_raw(tmp_path)
    src = compress(tarball if kind == "tar" else raw, suffix)
    complete = src.stat().st_size
    with open(src, "ab") as f:
        f.write(b"trailing garbage!!")
    format_name = FORMATS[suffix]
    message = (f"Failed to decompress {format_name} data: Trailing garbage after the end of the compressed stream, "
               f"at offset {complete}")
    with pytest.raises(TransferError, match="^" + re.escape(message) + "$"):
        local_import(kind, src, pool, "ours")
    assert image_names(pool) == set() and leftovers(pool) == []
    if suffix in (".xz", ".bz2"):
        r = systemd_import(kind, src, "reference")
        assert r.returncode == 1 and "Failed to decode and write: Input/output error" in r.stderr, r.stderr
        assert image_names(pool) == set()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
@pytest.mark.parametrize("kind", ["tar", "raw"])
def test_xz_zero_padding_imports_like_systemd(pool: Pool, tmp_path: Path, kind: str) -> None:
    """Zero bytes after an xz stream, not a multiple of four (xz itself
    refuses those): systemd-import 252 imports it, and so do we."""
    tarball, raw = tar_and_raw(tmp_path)
    src = compress(tarball if kind == "tar" else raw, ".xz")
    with open(src, "ab") as f:
        f.write(bytes(3))
    lines = local_import(kind, src, pool, "ours")
    assert "Operation completed successfully." in lines
    r = systemd_import(kind, src, "reference")
    assert r.returncode == 0, r.stderr
    if kind == "raw":
        assert (pool / "ours.raw").read_bytes() == (pool / "reference.raw").read_bytes() == raw.read_bytes()
    else:
        assert describe_tree(pool / "ours", trusted=False) == describe_tree(pool / "reference", trusted=False)
    assert leftovers(pool) == []


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
@pytest.mark.parametrize("suffix", [".xz", ".gz", ".bz2", ".zst"])
def test_truncated_raw_is_refused(pool: Pool, tmp_path: Path, suffix: str) -> None:
    """A compressed raw image cut short: refused as truncated (systemd-import
    252 never asks its decoder whether the stream ended, and installs the
    short image)."""
    _, raw = tar_and_raw(tmp_path)
    src = compress(raw, suffix)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 100])
    format_name = FORMATS[suffix]
    with pytest.raises(TransferError, match=f"^Failed to decompress {format_name} data: Compressed stream is "
                                            "truncated$"):
        local_import("raw", src, pool, "ours")
    assert image_names(pool) == set() and leftovers(pool) == []
