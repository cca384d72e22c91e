"""Local imports and exports: the blocking jobs behind ImportTar, ImportRaw,
ImportFileSystem, ExportTar and ExportRaw.

Each job logs what systemd's worker tools log (machinectl prints those lines),
builds the new image under a hidden ``.#`` name, and renames it into place
only once it is complete; on any failure or cancel it removes what it wrote.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import stat

from imagepool import btrfs, tree
from imagepool.image import Image, ImageType, Pool
from imagepool.locks import image_name_lock
from importd import compress, ostree, qcow2, sparse, tar
from importd.compress.source import Input
from importd.context import Canceled, JobContext, TransferError, exiting_on_failure
from importd.handoff import Handoff
from importd.progress import ProgressLogger, format_bytes

# Cap on what one import may write, on top of the pool's free space.
DEFAULT_MAX_IMAGE_SIZE = 64 << 30
QCOW2_HEAD = 4


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "n/a"


def _input_size(fd: int) -> int | None:
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def size_limit(pool: Pool, max_size: int) -> int:
    """What an import may write: the cap, or the pool's free space if less."""
    st = os.statvfs(pool.path)
    return min(max_size, st.f_bavail * st.f_frsize)


def _check_target(pool: Pool, name: str, force: bool) -> None:
    if not force and pool.exists(name):
        raise TransferError(f"Image '{name}' already exists.")


def _finish(ctx: JobContext) -> None:
    ctx.log("Operation completed successfully.")
    ctx.log("Exiting.")


# --- imports ---------------------------------------------------------------------


def sync_default() -> bool:
    """Whether to sync before installing: yes, unless $SYSTEMD_IMPORT_SYNC
    says no (as systemd-import and systemd-pull)."""
    value = os.environ.get("SYSTEMD_IMPORT_SYNC", "").strip().lower()
    return value not in ("0", "no", "n", "false", "f", "off")



def import_tar(ctx: JobContext, fd: int, pool: Pool, name: str, force: bool, read_only: bool,
               max_size: int = DEFAULT_MAX_IMAGE_SIZE, sync: bool = True) -> None:
    _check_target(pool, name, force)
    ctx.log(f"Importing '{fd_path(fd)}', saving as '{name}'.")
    ctx.log(f"Operating on image directory '{pool.path}'.")
    with exiting_on_failure(ctx):
        with image_name_lock(name):
            tmp = tree.temp_name(pool.path, name)
            tree.make_tree_dir(tmp)
            try:
                sub = ctx.derive(ProgressLogger(ctx, "Imported"))
                unpack_tar(sub, fd, tmp, size_limit(pool, max_size), size=_input_size(fd))
                _check_target(pool, name, force)
                tree.install_image(tmp, os.path.join(pool.path, name), force=force, read_only=read_only, sync=sync)
            except BaseException:
                tree.remove_path(tmp)
                raise
    _finish(ctx)


def unpack_tar(ctx: JobContext, fd: Input, directory: str, limit: int, size: int | None = None) -> int:
    """Unpack the (compressed) tarball read from FD into DIRECTORY, which
    exists and is empty; returns the size of the tar stream."""
    unpacker = tar.TarUnpacker(directory, ctx)
    total = 0
    try:
        for chunk in compress.decompressed_chunks(fd, ctx, size=size, max_output=limit):
            total += len(chunk)
            unpacker.write(chunk)
        unpacker.finish()
    except BaseException:
        unpacker.abort()
        raise
    ostree.mangle_os_tree(directory)
    return total


def import_raw(ctx: JobContext, fd: int, pool: Pool, name: str, force: bool, read_only: bool,
               max_size: int = DEFAULT_MAX_IMAGE_SIZE, sync: bool = True) -> None:
    _check_target(pool, name, force)
    ctx.log(f"Importing '{fd_path(fd)}', saving as '{name}'.")
    ctx.log(f"Operating on image directory '{pool.path}'.")
    with exiting_on_failure(ctx):
        limit = size_limit(pool, max_size)
        with image_name_lock(name):
            tmp = tree.temp_name(pool.path, name + ".raw")
            try:
                size = write_image(ctx, fd, tmp, limit, writeback=sync)
                ctx.log(f"Wrote {format_bytes(size)}.")
                _check_target(pool, name, force)
                tree.install_image(tmp, os.path.join(pool.path, name + ".raw"), force=force, read_only=read_only,
                                  sync=sync)
            except BaseException:
                tree.remove_path(tmp)
                raise
    _finish(ctx)


def write_image(ctx: JobContext, fd: Input, path: str, limit: int, writeback: bool = False) -> int:
    """The raw image read from FD (compressed, qcow2 or plain), written
    sparse to the new file PATH; returns its size.  On failure PATH is
    removed again."""
    if isinstance(fd, int) and _input_size(fd) is not None and qcow2.is_qcow2(os.pread(fd, QCOW2_HEAD, 0)):
        # An uncompressed qcow2 file: convert straight from it.
        return convert_qcow2(ctx, fd, path, limit)
    out = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        size = write_raw(ctx, fd, out, limit, writeback)
        return size if size is not None else convert_qcow2_in_place(ctx, out, path, limit)
    except BaseException:
        _remove_quietly(path)
        raise
    finally:
        os.close(out)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def convert_qcow2_in_place(ctx: JobContext, qcow_fd: int, path: str, limit: int) -> int:
    """PATH holds a qcow2 file, open as QCOW_FD (qcow2 needs random access, so
    a stream is written out first): replace it by the raw image."""
    os.rename(path, path + ".qcow2")
    try:
        return convert_qcow2(ctx, qcow_fd, path, limit)
    finally:
        tree.remove_path(path + ".qcow2")


def write_raw(ctx: JobContext, fd: Input, out: int, limit: int, writeback: bool = False) -> int | None:
    """Copy the (decompressed) input into OUT, sparse.  Returns the size, or
    None when the data turned out to be qcow2 (left in OUT for conversion)."""
    progress = ProgressLogger(ctx, "Imported")
    size = _input_size(fd) if isinstance(fd, int) else None  # (a channel has no size)
    if size is not None:
        assert isinstance(fd, int)
        head = os.pread(fd, 6, 0)
        if compress.detect(head) == compress.Compression.NONE and not qcow2.is_qcow2(head[:QCOW2_HEAD]):
            if size > limit:
                raise TransferError(f"Image of {size} bytes exceeds the size limit of {limit} bytes")
            sparse.copy_sparse(fd, out, ctx.derive(progress), size)
            return size
    writer = sparse.SparseWriter(out, writeback=writeback)
    sub = ctx.derive(progress)
    chunks = compress.decompressed_chunks(fd, sub, size=size, max_output=limit)
    try:
        first = next(chunks, None)
        if first is None:
            return writer.finish()
        is_qcow = qcow2.is_qcow2(bytes(first[:QCOW2_HEAD]))
        # The writes in a thread of their own (importd.handoff): they overlap
        # the decoding.  A chunk of zeros goes over as its length, holding no
        # room: the decoder runs on through the holes.
        with Handoff(functools.partial(_write_all, out) if is_qcow else functools.partial(_write_sparse, writer),
                     ctx, "raw-writer") as handoff:
            for chunk in itertools.chain((first,), chunks):
                zeros = None if is_qcow else sparse.zero_run(chunk)
                if zeros is None:
                    handoff.put(chunk)
                else:
                    handoff.put(zeros, cost=0)
            handoff.close()
    finally:
        chunks.close()
    if is_qcow:
        return None
    return writer.finish()


def _write_sparse(writer: sparse.SparseWriter, item: bytes | int) -> None:
    if isinstance(item, int):
        writer.skip(item)
    else:
        writer.write(item)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def convert_qcow2(ctx: JobContext, qcow_fd: int, raw_path: str, limit: int) -> int:
    """The raw image of the qcow2 file QCOW_FD, written to the new file
    RAW_PATH, which is removed again if the image is refused (Qcow2Error) or
    the conversion fails."""
    ctx.log("Unpacking QCOW2 file.")
    out = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        def progress(done: int, total: int) -> None:
            ctx.check()

        return qcow2.convert_to_raw(qcow_fd, out, cancel=ctx.cancel, progress=progress, max_size=limit)
    except qcow2.Canceled:
        _remove_quietly(raw_path)
        raise Canceled() from None
    except BaseException:
        _remove_quietly(raw_path)
        raise
    finally:
        os.close(out)


def import_fs(ctx: JobContext, dir_fd: int, pool: Pool, name: str, force: bool, read_only: bool,
              sync: bool = True) -> None:
    _check_target(pool, name, force)
    ctx.log(f"Importing '{fd_path(dir_fd)}', saving as '{name}'.")
    ctx.log(f"Operating on image directory '{pool.path}'.")
    with exiting_on_failure(ctx):
        final = os.path.join(pool.path, name)
        with image_name_lock(name):
            tmp = tree.temp_name(pool.path, name)
            try:
                # Copy through the fd, not the path: the path may have changed.
                tree.make_tree_copy(f"/proc/{os.getpid()}/fd/{dir_fd}", tmp, False)
                ctx.check()
                _check_target(pool, name, force)
                tree.install_image(tmp, final, force=force, read_only=read_only, sync=sync)
            except BaseException:
                tree.remove_path(tmp)
                raise
    ctx.log(f"Directory '{final} successfully installed. Exiting.")


# --- exports ---------------------------------------------------------------------


def _find_for_export(pool: Pool, name: str) -> Image:
    image = pool.find(name)
    if image is None:
        raise TransferError(f"Machine image {name} not found.")
    return image


def export_format(ctx: JobContext, fmt: str, out_fd: int, tar: bool) -> compress.Compression:
    """The compression asked for; with none, the one the target file's name
    says, as newer clients choose it (machinectl 252 sends no format for a
    suffix it does not know, such as .zst)."""
    if fmt:
        return compress.parse_format(fmt)
    path = fd_path(out_fd)
    kind = compress.from_suffix(path, tar=tar)
    if kind != compress.Compression.NONE:
        ctx.log(f"No compression format given, using '{kind}' as the name of '{path}' says.")
    return kind


def export_tar(ctx: JobContext, pool: Pool, name: str, out_fd: int, fmt: str) -> None:
    image = _find_for_export(pool, name)
    kind = export_format(ctx, fmt, out_fd, tar=True)
    ctx.log(f"Exporting '{image.path}', saving to '{fd_path(out_fd)}' with compression '{kind}'.")
    if image.type not in (ImageType.DIRECTORY, ImageType.SUBVOLUME):
        raise TransferError("Failed to export image: Not a directory")
    source = image.path
    snapshot = None
    total = image.usage if image.usage not in (0, 2**64 - 1) else None
    try:
        if image.type == ImageType.SUBVOLUME:
            # Export a read-only snapshot, so the tarball is consistent.
            snapshot = tree.temp_name(os.path.dirname(image.path), name)
            btrfs.snapshot(image.path, snapshot, read_only=True)
            source = snapshot
        if total is None:
            total = _tree_size(source)
        progress = ProgressLogger(ctx, "Exported")
        done = 0
        # The writer aborts on an exception: no complete-looking partial file.
        with compress.compressed_writer(out_fd, kind, ctx) as writer:
            for chunk in tar.pack_tar(source, ctx):
                writer.write(chunk)
                done += len(chunk)
                if total:
                    progress(min(done / total, 1.0))
    finally:
        if snapshot:
            tree.remove_path(snapshot)
    _finish(ctx)


def _tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def export_raw(ctx: JobContext, pool: Pool, name: str, out_fd: int, fmt: str) -> None:
    image = _find_for_export(pool, name)
    kind = export_format(ctx, fmt, out_fd, tar=False)
    ctx.log(f"Exporting '{image.path}', saving to '{fd_path(out_fd)}' with compression '{kind}'.")
    if image.type != ImageType.RAW:
        raise TransferError("Failed to export image: Is a directory")
    progress = ProgressLogger(ctx, "Exported")
    src = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        if kind == compress.Compression.NONE and stat.S_ISREG(os.fstat(out_fd).st_mode):
            sparse.copy_sparse(src, out_fd, ctx.derive(progress), size)
        else:
            with compress.compressed_writer(out_fd, kind, ctx) as writer:
                done = 0
                while True:
                    ctx.check()
                    chunk = os.read(src, 1 << 20)
                    if not chunk:
                        break
                    writer.write(chunk)
                    done += len(chunk)
                    if size:
                        progress(done / size)
    finally:
        os.close(src)
    _finish(ctx)
