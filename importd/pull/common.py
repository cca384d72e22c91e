"""What the parts of a pull share: the request, URLs and the local names
derived from them, the cache entries' names (``.tar-<URL>.<ETag>``,
``.raw-<URL>.<ETag>.raw``) and the side files (pull-common.c)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from imagepool.image import Pool
from imagepool.names import image_name_is_valid
from importd import verify
from importd.context import TransferError
from importd.fileurl import file_url_is_valid
from importd.http import HttpOptions, valid_etag
from importd.local import DEFAULT_MAX_IMAGE_SIZE

SIDECARS_RAW = (
    (".nspawn", "Settings file"),
    (".roothash", "Root hash file"),
    (".roothash.p7s", "Root hash signature file"),
    (".verity", "Verity integrity file"),
)
SIDECARS_TAR = ((".nspawn", "Settings file"),)

TAR_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst", ".tgz", ".txz", ".tbz2", ".tzst", ".tar")
RAW_SUFFIXES = (".xz", ".gz", ".bz2", ".zst", ".raw", ".qcow2", ".img", ".bin")
_ESCAPE = set('/.#"\'\\')
NAME_MAX_CACHE = 240


@dataclass
class PullRequest:
    kind: str  # "tar" or "raw"
    url: str
    local: str  # "": derived from the URL
    verify: verify.VerifyMode
    force: bool = False
    read_only: bool = False
    keep_download: bool = True
    settings: bool = True
    max_size: int = DEFAULT_MAX_IMAGE_SIZE
    http: HttpOptions | None = None
    sync: bool = True  # on disk before it is installed, as systemd-pull's --sync=yes
    keyring: str | None = None  # verifies signatures; None: the first of verify.DEFAULT_KEYRINGS


def url_is_valid(url: str) -> bool:
    """http://, https:// and (as systemd 262) file:// URLs."""
    if url.startswith("file:"):
        return file_url_is_valid(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in url)


def last_component(url: str) -> str:
    path = urlsplit(url).path.rstrip("/")
    return path.rsplit("/", 1)[-1]


def strip_suffixes(name: str, kind: str) -> str:
    if kind == "tar":
        for suffix in TAR_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
        return name
    changed = True
    while changed:
        changed = False
        for suffix in RAW_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def sibling_url(url: str, filename: str) -> str:
    parts = urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/" + filename
    return parts._replace(path=path, query="", fragment="").geturl()


def escape(text: str) -> str:
    out: list[str] = []
    for ch in text:
        if ch in _ESCAPE or not ch.isprintable() or ord(ch) > 127:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and len(text) >= i + 4:
            try:
                raw.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        raw += text[i].encode()
        i += 1
    return raw.decode("utf-8", "replace")


def _url_part(url: str) -> str:
    escaped = escape(url)
    if len(escaped) >= NAME_MAX_CACHE - 80:
        escaped = hashlib.sha256(url.encode()).hexdigest()[:16]
    return escaped


def cache_base(pool: Pool, kind: str, url: str, etag: str | None) -> str:
    """The cache entry's path without the ".raw" suffix of raw images."""
    name = f".{kind}-{_url_part(url)}"
    if etag:
        name += "." + escape(etag)
    return os.path.join(pool.path, name)


def cached_etags(pool: Pool, kind: str, url: str) -> list[str]:
    prefix = f".{kind}-{_url_part(url)}."
    etags = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(pool.path):
            if not entry.startswith(prefix):
                continue
            rest = entry[len(prefix):]
            if kind == "raw":
                if not rest.endswith(".raw"):
                    continue
                rest = rest[:-4]
            elif any(rest.endswith(e) for e, _ in SIDECARS_RAW):
                continue
            etag = unescape(rest)
            if valid_etag(etag):
                etags.append(etag)
    return etags


def local_name_from_url(url: str, kind: str) -> str:
    """The image name systemd-pull derives when none is given."""
    name = strip_suffixes(last_component(url), kind)
    if not name or not image_name_is_valid(name):
        raise TransferError(f"Cannot use '{name}' as local image name, refusing.")
    return name
