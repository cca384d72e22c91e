"""Crafted qcow2 headers and tables (importd.qcow2, through importd.local).

Each variant starts from a real image made by qemu-img and patches one
header field (or one table entry) with struct.  Every one must be refused
with its own Qcow2Error message, by convert_to_raw and by an import through
importd.local.write_image (from the file itself, and from a compressed copy,
which is converted in place), and the import must leave no file behind.
Real images of every shape qemu-img makes still convert, byte for byte as
qemu-img converts them.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from importd import local, qcow2
from importd.context import JobContext
from importd.qcow2 import Qcow2Error

KiB = 1 << 10
MiB = 1 << 20
LIMIT = 64 * MiB  # what the imports may write

_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

# Header fields: (struct format, offset)
VERSION = (">I", 4)
BACKING_OFFSET = (">Q", 8)
BACKING_SIZE = (">I", 16)
CLUSTER_BITS = (">I", 20)
SIZE = (">Q", 24)
CRYPT = (">I", 32)
L1_SIZE = (">I", 36)
L1_OFFSET = (">Q", 40)
REFCOUNT_OFFSET = (">Q", 48)
REFCOUNT_CLUSTERS = (">I", 56)
NB_SNAPSHOTS = (">I", 60)
SNAPSHOTS_OFFSET = (">Q", 64)
INCOMPATIBLE = (">Q", 72)
REFCOUNT_ORDER = (">I", 96)
HEADER_LENGTH = (">I", 100)


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


def _compressible(rng: random.Random, n: int) -> bytes:
    table = bytes(b"etaoin shrdlu\ncmfwypvbgkqjxz"[i % 16] for i in range(256))
    return rng.randbytes(n).translate(table)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """qemu-img's images of a 2 MiB disk (data, a hole, more data): plain
    (64 KiB clusters), compressed, with a snapshot, with 512-byte clusters,
    and version 2."""
    d = tmp_path_factory.mktemp("qcow2-bases")
    rng = random.Random(11)
    raw = bytearray(2 * MiB)
    raw[0 : MiB] = _compressible(rng, MiB)
    raw[1536 * KiB : 1792 * KiB] = rng.randbytes(256 * KiB)
    (d / "disk.raw").write_bytes(raw)
    made = {
        "plain": [],
        "compressed": ["-c"],
        "small-clusters": ["-o", "cluster_size=512"],
        "v2": ["-o", "compat=0.10"],
    }
    for name, options in made.items():
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *options, str(d / "disk.raw"), str(d / f"{name}.qcow2"))
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(d / "disk.raw"), str(d / "snapshot.qcow2"))
    _run("qemu-img", "snapshot", "-c", "before", str(d / "snapshot.qcow2"))
    images = {name: (d / f"{name}.qcow2").read_bytes() for name in [*made, "snapshot"]}
    assert struct.unpack_from(">I", images["snapshot"], 60)[0] == 1
    return images


def _get(image: bytes | bytearray, field: tuple[str, int]) -> int:
    value: int = struct.unpack_from(field[0], image, field[1])[0]
    return value


def _l1(image: bytes | bytearray) -> int:
    return _get(image, L1_OFFSET)


def _l2(image: bytes | bytearray) -> int:
    return struct.unpack_from(">Q", image, _l1(image))[0] & _OFFSET_MASK


def _refcount_table(image: bytes | bytearray) -> int:
    return _get(image, REFCOUNT_OFFSET)


def _cluster(image: bytes | bytearray) -> int:
    return 1 << _get(image, CLUSTER_BITS)


Patch = Callable[[bytearray], None]


def _set(field: tuple[str, int], value: int | Callable[[bytearray], int]) -> Patch:
    def patch(image: bytearray) -> None:
        struct.pack_into(field[0], image, field[1], value(image) if callable(value) else value)
    return patch


def _set_l1_entry(value: Callable[[bytearray], int]) -> Patch:
    def patch(image: bytearray) -> None:
        struct.pack_into(">Q", image, _l1(image), value(image))
    return patch


def _set_l2_entry(value: Callable[[bytearray], int], index: int = 0) -> Patch:
    def patch(image: bytearray) -> None:
        struct.pack_into(">Q", image, _l2(image) + 8 * index, value(image))
    return patch


def _compressed_at(offset: Callable[[bytearray], int]) -> Callable[[bytearray], int]:
    """The first compressed L2 entry, moved to OFFSET (same sector count)."""
    def value(image: bytearray) -> int:
        entry: int = struct.unpack_from(">Q", image, _l2(image))[0]
        assert entry & _COMPRESSED
        shift = 62 - (_get(image, CLUSTER_BITS) - 8)
        return (entry & ~((1 << shift) - 1)) | offset(image)
    return value


def _past_eof(image: bytearray) -> int:
    cs = _cluster(image)
    return -(-len(image) // cs) * cs


# name -> (base image, patches, the exact message)
VARIANTS: dict[str, tuple[str, list[Patch], str]] = {
    # version, cluster size
    "version-1": ("plain", [_set(VERSION, 1)], "qcow2 version 1 not supported"),
    "version-4": ("plain", [_set(VERSION, 4)], "qcow2 version 4 not supported"),
    "cluster-bits-8": ("plain", [_set(CLUSTER_BITS, 8)], "qcow2 cluster_bits 8 not supported"),
    "cluster-bits-22": ("plain", [_set(CLUSTER_BITS, 22)], "qcow2 cluster_bits 22 not supported"),
    # the version 3 fields
    "header-length-short": ("plain", [_set(HEADER_LENGTH, 100)], "qcow2 header length 100 invalid (at least 104)"),
    "header-length-unaligned": ("plain", [_set(HEADER_LENGTH, 108)],
                                "qcow2 header length 108 invalid (not a multiple of 8)"),
    "header-length-over-cluster": ("small-clusters", [_set(HEADER_LENGTH, 520)],
                                   "qcow2 header length 520 exceeds the cluster size 512"),
    "refcount-order-7": ("plain", [_set(REFCOUNT_ORDER, 7)], "qcow2 refcount_order 7 invalid (at most 6)"),
    "unknown-incompatible": ("plain", [_set(INCOMPATIBLE, 1 << 5)],
                             "qcow2 image has unknown incompatible features 0x20, refusing"),
    # what the image needs besides itself
    "backing-file": ("plain", [_set(BACKING_OFFSET, 0x1000), _set(BACKING_SIZE, 4)],
                     "qcow2 image has a backing file, refusing"),
    "encrypted-aes": ("plain", [_set(CRYPT, 1)], "qcow2 image is encrypted, refusing"),
    "encrypted-luks": ("v2", [_set(CRYPT, 2)], "qcow2 image is encrypted, refusing"),
    # the virtual size
    "size-over-limit": ("plain", [_set(SIZE, LIMIT + 512)],
                        f"qcow2 virtual size {LIMIT + 512} exceeds the limit of {LIMIT} bytes"),
    # the L1 table
    "l1-size-huge": ("plain", [_set(L1_SIZE, 0xFFFFFFFF)],
                     "qcow2 L1 table too large (4294967295 entries, at most 4194304)"),
    "l1-size-huge-v2": ("v2", [_set(L1_SIZE, 0xFFFFFFFF)],
                        "qcow2 L1 table too large (4294967295 entries, at most 4194304)"),
    "l1-size-past-eof": ("plain", [_set(L1_SIZE, 4 << 20)], "qcow2 L1 table offset beyond end of file"),
    "l1-size-short": ("plain", [_set(L1_SIZE, 0)], "qcow2 L1 table too small for the virtual size"),
    "l1-at-header": ("plain", [_set(L1_OFFSET, 0)], "qcow2 L1 table overlaps the header"),
    "l1-at-header-empty-disk": ("plain", [_set(SIZE, 0), _set(L1_OFFSET, 0)], "qcow2 L1 table overlaps the header"),
    "l1-unaligned": ("plain", [_set(L1_OFFSET, lambda i: _l1(i) + 512)], "qcow2 L1 table offset not cluster-aligned"),
    "l1-past-eof": ("plain", [_set(L1_OFFSET, _past_eof)], "qcow2 L1 table offset beyond end of file"),
    "l1-at-refcount-table": ("plain", [_set(L1_OFFSET, _refcount_table)], "qcow2 L1 table overlaps the refcount table"),
    # the refcount table
    "no-refcount-table": ("plain", [_set(REFCOUNT_CLUSTERS, 0)], "qcow2 image has no refcount table"),
    "refcount-table-unaligned": ("plain", [_set(REFCOUNT_OFFSET, lambda i: _refcount_table(i) + 512)],
                                 "qcow2 refcount table offset not cluster-aligned"),
    "refcount-table-at-header": ("plain", [_set(REFCOUNT_OFFSET, 0)], "qcow2 refcount table overlaps the header"),
    "refcount-table-past-eof": ("plain", [_set(REFCOUNT_OFFSET, _past_eof)], "qcow2 refcount table beyond end of file"),
    "refcount-table-too-long-for-file": ("plain", [_set(REFCOUNT_CLUSTERS, 100)],
                                         "qcow2 refcount table beyond end of file"),
    "refcount-table-huge": ("plain", [_set(REFCOUNT_CLUSTERS, 0xFFFFFFFF)],
                            "qcow2 refcount table too large (4294967295 clusters)"),
    "refcount-table-over-l1": ("plain", [_set(REFCOUNT_CLUSTERS, 3)], "qcow2 L1 table overlaps the refcount table"),
    # the snapshot table
    "snapshots-unaligned": ("snapshot", [_set(SNAPSHOTS_OFFSET, lambda i: _get(i, SNAPSHOTS_OFFSET) + 8)],
                            "qcow2 snapshot table offset not cluster-aligned"),
    "snapshots-at-header": ("snapshot", [_set(SNAPSHOTS_OFFSET, 0)], "qcow2 snapshot table overlaps the header"),
    "snapshots-past-eof": ("snapshot", [_set(NB_SNAPSHOTS, 60000)], "qcow2 snapshot table beyond end of file"),
    "snapshots-too-many": ("snapshot", [_set(NB_SNAPSHOTS, 65537)], "qcow2 image has too many snapshots (65537)"),
    "snapshots-offset-without-snapshots": ("plain", [_set(SNAPSHOTS_OFFSET, 4096)],
                                           "qcow2 snapshot table offset not cluster-aligned"),
    # L2 tables and data clusters
    "l2-at-l1": ("plain", [_set_l1_entry(lambda i: _COPIED | _l1(i))], "qcow2 L2 table overlaps the L1 table"),
    "l2-at-refcount-table": ("plain", [_set_l1_entry(lambda i: _COPIED | _refcount_table(i))],
                             "qcow2 L2 table overlaps the refcount table"),
    "l2-past-eof": ("plain", [_set_l1_entry(_past_eof)], "qcow2 L2 table offset beyond end of file"),
    "data-at-l1": ("plain", [_set_l2_entry(lambda i: _COPIED | _l1(i), 3)], "qcow2 data cluster overlaps the L1 table"),
    "data-at-refcount-table": ("plain", [_set_l2_entry(lambda i: _COPIED | _refcount_table(i), 5)],
                               "qcow2 data cluster overlaps the refcount table"),
    "data-past-eof": ("plain", [_set_l2_entry(_past_eof, 2)], "qcow2 data cluster offset beyond end of file"),
    "compressed-at-header": ("compressed", [_set_l2_entry(_compressed_at(lambda i: 100))],
                             "qcow2 compressed cluster overlaps the header"),
    "compressed-at-l1": ("compressed", [_set_l2_entry(_compressed_at(lambda i: _l1(i) - 200))],
                         "qcow2 compressed cluster overlaps the L1 table"),
    "compressed-at-refcount-table": ("compressed", [_set_l2_entry(_compressed_at(lambda i: _refcount_table(i) + 700))],
                                     "qcow2 compressed cluster overlaps the refcount table"),
}


def _variant(bases: dict[str, bytes], name: str) -> bytes:
    base, patches, _ = VARIANTS[name]
    image = bytearray(bases[base])
    for patch in patches:
        patch(image)
    assert image != bases[base]
    return bytes(image)


def _import(src: Path, out: Path) -> int:
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return local.write_image(JobContext(), fd, str(out), LIMIT)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_refused(name: str, bases: dict[str, bytes], tmp_path: Path) -> None:
    message = "^" + re.escape(VARIANTS[name][2]) + "$"
    image = _variant(bases, name)
    src = tmp_path / "crafted.qcow2"
    src.write_bytes(image)
    converted = tmp_path / "converted.raw"
    s = os.open(src, os.O_RDONLY)
    d = os.open(converted, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with pytest.raises(Qcow2Error, match=message):
            qcow2.convert_to_raw(s, d, max_size=LIMIT)
    finally:
        os.close(s)
        os.close(d)
    converted.unlink()

    # Imported from the file, and from a gzip'd copy (written out, then
    # converted in place): the same refusal, and nothing left.
    compressed = tmp_path / "crafted.qcow2.gz"
    compressed.write_bytes(gzip.compress(image, 1))
    for source in (src, compressed):
        out = tmp_path / "image.raw"
        with pytest.raises(Qcow2Error, match=message):
            _import(source, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.qcow2", "crafted.qcow2.gz"]


# -- what qemu-img makes still converts ----------------------------------------


def _qemu_images(d: Path) -> dict[str, Path]:
    rng = random.Random(12)
    raw = d / "disk.raw"
    data = bytearray(4 * MiB)
    data[0 : MiB] = _compressible(rng, MiB)
    data[3 * MiB : 3 * MiB + 300 * KiB] = rng.randbytes(300 * KiB)
    raw.write_bytes(data)
    images: dict[str, Path] = {}

    def convert(name: str, *options: str) -> Path:
        path = images[name] = d / f"{name}.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *options, str(raw), str(path))
        return path

    convert("plain")
    convert("v2", "-o", "compat=0.10")
    convert("compressed", "-c")
    convert("zstd", "-c", "-o", "compression_type=zstd")
    convert("clusters-512", "-o", "cluster_size=512")
    convert("clusters-2M", "-o", "cluster_size=2M")
    convert("refcount-64", "-o", "refcount_bits=64")
    convert("refcount-1", "-o", "refcount_bits=1")
    convert("lazy-refcounts", "-o", "lazy_refcounts=on")
    convert("preallocated", "-o", "preallocation=metadata")
    snap = convert("snapshots")
    _run("qemu-img", "snapshot", "-c", "one", str(snap))
    _run("qemu-io", "-c", "write -P 0x5a 64k 64k", str(snap))
    _run("qemu-img", "snapshot", "-c", "two", str(snap))
    # Shrunk from 64 GiB: the L1 table keeps its 128 entries for a 4 MiB disk.
    shrunk = images["shrunk"] = d / "shrunk.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(shrunk), "64G")
    _run("qemu-io", "-c", "write -P 0x33 0 1M", "-c", "write -P 0x44 9G 1M", str(shrunk))
    _run("qemu-img", "resize", "-q", "--shrink", str(shrunk), "4M")
    grown = images["grown"] = d / "grown.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(grown), "1M")
    _run("qemu-io", "-c", "write -P 0x66 0 512k", str(grown))
    _run("qemu-img", "resize", "-q", str(grown), "60M")
    empty = images["empty"] = d / "empty.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(empty), "0")
    return images


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _qemu_images(tmp_path_factory.mktemp("qcow2-real"))


@pytest.mark.parametrize("name", ["plain", "v2", "compressed", "zstd", "clusters-512", "clusters-2M", "refcount-64",
                                  "refcount-1", "lazy-refcounts", "preallocated", "snapshots", "shrunk", "grown",
                                  "empty"])
def test_real_images_convert(name: str, qemu_images: dict[str, Path], tmp_path: Path) -> None:
    src = qemu_images[name]
    if name == "shrunk":
        assert _get(src.read_bytes(), L1_SIZE) == 128
    oracle = tmp_path / "oracle.raw"
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(oracle))
    out = tmp_path / "image.raw"
    size = _import(src, out)
    assert size == os.path.getsize(oracle) == os.path.getsize(out)
    assert out.read_bytes() == oracle.read_bytes()
