"""org.freedesktop.import1.Transfer: one object per running transfer."""

from __future__ import annotations

from sdbus import DbusInterfaceCommonAsync, DbusPropertyConstFlag, DbusPropertyEmitsChangeFlag, dbus_signal_async

from imagepool import dbus
from importd.manager import ImportManager
from importd.transfer import Transfer, TransferListener

INTERFACE = "org.freedesktop.import1.Transfer"
# systemd asks for "pull" (not "cancel") to cancel through a Transfer object, without details.
CANCEL = "org.freedesktop.import1.pull"

PROPERTIES = [
    ("Id", "u", "id", DbusPropertyConstFlag),
    ("Local", "s", "local", DbusPropertyConstFlag),
    ("Remote", "s", "remote", DbusPropertyConstFlag),
    ("Type", "s", "type", DbusPropertyConstFlag),
    ("Verify", "s", "verify", DbusPropertyConstFlag),
    ("Progress", "d", "progress", DbusPropertyEmitsChangeFlag),
]


def transfer_object_path(transfer_id: int) -> str:
    return f"/org/freedesktop/import1/transfer/_{transfer_id}"


class TransferObject(DbusInterfaceCommonAsync, TransferListener, interface_name=INTERFACE):
    def __init__(self, manager: ImportManager, transfer: Transfer) -> None:
        super().__init__()
        self.manager = manager
        self.transfer = transfer

    # --- TransferListener ----------------------------------------------------

    def log_message(self, transfer: Transfer, priority: int, line: str) -> None:
        self.log_message_signal.emit((priority, line))

    def progress_changed(self, transfer: Transfer, notify_property: bool) -> None:
        self.progress_update.emit(transfer.progress)
        if notify_property:
            self.properties_changed.emit((INTERFACE, {"Progress": ("d", transfer.progress)}, []))

    # --- D-Bus ---------------------------------------------------------------

    locals().update(dbus.properties("transfer", PROPERTIES))

    @dbus.method("", "", "Cancel")
    async def cancel(self) -> None:
        await dbus.authorize(CANCEL)
        self.manager.cancel(self.transfer)

    @dbus_signal_async("us", signal_name="LogMessage", signal_args_names=["priority", "line"])
    def log_message_signal(self) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_signal_async("d", signal_name="ProgressUpdate", signal_args_names=["progress"])
    def progress_update(self) -> float:
        raise NotImplementedError
