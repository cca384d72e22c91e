"""Name rules of systemd (hostname-util.c, os-util.c) and sd-bus path labels."""

from __future__ import annotations

import string

_LABEL_SAFE = frozenset(string.ascii_letters + string.digits)
_HOST_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
NAME_MAX = 255
HOST_NAME_MAX = 64


def filename_is_valid(name: str) -> bool:
    if not name or name in (".", ".."):
        return False
    if "/" in name or "\0" in name:
        return False
    return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX


def image_name_is_valid(name: str) -> bool:
    """Image names: a valid file name, valid UTF-8, no control characters,
    not starting with ".#" (temporary files use that prefix)."""
    if not filename_is_valid(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return not name.startswith(".#")


def hostname_is_valid(name: str) -> bool:
    """Machine names: labels of letters, digits, '-' and '_' joined by single
    dots, no leading or trailing dot, at most 64 characters."""
    if not name or len(name) > HOST_NAME_MAX:
        return False
    labels = name.split(".")
    return all(label and set(label) <= _HOST_CHARS for label in labels)


def machine_name_is_valid(name: str) -> bool:
    return name == ".host" or hostname_is_valid(name)


def bus_label_escape(name: str) -> str:
    """sd-bus label escaping: letters and digits kept (a leading digit is
    escaped), every other byte becomes _xx; the empty string becomes _."""
    if not name:
        return "_"
    out = []
    for i, byte in enumerate(name.encode("utf-8", "surrogateescape")):
        ch = chr(byte)
        if ch in _LABEL_SAFE and not (i == 0 and ch.isdigit()):
            out.append(ch)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def bus_label_unescape(label: str) -> str:
    if label == "_":
        return ""
    out = bytearray()
    i = 0
    while i < len(label):
        pair = label[i + 1 : i + 3]
        if label[i] == "_" and len(pair) == 2 and all(c in string.hexdigits for c in pair):
            out.append(int(pair, 16))
            i += 3
            continue
        out.append(ord(label[i]))
        i += 1
    return out.decode("utf-8", "surrogateescape")
