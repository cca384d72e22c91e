"""One HTTP download at a time, for a pull job's worker thread.

httpx's synchronous client does the HTTP; this module adds what a pull needs
on top: systemd's messages, size caps, conditional requests (If-None-Match),
resuming a dropped body with a Range request guarded by If-Range, a stall
timeout, and cancellation that interrupts a blocked read by shutting the
socket down.

Stalls: a read that waits longer than the stall timeout fails (httpx's read
timeout), and so does a connection that delivers less than LOW_SPEED_LIMIT
bytes a second over a whole stall timeout, headers included -- a server
dripping a byte now and then would otherwise keep a transfer forever (curl,
for systemd-pull, has the same kind of limit).  A watchdog thread shuts the
sockets down then; sockets are known from the moment they connect (httpx's
trace hook), so a wait for headers can be cut, or canceled, too.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from importd import fileurl
from importd.context import Canceled, JobContext, TransferError
from importd.progress import format_bytes, format_timespan

AUX_MAX = 1 << 20
DEFAULT_STALL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
MAX_REDIRECTS = 10
MAX_RETRIES = 5
LOW_SPEED_LIMIT = 30  # bytes per second, on average over a stall timeout
USER_AGENT = "systemd-importd/252 (machined-py)"

# httpcore reads the body 64 KiB at a time and pays a fixed Python cost per
# read; larger reads cut the CPU per gigabyte (measured: 270 -> 590 MB/s on
# loopback with 1 MiB).  512 KiB keeps most of that and the memory of four
# concurrent pulls under 90 MB (1 MiB: 95-101 MB).  The attribute is
# httpcore's own knob for this.
httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES = 512 << 10


_SSL_CONTEXT: ssl.SSLContext | None = None


def system_ssl_context() -> ssl.SSLContext:
    """HTTPS with the system's CAs (OpenSSL's default paths, or
    $SSL_CERT_FILE/$SSL_CERT_DIR), as curl does for systemd-pull; not the
    bundle a Python package brings."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class _ConnectFailed(TransferError):
    """No connection to the server (a resume may try again)."""


class HttpError(TransferError):
    def __init__(self, url: str, status: int, challenge: str | None = None) -> None:
        super().__init__(f"HTTP request to {url} failed with code {status}.")
        self.url = url
        self.status = status
        self.challenge = challenge  # WWW-Authenticate of a 401, for registry clients


@dataclass
class HttpOptions:
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    retries: int = MAX_RETRIES
    backoff: float = 0.5  # seconds before the first retry; doubles, at most 8 s


@dataclass
class Download:
    url: str
    status: int = 0
    etag: str | None = None
    last_modified: float | None = None
    size: int = 0  # bytes received
    sha256: str = ""
    not_modified: bool = False  # the server (or the ETag) said we have it
    resumes: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # of the (first) response


def _parse_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def valid_etag(etag: str) -> bool:
    body = etag[2:] if etag.startswith("W/") else etag
    return len(body) >= 2 and body[0] == '"' and body[-1] == '"'


class Http:
    """An HTTP client for one transfer (connections are reused within it)."""

    def __init__(self, ctx: JobContext, options: HttpOptions | None = None) -> None:
        self.ctx = ctx
        self.options = options or HttpOptions()
        o = self.options
        self.client = httpx.Client(
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            timeout=httpx.Timeout(o.stall_timeout, connect=o.connect_timeout),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            trust_env=True,  # http_proxy, https_proxy, no_proxy
            verify=system_ssl_context(),
        )
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Low-speed watchdog: bytes received, and since when the current
        # request is being judged (None while no request is in flight).
        self._received = 0
        self._since: float | None = None
        self._since_received = 0
        self._consuming = False  # in the sink: the time is the consumer's, not the server's
        self.stalled = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="importd-http-watchdog", daemon=True)
        self._watchdog.start()
        ctx.cancel_hooks.append(self._interrupt)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.ctx.cancel_hooks.remove(self._interrupt)
        self._closed.set()
        self.client.close()

    def _watch(self) -> None:
        window = self.options.stall_timeout
        while not self._closed.wait(min(1.0, window / 4)):
            with self._lock:
                if self._since is None:
                    continue
                now = time.monotonic()
                if self._consuming:
                    self._since, self._since_received = now, self._received
                    continue
                if now - self._since < window:
                    continue
                slow = self._received - self._since_received < LOW_SPEED_LIMIT * window
                self._since, self._since_received = now, self._received
            if slow:
                self.stalled = True
                self._interrupt()

    def _begin(self) -> None:
        with self._lock:
            self._since, self._since_received = time.monotonic(), self._received

    def _end(self) -> None:
        with self._lock:
            self._since = None

    def _got(self, n: int) -> None:
        self._received += n  # one reader at a time; the watchdog only compares

    def _stall_error(self, url: str) -> TransferError:
        return TransferError(f"Download of {url} stalled: no data for {self.options.stall_timeout:g} seconds.")

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's trace hook: note each socket as soon as it is connected."""
        if event.endswith((".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                self._sockets.add(sock)
                if self.ctx.cancel.is_set() or self.stalled:
                    self._interrupt()

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _interrupt(self) -> None:
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def _request(self, url: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        self.ctx.check()
        if url.startswith("file:"):
            response = fileurl.get(url, headers)
            try:
                yield response
            finally:
                response.close()
            return
        self.stalled = False
        self._begin()
        try:
            with self.client.stream("GET", url, headers=headers, extensions={"trace": self._trace}) as response:
                stream = response.extensions.get("network_stream")
                sock = stream.get_extra_info("socket") if stream is not None else None
                if sock is not None:
                    self._sockets.add(sock)  # a connection reused from an earlier request
                yield response
        except httpx.TooManyRedirects:
            raise TransferError(f"Too many redirects for {url}.") from None
        except httpx.UnsupportedProtocol:
            raise TransferError(f"Redirect of {url} to an unsupported protocol.") from None
        except httpx.ConnectTimeout:
            self.ctx.check()
            raise _ConnectFailed(f"Timed out connecting to {url}.") from None
        except httpx.ConnectError as e:
            self.ctx.check()
            raise _ConnectFailed(f"Failed to connect to {url}: {e}") from None
        except httpx.TransportError as e:  # headers or body: the one place stalls are told apart
            self.ctx.check()
            if self.stalled or isinstance(e, httpx.ReadTimeout):
                raise self._stall_error(url) from None
            raise
        finally:
            self._end()

    def fetch_small(self, url: str, limit: int = AUX_MAX,
                    headers: dict[str, str] | None = None) -> tuple[bytes, Download] | None:
        """A side file (checksums, signature, settings): None on 404."""
        info = Download(url)
        try:
            with self._request(url, dict(headers or {})) as response:
                if response.status_code == 404:
                    self.ctx.log(f"HTTP request to {url} failed with code 404.")
                    return None
                if response.status_code >= 300:
                    raise HttpError(url, response.status_code, response.headers.get("WWW-Authenticate"))
                length = _content_length(response)
                if length is not None and length > limit:
                    raise TransferError("Content too large.")
                if length is not None:
                    self.ctx.log(f"Downloading {format_bytes(length)} for {url}.")
                data = bytearray()
                for chunk in response.iter_raw():
                    self.ctx.check()
                    self._got(len(chunk))
                    data += chunk
                    if len(data) > limit:
                        raise TransferError("Content too large.")
                if length is not None and len(data) != length:
                    raise TransferError("Download truncated.")
        except (httpx.HTTPError, httpx.StreamError) as e:
            self.ctx.check()
            raise TransferError(f"Download of {url} failed: {e}") from None
        info.size = len(data)
        info.etag = response.headers.get("ETag")
        info.content_type = response.headers.get("Content-Type")
        info.headers = dict(response.headers)
        self.ctx.log(f"Acquired {format_bytes(len(data))} for {url}.")
        self.ctx.log(f"Download of {url} complete.")
        info.sha256 = hashlib.sha256(data).hexdigest()
        return bytes(data), info

    def stream(self, url: str, sink: Callable[[bytes], None], *, etags: Sequence[str] = (),
               max_size: int, progress: Callable[[float], None] | None = None, hash: bool = True,
               request_headers: dict[str, str] | None = None) -> Download:
        """Download URL into SINK (called with each chunk as it arrives),
        hashing the bytes as received.  A dropped connection is resumed
        where it stopped, if the server supports ranges and the validator
        still matches.  With ETAGS, a 304 (or a matching ETag) means the
        cached copy is current: nothing is passed to SINK."""
        info = Download(url)
        base = dict(request_headers or {})  # sent with every request, resumes too (Authorization)
        headers: dict[str, str] = dict(base)
        if etags:
            headers["If-None-Match"] = ", ".join(etags)
        total: int | None = None
        validator: str | None = None
        attempt = 0
        last_report = time.monotonic()
        started = last_report
        while True:
            try:
                with self._request(url, headers) as response:
                    status = response.status_code
                    if info.size == 0:
                        if status == 304:
                            info.not_modified = True
                            info.etag = response.headers.get("ETag") or (etags[0] if len(etags) == 1 else None)
                            return info
                        if status == 404:
                            raise HttpError(url, 404)
                        if status >= 300:
                            raise HttpError(url, status, response.headers.get("WWW-Authenticate"))
                        info.status = status
                        info.content_type = response.headers.get("Content-Type")
                        info.headers = dict(response.headers)
                        info.etag = response.headers.get("ETag")
                        if info.etag and info.etag in etags:
                            info.not_modified = True
                            return info
                        info.last_modified = _parse_date(response.headers.get("Last-Modified"))
                        total = _content_length(response)
                        if total is not None and total > max_size:
                            raise TransferError("Content too large.")
                        if total is not None and not url.startswith("file:"):  # (curl says nothing for files)
                            self.ctx.log(f"Downloading {format_bytes(total)} for {url}.")
                        if info.etag and valid_etag(info.etag) and not info.etag.startswith("W/"):
                            validator = info.etag
                        elif response.headers.get("Last-Modified"):
                            validator = response.headers["Last-Modified"]
                        if response.headers.get("Accept-Ranges", "").lower() == "none":
                            validator = None
                    elif status == 401:  # a token that expired in the meantime: the caller may renew it
                        raise HttpError(url, status, response.headers.get("WWW-Authenticate"))
                    elif status != 206 or not _range_matches(response, info.size, total):
                        raise TransferError(f"The image at {url} changed while it was being downloaded.")
                    for chunk in response.iter_raw():
                        self.ctx.check()
                        self._got(len(chunk))
                        info.size += len(chunk)
                        if info.size > max_size:
                            raise TransferError("Content too large.")
                        if hash:
                            info.hasher.update(chunk)
                        self._consuming = True
                        try:
                            sink(chunk)
                        finally:
                            self._consuming = False
                        now = time.monotonic()
                        if total and now - last_report >= 1.0:
                            last_report = now
                            self._report(url, info.size, total, now - started)
                        if total and progress:
                            progress(info.size / total)
                if total is not None and info.size < total:
                    raise httpx.RemoteProtocolError("short body")
                if total is not None and info.size > total:
                    raise TransferError(f"The image at {url} changed while it was being downloaded.")
                break
            except Canceled:
                raise
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, _ConnectFailed) as e:
                self.ctx.check()
                attempt += 1
                if info.size == 0 and info.status == 0:
                    if isinstance(e, _ConnectFailed):
                        raise
                    raise TransferError(f"Download of {url} failed: {e}") from None
                if validator is None or attempt > self.options.retries:
                    raise TransferError("Download truncated.") from None
                delay = min(self.options.backoff * 2 ** (attempt - 1), 8.0)
                self.ctx.log(f"Connection to {url} lost after {format_bytes(info.size)}, "
                             f"resuming in {delay:g}s (attempt {attempt} of {self.options.retries}).")
                if self.ctx.cancel.wait(delay):
                    raise Canceled() from None
                headers = {**base, "Range": f"bytes={info.size}-", "If-Range": validator}
                info.resumes += 1
        info.sha256 = info.hasher.hexdigest()
        return info

    def _report(self, url: str, done: int, total: int, elapsed: float) -> None:
        speed = done / elapsed if elapsed > 0 else 0
        percent = done * 100 // total
        left = (total - done) / speed if speed > 0 else 0
        self.ctx.log(f"Got {percent}% of {url}. {format_timespan(left)} left at {format_bytes(int(speed))}/s.")


def _content_length(response: httpx.Response) -> int | None:
    """Content-Length, if there is exactly one well-formed value."""
    values = response.headers.get_list("Content-Length")
    if len(values) != 1 or not values[0].strip().isdigit():
        if values:
            raise TransferError(f"Bad Content-Length from {response.request.url}.")
        return None
    return int(values[0])


def _range_matches(response: httpx.Response, offset: int, total: int | None) -> bool:
    """Whether Content-Range is "bytes OFFSET-(TOTAL-1)/TOTAL" (any end and
    length when the total is not known)."""
    value = response.headers.get("Content-Range", "")
    if not value.startswith("bytes "):
        return False
    try:
        span, _, length = value[6:].partition("/")
        first, _, last = span.partition("-")
        if int(first) != offset or int(last) < offset:
            return False
        if total is None:
            return True
        return int(length) == total and int(last) == total - 1
    except ValueError:
        return False
