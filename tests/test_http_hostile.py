"""importd.http against hostile servers on loopback, each a few lines of raw
socket code: servers that drip headers or bodies a byte at a time (under the
stall timeout per read, far under any useful speed), that never answer while
the transfer is canceled, that resume with the wrong range, or that go away
for a moment in the middle of a body."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from importd.context import Canceled, JobContext, TransferError
from importd.http import Http, HttpOptions

BODY = bytes(range(256)) * 40  # 10240 bytes


class RawServer:
    """Accepts connections on 127.0.0.1 and hands each, with the request's
    head, to HANDLER(conn, request) in a thread of its own."""

    def __init__(self, handler: Callable[[socket.socket, bytes], None], port: int = 0) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.threads: list[threading.Thread] = []
        self.closing = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def url(self, path: str = "/img.raw") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            try:
                self.handler(conn, data)
            except OSError:
                pass

    def stop_listening(self) -> None:
        """No more connections (shutdown wakes the accept() in progress,
        close alone would leave the socket listening until it returns)."""
        self.closing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.acceptor.join(timeout=10)

    def close(self) -> None:
        self.stop_listening()
        for t in self.threads:
            t.join(timeout=10)


@contextlib.contextmanager
def serving(handler: Callable[[socket.socket, bytes], None], stop: threading.Event) -> Iterator[RawServer]:
    """A RawServer for the test; STOP (which its handlers watch) is set and
    the server closed at the end."""
    server = RawServer(handler)
    try:
        yield server
    finally:
        stop.set()
        server.close()


def drip(conn: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(every):
            return
        conn.sendall(bytes([byte]))


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


def options(stall: float = 1.0, retries: int = 3) -> HttpOptions:
    return HttpOptions(stall_timeout=stall, connect_timeout=5, retries=retries, backoff=0.2)


def run_stream(url: str, opts: HttpOptions, ctx: JobContext | None = None) -> bytes:
    out = bytearray()
    with Http(ctx or JobContext(), opts) as http:
        http.stream(url, out.extend, max_size=1 << 30)
    return bytes(out)


def test_dripping_body_stalls(stop: threading.Event) -> None:
    def handler(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10240\r\n\r\n")
        drip(conn, BODY, 0.25, stop)  # 4 bytes a second, each read well within the stall timeout

    with serving(handler, stop) as server:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="stalled"):
            run_stream(server.url(), options(stall=1.0))
        assert time.monotonic() - t0 < 5


def test_dripping_headers_stall(stop: threading.Event) -> None:
    def handler(conn: socket.socket, request: bytes) -> None:
        drip(conn, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10000 + b"\r\n\r\n", 0.25, stop)

    with serving(handler, stop) as server:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="stalled"):
            run_stream(server.url(), options(stall=1.0))
        assert time.monotonic() - t0 < 5
        # A side file (fetch_small) as well.
        with Http(JobContext(), options(stall=1.0)) as http, pytest.raises(TransferError, match="stalled"):
            http.fetch_small(server.url("/img.nspawn"))


def test_cancel_while_waiting_for_headers(stop: threading.Event) -> None:
    def handler(conn: socket.socket, request: bytes) -> None:
        stop.wait(60)  # never answers

    ctx = JobContext()
    with serving(handler, stop) as server:
        threading.Timer(0.5, ctx.request_cancel).start()
        t0 = time.monotonic()
        with pytest.raises(Canceled):
            run_stream(server.url(), options(stall=30.0), ctx)
        assert time.monotonic() - t0 < 5


def test_resume_with_a_wrong_range_fails(stop: threading.Event) -> None:
    def handler(conn: socket.socket, request: bytes) -> None:
        if b"range:" not in request.lower():
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10240\r\nETag: "v1"\r\nAccept-Ranges: bytes\r\n\r\n')
            conn.sendall(BODY[:4000])
            conn.shutdown(socket.SHUT_RDWR)
        else:
            # Starts at the right place, but of a longer resource.
            conn.sendall(b'HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 4000-20479/20480\r\n'
                         b'Content-Length: 16480\r\nETag: "v1"\r\n\r\n' + bytes(16480))

    with serving(handler, stop) as server:
        with pytest.raises(TransferError, match="changed while it was being downloaded"):
            run_stream(server.url(), options())
        assert b"range: bytes=4000-" in server.requests[1].lower()


def test_resume_after_the_server_was_gone_for_a_moment(stop: threading.Event) -> None:
    """A drop, then connections refused for a while: resumed once the
    server is back (the reconnect is retried with backoff)."""
    servers: list[RawServer] = []

    def handler(conn: socket.socket, request: bytes) -> None:
        if b"range:" not in request.lower():
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10240\r\nETag: "v1"\r\nAccept-Ranges: bytes\r\n\r\n')
            conn.sendall(BODY[:3000])
            conn.shutdown(socket.SHUT_RDWR)
            # Gone: nobody listens for a while, then a new server on the same port.
            servers[0].stop_listening()
            time.sleep(0.5)
            servers.append(RawServer(handler, servers[0].port))
        else:
            conn.sendall(b'HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 3000-10239/10240\r\n'
                         b'Content-Length: 7240\r\nETag: "v1"\r\n\r\n' + BODY[3000:])

    servers.append(RawServer(handler))
    try:
        assert run_stream(servers[0].url(), options(retries=5)) == BODY
        assert len(servers) == 2, [s.requests for s in servers]
        assert b"bytes=3000-" in servers[1].requests[0].lower()
    finally:
        stop.set()
        for s in servers:
            s.close()


def test_duplicate_content_length_is_an_error(stop: threading.Event) -> None:
    def handler(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")

    with serving(handler, stop) as server:
        with Http(JobContext(), options()) as http, pytest.raises(TransferError):
            http.fetch_small(server.url("/img.nspawn"))
