"""org.freedesktop.import1.Transfer: one object per running transfer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdbus import (
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)

from imagepool.bus import UNPRIVILEGED, require_root, translated
from importd.transfer import Transfer, TransferListener

if TYPE_CHECKING:
    from sdbus.dbus_common_elements import DbusExportHandle

    from importd.transfer import TransferManager

INTERFACE = "org.freedesktop.import1.Transfer"


def transfer_object_path(transfer_id: int) -> str:
    return f"/org/freedesktop/import1/transfer/_{transfer_id}"


class TransferObject(DbusInterfaceCommonAsync, TransferListener, interface_name=INTERFACE):
    def __init__(self, manager: TransferManager, transfer: Transfer) -> None:
        super().__init__()
        self.manager = manager
        self.transfer = transfer
        self.handle: DbusExportHandle | None = None

    # --- TransferListener ----------------------------------------------------

    def log_message(self, transfer: Transfer, priority: int, line: str) -> None:
        self.log_message_signal.emit((priority, line))

    def progress_changed(self, transfer: Transfer, notify_property: bool) -> None:
        self.progress_update.emit(transfer.progress)
        if notify_property:
            self.properties_changed.emit((INTERFACE, {"Progress": ("d", transfer.progress)}, []))

    # --- D-Bus ---------------------------------------------------------------

    @dbus_method_async("", "", flags=UNPRIVILEGED, method_name="Cancel")
    @translated
    async def cancel(self) -> None:
        await require_root()
        self.manager.cancel(self.transfer)

    @dbus_property_async("u", flags=DbusPropertyConstFlag, property_name="Id")
    def id(self) -> int:
        return self.transfer.id

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Local")
    def local(self) -> str:
        return self.transfer.local

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Remote")
    def remote(self) -> str:
        return self.transfer.remote

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Type")
    def type(self) -> str:
        return str(self.transfer.type)

    @dbus_property_async("s", flags=DbusPropertyConstFlag, property_name="Verify")
    def verify(self) -> str:
        return self.transfer.verify

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="Progress")
    def progress(self) -> float:
        return self.transfer.progress

    @dbus_signal_async("us", signal_name="LogMessage", signal_args_names=["priority", "line"])
    def log_message_signal(self) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_signal_async("d", signal_name="ProgressUpdate", signal_args_names=["progress"])
    def progress_update(self) -> float:
        raise NotImplementedError
