"""The signed demo image that ``make run`` serves on loopback.

Made once under its DIRECTORY (``.run/demo``) and kept there:

- ``gnupg/``: the demo's own signing key, in a throw-away GNUPGHOME;
- ``import-pubring.gpg``: its public key, the keyring the run's importd
  verifies signatures with (``importd --keyring``), so nothing of /etc is used;
- ``site/``: ``demo.tar.xz`` (a root file system of busybox-static, with an
  os-release), ``SHA256SUMS`` and its detached signature ``SHA256SUMS.gpg``.

``serve()`` serves ``site/`` over HTTP on 127.0.0.1 from a thread, on
DEFAULT_PORT or, when that is taken, on a port the kernel picks.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

IMAGE = "demo.tar.xz"
DEFAULT_PORT = 8099
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
KEY_USER_ID = "machined-py demo image <demo@machined-py.invalid>"

OS_RELEASE = """\
PRETTY_NAME="machined-py demo (busybox)"
NAME="machined-py demo"
ID=machined-py-demo
VERSION_ID=1
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass


class Demo:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keyring = directory / "import-pubring.gpg"
        self.site = directory / "site"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- the files ---------------------------------------------------------

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.keyring, self.site / IMAGE, self.site / "SHA256SUMS",
                                          self.site / "SHA256SUMS.gpg"))

    def prepare(self) -> Demo:
        """Make the key, the image and its signed checksums unless a
        previous run made them all."""
        if self.complete():
            return self
        new = self.directory.with_name(f".{self.directory.name}.new")
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        home = new / "gnupg"
        home.mkdir(parents=True, mode=0o700)
        (new / "site").mkdir()
        (new / "site" / IMAGE).write_bytes(root_tar())
        sums = new / "site" / "SHA256SUMS"
        sums.write_text(f"{hashlib.sha256((new / 'site' / IMAGE).read_bytes()).hexdigest()} *{IMAGE}\n")
        env = dict(os.environ, GNUPGHOME=str(home))
        gpg = ["gpg", "--batch", "--quiet", "--no-tty"]
        try:
            subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", KEY_USER_ID, "ed25519", "sign", "never"],
                           env=env, check=True, capture_output=True)
            with open(new / self.keyring.name, "wb") as ring:
                subprocess.run([*gpg, "--export"], env=env, stdout=ring, check=True)
            subprocess.run([*gpg, "--detach-sign", "--output", str(sums) + ".gpg", str(sums)],
                           env=env, check=True, capture_output=True)
        finally:
            # gpg started an agent for the secret key: it must not outlive this.
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True)
        new.rename(self.directory)
        return self

    # --- the server --------------------------------------------------------

    def serve(self, port: int = DEFAULT_PORT) -> Demo:
        handler = functools.partial(_QuietHandler, directory=str(self.site))
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or port == 0:
                raise
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-http", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "not serving"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{IMAGE}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def root_tar(busybox: str = BUSYBOX) -> bytes:
    """A small root file system as an xz-compressed tar: busybox and a link
    for each of its applets in /usr/bin, the merged-/usr links, an
    os-release, root's passwd and group entries."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    now = int(time.time())
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, kind: bytes = tarfile.DIRTYPE, mode: int = 0o755, data: bytes = b"",
                link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, now, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("dev", "etc", "proc", "run", "sys", "usr", "usr/bin", "usr/lib", "var", "var/tmp"):
            add(d)
        add("root", mode=0o700)
        add("tmp", mode=0o1777)
        for name, target in (("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"),
                             ("etc/os-release", "../usr/lib/os-release")):
            add(name, tarfile.SYMTYPE, 0o777, link=target)
        add("usr/bin/busybox", tarfile.REGTYPE, 0o755, Path(busybox).read_bytes())
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"usr/bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        for name, text in (("usr/lib/os-release", OS_RELEASE), ("etc/hostname", "demo\n"),
                           ("etc/machine-id", ""), ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n")):
            add(name, tarfile.REGTYPE, 0o644, text.encode())
    return out.getvalue()
