"""Names, URLs and suffixes, as importctl 262 checks and derives them
(import-util.c, discover-image.c) before it calls the bus."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

TAR_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tar.bz2", ".tar.zst", ".tgz", ".tbz2", ".txz", ".tzst")
RAW_SUFFIXES = (".xz", ".gz", ".bz2", ".zst", ".sysext.raw", ".confext.raw", ".raw", ".qcow2", ".img", ".bin")
CLASSES = ("machine", "portable", "sysext", "confext")
FORMATS = ("uncompressed", "xz", "gzip", "bzip2", "zstd")


def filename_is_valid(s: str) -> bool:
    return bool(s) and s not in (".", "..") and "/" not in s and len(s.encode()) <= 255


def image_name_is_valid(s: str) -> bool:
    """A file name without control characters, not a ".#" temporary."""
    if not filename_is_valid(s) or s.startswith(".#"):
        return False
    return not any(ord(c) < 32 or ord(c) == 127 for c in s)


def hostname_is_valid(s: str) -> bool:
    """hostname_is_valid(s, 0): dot-separated labels of letters, digits,
    "-" and "_", at most 64 characters (machine names)."""
    if not s or len(s) > 64 or s.startswith(".") or s.endswith(".") or ".." in s:
        return False
    return all(c.isascii() and (c.isalnum() or c in "-_.") for c in s)


def tar_strip_suffixes(name: str) -> str:
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def raw_strip_suffixes(name: str) -> str:
    while True:
        for suffix in RAW_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        else:
            return name


def url_is_valid(url: str) -> bool:
    """http_url_is_valid() or file_url_is_valid()."""
    if any(ord(c) <= 32 or ord(c) >= 127 for c in url):
        return False
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            return len(url) > len(scheme) and url[len(scheme)] not in "/"
    if url.startswith("file:///"):
        return True
    return False


def url_last_component(url: str) -> str | None:
    """The last non-empty path segment of URL (without query or fragment)."""
    path = urlsplit(url).path
    parts = [p for p in path.split("/") if p]
    return parts[-1] if parts else None


def format_from_suffix(path: str) -> str | None:
    """The compression an export gets from its file name, as importctl 262
    picks it: .xz .gz .bz2 .zst (importd makes out the rest, .tgz and the
    like, itself, and says so)."""
    for suffix, fmt in ((".xz", "xz"), (".gz", "gzip"), (".bz2", "bzip2"), (".zst", "zstd")):
        if path.endswith(suffix):
            return fmt
    return None


def local_name_from_path(path: str) -> str:
    return os.path.basename(path.rstrip("/")) if path.rstrip("/") else path
