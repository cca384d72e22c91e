"""What we know about a running transfer, and how it is shown.

A transfer's state comes from three places, and the display says which
numbers are known and which are not:

* the fraction done: the Transfer's ``ProgressUpdate`` signal (and its
  ``Progress`` property, polled for daemons that have no such signal);
* for pulls, the worker's log lines about the main download:
  "Downloading 16M for URL." (the size, to at most one digit below the point,
  hence shown with "~"), "Got 45% of URL. 8s left at 1.1M/s." (bytes done, the
  daemon's rate and time left) and "Download of URL complete.";
* for imports from a regular file, that file's size (exact), times the
  fraction done; for exports into a regular file, the bytes written so far
  (exact, from fstat); the rate of either is measured here over the last
  seconds.

Whatever is not known is shown as "unknown"."""

from __future__ import annotations

import os
import re
import stat
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.style import Style

from machinedpy_cli.fmt import format_bytes, format_duration, parse_logged_bytes, parse_logged_timespan

_DOWNLOADING = re.compile(r"^Downloading (\S+) for (\S+)\.$")
_GOT = re.compile(r"^Got (\d+)% of (\S+)\. (.+) left at (\S+)/s\.$")
_COMPLETE = re.compile(r"^Download of (\S+) complete\.$")
_PERCENT_LINE = re.compile(r"^(Imported|Exported|Copied) \d+%\.$")

RATE_WINDOW = 5.0     # seconds of samples behind a locally measured rate


@dataclass
class TransferState:
    id: int
    path: str
    type: str = ""
    local: str = ""
    remote: str = ""
    image_class: str = "machine"
    ours: bool = False                  # started by this command (Ctrl-C cancels it)
    progress: float | None = None       # 0..1, None while unknown
    total: int | None = None            # bytes of the main payload
    total_exact: bool = False
    done: int | None = None             # bytes of it done so far
    done_exact: bool = False
    rate: float | None = None           # bytes/s
    eta: float | None = None            # seconds left, as of eta_time
    eta_time: float = 0.0
    result: str | None = None           # "done", "failed", "canceled"
    cancel_requested: bool = False
    input_size: int | None = None       # imports: the size of the regular file read
    output_fd: int | None = None        # exports: the regular file written
    last_error: str | None = None
    rendered_width: int = 0             # of its line, when last drawn
    started: float = field(default_factory=time.monotonic)
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _progress_samples: deque[tuple[float, float]] = field(default_factory=deque)
    _daemon_rate: bool = False

    @property
    def label(self) -> str:
        what = self.local or self.remote or "-"
        return f"{self.id} {self.type} {what}".strip()

    # --- events ------------------------------------------------------------------------------------------------------

    def on_progress(self, value: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if value < 0:
            return                      # -DBL_MAX: not known (yet)
        self.progress = min(value, 1.0)
        self._progress_samples.append((now, self.progress))
        if self.input_size is not None:
            self.done = int(self.progress * self.input_size)
            self._sample(now)

    def on_log(self, priority: int, line: str, now: float | None = None) -> bool:
        """Take what LINE tells; True if the live display shows it already
        (the percentage lines), so that it need not be printed."""
        now = time.monotonic() if now is None else now
        if priority <= 3:
            self.last_error = line
        if self.remote:
            m = _DOWNLOADING.match(line)
            if m and m.group(2) == self.remote:
                size = parse_logged_bytes(m.group(1))
                if size is not None:
                    self.total = size
                    self.total_exact = m.group(1).endswith("B")
                    self.done, self.done_exact = 0, True
                return False
            m = _GOT.match(line)
            if m and m.group(2) == self.remote:
                percent = int(m.group(1))
                if self.total is not None:
                    self.done, self.done_exact = self.total * percent // 100, self.total_exact
                rate = parse_logged_bytes(m.group(4))
                if rate is not None:
                    self.rate, self._daemon_rate = float(rate), True
                eta = parse_logged_timespan(m.group(3))
                if eta is not None:
                    self.eta, self.eta_time = eta, now
                return True
            m = _COMPLETE.match(line)
            if m and m.group(1) == self.remote:
                if self.total is not None:
                    self.done, self.done_exact = self.total, self.total_exact
                self.eta, self.eta_time = 0.0, now
                return False
        return bool(_PERCENT_LINE.match(line))

    def tick(self, now: float | None = None) -> None:
        """Update what is measured here: bytes written by an export, and
        locally measured rates and times left."""
        now = time.monotonic() if now is None else now
        if self.output_fd is not None and self.result is None:
            try:
                st = os.fstat(self.output_fd)
                if stat.S_ISREG(st.st_mode):
                    self.done, self.done_exact = st.st_size, True
                    self._sample(now)
            except OSError:
                pass
        if not self._daemon_rate and self._samples:
            self._sample(now)
            t0, d0 = self._samples[0]
            if now - t0 >= 0.5 and self.done is not None:
                self.rate = (self.done - d0) / (now - t0)
        if self.eta is None or not self._daemon_rate:
            self._estimate_eta(now)

    def _sample(self, now: float) -> None:
        if self.done is None:
            return
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()

    def _estimate_eta(self, now: float) -> None:
        if self.total is not None and self.done is not None and self.rate:
            self.eta, self.eta_time = max(0.0, (self.total - self.done) / self.rate), now
            return
        while len(self._progress_samples) > 2 and now - self._progress_samples[1][0] >= RATE_WINDOW:
            self._progress_samples.popleft()
        if self.progress is not None and len(self._progress_samples) >= 2:
            t0, p0 = self._progress_samples[0]
            if now - t0 >= 1.0 and self.progress > p0:
                speed = (self.progress - p0) / (now - t0)
                self.eta, self.eta_time = (1.0 - self.progress) / speed, now
                return
        if not self._daemon_rate:
            self.eta = None

    # --- text --------------------------------------------------------------------------------------------------------

    def percent_text(self) -> str:
        return "unknown" if self.progress is None else f"{int(self.progress * 100)}%"

    def bytes_text(self) -> str:
        if self.output_fd is not None:
            done = format_bytes(self.done) if self.done is not None else None
            return f"{done} written" if done else "size unknown"
        if self.total is None:
            return "size unknown" if self.done is None else f"{format_bytes(self.done)} of unknown"
        tilde = "" if self.total_exact else "~"
        if self.done is None:
            return f"unknown of {tilde}{format_bytes(self.total)}"
        approx = "" if self.done_exact else "~"
        return f"{approx}{format_bytes(self.done)} of {tilde}{format_bytes(self.total)}"

    def rate_text(self) -> str:
        if self.rate is None:
            return "rate unknown"
        return f"{format_bytes(max(0, int(self.rate)))}/s"

    def eta_text(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self.result is not None:
            return self.result
        if self.cancel_requested:
            return "canceling"
        if self.eta is None:
            return "ETA unknown"
        return f"ETA {format_duration(max(0.0, self.eta - (now - self.eta_time)))}"

    def stats_text(self) -> str:
        return "  ".join((self.bytes_text(), self.rate_text(), self.eta_text()))


class TransferLine:
    """One transfer on one line, laid out for the width it is given: the
    label, the bar, the percentage and the numbers; what does not fit is cut
    with an ellipsis (the numbers first, then the bar, then the label), so a
    line never wraps, whatever the terminal's width."""

    def __init__(self, state: TransferState) -> None:
        self.state = state

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        s = self.state
        label, percent, stats = s.label, s.percent_text().rjust(4), s.stats_text()
        style = {"done": "green", "failed": "red", "canceled": "yellow"}.get(s.result or "", "")
        if width < len(percent) + 4:
            s.rendered_width = min(width, len(label) + 1 + len(percent))
            yield from _text(_cut(f"{label} {percent}", width))
            return
        label_w = min(len(label), max(8, width // 4), 32)
        rest = width - label_w - 1 - len(percent) - 1       # for the bar, a space, and the numbers
        if rest >= len(stats) + 1 + 10:                     # everything fits: the bar gets what is left
            stats_w = len(stats)
            bar_w = min(40, rest - stats_w - 1)
        elif rest >= 8 + 1 + 10:                            # a short bar, the numbers cut
            bar_w = 10
            stats_w = rest - bar_w - 1
        else:                                               # no numbers
            stats_w = 0
            bar_w = min(40, rest) if rest >= 6 else 0
        used = label_w + 1 + len(percent)
        used += bar_w + 1 if bar_w else 0
        used += 1 + min(len(stats), stats_w) if stats_w > 0 else 0
        s.rendered_width = min(used, width)
        yield from _text(_cut(label, label_w).ljust(label_w) + " ")
        if bar_w:
            bar = ProgressBar(total=None if s.progress is None else 1.0,
                              completed=s.progress or 0.0, width=bar_w,
                              pulse=s.progress is None and s.result is None)
            for line in console.render_lines(bar, options.update_width(bar_w), pad=False):
                yield from line
            yield Segment(" ")
        yield from _text(percent, Style.parse(style) if style else None)
        if stats_w > 0:
            yield from _text(" " + _cut(stats, stats_w), Style.parse(style) if style else None)
        yield Segment.line()


def _cut(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _text(text: str, style: Style | None = None) -> Iterable[Segment]:
    yield Segment(text, style)
