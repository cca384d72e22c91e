"""A real HTTP/1.1 server on loopback for the pull tests, with fault injection.

    with serve(root) as srv:
        srv.faults["image.raw"] = Fault(drop_after=4096)
        pull(srv.url("image.raw"))
        assert srv.count("image.raw") == 2

Files below ROOT are served for GET and HEAD with a strong ETag, Last-Modified,
conditional requests (If-None-Match, If-Modified-Since, If-Range) and single
byte ranges.  Each connection is handled by its own daemon thread; stop()
wakes every stalled or idle connection, closes it and joins every thread, so
nothing of the server survives it.  Clean bodies go out with sendfile(2);
bodies with a fault or a rate limit are sent by hand in chunks.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import http.server
import os
import select
import socket
import socketserver
import struct
import sys
import termios
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

CHUNK = 256 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024


@dataclass
class Fault:
    """What to do wrong when a path is requested.  Checked in this order:
    delay, redirect_to, status; then the body faults, which apply to GET only
    (to the bytes of the answer, whether 200 or 206)."""

    status: int | None = None
    drop_after: int | None = None
    drop_times: int = 1
    stall_after: int | None = None
    stall_seconds: float = 3600
    short_body: int | None = None
    redirect_to: str | None = None
    redirect_status: int = 302
    rate: int | None = None
    no_etag: bool = False
    no_range: bool = False
    delay: float = 0
    # How many answers drop_after has already been applied to.
    drops: int = field(default=0, compare=False)


class Headers(dict):
    """Request headers; names are stored in lower case and looked up in any
    case.  A header sent more than once has its values joined by ", "."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        for name, value in items:
            name = name.lower()
            if super().__contains__(name):
                value = f"{super().__getitem__(name)}, {value}"
            super().__setitem__(name, value)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __setitem__(self, name: str, value: str) -> None:
        super().__setitem__(name.lower(), value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


@dataclass
class Request:
    """One GET or HEAD as the server saw it.  Logged as soon as it is parsed.
    status and bytes_sent are updated before the bytes they stand for go out,
    so a client that has its answer sees them final; done is set only after
    the handler is through, and may lag behind the client (wait_idle())."""

    method: str
    path: str                 # decoded, with its leading "/", without the query
    target: str               # the request target as sent
    headers: Headers
    range: str | None         # the Range header, if any
    conn: int                 # serial number of the connection it came on
    status: int | None = None
    bytes_sent: int = 0       # body bytes only
    done: bool = False        # the answer is complete (or was cut off)


def _path_of(target: str) -> str:
    """The decoded path of a request target (or of a URL), without the query."""
    if target.startswith(("http://", "https://")):
        target = urlsplit(target).path
    return unquote(target.partition("?")[0].partition("#")[0])


def _key(path: str) -> str:
    """Normalize a path for faults and count(): decoded, no query, no leading "/"."""
    return _path_of(path).lstrip("/")


def _etag_of_stat(st: os.stat_result) -> str:
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'


def _parse_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _opaque(tag: str) -> tuple[bool, str]:
    """(weak, opaque-tag) of an entity tag."""
    tag = tag.strip()
    if tag.startswith("W/"):
        return True, tag[2:]
    return False, tag


def _parse_range(value: str, size: int) -> tuple[int, int] | None | str:
    """One byte range as (first, last), None to ignore the header (bad syntax,
    other units, several ranges), or "unsatisfiable"."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:                           # suffix: the last N bytes
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    a = int(first)
    if last and int(last) < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(int(last), size - 1) if last else size - 1


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False      # TestServer.stop() does the joining
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, owner: TestServer, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse lookup of the host; not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        owner = self.owner
        with owner._lock:
            if owner._stopping:
                self.shutdown_request(request)
                return
            owner._conn_serial += 1
            serial = owner._conn_serial
            t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                 name=f"httpserver-conn-{serial}", daemon=True)
            owner._threads.add(t)
            owner._conns[request] = serial
        t.start()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.owner._lock:
                self.owner._conns.pop(request, None)
                self.owner._threads.discard(threading.current_thread())

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or exc is None:
            return                  # the client went away, or stop() cut it off
        self.owner.errors.append(exc)
        traceback.print_exc()


class _Abort(Exception):
    """The answer was cut off on purpose; the connection must go."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "importd-testserver/1"
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, _Abort):
            # The client went away, stop() cut the connection, or a fault did.
            self.close_connection = True

    @property
    def owner(self) -> TestServer:
        return self.server.owner

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    # -- answering ---------------------------------------------------------

    def _answer(self, head: bool) -> None:
        owner = self.owner
        path = _path_of(self.path)
        req = Request(method=self.command, path=path, target=self.path,
                      headers=Headers(self.headers.items()), range=self.headers.get("Range"),
                      conn=owner._conns.get(self.connection, 0))
        owner._log(req)
        try:
            self._respond(req, head)
        finally:
            req.done = True

    def _respond(self, req: Request, head: bool) -> None:
        owner = self.owner
        fault = owner._fault_for(req.path)
        if fault and fault.delay > 0:
            if owner._stop_event.wait(fault.delay):
                raise _Abort()
        if fault and fault.redirect_to is not None:
            return self._simple(req, head, fault.redirect_status,
                                extra={"Location": fault.redirect_to})
        if fault and fault.status is not None:
            extra = {}
            if fault.status == 401:
                extra["WWW-Authenticate"] = 'Basic realm="importd-test"'
            return self._simple(req, head, fault.status, extra=extra)

        file = owner._resolve(req.path)
        if file is None:
            return self._simple(req, head, 404)
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return self._simple(req, head, 404)
        try:
            self._serve_file(req, head, fd, fault)
        finally:
            os.close(fd)

    def _serve_file(self, req: Request, head: bool, fd: int, fault: Fault | None) -> None:
        st = os.fstat(fd)
        size = st.st_size
        etag = None if fault and fault.no_etag else _etag_of_stat(st)
        mtime = int(st.st_mtime)
        validators = {"Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
        if etag:
            validators["ETag"] = etag

        # Conditional GET.
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            if etag and any(t.strip() == "*" or _opaque(t)[1] == etag for t in inm.split(",")):
                return self._not_modified(req, validators)
        else:
            ims = self.headers.get("If-Modified-Since")
            since = _parse_date(ims) if ims else None
            if since is not None and mtime <= since:
                return self._not_modified(req, validators)

        # Range, unless If-Range says the client's copy is stale.
        first, last, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        no_range = bool(fault and fault.no_range)
        if rng is not None and not head and not no_range and self._if_range_holds(etag, mtime):
            r = _parse_range(rng, size)
            if r == "unsatisfiable":
                return self._simple(req, head, 416, extra={"Content-Range": f"bytes */{size}"})
            if r is not None:
                first, last = r
                status = 206

        length = last - first + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "none" if no_range else "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        for name, value in validators.items():
            self.send_header(name, value)
        req.status = status
        self.end_headers()
        if head or length == 0:
            return
        self._send_body(req, fd, first, length, fault)

    def _if_range_holds(self, etag: str | None, mtime: int) -> bool:
        value = self.headers.get("If-Range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith('"') or value.startswith("W/"):
            weak, tag = _opaque(value)
            return not weak and etag is not None and tag == etag
        when = _parse_date(value)
        return when is not None and int(when) == mtime

    def _not_modified(self, req: Request, validators: dict[str, str]) -> None:
        self.send_response(304)
        for name, value in validators.items():
            self.send_header(name, value)
        req.status = 304
        self.end_headers()

    def _simple(self, req: Request, head: bool, status: int, extra: dict[str, str] | None = None) -> None:
        """A short text answer that keeps the connection open."""
        phrase = self.responses.get(status, ("",))[0]
        body = b"" if status in (204, 304) or status < 200 else f"{status} {phrase}\n".encode()
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if status not in (204, 304) and status >= 200:
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
        req.status = status
        self.end_headers()
        if body and not head:
            req.bytes_sent = len(body)
            self.wfile.write(body)

    # -- bodies ------------------------------------------------------------

    def _send_body(self, req: Request, fd: int, offset: int, length: int, fault: Fault | None) -> None:
        owner = self.owner
        limit, action = length, None
        if fault:
            if fault.drop_after is not None and fault.drop_after < limit and owner._take_drop(fault):
                limit, action = fault.drop_after, "drop"
            if fault.short_body is not None and fault.short_body < limit:
                limit, action = fault.short_body, "short"
            if fault.stall_after is not None and fault.stall_after < limit:
                limit, action = fault.stall_after, "stall"
        rate = fault.rate if fault and fault.rate else None

        if action is None and rate is None:
            self._sendfile(req, fd, offset, length)
            return
        self._send_slowly(req, fd, offset, limit, rate)
        if action == "stall":
            self._stall(fault.stall_seconds)
            self._close(abort=False)
        elif action == "short":
            self._close(abort=False)
        elif action == "drop":
            self._close(abort=True)

    def _sendfile(self, req: Request, fd: int, offset: int, length: int) -> None:
        sock = self.connection.fileno()
        end = offset + length
        while offset < end:
            want = min(SENDFILE_CHUNK, end - offset)
            req.bytes_sent += want      # counted before it can reach the client
            try:
                n = os.sendfile(sock, fd, offset, want)
            except OSError as e:
                req.bytes_sent -= want
                if isinstance(e, InterruptedError):
                    continue
                if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    self._send_slowly(req, fd, offset, end - offset, None)
                    return
                raise
            req.bytes_sent -= want - n
            if n == 0:              # the file shrank under us
                raise _Abort()
            offset += n

    def _send_slowly(self, req: Request, fd: int, offset: int, count: int, rate: int | None) -> None:
        stop = self.owner._stop_event
        chunk = CHUNK if rate is None else max(1, min(CHUNK, rate // 50))
        start = time.monotonic()
        sent = 0
        while sent < count:
            data = os.pread(fd, min(chunk, count - sent), offset + sent)
            if not data:
                raise _Abort()
            req.bytes_sent += len(data)     # counted before it can reach the client
            try:
                self.connection.sendall(data)
            except OSError:
                req.bytes_sent -= len(data)
                raise
            sent += len(data)
            if rate is not None and sent < count:
                pause = start + sent / rate - time.monotonic()
                if pause > 0 and stop.wait(pause):
                    raise _Abort()

    def _stall(self, seconds: float) -> None:
        """Keep the connection open and silent until stop(), the deadline, or
        the client hanging up."""
        stop = self.owner._stop_event
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.1))
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return          # the client hung up
            except (OSError, ValueError):
                return
            if readable:
                stop.wait(min(left, 0.1))   # a pipelined request: not now

    def _drain(self, timeout: float) -> None:
        """Wait until the kernel has handed everything we sent to the peer."""
        stop = self.owner._stop_event
        deadline = time.monotonic() + timeout
        buf = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(self.connection.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0 or stop.wait(0.005):
                return

    def _close(self, abort: bool) -> None:
        """End the connection now: with a reset (abort) or a clean FIN."""
        self.close_connection = True
        sock = self.connection
        try:
            if abort:
                # Let what was sent reach the client first: a reset throws
                # away whatever is still queued on our side.
                self._drain(2.0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                os.close(sock.detach())
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Abort()


class TestServer:
    """Serves the files below ROOT over HTTP/1.1 on HOST, at a free port."""

    __test__ = False            # not a pytest test class

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.host = host
        self.port: int | None = None
        self.requests: list[Request] = []
        self.faults: dict[str, Fault] = {}
        self.errors: list[BaseException] = []   # unexpected handler exceptions
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._stopping = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: dict[socket.socket, int] = {}
        self._conn_serial = 0

    # -- life cycle --------------------------------------------------------

    def start(self) -> TestServer:
        if self._server is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._stop_event.clear()
        self._stopping = False
        self._server = _Server(self, (self.host, 0), family)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"httpserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()               # no more accepts
        self._thread.join(timeout)
        server.server_close()
        with self._lock:
            self._stopping = True
            self._stop_event.set()      # wakes delays, stalls, rate pauses
            conns = list(self._conns)
            threads = list(self._threads)
        for sock in conns:              # wakes idle keep-alives and blocked sends
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive or self._thread.is_alive():
            raise RuntimeError(f"HTTP test server threads did not stop: {alive}")

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for tests ---------------------------------------------------------

    def url(self, path: str = "") -> str:
        if self.port is None:
            raise RuntimeError("not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/{quote(path.lstrip('/'), safe='/?&=%~:@!$,;+*()')}"

    def count(self, path: str) -> int:
        """Number of GET requests for PATH, whatever their outcome."""
        key = _key(path)
        with self._lock:
            return sum(1 for r in self.requests if r.method == "GET" and _key(r.path) == key)

    def requests_for(self, path: str) -> list[Request]:
        key = _key(path)
        with self._lock:
            return [r for r in self.requests if _key(r.path) == key]

    def etag_of(self, path: str) -> str:
        return _etag_of_stat(os.stat(self.root / _key(path)))

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until every logged request has been fully handled."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = [r for r in self.requests if not r.done]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still being answered: {busy}")
            time.sleep(0.005)

    def reset(self) -> None:
        """Forget the request log and every fault."""
        with self._lock:
            self.requests.clear()
            self.faults.clear()

    # -- for the handler ---------------------------------------------------

    def _log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _fault_for(self, path: str) -> Fault | None:
        key = _key(path)
        faults = self.faults
        f = faults.get(key)
        return f if f is not None else faults.get("/" + key)

    def _take_drop(self, fault: Fault) -> bool:
        with self._lock:
            if fault.drop_times >= 0 and fault.drops >= fault.drop_times:
                return False
            fault.drops += 1
            return True

    def _resolve(self, path: str) -> Path | None:
        parts = path.split("/")
        if any(p in ("..", ".") for p in parts) or "\0" in path or "\\" in path:
            return None
        file = self.root.joinpath(*[p for p in parts if p])
        return file if file.is_file() else None


@contextlib.contextmanager
def serve(root: Path, host: str = "127.0.0.1") -> Iterator[TestServer]:
    """A started TestServer for ROOT, stopped on the way out."""
    srv = TestServer(root, host).start()
    try:
        yield srv
    finally:
        srv.stop()
