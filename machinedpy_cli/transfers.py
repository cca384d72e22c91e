"""Transfer verbs: pull-tar, pull-raw, import-tar, import-raw, import-fs,
export-tar, export-raw, list-transfers, cancel-transfer, and watch.

A transfer verb subscribes to importd's signals first (TransferRemoved, and
LogMessage and ProgressUpdate on every Transfer object), then calls the
``*Ex`` method (falling back to the old one on UnknownMethod), and follows
its transfer until TransferRemoved says how it ended: 0 for "done", 1 for
"failed" or "canceled".  Ctrl-C (or SIGTERM) cancels it (CancelTransfer)
and waits for importd to confirm; a second one leaves at once.  With
``--detach`` the verb prints the transfer's id and returns while it runs.

``watch [ID…]`` (also ``list-transfers --follow``) follows transfers it did
not start: the given ones, or all running ones and those that start while
it watches; one bar per transfer.  Ctrl-C stops watching and leaves them
running.  Its exit status is 0 if every transfer it saw end ended "done"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

from machinedpy_cli import names
from machinedpy_cli.bus import IMPORT1, IMPORT1_MANAGER, IMPORT1_PATH, IMPORT1_TRANSFER, UNKNOWN_METHOD, BusError
from machinedpy_cli.context import Context
from machinedpy_cli.fmt import Column, Table
from machinedpy_cli.progress import TransferLine, TransferState

FLAG_FORCE = 1
FLAG_READ_ONLY = 2
FLAG_PULL_KEEP_DOWNLOAD = 4
REFRESH = 0.25          # seconds between redraws of the bars
POLL = 1.0              # seconds between reads of the Progress property
VANISHED_AFTER = 3      # polls that find no object before a transfer counts as gone
PROGRAM = "machined-py"


# --- displays ---------------------------------------------------------------------------------------------------------


class Display(Protocol):
    def start(self) -> None: ...
    def add(self, state: TransferState) -> None: ...
    def log(self, state: TransferState, priority: int, line: str, shown: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def refresh(self) -> None: ...
    def resized(self) -> None: ...
    def stop(self) -> None: ...


class PlainDisplay:
    """Off a terminal: the log lines, as machinectl prints them (with the
    transfer's id in front when several are followed)."""

    def __init__(self, quiet: bool, prefix: bool) -> None:
        self.quiet = quiet
        self.prefix = prefix

    def start(self) -> None:
        pass

    def add(self, state: TransferState) -> None:
        pass

    def log(self, state: TransferState, priority: int, line: str, shown: bool) -> None:
        if self.quiet and priority >= 6:
            return
        print(f"[{state.id}] {line}" if self.prefix else line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def refresh(self) -> None:
        pass

    def resized(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _LineColumn(ProgressColumn):
    def render(self, task: Task) -> TransferLine:
        state: TransferState = task.fields["state"]
        return TransferLine(state)


class LiveDisplay:
    """On a terminal: one bar per transfer, redrawn in place (four times a
    second, and at once on SIGWINCH), the log lines printed above them."""

    def __init__(self, console: Console, prefix: bool) -> None:
        self.console = console
        self.prefix = prefix
        self.progress = Progress(_LineColumn(), console=console, auto_refresh=False, expand=True,
                                 redirect_stdout=False, redirect_stderr=False)
        self.tasks: dict[int, Any] = {}
        self.states: list[TransferState] = []
        self.width = console.width
        self.reflows = terminal_reflows()
        self._saved_tty: list[Any] | None = None

    def start(self) -> None:
        # Keys typed meanwhile (and the "^C" the terminal would echo) must not land inside the bars:
        # no echo while they are shown; ^C still interrupts.
        self._saved_tty = None
        with contextlib.suppress(OSError, termios.error):
            if os.isatty(0):
                self._saved_tty = termios.tcgetattr(0)
                quiet = termios.tcgetattr(0)
                quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
                termios.tcsetattr(0, termios.TCSANOW, quiet)
        self.progress.start()

    def add(self, state: TransferState) -> None:
        if state.id not in self.tasks:
            self.tasks[state.id] = self.progress.add_task(state.label, total=None, state=state)
            self.states.append(state)
            self.refresh()

    def log(self, state: TransferState, priority: int, line: str, shown: bool) -> None:
        if shown:
            return
        text = Text(f"[{state.id}] {line}" if self.prefix else line)
        if priority <= 3:
            text.stylize("bold red")
        elif priority == 4:
            text.stylize("yellow")
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.progress.console.print(Text(text), markup=False, highlight=False, soft_wrap=True)

    def refresh(self) -> None:
        for task in self.tasks.values():
            self.progress.update(task, refresh=False)
        self.progress.refresh()
        self.width = self.console.width

    def resized(self) -> None:
        """SIGWINCH.  A terminal that reflows its lines (tmux, VTE, kitty…)
        has rewrapped the bars drawn at the old width when it got narrower,
        and they take more rows now than rich erases: erase from where they
        begin now, then redraw at the new width.  Other terminals (xterm,
        the console) cut the lines instead, and rich's own redraw is right."""
        width = self.console.width
        height = self.progress.live._live_render.last_render_height
        if self.reflows and width < self.width and height:
            rows = sum(max(1, -(-(s.rendered_width or self.width) // width)) for s in self.states[-height:])
            rows = max(rows, height)
            up = f"\x1b[{rows - 1}A" if rows > 1 else ""
            down = f"\x1b[{height - 1}B" if height > 1 else ""    # where rich thinks its last line is
            self.console.file.write(up + "\r\x1b[J" + down)
            self.console.file.flush()
        self.refresh()

    def stop(self) -> None:
        self.refresh()
        self.progress.stop()
        if self._saved_tty is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(0, termios.TCSANOW, self._saved_tty)
            self._saved_tty = None


def terminal_reflows() -> bool:
    """Whether the terminal rewraps its lines when it gets narrower, as far as
    its environment tells: tmux, screen, VTE (GNOME Terminal…), kitty,
    iTerm2, WezTerm, Windows Terminal, Konsole, Alacritty do; xterm and the
    Linux console do not.  $MACHINED_PY_REFLOW=1/0 says it outright."""
    forced = os.environ.get("MACHINED_PY_REFLOW")
    if forced in ("0", "1"):
        return forced == "1"
    if any(os.environ.get(v) for v in ("TMUX", "STY", "VTE_VERSION", "KITTY_WINDOW_ID", "WT_SESSION",
                                       "KONSOLE_VERSION", "ALACRITTY_WINDOW_ID", "WEZTERM_PANE")):
        return True
    term = os.environ.get("TERM", "")
    if term.startswith(("screen", "tmux", "xterm-kitty", "alacritty", "wezterm")):
        return True
    return os.environ.get("TERM_PROGRAM", "") in ("iTerm.app", "WezTerm", "vscode", "tmux")


def make_display(ctx: Context, prefix: bool) -> Display:
    console = Console(stderr=True, highlight=False)
    if console.is_terminal and not console.is_dumb_terminal and not ctx.opts.quiet:
        return LiveDisplay(console, prefix)
    return PlainDisplay(ctx.opts.quiet, prefix)


# --- following transfers ---------------------------------------------------------------------------------------------


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


async def _follow(ctx: Context, monitor: Monitor, display: Display, watching: bool) -> int:
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
    failed = False
    for state in monitor.states.values():
        if state.result == "done":
            continue
        failed = True
        display.message(f"Transfer {state.id} {state.result or 'ended'}.")
    return 1 if failed else 0


async def _start_transfer(ctx: Context, ex: tuple[str, str, tuple[Any, ...]],
                          old: tuple[str, str, tuple[Any, ...]] | None, state: TransferState) -> int:
    """Call EX (or OLD on UnknownMethod), then follow the new transfer."""
    display: Display | None = None
    monitor: Monitor | None = None
    if not ctx.opts.detach:
        display = make_display(ctx, prefix=False)
        monitor = Monitor(ctx, display)
        await monitor.subscribe()
    try:
        try:
            transfer_id, path = await ctx.bus.import1(ex[0], ex[1], *ex[2])
        except BusError as e:
            if e.name != UNKNOWN_METHOD:
                raise
            if old is None:
                return ctx.error(f"importd has no {ex[0]}, and its older method cannot do this "
                                 f"(class {state.image_class}, these flags).")
            transfer_id, path = await ctx.bus.import1(old[0], old[1], *old[2])
    except BusError as e:
        return ctx.error(f"Failed to transfer image: {e}")
    state.id, state.path, state.ours = int(transfer_id), str(path), True
    if ctx.opts.detach or monitor is None or display is None:
        to_stderr = state.output_fd == 1
        print(state.id, file=sys.stderr if to_stderr else sys.stdout, flush=True)
        ctx.info(f"Transfer {state.id} continues in the background. Use \"{PROGRAM} watch {state.id}\" to follow "
                 f"it, \"{PROGRAM} cancel-transfer {state.id}\" to cancel it.")
        return 0
    display.start()
    display.message(f"Enqueued transfer job {state.id}. Press C-c to cancel it.")
    monitor.track(state)
    return await _follow(ctx, monitor, display, watching=False)


# --- the verbs -------------------------------------------------------------------------------------------------------


def _class(ctx: Context) -> str:
    return ctx.opts.image_class or "machine"


def _keep_download(ctx: Context) -> bool:
    return ctx.opts.keep_download if ctx.opts.keep_download is not None else _class(ctx) == "machine"


async def pull(ctx: Context, args: list[str], kind: str) -> int:
    remote = args[0]
    if not names.url_is_valid(remote):
        return ctx.error(f"URL '{remote}' is not valid.")
    if len(args) >= 2:
        local: str | None = args[1]
    else:
        local = names.url_last_component(remote)
        if local is None:
            return ctx.error("Failed to get final component of URL: Invalid argument")
    if local in ("", "-"):
        local = None
    if local:
        local = names.tar_strip_suffixes(local) if kind == "tar" else names.raw_strip_suffixes(local)
        if not names.image_name_is_valid(local):
            return ctx.error(f"Local name {local} is not a suitable image name.")
    flags = (FLAG_FORCE if ctx.opts.force else 0) | (FLAG_READ_ONLY if ctx.opts.read_only else 0) | \
        (FLAG_PULL_KEEP_DOWNLOAD if _keep_download(ctx) else 0)
    method = "PullTar" if kind == "tar" else "PullRaw"
    klass = _class(ctx)
    ex = (f"{method}Ex", "sssst", (remote, local or "", klass, ctx.opts.verify, flags))
    old = None
    if klass == "machine" and not ctx.opts.read_only and _keep_download(ctx):
        old = (method, "sssb", (remote, local or "", ctx.opts.verify, ctx.opts.force))
    state = TransferState(0, "", type=f"pull-{kind}", local=local or "", remote=remote, image_class=klass)
    return await _start_transfer(ctx, ex, old, state)


def _input_size(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
    except OSError:
        return None


async def import_file(ctx: Context, args: list[str], kind: str) -> int:
    path = args[0] if args and args[0] not in ("", "-") else None
    local: str | None
    if len(args) >= 2:
        local = None if args[1] in ("", "-") else args[1]
    elif path:
        if path.endswith("/"):
            return ctx.error(f"Path '{path}' refers to directory, but we need a regular file.")
        local = names.local_name_from_path(path)
    else:
        local = None
    if not local:
        return ctx.error("Need either path or local name.")
    local = names.tar_strip_suffixes(local) if kind == "tar" else names.raw_strip_suffixes(local)
    if not names.image_name_is_valid(local):
        return ctx.error(f"Local name {local} is not a suitable image name.")
    fd = 0
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            return ctx.error(f"Failed to open {path}: {e.strerror}")
    try:
        method = "ImportTar" if kind == "tar" else "ImportRaw"
        klass = _class(ctx)
        flags = (FLAG_FORCE if ctx.opts.force else 0) | (FLAG_READ_ONLY if ctx.opts.read_only else 0)
        ex = (f"{method}Ex", "hsst", (fd, local, klass, flags))
        old = (method, "hsbb", (fd, local, ctx.opts.force, ctx.opts.read_only)) if klass == "machine" else None
        state = TransferState(0, "", type=f"import-{kind}", local=local, image_class=klass, input_size=_input_size(fd))
        if state.input_size is not None:
            state.total, state.total_exact = state.input_size, True
        return await _start_transfer(ctx, ex, old, state)
    finally:
        if fd != 0:
            os.close(fd)


async def import_fs(ctx: Context, args: list[str]) -> int:
    path = args[0] if args and args[0] not in ("", "-") else None
    local: str | None
    if len(args) >= 2:
        local = None if args[1] in ("", "-") else args[1]
    else:
        local = names.local_name_from_path(path) if path else None
    if not local:
        return ctx.error("Need either path or local name.")
    if not names.image_name_is_valid(local):
        return ctx.error(f"Local name {local} is not a suitable image name.")
    fd = 0
    if path:
        try:
            fd = os.open(path, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return ctx.error(f"Failed to open directory '{path}': {e.strerror}")
    try:
        klass = _class(ctx)
        flags = (FLAG_FORCE if ctx.opts.force else 0) | (FLAG_READ_ONLY if ctx.opts.read_only else 0)
        ex = ("ImportFileSystemEx", "hsst", (fd, local, klass, flags))
        old = ("ImportFileSystem", "hsbb", (fd, local, ctx.opts.force, ctx.opts.read_only)) \
            if klass == "machine" else None
        state = TransferState(0, "", type="import-fs", local=local, image_class=klass)
        return await _start_transfer(ctx, ex, old, state)
    finally:
        if fd != 0:
            os.close(fd)


async def export(ctx: Context, args: list[str], kind: str) -> int:
    local = args[0]
    if not names.image_name_is_valid(local):
        return ctx.error(f"Image name {local} is not valid.")
    path = args[1] if len(args) >= 2 and args[1] not in ("", "-") else None
    fmt = ctx.opts.format or (names.format_from_suffix(path, kind == "tar") if path else None) or ""
    fd = 1
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY, 0o666)
        except OSError as e:
            return ctx.error(f"Failed to open {path}: {e.strerror}")
    try:
        method = "ExportTar" if kind == "tar" else "ExportRaw"
        klass = _class(ctx)
        ex = (f"{method}Ex", "sshst", (local, klass, fd, fmt, 0))
        old = (method, "shs", (local, fd, fmt)) if klass == "machine" else None
        state = TransferState(0, "", type=f"export-{kind}", local=local, image_class=klass, output_fd=fd)
        if fd == 1 and not _is_regular(fd):
            state.output_fd = None
        return await _start_transfer(ctx, ex, old, state)
    finally:
        if fd != 1:
            os.close(fd)


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


async def _list(ctx: Context) -> list[tuple[int, str, str, str, str, float, str]]:
    """(id, type, remote, local, class, progress, path) of every transfer of
    the class asked for (all without --class)."""
    klass = ctx.opts.image_class or ""
    try:
        (rows,) = await ctx.bus.import1("ListTransfersEx", "st", klass, 0)
        return [tuple(r) for r in rows]
    except BusError as e:
        if e.name != UNKNOWN_METHOD:
            raise
    (rows,) = await ctx.bus.import1("ListTransfers")
    return [(i, t, r, loc, "machine", p, path) for i, t, r, loc, p, path in rows if klass in ("", "machine")]


async def list_transfers(ctx: Context, args: list[str]) -> int:
    if ctx.opts.follow:
        return await watch(ctx, [])
    try:
        rows = await _list(ctx)
    except BusError as e:
        return ctx.error(f"Could not get transfers: {e}")
    # importctl's order: by local name, then id.
    table = Table([Column("id", right=True), Column("progress", right=True), Column("type"), Column("class"),
                   Column("local"), Column("remote")], ersatz="-",
                  sort_key=lambda row, shown: ((shown[4] or "").encode(), row[0]))
    for transfer_id, kind, remote, local, klass, progress, _path in rows:
        percent = None if progress < 0 else int(progress * 100)
        table.add([transfer_id, percent, kind, klass, local or None, remote or None],
                  [str(transfer_id), None if percent is None else f"{percent}%", kind, klass, local, remote])
    return ctx.show_table(table, "transfers")


async def cancel_transfer(ctx: Context, args: list[str]) -> int:
    for text in args:
        try:
            transfer_id = int(text)
            if not 0 <= transfer_id < 2**32:
                raise ValueError(text)
        except ValueError:
            return ctx.error(f"Failed to parse transfer id: {text}")
        try:
            await ctx.bus.import1("CancelTransfer", "u", transfer_id)
        except BusError as e:
            return ctx.error(f"Could not cancel transfer: {e}")
    return 0


async def watch(ctx: Context, args: list[str]) -> int:
    wanted: set[int] = set()
    for text in args:
        try:
            wanted.add(int(text))
        except ValueError:
            return ctx.error(f"Failed to parse transfer id: {text}")
    display = make_display(ctx, prefix=True)
    monitor = Monitor(ctx, display)
    await monitor.subscribe()
    try:
        rows = await _list(ctx)
    except BusError as e:
        return ctx.error(f"Could not get transfers: {e}")
    found = {r[0] for r in rows}
    for transfer_id in sorted(wanted - found):
        return ctx.error(f"No transfer by id {transfer_id}")
    rows = [r for r in rows if not wanted or r[0] in wanted]
    if not rows:
        ctx.info("No transfers.")
        return 0
    monitor.follow_new = not wanted
    display.start()
    for transfer_id, kind, remote, local, klass, progress, path in sorted(rows):
        state = TransferState(int(transfer_id), str(path), type=kind, local=local, remote=remote, image_class=klass)
        state.on_progress(float(progress))
        monitor.track(state)
    return await _follow(ctx, monitor, display, watching=True)
