"""Following transfers over the bus: importd's signals sorted by transfer
(LogMessage and ProgressUpdate of every Transfer object, TransferNew,
TransferRemoved, importd leaving the bus), the Progress property polled for
importds without ProgressUpdate, and the loop that redraws the display and
handles Ctrl-C until every followed transfer has ended."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

from machinedpy_cli.bus import IMPORT1, IMPORT1_MANAGER, IMPORT1_PATH, IMPORT1_TRANSFER, BusError
from machinedpy_cli.context import PROGRAM, Context
from machinedpy_cli.display import Display
from machinedpy_cli.progress import TransferState

REFRESH = 0.25          # seconds between redraws of the bars
POLL = 1.0              # seconds between reads of the Progress property
VANISHED_AFTER = 3      # polls that find no object before a transfer counts as gone


class Monitor:
    """importd's transfer signals, sorted by transfer.  Events for an object
    path nobody tracks yet are kept until it is (the method reply that names
    a new transfer may be read after its first signals)."""

    def __init__(self, ctx: Context, display: Display) -> None:
        self.ctx = ctx
        self.display = display
        self.states: dict[str, TransferState] = {}
        self.pending: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
        self.follow_new = False
        self.changed = asyncio.Event()
        self.gone = False
        self._missing: dict[str, int] = {}
        self._adding: set[str] = set()

    async def subscribe(self) -> None:
        bus = self.ctx.bus
        await bus.match(IMPORT1, None, IMPORT1_TRANSFER, "LogMessage", self._signal("log"))
        await bus.match(IMPORT1, None, IMPORT1_TRANSFER, "ProgressUpdate", self._signal("progress"))
        await bus.match(IMPORT1, IMPORT1_PATH, IMPORT1_MANAGER, "TransferRemoved", self._on_removed)
        await bus.match(IMPORT1, IMPORT1_PATH, IMPORT1_MANAGER, "TransferNew", self._on_new)
        await bus.match("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                        self._on_owner)

    def _signal(self, kind: str) -> Callable[[Any], None]:
        def handler(message: Any) -> None:
            contents = message.parse_to_tuple()
            self._dispatch(str(message.path), kind, contents)

        return handler

    def _dispatch(self, path: str, kind: str, contents: tuple[Any, ...]) -> None:
        state = self.states.get(path)
        if state is None:
            queue = self.pending.setdefault(path, [])
            if len(queue) < 10000 and len(self.pending) < 256:
                queue.append((kind, contents))
            return
        self._apply(state, kind, contents)

    def _apply(self, state: TransferState, kind: str, contents: tuple[Any, ...]) -> None:
        if state.result is not None:
            return
        if kind == "log":
            priority, line = int(contents[0]), str(contents[1])
            shown = state.on_log(priority, line)
            self.display.log(state, priority, line, shown)
        elif kind == "progress":
            state.on_progress(float(contents[0]))
        elif kind == "removed":
            self.finish(state, str(contents[0]))
        self.changed.set()

    def _on_removed(self, message: Any) -> None:
        _id, path, result = message.parse_to_tuple()
        self._dispatch(str(path), "removed", (result,))

    def _on_new(self, message: Any) -> None:
        transfer_id, path = message.parse_to_tuple()
        if self.follow_new and str(path) not in self.states:
            self._adding.add(str(path))
            asyncio.get_running_loop().create_task(self._add_new(int(transfer_id), str(path)))

    async def _add_new(self, transfer_id: int, path: str) -> None:
        state = TransferState(transfer_id, path)
        try:
            props = await self.ctx.bus.get_all(IMPORT1, path, IMPORT1_TRANSFER)
            state.type = str(props.get("Type", ("s", ""))[1])
            state.local = str(props.get("Local", ("s", ""))[1])
            state.remote = str(props.get("Remote", ("s", ""))[1])
            state.on_progress(float(props.get("Progress", ("d", -1.0))[1]))
        except BusError:
            pass                        # gone already: its TransferRemoved is queued
        self._adding.discard(path)
        self.track(state)

    def _on_owner(self, message: Any) -> None:
        name, _old, new = message.parse_to_tuple()
        if name == IMPORT1 and not new:
            self.gone = True
            for state in self.states.values():
                if state.result is None:
                    self.display.log(state, 3, "importd left the bus.", False)
                    self.finish(state, "failed")
            self.changed.set()

    def track(self, state: TransferState) -> None:
        self.states[state.path] = state
        self.display.add(state)
        for kind, contents in self.pending.pop(state.path, []):
            self._apply(state, kind, contents)
        self.changed.set()

    def finish(self, state: TransferState, result: str) -> None:
        if state.result is None:
            state.result = result
            if result == "done" and state.progress is not None:
                state.progress = 1.0
            state.tick()
        self.changed.set()

    def unfinished(self) -> list[TransferState]:
        return [s for s in self.states.values() if s.result is None]

    def all_done(self) -> bool:
        return not self.unfinished() and not self._adding

    async def poll(self) -> None:
        """Read Progress of each unfinished transfer (for importds without
        ProgressUpdate), and notice transfers whose object went away
        without a TransferRemoved we saw."""
        while True:
            await asyncio.sleep(POLL)
            for state in self.unfinished():
                try:
                    value = await self.ctx.bus.get(IMPORT1, state.path, IMPORT1_TRANSFER, "Progress")
                    self._missing.pop(state.path, None)
                    if state.result is None:
                        state.on_progress(float(value))
                except BusError:
                    n = self._missing[state.path] = self._missing.get(state.path, 0) + 1
                    if n >= VANISHED_AFTER and state.result is None:
                        self.display.log(state, 3, f"Transfer {state.id} vanished without a result.", False)
                        self.finish(state, "failed")
            self.changed.set()


async def follow(ctx: Context, monitor: Monitor, display: Display, watching: bool) -> int:
    """Until every tracked transfer has ended: redraw, and handle Ctrl-C."""
    loop = asyncio.get_running_loop()
    interrupts = 0
    interrupted = asyncio.Event()

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        interrupted.set()
        monitor.changed.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_interrupt)
    loop.add_signal_handler(signal.SIGWINCH, display.resized)
    poller = loop.create_task(monitor.poll())
    handled = 0
    try:
        while not monitor.all_done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(monitor.changed.wait(), REFRESH)
            monitor.changed.clear()
            now = time.monotonic()
            for state in monitor.states.values():
                state.tick(now)
            display.refresh()
            if interrupts > handled:
                handled = interrupts
                if watching:
                    display.message("Stopped watching; the transfers go on in the background.")
                    return 1
                if handled >= 2:
                    for state in monitor.unfinished():
                        display.message(f"Leaving transfer {state.id}; "
                                        f"use \"{PROGRAM} cancel-transfer {state.id}\" if it is still running.")
                    return 1
                for state in monitor.unfinished():
                    if state.ours and not state.cancel_requested:
                        state.cancel_requested = True
                        display.message(f"Canceling transfer {state.id}…")
                        try:
                            await ctx.bus.import1("CancelTransfer", "u", state.id)
                        except BusError as e:
                            display.message(f"Could not cancel transfer: {e}")
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        display.stop()
    failed = [state for state in monitor.states.values() if state.result != "done"]
    for state in failed:
        display.ended(state)
    return 1 if failed else 0

