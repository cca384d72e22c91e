"""import1's newer API (the *Ex methods, ListTransfersEx, ListImages,
ProgressUpdate) and its signals, through a D-Bus client of our own: busctl
252 can't pass file descriptors."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async

from imagepool import btrfs, fsutil
from tests.conftest import Daemons, Pool, busctl
from tests.imagetree import make_os_tree

FORCE, READ_ONLY = 1, 2


class Import1(DbusInterfaceCommonAsync, interface_name="org.freedesktop.import1.Manager"):
    @dbus_method_async("hsst", "uo", method_name="ImportTarEx")
    async def import_tar_ex(self, fd: int, name: str, cls: str, flags: int) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("hsst", "uo", method_name="ImportRawEx")
    async def import_raw_ex(self, fd: int, name: str, cls: str, flags: int) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("hsst", "uo", method_name="ImportFileSystemEx")
    async def import_fs_ex(self, fd: int, name: str, cls: str, flags: int) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("sshst", "uo", method_name="ExportTarEx")
    async def export_tar_ex(self, name: str, cls: str, fd: int, fmt: str, flags: int) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("sshst", "uo", method_name="ExportRawEx")
    async def export_raw_ex(self, name: str, cls: str, fd: int, fmt: str, flags: int) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("shs", "uo", method_name="ExportTar")
    async def export_tar(self, name: str, fd: int, fmt: str) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_method_async("st", "a(ussssdo)", method_name="ListTransfersEx")
    async def list_transfers_ex(self, cls: str, flags: int) -> list:
        raise NotImplementedError


class Signals:
    """Every signal import1 sends, in order: (member, path, args)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, tuple]] = []
        self.slots: list = []
        self.changed = asyncio.Event()

    async def watch(self, bus: sdbus.SdBus) -> None:
        for interface in ("org.freedesktop.import1.Manager", "org.freedesktop.import1.Transfer",
                          "org.freedesktop.DBus.Properties"):
            self.slots.append(await bus.match_signal_async("org.freedesktop.import1", None, interface, None,
                                                           self._got))

    def _got(self, msg: sdbus.SdBusMessage) -> None:
        contents = msg.get_contents()
        args = contents if isinstance(contents, tuple) else (contents,)
        self.seen.append((msg.member or "", msg.path or "", args))
        self.changed.set()

    async def until_removed(self, transfer_id: int, timeout: float = 60) -> str:
        async def wait() -> str:
            while True:
                for member, _path, args in self.seen:
                    if member == "TransferRemoved" and args[0] == transfer_id:
                        return args[2]
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    def of(self, member: str, path: str | None = None) -> list[tuple]:
        return [args for m, p, args in self.seen if m == member and (path is None or p == path)]

    def close(self) -> None:
        for slot in self.slots:
            slot.close()


async def with_client(scenario):
    bus = sdbus.sd_bus_open_system()
    manager = Import1.new_proxy("org.freedesktop.import1", "/org/freedesktop/import1", bus)
    signals = Signals()
    await signals.watch(bus)
    try:
        return await scenario(manager, signals)
    finally:
        signals.close()
        bus.close()


def test_ex_methods_and_signals(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    (tree / "payload").write_bytes(os.urandom(8 << 20))
    tarball = tmp_path / "t.tar.zst"
    subprocess.run(f"tar -C {tree} -c . | zstd -q -c > {tarball}", shell=True, check=True)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))

    async def scenario(manager: Import1, signals: Signals) -> None:
        with open(tarball, "rb") as f:
            tid, path = await manager.import_tar_ex(f.fileno(), "ex", "machine", FORCE | READ_ONLY)
        assert path == f"/org/freedesktop/import1/transfer/_{tid}"
        assert await signals.until_removed(tid) == "done"
        assert signals.of("TransferNew")[0] == (tid, path)
        lines = [args[1] for args in signals.of("LogMessage", path)]
        assert lines[0] == f"Importing '{tarball}', saving as 'ex'."
        assert lines[-2:] == ["Operation completed successfully.", "Exiting."]
        progress = [args[0] for args in signals.of("ProgressUpdate", path)]
        assert progress and progress == sorted(progress) and progress[-1] == 1.0
        # PropertiesChanged for Progress is rate-limited, ProgressUpdate is not.
        changed = signals.of("PropertiesChanged", path)
        assert changed and len(changed) <= len(progress)

        with open(raw, "rb") as f:
            tid, _ = await manager.import_raw_ex(f.fileno(), "disk", "machine", 0)
        assert await signals.until_removed(tid) == "done"
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
        try:
            tid, _ = await manager.import_fs_ex(fd, "fs", "machine", READ_ONLY)
        finally:
            os.close(fd)
        assert await signals.until_removed(tid) == "done"

        # zstd exports, which machinectl 252 can't ask for.
        for name, method, out in (("ex", manager.export_tar_ex, tmp_path / "ex.tar.zst"),
                                  ("disk", manager.export_raw_ex, tmp_path / "disk.raw.zst")):
            with open(out, "wb") as f:
                tid, _ = await method(name, "machine", f.fileno(), "zstd", 0)
            assert await signals.until_removed(tid) == "done"
            assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
        with open(tmp_path / "v252.tar.zst", "wb") as f:
            tid, _ = await manager.export_tar("ex", f.fileno(), "zstd")
        assert await signals.until_removed(tid) == "done"

        # Argument checks, in systemd's words.
        with open(raw, "rb") as f:
            for args, message in ((("x", "nope", 0), "Image class 'nope' not known"),
                                  (("x", "machine", 8), "Flags 0x8 invalid"),
                                  (("../x", "machine", 0), "Local image name ../x is invalid")):
                with pytest.raises(sdbus.DbusInvalidArgsError, match=message.replace("(", r"\(")):
                    await manager.import_raw_ex(f.fileno(), *args)
        with open(raw, "rb") as f:
            with pytest.raises(sdbus.DbusInvalidArgsError, match="Flags 0x1 invalid"):
                await manager.export_raw_ex("disk", "machine", f.fileno(), "", 1)
        assert await manager.list_transfers_ex("", 0) == []

    asyncio.run(with_client(scenario))
    assert (pool / "ex/payload").stat().st_size == 8 << 20
    if pool.btrfs:
        assert btrfs.get_read_only(str(pool / "ex"))
    else:
        assert fsutil.get_immutable(str(pool / "ex"))
    assert os.stat(pool / "disk.raw").st_blocks * 512 < 2 << 20
    assert fsutil.get_immutable(str(pool / "fs")) or btrfs.get_read_only(str(pool / "fs"))
    r = subprocess.run(["zstd", "-dc", str(tmp_path / "disk.raw.zst")], capture_output=True, check=True)
    assert r.stdout == raw.read_bytes()


def test_list_images_and_transfers_with_busctl(pool: Pool, services: Daemons) -> None:
    (pool / "dir1").mkdir()
    with open(pool / "r.raw", "wb") as f:
        f.truncate(1 << 20)
    r = busctl("call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
               "ListImages", "st", "machine", "0")
    assert r.returncode == 0, r.stderr
    assert '"machine" "dir1" "directory"' in r.stdout and '"machine" "r" "raw"' in r.stdout
    r = busctl("call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
               "ListTransfersEx", "st", "", "0")
    assert r.stdout.strip() == "a(ussssdo) 0"
    r = busctl("call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
               "ListTransfersEx", "st", "bogus", "0")
    assert "Image class 'bogus' not known" in r.stderr
    r = busctl("call", "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
               "CancelTransfer", "u", "0")
    assert "Invalid transfer id" in r.stderr
