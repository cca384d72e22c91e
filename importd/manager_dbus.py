"""org.freedesktop.import1.Manager at /org/freedesktop/import1.

Arguments are checked in systemd's order (authorization, class and flags,
file descriptor, name), then a transfer is created; its job runs in a worker
thread.  File descriptors received here belong to the transfer and are
closed when it ends."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import stat
from collections.abc import Callable

import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_signal_async

from imagepool import ops
from imagepool.bus import UNPRIVILEGED, require_root, translated
from imagepool.errors import Errno, InvalidArgs
from imagepool.image import Pool
from imagepool.names import hostname_is_valid, image_name_is_valid
from importd import local, pull
from importd.http import HttpOptions
from importd.context import JobContext
from importd.transfer import Transfer, TransferManager, TransferType
from importd.transfer_dbus import TransferObject, transfer_object_path

MANAGER_PATH = "/org/freedesktop/import1"

FLAG_FORCE = 1
FLAG_READ_ONLY = 2
FLAG_PULL_KEEP_DOWNLOAD = 4

CLASS_POOLS = {
    "machine": None,  # the --pool of this daemon
    "portable": "/var/lib/portables",
    "sysext": "/var/lib/extensions",
    "confext": "/var/lib/confexts",
}

TransferTuple = tuple[int, str, str, str, float, str]


def _check_class(image_class: str) -> None:
    if image_class not in CLASS_POOLS:
        raise InvalidArgs(f"Image class '{image_class}' not known")


def _check_flags(flags: int, allowed: int) -> None:
    if flags & ~allowed:
        raise InvalidArgs(f"Flags 0x{flags:x} invalid")


def _check_name(name: str) -> None:
    check_local_name(name)


def check_local_name(name: str) -> None:
    """systemd 252's methods take machine names (host names) and say so in
    their words; the newer (*Ex) methods take any image name."""
    if sdbus.get_current_message().member.endswith("Ex"):
        if not image_name_is_valid(name):
            raise InvalidArgs(f"Local image name {name} is invalid")
    elif not hostname_is_valid(name):
        raise InvalidArgs(f"Local name {name} is invalid")


def _check_stream_fd(fd: int) -> None:
    """Imports read, exports write: a regular file or a pipe, nothing else."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise Errno(errno.EINVAL)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
        raise Errno(errno.EINVAL)


def _check_dir_fd(fd: int) -> None:
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise Errno(errno.EINVAL)


class ImportManagerObject(DbusInterfaceCommonAsync, interface_name="org.freedesktop.import1.Manager"):
    def __init__(self, machine_pool: Pool, max_image_size: int = local.DEFAULT_MAX_IMAGE_SIZE,
                 http: HttpOptions | None = None, sync: bool = True) -> None:
        super().__init__()
        self.machine_pool = machine_pool
        self.max_image_size = max_image_size
        self.http = http or HttpOptions()
        self.sync = sync
        self.transfers = TransferManager()
        self.objects: dict[int, TransferObject] = {}
        self.transfers.on_new = self._transfer_new
        self.transfers.on_removed = self._transfer_removed

    def pool_for(self, image_class: str) -> Pool:
        path = CLASS_POOLS[image_class]
        return self.machine_pool if path is None else Pool(path, [path])

    # --- transfer objects and signals ------------------------------------------

    def _transfer_new(self, transfer: Transfer) -> None:
        obj = TransferObject(self.transfers, transfer)
        transfer.listener = obj
        obj.handle = obj.export_to_dbus(transfer_object_path(transfer.id))
        self.objects[transfer.id] = obj
        self.transfer_new.emit((transfer.id, transfer_object_path(transfer.id)))

    def _transfer_removed(self, transfer: Transfer, result: str) -> None:
        self.transfer_removed.emit((transfer.id, transfer_object_path(transfer.id), result))
        obj = self.objects.pop(transfer.id, None)
        if obj and obj.handle:
            obj.handle.stop()

    def _start(self, type: TransferType, local_name: str, job: Callable[[JobContext], None],
               fd: int, image_class: str = "machine", remote: str = "", verify: str = "") -> tuple[int, str]:
        def run(ctx: JobContext) -> None:
            try:
                job(ctx)
            finally:
                if fd >= 0:
                    os.close(fd)

        try:
            transfer = self.transfers.create(type, local_name, run, image_class=image_class, remote=remote,
                                             verify=verify)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return transfer.id, transfer_object_path(transfer.id)

    async def _pull(self, type: TransferType, url: str, local_name: str, image_class: str, verify_mode: str,
                    force: bool, read_only: bool, keep_download: bool) -> tuple[int, str]:
        await require_root()
        mode = pull.check_request(url, local_name, verify_mode, check_local_name)
        pool = self.pool_for(image_class)
        await asyncio.to_thread(ops.setup_pool, pool)
        req = pull.PullRequest(
            kind="tar" if type == TransferType.PULL_TAR else "raw", url=url, local=local_name, verify=mode,
            force=force, read_only=read_only, keep_download=keep_download, settings=image_class == "machine",
            max_size=self.max_image_size, http=self.http, sync=self.sync)
        job = functools.partial(pull.pull, req=req, pool=pool)
        return self._start(type, local_name, job, -1, image_class, remote=url, verify=str(mode))

    # --- pulls -------------------------------------------------------------------

    @dbus_method_async("sssb", "uo", flags=UNPRIVILEGED, method_name="PullTar",
                       input_args_names=["url", "local_name", "verify_mode", "force"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def pull_tar(self, url: str, local_name: str, verify_mode: str, force: bool) -> tuple[int, str]:
        return await self._pull(TransferType.PULL_TAR, url, local_name, "machine", verify_mode, force, False, True)

    @dbus_method_async("sssb", "uo", flags=UNPRIVILEGED, method_name="PullRaw",
                       input_args_names=["url", "local_name", "verify_mode", "force"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def pull_raw(self, url: str, local_name: str, verify_mode: str, force: bool) -> tuple[int, str]:
        return await self._pull(TransferType.PULL_RAW, url, local_name, "machine", verify_mode, force, False, True)

    async def _pull_ex(self, type: TransferType, url: str, local_name: str, image_class: str, verify_mode: str,
                       flags: int) -> tuple[int, str]:
        await require_root()  # as newer systemd: polkit before the arguments
        _check_class(image_class)
        _check_flags(flags, FLAG_FORCE | FLAG_READ_ONLY | FLAG_PULL_KEEP_DOWNLOAD)
        return await self._pull(type, url, local_name, image_class, verify_mode, bool(flags & FLAG_FORCE),
                                bool(flags & FLAG_READ_ONLY), bool(flags & FLAG_PULL_KEEP_DOWNLOAD))

    @dbus_method_async("sssst", "uo", flags=UNPRIVILEGED, method_name="PullTarEx",
                       input_args_names=["url", "local_name", "class", "verify_mode", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def pull_tar_ex(self, url: str, local_name: str, image_class: str, verify_mode: str,
                          flags: int) -> tuple[int, str]:
        return await self._pull_ex(TransferType.PULL_TAR, url, local_name, image_class, verify_mode, flags)

    @dbus_method_async("sssst", "uo", flags=UNPRIVILEGED, method_name="PullRawEx",
                       input_args_names=["url", "local_name", "class", "verify_mode", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def pull_raw_ex(self, url: str, local_name: str, image_class: str, verify_mode: str,
                          flags: int) -> tuple[int, str]:
        return await self._pull_ex(TransferType.PULL_RAW, url, local_name, image_class, verify_mode, flags)

    async def _prepare_import(self, fd: int, name: str, image_class: str, directory: bool) -> Pool:
        try:
            await require_root()
            _check_dir_fd(fd) if directory else _check_stream_fd(fd)
            _check_name(name)
            pool = self.pool_for(image_class)
            await asyncio.to_thread(ops.setup_pool, pool)
            return pool
        except BaseException:
            os.close(fd)
            raise

    async def _import(self, type: TransferType, fd: int, name: str, image_class: str, force: bool,
                      read_only: bool) -> tuple[int, str]:
        pool = await self._prepare_import(fd, name, image_class, type == TransferType.IMPORT_FS)
        if type == TransferType.IMPORT_TAR:
            job = functools.partial(local.import_tar, fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, max_size=self.max_image_size, sync=self.sync)
        elif type == TransferType.IMPORT_RAW:
            job = functools.partial(local.import_raw, fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, max_size=self.max_image_size, sync=self.sync)
        else:
            job = functools.partial(local.import_fs, dir_fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, sync=self.sync)
        return self._start(type, name, job, fd, image_class)

    async def _export(self, type: TransferType, name: str, image_class: str, fd: int,
                      fmt: str) -> tuple[int, str]:
        try:
            await require_root()
            _check_stream_fd(fd)
            _check_name(name)
        except BaseException:
            os.close(fd)
            raise
        pool = self.pool_for(image_class)
        export = local.export_tar if type == TransferType.EXPORT_TAR else local.export_raw
        job = functools.partial(export, pool=pool, name=name, out_fd=fd, fmt=fmt)
        return self._start(type, name, job, fd, image_class)

    # --- imports -----------------------------------------------------------------

    @dbus_method_async("hsbb", "uo", flags=UNPRIVILEGED, method_name="ImportTar",
                       input_args_names=["fd", "local_name", "force", "read_only"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_tar(self, fd: int, local_name: str, force: bool, read_only: bool) -> tuple[int, str]:
        return await self._import(TransferType.IMPORT_TAR, fd, local_name, "machine", force, read_only)

    @dbus_method_async("hsbb", "uo", flags=UNPRIVILEGED, method_name="ImportRaw",
                       input_args_names=["fd", "local_name", "force", "read_only"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_raw(self, fd: int, local_name: str, force: bool, read_only: bool) -> tuple[int, str]:
        return await self._import(TransferType.IMPORT_RAW, fd, local_name, "machine", force, read_only)

    @dbus_method_async("hsbb", "uo", flags=UNPRIVILEGED, method_name="ImportFileSystem",
                       input_args_names=["fd", "local_name", "force", "read_only"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_file_system(self, fd: int, local_name: str, force: bool,
                                 read_only: bool) -> tuple[int, str]:
        return await self._import(TransferType.IMPORT_FS, fd, local_name, "machine", force, read_only)

    async def _import_ex(self, type: TransferType, fd: int, name: str, image_class: str,
                         flags: int) -> tuple[int, str]:
        try:
            _check_class(image_class)
            _check_flags(flags, FLAG_FORCE | FLAG_READ_ONLY)
        except BaseException:
            os.close(fd)
            raise
        return await self._import(type, fd, name, image_class, bool(flags & FLAG_FORCE),
                                  bool(flags & FLAG_READ_ONLY))

    @dbus_method_async("hsst", "uo", flags=UNPRIVILEGED, method_name="ImportTarEx",
                       input_args_names=["fd", "local_name", "class", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_tar_ex(self, fd: int, local_name: str, image_class: str, flags: int) -> tuple[int, str]:
        return await self._import_ex(TransferType.IMPORT_TAR, fd, local_name, image_class, flags)

    @dbus_method_async("hsst", "uo", flags=UNPRIVILEGED, method_name="ImportRawEx",
                       input_args_names=["fd", "local_name", "class", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_raw_ex(self, fd: int, local_name: str, image_class: str, flags: int) -> tuple[int, str]:
        return await self._import_ex(TransferType.IMPORT_RAW, fd, local_name, image_class, flags)

    @dbus_method_async("hsst", "uo", flags=UNPRIVILEGED, method_name="ImportFileSystemEx",
                       input_args_names=["fd", "local_name", "class", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def import_file_system_ex(self, fd: int, local_name: str, image_class: str,
                                    flags: int) -> tuple[int, str]:
        return await self._import_ex(TransferType.IMPORT_FS, fd, local_name, image_class, flags)

    # --- exports -----------------------------------------------------------------

    @dbus_method_async("shs", "uo", flags=UNPRIVILEGED, method_name="ExportTar",
                       input_args_names=["local_name", "fd", "format"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def export_tar(self, local_name: str, fd: int, fmt: str) -> tuple[int, str]:
        return await self._export(TransferType.EXPORT_TAR, local_name, "machine", fd, fmt)

    @dbus_method_async("shs", "uo", flags=UNPRIVILEGED, method_name="ExportRaw",
                       input_args_names=["local_name", "fd", "format"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def export_raw(self, local_name: str, fd: int, fmt: str) -> tuple[int, str]:
        return await self._export(TransferType.EXPORT_RAW, local_name, "machine", fd, fmt)

    async def _export_ex(self, type: TransferType, name: str, image_class: str, fd: int, fmt: str,
                         flags: int) -> tuple[int, str]:
        try:
            _check_class(image_class)
            _check_flags(flags, 0)
        except BaseException:
            os.close(fd)
            raise
        return await self._export(type, name, image_class, fd, fmt)

    @dbus_method_async("sshst", "uo", flags=UNPRIVILEGED, method_name="ExportTarEx",
                       input_args_names=["local_name", "class", "fd", "format", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def export_tar_ex(self, local_name: str, image_class: str, fd: int, fmt: str,
                            flags: int) -> tuple[int, str]:
        return await self._export_ex(TransferType.EXPORT_TAR, local_name, image_class, fd, fmt, flags)

    @dbus_method_async("sshst", "uo", flags=UNPRIVILEGED, method_name="ExportRawEx",
                       input_args_names=["local_name", "class", "fd", "format", "flags"],
                       result_args_names=["transfer_id", "transfer_path"])
    @translated
    async def export_raw_ex(self, local_name: str, image_class: str, fd: int, fmt: str,
                            flags: int) -> tuple[int, str]:
        return await self._export_ex(TransferType.EXPORT_RAW, local_name, image_class, fd, fmt, flags)

    # --- listing and cancelling ------------------------------------------------------

    @dbus_method_async("", "a(usssdo)", flags=UNPRIVILEGED, method_name="ListTransfers",
                       result_args_names=["transfers"])
    @translated
    async def list_transfers(self) -> list[TransferTuple]:
        return [(t.id, str(t.type), t.remote, t.local, t.progress, transfer_object_path(t.id))
                for t in sorted(self.transfers.transfers.values(), key=lambda t: t.id)]

    @dbus_method_async("st", "a(ussssdo)", flags=UNPRIVILEGED, method_name="ListTransfersEx",
                       input_args_names=["class", "flags"], result_args_names=["transfers"])
    @translated
    async def list_transfers_ex(self, image_class: str, flags: int) -> list[tuple]:
        if image_class:
            _check_class(image_class)
        _check_flags(flags, 0)
        return [(t.id, str(t.type), t.remote, t.local, t.image_class, t.progress, transfer_object_path(t.id))
                for t in sorted(self.transfers.transfers.values(), key=lambda t: t.id)
                if not image_class or t.image_class == image_class]

    @dbus_method_async("st", "a(ssssbtttttt)", flags=UNPRIVILEGED, method_name="ListImages",
                       input_args_names=["class", "flags"], result_args_names=["images"])
    @translated
    async def list_images(self, image_class: str, flags: int) -> list[tuple]:
        if image_class:
            _check_class(image_class)
        _check_flags(flags, 0)
        classes = [image_class] if image_class else list(CLASS_POOLS)
        result = []
        for cls in classes:
            images = await asyncio.to_thread(self._discover, cls)
            for i in images:
                result.append((cls, i.name, str(i.type), i.path, i.read_only, i.crtime, i.mtime, i.usage,
                               i.usage_exclusive, i.limit, i.limit_exclusive))
        return result

    def _discover(self, image_class: str) -> list:
        pool = self.pool_for(image_class)
        return [i for name, i in sorted(pool.discover().items()) if not i.is_host]

    @dbus_method_async("u", "", flags=UNPRIVILEGED, method_name="CancelTransfer",
                       input_args_names=["transfer_id"])
    @translated
    async def cancel_transfer(self, transfer_id: int) -> None:
        await require_root()
        self.transfers.cancel(self.transfers.get(transfer_id))

    # --- signals -----------------------------------------------------------------------

    @dbus_signal_async("uo", signal_name="TransferNew", signal_args_names=["transfer_id", "transfer_path"])
    def transfer_new(self) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_signal_async("uos", signal_name="TransferRemoved",
                       signal_args_names=["transfer_id", "transfer_path", "result"])
    def transfer_removed(self) -> tuple[int, str, str]:
        raise NotImplementedError
