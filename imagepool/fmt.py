"""systemd's byte format, shared by importd (its log lines) and machined-py
(its tables, status texts and bars), so that both print sizes as systemd
262 does."""

from __future__ import annotations


def format_bytes(n: int) -> str:
    """systemd 262's FORMAT_BYTES: 1024-based, truncated to one digit below
    the point (from the next smaller unit, as systemd computes it), which is
    left out when it is 0 ("80K", "8.5M", "512B")."""
    for i, suffix in enumerate("EPTGMK"):
        factor = 1 << (10 * (6 - i))
        if n >= factor:
            digit = (n * 10 // factor) % 10 if suffix == "K" else (n // (factor >> 10) * 10 // 1024) % 10
            return f"{n // factor}.{digit}{suffix}" if digit else f"{n // factor}{suffix}"
    return f"{n}B"
