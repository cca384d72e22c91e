"""The transfer engine: a Manager owns the transfers; each runs one job (the
blocking work) in a worker thread, and reports log lines and progress back to
the event loop, where the D-Bus layer turns them into signals.

Ordering matters to clients: TransferNew goes out before the method reply,
the job starts only after the reply, and every LogMessage precedes the
TransferRemoved that ends the transfer.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import errno
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from imagepool.errors import Errno, InvalidArgs, NoSuchTransfer, PoolError, TransferInProgress
from importd.context import Canceled, JobContext, ReportedFailure

log = logging.getLogger(__name__)

TRANSFERS_MAX = 64
PROGRESS_UNKNOWN = -sys.float_info.max
PROPERTY_INTERVAL = 1.0  # seconds between PropertiesChanged for Progress


class TransferType(enum.StrEnum):
    IMPORT_TAR = "import-tar"
    IMPORT_RAW = "import-raw"
    IMPORT_FS = "import-fs"
    EXPORT_TAR = "export-tar"
    EXPORT_RAW = "export-raw"
    PULL_TAR = "pull-tar"
    PULL_RAW = "pull-raw"
    PULL_OCI = "pull-oci"

    @property
    def writes_image(self) -> bool:
        return not self.value.startswith("export-")


Job = Callable[[JobContext], None]


class TransferListener:
    """What a front end implements to hear about a transfer."""

    def log_message(self, transfer: Transfer, priority: int, line: str) -> None: ...
    def progress_changed(self, transfer: Transfer, notify_property: bool) -> None: ...


@dataclass(eq=False)
class Transfer:
    id: int
    type: TransferType
    local: str
    remote: str = ""
    verify: str = ""
    image_class: str = "machine"
    progress: float = PROGRESS_UNKNOWN
    ctx: JobContext = field(default_factory=JobContext)
    listeners: list[TransferListener] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancel_requests: int = 0
    _percent: int = -1
    _property_sent: float = 0.0

    @property
    def percent(self) -> int:
        return self._percent

    def _log(self, line: str, priority: int = 6) -> None:
        log.info("(transfer%d) %s", self.id, line)
        for listener in self.listeners:
            listener.log_message(self, priority, line)

    def _progress(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        percent = int(fraction * 100)
        self.progress = fraction
        if percent == self._percent:
            return
        self._percent = percent
        now = time.monotonic()
        notify = now - self._property_sent >= PROPERTY_INTERVAL or percent == 100
        if notify:
            self._property_sent = now
        for listener in self.listeners:
            listener.progress_changed(self, notify)


class TransferManager:
    def __init__(self) -> None:
        self.transfers: dict[int, Transfer] = {}
        self._next_id = 1
        # What front ends subscribe to: a transfer's start, and its end (with
        # its result: "done", "failed" or "canceled").
        self.on_new: list[Callable[[Transfer], None]] = []
        self.on_removed: list[Callable[[Transfer, str], None]] = []

    def check_conflict(self, type: TransferType, local: str, remote: str) -> None:
        if len(self.transfers) >= TRANSFERS_MAX:
            raise Errno(errno.E2BIG)
        for t in self.transfers.values():
            if remote and t.type == type and t.remote == remote:
                raise TransferInProgress(f"Transfer for {remote} already in progress.", remote)
            if local and type.writes_image and t.type.writes_image and t.local == local:
                raise TransferInProgress(f"Transfer for {local} already in progress.", remote)

    def create(self, type: TransferType, local: str, job: Job, *, remote: str = "", verify: str = "",
               image_class: str = "machine") -> Transfer:
        """Register a transfer and schedule its job to start after the
        current method call has been answered."""
        self.check_conflict(type, local, remote)
        loop = asyncio.get_running_loop()
        transfer = Transfer(self._next_id, type, local, remote, verify, image_class)
        self._next_id += 1

        def log_threadsafe(line: str) -> None:
            priority, text = _split_priority(line)
            loop.call_soon_threadsafe(transfer._log, text, priority)

        last_percent = [-1]

        def progress_threadsafe(fraction: float) -> None:
            # Wake the event loop only when the percentage changes.
            percent = int(min(max(fraction, 0.0), 1.0) * 100)
            if percent != last_percent[0]:
                last_percent[0] = percent
                loop.call_soon_threadsafe(transfer._progress, fraction)

        transfer.ctx.log = log_threadsafe
        transfer.ctx.progress = progress_threadsafe
        self.transfers[transfer.id] = transfer
        for cb in self.on_new:
            cb(transfer)
        # In a context of its own: the caller's holds its D-Bus message (and
        # with it the file descriptors the message brought, an export's
        # output among them) for as long as the task would live.
        loop.call_soon(self._start, transfer, job, context=contextvars.Context())
        return transfer

    def _start(self, transfer: Transfer, job: Job) -> None:
        transfer.task = asyncio.get_running_loop().create_task(self._run(transfer, job))

    async def _run(self, transfer: Transfer, job: Job) -> None:
        result = "failed"
        try:
            await asyncio.to_thread(job, transfer.ctx)
            result = "done"
        except Canceled:
            transfer._log("Transfer canceled.", 4)
            result = "canceled"
        except ReportedFailure:
            pass
        except PoolError as e:
            transfer._log(str(e), 3)
        except OSError as e:
            transfer._log(f"Transfer failed: {e.strerror or e}", 3)
        except Exception:
            log.exception("(transfer%d) unexpected failure", transfer.id)
            transfer._log("Transfer failed: internal error", 3)
        if result == "failed" and transfer.ctx.cancel.is_set():
            result = "canceled"
        # Let log lines queued by the worker thread go out first.
        await asyncio.sleep(0)
        self.transfers.pop(transfer.id, None)
        log.info("Transfer %d finished: %s", transfer.id, result)
        for cb in self.on_removed:
            cb(transfer, result)

    def get(self, transfer_id: int) -> Transfer:
        if transfer_id == 0:
            raise InvalidArgs("Invalid transfer id")
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise NoSuchTransfer(f"No transfer by id {transfer_id}")
        return transfer

    def cancel(self, transfer: Transfer) -> None:
        transfer.cancel_requests += 1
        transfer.ctx.request_cancel()

    async def shutdown(self) -> None:
        """Cancel everything and wait: nothing half-written stays behind."""
        for transfer in list(self.transfers.values()):
            self.cancel(transfer)
        tasks = [t.task for t in self.transfers.values() if t.task]
        if tasks:
            await asyncio.wait(tasks, timeout=30)


def _split_priority(line: str) -> tuple[int, str]:
    if len(line) > 3 and line[0] == "<" and line[2] == ">" and line[1].isdigit():
        return int(line[1]), line[3:]
    return 6, line
