"""importd's Varlink front end: io.systemd.Import on /run/systemd/io.systemd.Import,
as systemd 262's importd serves it (what boot-time ``systemd.pull=``
downloads call).

Pull with "more" streams the transfer: its id first, then its log lines
and progress, and a last empty reply when it is done (TransferFailed or
TransferCancelled when not).  A client that hangs up on that stream
cancels the transfer, as Ctrl-C of importctl does.  Without "more", the
id is the only reply and the transfer runs on, as one started over D-Bus
(systemd 262 loses such a transfer)."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections.abc import AsyncIterator
from typing import Any

from imagepool import authz, daemon
from imagepool.errors import PoolError
from imagepool.varlink_service import (
    Call,
    Error,
    Handler,
    Partial,
    Result,
    Service,
    expected_more,
    invalid_parameter,
)
from importd import manager as domain
from importd import pull
from importd.manager import ImportManager
from importd.transfer import Transfer, TransferListener, TransferType

log = logging.getLogger(__name__)

SOCKET = "/run/systemd/io.systemd.Import"
INTERFACE = "io.systemd.Import"
PULL = f"{authz.IMPORT1}.pull"
LOG_DAEMON = 3 << 3  # the syslog facility systemd 262 puts on a transfer's lines


def _idl() -> str:
    return importlib.resources.files(__name__).joinpath(f"{INTERFACE}.varlink").read_text()


def _type_name(type: TransferType) -> str:
    return str(type).replace("-", "_")  # pull-tar over D-Bus, pull_tar over Varlink


class _Stream(TransferListener):
    """A transfer's log lines and progress, queued for one Pull call."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | str] = asyncio.Queue()

    def log_message(self, transfer: Transfer, priority: int, line: str) -> None:
        self.queue.put_nowait({"log": {"message": line, "priority": LOG_DAEMON | priority}})

    def progress_changed(self, transfer: Transfer, notify_property: bool) -> None:
        self.queue.put_nowait({"progress": transfer.progress})

    def removed(self, result: str) -> None:
        self.queue.put_nowait(result)


class ImportInterface:
    def __init__(self, manager: ImportManager) -> None:
        self.manager = manager
        self._streams: dict[int, _Stream] = {}
        manager.transfers.on_removed.append(self._removed)

    def handlers(self) -> dict[str, Handler]:
        return {"ListTransfers": self.list_transfers, "Pull": self.pull}

    def _removed(self, transfer: Transfer, result: str) -> None:
        stream = self._streams.pop(transfer.id, None)
        if stream is not None:
            stream.removed(result)

    async def list_transfers(self, call: Call) -> AsyncIterator[Result]:
        if not call.more:
            raise expected_more()
        transfers = self.manager.list_transfers(call["class"] or "")
        if not transfers:
            raise Error(f"{INTERFACE}.NoTransfers")
        for t in transfers:
            yield {"id": t.id, "type": _type_name(t.type), "remote": t.remote, "local": t.local,
                   "class": t.image_class, "percent": t.progress}  # -DBL_MAX until known, as systemd

    async def pull(self, call: Call) -> AsyncIterator[Result | Partial]:
        remote, local = call["remote"], call["local"] or ""
        if not pull.url_is_valid(remote):
            raise invalid_parameter("remote")
        if local:
            try:
                domain.check_local_name(local, legacy=False)
            except PoolError:
                raise invalid_parameter("local") from None
        image_root = call["imageRoot"]
        if image_root is not None and not domain.image_root_is_valid(image_root):
            raise invalid_parameter("imageRoot")
        verify = call["verify"] or "signature"
        # systemd's details, which end where "local" is missing (STRV_MAKE stops at its NULL).
        await authz.authorize(call.caller, PULL, authz.detail_pairs("remote", remote, "local", local or None,
                                                                    "class", call["class"], "type", call["type"],
                                                                    "verify", verify))
        mode = domain.check_pull(remote, local, verify, legacy=False)
        type = TransferType.PULL_TAR if call["type"] == "tar" else TransferType.PULL_RAW
        transfer = await self.manager.start_pull(
            type, remote, local, call["class"], mode, force=bool(call["force"]), read_only=bool(call["readOnly"]),
            keep_download=bool(call["keepDownload"]), image_root=image_root)
        if not call.more:
            yield {"id": transfer.id}
            return
        stream = _Stream()
        transfer.listeners.append(stream)
        self._streams[transfer.id] = stream
        finished = False
        try:
            yield Partial({"id": transfer.id})
            while True:
                item = await stream.queue.get()
                if isinstance(item, str):
                    finished = True
                    if item == "done":
                        yield {}
                        return
                    if item == "canceled":
                        raise Error(f"{INTERFACE}.TransferCancelled")
                    raise Error(f"{INTERFACE}.TransferFailed")
                yield Partial(item)
        finally:
            if not finished and transfer.id in self.manager.transfers.transfers:
                log.info("Varlink client of transfer %d went away, canceling it.", transfer.id)
                self.manager.cancel(transfer)
            self._streams.pop(transfer.id, None)
            if stream in transfer.listeners:
                transfer.listeners.remove(stream)


async def serve(manager: ImportManager) -> Service:
    """io.systemd.Import (and io.systemd.service) on its socket, or on the
    one systemd passed (socket activation)."""
    service = Service("importd-py (systemd-importd in Python)")
    service.add(_idl(), ImportInterface(manager).handlers())
    service.add_service_interface(daemon.get_log_level, daemon.set_log_level)
    try:
        await service.listen(SOCKET, daemon.listen_fds().get("varlink"))
    except OSError as e:
        log.warning("Not serving Varlink on %s: %s", SOCKET, e)
    return service

