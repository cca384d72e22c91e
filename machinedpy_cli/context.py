"""What every verb gets: the parsed options, the bus, and the output
(through a pager on a terminal, as machinectl does, unless --no-pager)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from machinedpy_cli import fmt
from machinedpy_cli.bus import Bus

PROGRAM = "machined-py"


@dataclass
class Options:
    properties: list[str] = field(default_factory=list)
    all: bool = False
    value: bool = False
    full: bool = False
    pager: bool = True
    legend: bool = True
    ask_password: bool = True
    quiet: bool = False
    kill_whom: str | None = None
    signal: int = signal.SIGTERM
    uid: str | None = None
    setenv: list[str] = field(default_factory=list)
    read_only: bool = False
    force: bool = False
    verify: str = "signature"
    format: str | None = None
    image_class: str | None = None   # None: machine (list-images: machinectl's; list-transfers: all classes)
    keep_download: bool | None = None
    json: str | None = None          # "pretty", "short" (and from -o: "sse", "seq")
    detach: bool = False
    follow: bool = False
    max_addresses: int = 1


class Context:
    def __init__(self, opts: Options, bus: Bus) -> None:
        self.opts = opts
        self.bus = bus
        self._out: list[str] = []

    # --- messages (stderr, like systemd's log_info/log_error on the console) ---

    def info(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=sys.stderr, flush=True)

    def error(self, text: str) -> int:
        print(text, file=sys.stderr, flush=True)
        return 1

    # --- output (stdout, paged at the end) ---

    def emit(self, text: str) -> None:
        self._out.append(text)

    def emit_json(self, value: Any) -> None:
        assert self.opts.json is not None
        self.emit(fmt.dump_json(value, self.opts.json))

    def show_table(self, table: fmt.Table, word: str, empty_json: bool = True) -> int:
        """show_table() of machinectl: the table (or JSON) and the legend.
        importctl's listings print no JSON for no rows (EMPTY_JSON false)."""
        if self.opts.json:
            if table.rows or empty_json:
                self.emit_json(table.to_json())
            return 0
        if table.rows:
            self.emit(table.render(header=self.opts.legend))
        if self.opts.legend:
            self.emit(f"\n{len(table.rows)} {word} listed.\n" if table.rows else f"No {word}.\n")
        return 0

    def flush(self) -> None:
        text = "".join(self._out)
        self._out.clear()
        if not text:
            return
        pager = self._pager()
        if pager is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        env = dict(os.environ)
        env.setdefault("LESS", "FRSXMK")
        try:
            proc = subprocess.Popen(pager, shell=True, stdin=subprocess.PIPE, env=env)
        except OSError:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        assert proc.stdin is not None
        try:
            proc.stdin.write(text.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.wait()

    def _pager(self) -> str | None:
        """The pager command, if the output should go through one: only on a
        terminal, never with --no-pager; $SYSTEMD_PAGER, $PAGER, less, more;
        "" or "cat" mean none."""
        if not self.opts.pager or not sys.stdout.isatty():
            return None
        for var in ("SYSTEMD_PAGER", "PAGER"):
            value = os.environ.get(var)
            if value is not None:
                return None if value.strip() in ("", "cat") else value
        for candidate in ("less", "more"):
            if shutil.which(candidate):
                return candidate
        return None
