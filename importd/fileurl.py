"""file:// URLs for pulls, as systemd 262's pulls have them (through curl):
a GET of a local file answered like a plain web server would (200 with
Content-Length and Last-Modified, 206 for a Range, 404 for a file that is
not there), so that everything a pull does with a
download -- size caps, checksums, side files, progress, messages -- is the
same for both.

Only the URL a pull asked for is read: httpx refuses a web server's
redirect to file:// (as curl does for systemd)."""

from __future__ import annotations

import email.utils
import errno
import os
import re
import stat
from collections.abc import Iterator
from urllib.parse import unquote

import httpx

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d+)-$")


def file_url_is_valid(url: str) -> bool:
    """file:///absolute/path (or file://localhost/...), nothing else."""
    if not url.startswith("file://"):
        return False
    rest = url[len("file://"):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return rest.startswith("/") and len(rest) > 1 and not any(c.isspace() or c == "\0" for c in rest)


class _FileStream(httpx.SyncByteStream):
    def __init__(self, fd: int, remaining: int) -> None:
        self.fd = fd
        self.remaining = remaining

    def __iter__(self) -> Iterator[bytes]:
        while self.remaining > 0:
            chunk = os.read(self.fd, min(CHUNK, self.remaining))
            if not chunk:
                break  # shrunk meanwhile: the caller sees a short body
            self.remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def get(url: str, headers: dict[str, str]) -> httpx.Response:
    """The answer to a GET of the file:// URL (HEADERS: Range, If-Range);
    its body must be closed."""
    request = httpx.Request("GET", url, headers=headers)
    path = unquote(url[len("file://"):].removeprefix("localhost").split("?", 1)[0].split("#", 1)[0])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        status = 404 if e.errno in (errno.ENOENT, errno.ENOTDIR) else 403
        return httpx.Response(status, headers={"Content-Length": "0"}, request=request)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # no directories, FIFOs or devices
            os.close(fd)
            return httpx.Response(403, headers={"Content-Length": "0"}, request=request)
        os.set_blocking(fd, True)
        headers = {"Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True), "Accept-Ranges": "bytes"}
        start = 0
        wanted = _RANGE.match(request.headers.get("Range", ""))
        status = 200
        if wanted is not None and request.headers.get("If-Range") in (None, headers["Last-Modified"]):
            start = min(int(wanted.group(1)), st.st_size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(st.st_size - 1, start)}/{st.st_size}"
        os.lseek(fd, start, os.SEEK_SET)
        headers["Content-Length"] = str(st.st_size - start)
    except BaseException:
        os.close(fd)
        raise
    return httpx.Response(status, headers=headers, stream=_FileStream(fd, st.st_size - start), request=request)
