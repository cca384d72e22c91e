"""How transfers are shown while they run: on a terminal one live bar per
transfer (rich), with the log lines above; off a terminal the log lines
as importctl prints them."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

from machinedpy_cli.context import Context
from machinedpy_cli.progress import TransferLine, TransferState


class Display(Protocol):
    def start(self) -> None: ...
    def add(self, state: TransferState) -> None: ...
    def log(self, state: TransferState, priority: int, line: str, shown: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def ended(self, state: TransferState) -> None: ...
    def refresh(self) -> None: ...
    def resized(self) -> None: ...
    def stop(self) -> None: ...


class PlainDisplay:
    """Off a terminal: the log lines, as importctl prints them (with the
    transfer's id in front, and how each ended, when several are followed)."""

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

    def ended(self, state: TransferState) -> None:
        if self.prefix:
            self.message(ended_text(state))

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

    def ended(self, state: TransferState) -> None:
        self.message(ended_text(state))

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


def ended_text(state: TransferState) -> str:
    """How a transfer that did not end "done" is told at the end."""
    return f"Transfer {state.id} {state.result or 'ended'}."


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

