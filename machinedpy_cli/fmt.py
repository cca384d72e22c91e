"""systemd's output formats, as machinectl and importctl print them: bytes,
timestamps and time spans, tables (format-table), JSON, and property lists
(``show``)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagepool.fmt import format_bytes as systemd_format_bytes

UINT64_MAX = 2**64 - 1

USEC_PER_MSEC = 1000
USEC_PER_SEC = 1000_000
USEC_PER_MINUTE = 60 * USEC_PER_SEC
USEC_PER_HOUR = 60 * USEC_PER_MINUTE
USEC_PER_DAY = 24 * USEC_PER_HOUR
USEC_PER_WEEK = 7 * USEC_PER_DAY
USEC_PER_MONTH = 2629800 * USEC_PER_SEC
USEC_PER_YEAR = 31557600 * USEC_PER_SEC


def format_bytes(n: int | None) -> str | None:
    """FORMAT_BYTES as systemd 262 prints it (imagepool.fmt: "10M", "8.5M",
    "512B"); None for unknown (UINT64_MAX, as systemd's format_bytes()
    returns NULL)."""
    if n is None or n == UINT64_MAX or n < 0:
        return None
    return systemd_format_bytes(n)


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]?)(i?B)?\s*$")


def parse_size(text: str, base: int = 1024) -> int:
    """parse_size(): "1G", "1.5M", "4096", "10K" (1024-based).  ValueError
    if it is not a size."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(text)
    number, suffix = m.group(1), m.group(2)
    factor = base ** ("KMGTPE".index(suffix) + 1) if suffix else 1
    whole, _, frac = number.partition(".")
    value = int(whole) * factor
    if frac:
        value += int(frac) * factor // 10 ** len(frac)
    if value > UINT64_MAX:
        raise ValueError(text)
    return value


def parse_logged_bytes(text: str) -> int | None:
    """A size as the import workers log it ("16M", "8.5M", "512B"): the
    value, or None.  Approximate, since the text has at most one digit
    below the point."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMGTPE]|B)", text)
    if not m:
        return None
    factor = 1 if m.group(2) == "B" else 1024 ** ("KMGTPE".index(m.group(2)) + 1)
    return int(float(m.group(1)) * factor)


def parse_logged_timespan(text: str) -> float | None:
    """A time span as the workers log it ("5s", "1min 3s", "2h 1min"): seconds."""
    units = {"y": 31557600, "month": 2629800, "w": 604800, "d": 86400, "h": 3600, "min": 60, "s": 1,
             "ms": 0.001, "us": 0.000001}
    total = 0.0
    parts = text.split()
    if not parts:
        return None
    for part in parts:
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]+)", part)
        if not m or m.group(2) not in units:
            return None
        total += float(m.group(1)) * units[m.group(2)]
    return total


def timestamp_is_set(usec: int) -> bool:
    return 0 < usec < UINT64_MAX


def format_timestamp(usec: int) -> str | None:
    """FORMAT_TIMESTAMP: "Wed 2026-12-02 18:17:26 UTC" in local time."""
    if not timestamp_is_set(usec):
        return None
    tm = time.localtime(usec // USEC_PER_SEC)
    return time.strftime("%a %Y-%m-%d %H:%M:%S ", tm) + (tm.tm_zone or "")


def format_timestamp_relative(usec: int, now_usec: int | None = None) -> str | None:
    """FORMAT_TIMESTAMP_RELATIVE: "5min 3s ago", "2h left", "now"."""
    if not timestamp_is_set(usec):
        return None
    n = time.time_ns() // 1000 if now_usec is None else now_usec
    if n > usec:
        d, s = n - usec, "ago"
    else:
        d, s = usec - n, "left"
    if d >= USEC_PER_YEAR:
        return f"{d // USEC_PER_YEAR} years {(d % USEC_PER_YEAR) // USEC_PER_MONTH} months {s}"
    if d >= USEC_PER_MONTH:
        return f"{d // USEC_PER_MONTH} months {(d % USEC_PER_MONTH) // USEC_PER_DAY} days {s}"
    if d >= USEC_PER_WEEK:
        return f"{d // USEC_PER_WEEK} weeks {(d % USEC_PER_WEEK) // USEC_PER_DAY} days {s}"
    if d >= 2 * USEC_PER_DAY:
        return f"{d // USEC_PER_DAY} days {s}"
    if d >= 25 * USEC_PER_HOUR:
        return f"1 day {(d - USEC_PER_DAY) // USEC_PER_HOUR}h {s}"
    if d >= 6 * USEC_PER_HOUR:
        return f"{d // USEC_PER_HOUR}h {s}"
    if d >= USEC_PER_HOUR:
        return f"{d // USEC_PER_HOUR}h {(d % USEC_PER_HOUR) // USEC_PER_MINUTE}min {s}"
    if d >= 5 * USEC_PER_MINUTE:
        return f"{d // USEC_PER_MINUTE}min {s}"
    if d >= USEC_PER_MINUTE:
        return f"{d // USEC_PER_MINUTE}min {(d % USEC_PER_MINUTE) // USEC_PER_SEC}s {s}"
    if d >= USEC_PER_SEC:
        return f"{d // USEC_PER_SEC}s {s}"
    if d >= USEC_PER_MSEC:
        return f"{d // USEC_PER_MSEC}ms {s}"
    if d > 0:
        return f"{d}us {s}"
    return "now"


def format_duration(seconds: float) -> str:
    """A short time span for progress displays: "5s", "1min 3s", "2h 1min"."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h {(s % 3600) // 60}min"
    if s >= 60:
        return f"{s // 60}min {s % 60}s"
    return f"{s}s"


# --- tables (format-table.c) ---------------------------------------------------------------------------------------


@dataclass
class Column:
    """A column: its cells inherit the alignment of the cell above them, as
    format-table's do, so a header and its cells may differ (importctl's ID
    and PROGRESS: a header on the left, numbers on the right)."""

    header: str                 # lower case; printed upper case, used as the JSON field name
    right: bool = False         # cells aligned right
    json_name: str | None = None
    header_right: bool | None = None    # None: as the cells


@dataclass
class Table:
    """A table as systemd's format-table prints it: one space between
    columns, each as wide as its widest cell, the last one unpadded;
    ersatz text for empty cells; sorted by the given columns (strcmp order);
    multi-line cells cut to ``cell_height_max`` lines with an ellipsis."""

    columns: list[Column]
    rows: list[list[Any]] = field(default_factory=list)   # JSON values
    display: list[list[str | None]] = field(default_factory=list)
    ersatz: str = ""
    sort_by: Sequence[int] = ()
    sort_key: Callable[[list[Any], list[str | None]], Any] | None = None
    cell_height_max: int | None = None

    def add(self, values: Sequence[Any], shown: Sequence[str | None]) -> None:
        self.rows.append(list(values))
        self.display.append(list(shown))

    def _order(self) -> list[int]:
        def key(i: int) -> tuple[bytes, ...]:
            return tuple((self.display[i][c] or "").encode() for c in self.sort_by)

        idx = list(range(len(self.rows)))
        if self.sort_key is not None:
            sort_key = self.sort_key
            return sorted(idx, key=lambda i: sort_key(self.rows[i], self.display[i]))
        return sorted(idx, key=key) if self.sort_by else idx

    def render(self, header: bool = True) -> str:
        order = self._order()
        cells: list[list[list[str]]] = []
        if header:
            cells.append([[c.header.upper()] for c in self.columns])
        for i in order:
            row = []
            for text in self.display[i]:
                lines = text.split("\n") if text else [self.ersatz]
                if self.cell_height_max is not None and len(lines) > self.cell_height_max:
                    lines = lines[: self.cell_height_max]
                    lines[-1] += "…"
                row.append(lines)
            cells.append(row)
        widths = [0] * len(self.columns)
        for row in cells:
            for j, lines in enumerate(row):
                widths[j] = max(widths[j], *(len(line) for line in lines))
        out = []
        last = len(self.columns) - 1
        for r, row in enumerate(cells):
            height = max(len(lines) for lines in row)
            for k in range(height):
                parts = []
                for j, lines in enumerate(row):
                    text = lines[k] if k < len(lines) else ""
                    column = self.columns[j]
                    right = column.right if r or not header or column.header_right is None else column.header_right
                    if right:
                        parts.append(text.rjust(widths[j]))
                    elif j == last:
                        parts.append(text)
                    else:
                        parts.append(text.ljust(widths[j]))
                out.append(" ".join(parts))
        return "".join(line + "\n" for line in out)

    def to_json(self) -> list[dict[str, Any]]:
        names = [c.json_name or c.header for c in self.columns]
        return [dict(zip(names, self.rows[i], strict=True)) for i in self._order()]


def dump_json(value: Any, mode: str) -> str:
    """--json=pretty (systemd's layout: tabs, " : "), --json=short, and -o's
    json-sse ("data: " and an empty line) and json-seq (after an RS)."""
    if mode == "pretty":
        return json.dumps(value, indent="\t", separators=(",", " : "), ensure_ascii=False) + "\n"
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if mode == "sse":
        return f"data: {text}\n\n"
    if mode == "seq":
        return f"\x1e{text}\n"
    return text + "\n"


# --- properties (bus-print-properties.c) ---------------------------------------------------------------------------


def _shell_quote(s: str) -> str:
    if s and re.fullmatch(r"[A-Za-z0-9_.,:/@%+=^~-]+", s):
        return s
    return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""


def property_text(name: str, signature: str, value: Any) -> str | None:
    """How ``show`` prints one property value, as bus_print_property()
    does; None for what it cannot print."""
    if signature == "s" or signature == "o":
        return value if "\n" not in value else "[unprintable]"
    if signature == "b":
        return "yes" if value else "no"
    if signature == "t":
        if name.endswith("Timestamp"):
            return format_timestamp(value) or ""
        if "USec" in name:
            return "infinity" if value == UINT64_MAX else str(value)
        if name.startswith("Limit") and value == UINT64_MAX:
            return "infinity"
        return str(value)
    if signature in ("u", "i", "x", "q", "n", "y"):
        if signature == "u" and name in ("UID", "GID") and value == 2**32 - 1:
            return "[not set]"
        return str(value)
    if signature == "d":
        return f"{value:g}"
    if signature == "as":
        return " ".join(_shell_quote(s) for s in value)
    if signature == "ay":
        return bytes(value).hex()
    if signature == "au":
        return "".join(f"{u:08x}" for u in value)
    return None


def is_empty(signature: str, value: Any) -> bool:
    if signature in ("s", "o"):
        return bool(value == "")
    if signature == "t":
        return False
    if signature in ("as", "ay", "au"):
        return len(value) == 0
    return False


def print_properties(props: Mapping[str, tuple[str, Any]], only: Iterable[str] = (), show_all: bool = False,
                     value_only: bool = False) -> str:
    """``show``: NAME=VALUE lines in the daemon's order; empty values only
    with --all or when asked for by -p; --value prints the values alone."""
    wanted = list(only)
    show_empty = show_all or bool(wanted)
    out = []
    for name, (signature, value) in props.items():
        if wanted and name not in wanted:
            continue
        text = property_text(name, signature, value)
        if text is None:
            if show_empty:
                out.append("[unprintable]" if value_only else f"{name}=[unprintable]")
            continue
        if (text == "" or is_empty(signature, value)) and not show_empty:
            continue
        out.append(text if value_only else f"{name}={text}")
    return "".join(line + "\n" for line in out)


def property_json(signature: str, value: Any) -> Any:
    """A property value for --json: numbers and strings as they are, byte
    arrays as hex (an id128 as systemd writes it), UINT64_MAX as null."""
    if value is None:
        return None
    if signature == "ay":
        return bytes(value).hex()
    if signature == "t" and value == UINT64_MAX:
        return None
    if isinstance(value, tuple):
        return [property_json("", v) for v in value]
    if isinstance(value, list):
        return [property_json(signature[1:] if signature.startswith("a") else "", v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value
