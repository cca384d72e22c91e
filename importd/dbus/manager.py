"""org.freedesktop.import1.Manager at /org/freedesktop/import1.

Arguments are checked in systemd's order (authorization, class and flags,
file descriptor, name), then the ImportManager starts the transfer.  A file
descriptor received here is closed if the call fails before the transfer
owns it."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sdbus import DbusInterfaceCommonAsync, dbus_signal_async

from imagepool import dbus
from imagepool.authz import IMPORT1
from importd import manager as domain
from importd.dbus.transfer import TransferObject, transfer_object_path
from importd.manager import FLAG_FORCE, FLAG_PULL_KEEP_DOWNLOAD, FLAG_PULL_OCI_FLATTEN, FLAG_READ_ONLY, ImportManager
from importd.transfer import Transfer, TransferType

PATH = "/org/freedesktop/import1"
INTERFACE = "org.freedesktop.import1.Manager"
PULL = f"{IMPORT1}.pull"
IMPORT = f"{IMPORT1}.import"
EXPORT = f"{IMPORT1}.export"
CANCEL = f"{IMPORT1}.cancel"

T = TypeVar("T")
Started = tuple[int, str]


def _legacy() -> bool:
    """Whether the method being handled is one of systemd 252's (not *Ex)."""
    return not dbus.current_method().endswith("Ex")


async def _closing_on_error(fd: int, checks: Callable[[], Awaitable[T]]) -> T:
    try:
        return await checks()
    except BaseException:
        os.close(fd)
        raise


class ImportManagerObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, manager: ImportManager) -> None:
        super().__init__()
        self.manager = manager
        self.exported: dbus.Exported[int, TransferObject] = dbus.Exported(transfer_object_path)
        manager.transfers.on_new.append(self._transfer_new)
        manager.transfers.on_removed.append(self._transfer_removed)

    # --- transfer objects and signals ------------------------------------------

    def _transfer_new(self, transfer: Transfer) -> None:
        obj = TransferObject(self.manager, transfer)
        transfer.listeners.append(obj)
        self.exported.export(transfer.id, obj)
        self.transfer_new.emit((transfer.id, transfer_object_path(transfer.id)))

    def _transfer_removed(self, transfer: Transfer, result: str) -> None:
        self.transfer_removed.emit((transfer.id, transfer_object_path(transfer.id), result))
        self.exported.unexport(transfer.id)

    @staticmethod
    def _started(transfer: Transfer) -> Started:
        return transfer.id, transfer_object_path(transfer.id)

    # --- pulls ---------------------------------------------------------------------

    async def _pull(self, type: TransferType, url: str, local_name: str, image_class: str, verify_mode: str,
                    flags: int, ex: bool = False) -> Started:
        # Polkit first (newer systemd checks the Ex forms' arguments after it too), without details, as
        # systemd asks for every import1 action over D-Bus.
        await dbus.authorize(PULL)
        if ex:
            domain.check_class(image_class)
            domain.check_flags(flags, FLAG_FORCE | FLAG_READ_ONLY | FLAG_PULL_KEEP_DOWNLOAD)
        mode = domain.check_pull(url, local_name, verify_mode, _legacy())
        transfer = await self.manager.start_pull(
            type, url, local_name, image_class, mode, force=bool(flags & FLAG_FORCE),
            read_only=bool(flags & FLAG_READ_ONLY), keep_download=bool(flags & FLAG_PULL_KEEP_DOWNLOAD))
        return self._started(transfer)

    @dbus.method("sssb", "uo", "PullTar", ["url", "local_name", "verify_mode", "force"],
                 ["transfer_id", "transfer_path"])
    async def pull_tar(self, url: str, local_name: str, verify_mode: str, force: bool) -> Started:
        # No pristine copy of the download is kept (systemd 262; 252 kept one):
        # importctl asks for one with PullTarEx.
        flags = FLAG_FORCE if force else 0
        return await self._pull(TransferType.PULL_TAR, url, local_name, "machine", verify_mode, flags)

    @dbus.method("sssb", "uo", "PullRaw", ["url", "local_name", "verify_mode", "force"],
                 ["transfer_id", "transfer_path"])
    async def pull_raw(self, url: str, local_name: str, verify_mode: str, force: bool) -> Started:
        flags = FLAG_FORCE if force else 0  # no kept download, as PullTar
        return await self._pull(TransferType.PULL_RAW, url, local_name, "machine", verify_mode, flags)

    @dbus.method("sssst", "uo", "PullTarEx", ["url", "local_name", "class", "verify_mode", "flags"],
                 ["transfer_id", "transfer_path"])
    async def pull_tar_ex(self, url: str, local_name: str, image_class: str, verify_mode: str,
                          flags: int) -> Started:
        return await self._pull(TransferType.PULL_TAR, url, local_name, image_class, verify_mode, flags, ex=True)

    @dbus.method("sssst", "uo", "PullRawEx", ["url", "local_name", "class", "verify_mode", "flags"],
                 ["transfer_id", "transfer_path"])
    async def pull_raw_ex(self, url: str, local_name: str, image_class: str, verify_mode: str,
                          flags: int) -> Started:
        return await self._pull(TransferType.PULL_RAW, url, local_name, image_class, verify_mode, flags, ex=True)

    @dbus.method("ssst", "uo", "PullOci", ["ref", "local_name", "class", "flags"], ["transfer_id", "transfer_path"])
    async def pull_oci(self, ref: str, local_name: str, image_class: str, flags: int) -> Started:
        """systemd 262's PullOci; REF may also be oci:/oci-archive:/docker-archive:PATH (offline), and the
        flags take FLAG_PULL_OCI_FLATTEN besides force and read-only."""
        await dbus.authorize(PULL)
        domain.check_class(image_class)
        domain.check_flags(flags, FLAG_FORCE | FLAG_READ_ONLY | FLAG_PULL_OCI_FLATTEN)
        domain.check_oci_pull(ref, local_name)
        transfer = await self.manager.start_pull_oci(ref, local_name, image_class, force=bool(flags & FLAG_FORCE),
                                                     read_only=bool(flags & FLAG_READ_ONLY),
                                                     flatten=bool(flags & FLAG_PULL_OCI_FLATTEN))
        return self._started(transfer)

    # --- imports -------------------------------------------------------------------

    async def _import(self, type: TransferType, fd: int, name: str, image_class: str, flags: int) -> Started:
        async def checks() -> None:
            await dbus.authorize(IMPORT)
            if type == TransferType.IMPORT_FS:
                domain.check_dir_fd(fd)
            else:
                domain.check_stream_fd(fd)
            domain.check_local_name(name, _legacy())

        await _closing_on_error(fd, checks)
        transfer = await self.manager.start_import(type, fd, name, image_class, force=bool(flags & FLAG_FORCE),
                                                   read_only=bool(flags & FLAG_READ_ONLY))
        return self._started(transfer)

    async def _import_ex(self, type: TransferType, fd: int, name: str, image_class: str, flags: int) -> Started:
        async def checks() -> None:
            domain.check_class(image_class)
            domain.check_flags(flags, FLAG_FORCE | FLAG_READ_ONLY)

        await _closing_on_error(fd, checks)
        return await self._import(type, fd, name, image_class, flags)

    @staticmethod
    def _flags(force: bool, read_only: bool) -> int:
        return (FLAG_FORCE if force else 0) | (FLAG_READ_ONLY if read_only else 0)

    @dbus.method("hsbb", "uo", "ImportTar", ["fd", "local_name", "force", "read_only"],
                 ["transfer_id", "transfer_path"])
    async def import_tar(self, fd: int, local_name: str, force: bool, read_only: bool) -> Started:
        return await self._import(TransferType.IMPORT_TAR, fd, local_name, "machine", self._flags(force, read_only))

    @dbus.method("hsbb", "uo", "ImportRaw", ["fd", "local_name", "force", "read_only"],
                 ["transfer_id", "transfer_path"])
    async def import_raw(self, fd: int, local_name: str, force: bool, read_only: bool) -> Started:
        return await self._import(TransferType.IMPORT_RAW, fd, local_name, "machine", self._flags(force, read_only))

    @dbus.method("hsbb", "uo", "ImportFileSystem", ["fd", "local_name", "force", "read_only"],
                 ["transfer_id", "transfer_path"])
    async def import_file_system(self, fd: int, local_name: str, force: bool, read_only: bool) -> Started:
        return await self._import(TransferType.IMPORT_FS, fd, local_name, "machine", self._flags(force, read_only))

    @dbus.method("hsst", "uo", "ImportTarEx", ["fd", "local_name", "class", "flags"],
                 ["transfer_id", "transfer_path"])
    async def import_tar_ex(self, fd: int, local_name: str, image_class: str, flags: int) -> Started:
        return await self._import_ex(TransferType.IMPORT_TAR, fd, local_name, image_class, flags)

    @dbus.method("hsst", "uo", "ImportRawEx", ["fd", "local_name", "class", "flags"],
                 ["transfer_id", "transfer_path"])
    async def import_raw_ex(self, fd: int, local_name: str, image_class: str, flags: int) -> Started:
        return await self._import_ex(TransferType.IMPORT_RAW, fd, local_name, image_class, flags)

    @dbus.method("hsst", "uo", "ImportFileSystemEx", ["fd", "local_name", "class", "flags"],
                 ["transfer_id", "transfer_path"])
    async def import_file_system_ex(self, fd: int, local_name: str, image_class: str, flags: int) -> Started:
        return await self._import_ex(TransferType.IMPORT_FS, fd, local_name, image_class, flags)

    # --- exports -------------------------------------------------------------------

    async def _export(self, type: TransferType, name: str, image_class: str, fd: int, fmt: str,
                      flags: int | None = None) -> Started:
        async def checks() -> None:
            if flags is not None:  # the Ex forms
                domain.check_class(image_class)
                domain.check_flags(flags, 0)
            await dbus.authorize(EXPORT)
            domain.check_stream_fd(fd)
            domain.check_local_name(name, _legacy())

        await _closing_on_error(fd, checks)
        return self._started(self.manager.start_export(type, name, image_class, fd, fmt))

    @dbus.method("shs", "uo", "ExportTar", ["local_name", "fd", "format"], ["transfer_id", "transfer_path"])
    async def export_tar(self, local_name: str, fd: int, fmt: str) -> Started:
        return await self._export(TransferType.EXPORT_TAR, local_name, "machine", fd, fmt)

    @dbus.method("shs", "uo", "ExportRaw", ["local_name", "fd", "format"], ["transfer_id", "transfer_path"])
    async def export_raw(self, local_name: str, fd: int, fmt: str) -> Started:
        return await self._export(TransferType.EXPORT_RAW, local_name, "machine", fd, fmt)

    @dbus.method("sshst", "uo", "ExportTarEx", ["local_name", "class", "fd", "format", "flags"],
                 ["transfer_id", "transfer_path"])
    async def export_tar_ex(self, local_name: str, image_class: str, fd: int, fmt: str, flags: int) -> Started:
        return await self._export(TransferType.EXPORT_TAR, local_name, image_class, fd, fmt, flags)

    @dbus.method("sshst", "uo", "ExportRawEx", ["local_name", "class", "fd", "format", "flags"],
                 ["transfer_id", "transfer_path"])
    async def export_raw_ex(self, local_name: str, image_class: str, fd: int, fmt: str, flags: int) -> Started:
        return await self._export(TransferType.EXPORT_RAW, local_name, image_class, fd, fmt, flags)

    # --- listing and cancelling ------------------------------------------------------

    @staticmethod
    def _check_listing(image_class: str, flags: int) -> None:
        if image_class:
            domain.check_class(image_class)
        domain.check_flags(flags, 0)

    @dbus.method("", "a(usssdo)", "ListTransfers", result_names=["transfers"])
    async def list_transfers(self) -> list[tuple[int, str, str, str, float, str]]:
        return [(t.id, str(t.type), t.remote, t.local, t.progress, transfer_object_path(t.id))
                for t in self.manager.list_transfers()]

    @dbus.method("st", "a(ussssdo)", "ListTransfersEx", ["class", "flags"], ["transfers"])
    async def list_transfers_ex(self, image_class: str, flags: int) -> list[tuple[Any, ...]]:
        self._check_listing(image_class, flags)
        return [(t.id, str(t.type), t.remote, t.local, t.image_class, t.progress, transfer_object_path(t.id))
                for t in self.manager.list_transfers(image_class)]

    @dbus.method("st", "a(ssssbtttttt)", "ListImages", ["class", "flags"], ["images"])
    async def list_images(self, image_class: str, flags: int) -> list[tuple[Any, ...]]:
        self._check_listing(image_class, flags)
        return [(cls, i.name, str(i.type), i.path, i.read_only, i.crtime, i.mtime, i.usage, i.usage_exclusive,
                 i.limit, i.limit_exclusive) for cls, i in await self.manager.list_images(image_class)]

    @dbus.method("u", "", "CancelTransfer", ["transfer_id"])
    async def cancel_transfer(self, transfer_id: int) -> None:
        await dbus.authorize(CANCEL)  # before the id is looked at, as systemd
        self.manager.cancel(self.manager.get(transfer_id))

    # --- signals -----------------------------------------------------------------------

    @dbus_signal_async("uo", signal_name="TransferNew", signal_args_names=["transfer_id", "transfer_path"])
    def transfer_new(self) -> Started:
        raise NotImplementedError

    @dbus_signal_async("uos", signal_name="TransferRemoved",
                       signal_args_names=["transfer_id", "transfer_path", "result"])
    def transfer_removed(self) -> tuple[int, str, str]:
        raise NotImplementedError
