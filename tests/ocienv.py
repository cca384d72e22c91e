"""Real components for the OCI pull tests: a throw-away CA, Debian's
docker-registry on loopback with TLS (and, for one test, token
authentication from a small token server of ours), a TLS proxy in front of
it that injects faults (drops, corrupts or hides a blob), images built with
umoci and pushed with skopeo, and systemd 262's systemd-pull (chrooted into
the sid root) as the oracle.

Everything runs in the test session's private mount namespace; the CA goes
into the bundle both sides read by a bind mount over
/etc/ssl/certs/ca-certificates.crt (the host's file is never changed).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

SID_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "roots" / "sid"
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TOOLS = ("docker-registry", "skopeo", "umoci", "openssl")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    return subprocess.run(argv, **kw)


# --- TLS ------------------------------------------------------------------------------


class CA:
    """A CA and a server certificate for 127.0.0.1/localhost; BUNDLE holds
    the system CAs and this one, bind-mounted over the system bundle."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / "ca.crt", directory / "ca.key"
        self.server_cert, self.server_key = directory / "srv.crt", directory / "srv.key"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run(["openssl", "req", "-x509", *ec, "-days", "30", "-subj", "/CN=machined-py test CA",
             "-keyout", str(self.key), "-out", str(self.cert), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        csr = directory / "srv.csr"
        run(["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(self.server_key), "-out", str(csr)])
        ext = directory / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                       "extendedKeyUsage=serverAuth\n")
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
             "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(self.server_cert)])
        self.bundle = directory / "bundle.crt"
        self.bundle.write_bytes(Path(BUNDLE).read_bytes() + self.cert.read_bytes())
        self.mounted: list[str] = []

    def install(self, *targets: str) -> None:
        for target in (BUNDLE, *targets):
            if os.path.exists(target):
                run(["mount", "--bind", str(self.bundle), target])
                self.mounted.append(target)

    def uninstall(self) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", target], capture_output=True)
        self.mounted.clear()

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


# --- the registry -----------------------------------------------------------------------


class Registry:
    """docker-registry serving STORAGE over TLS on loopback; with TOKEN
    (realm, service, issuer, root certificate) it wants bearer tokens."""

    def __init__(self, workdir: Path, ca: CA, storage: Path, token: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.ca = ca
        self.log = workdir / f"registry-{self.port}.log"
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}",
                     "tls": {"certificate": str(ca.server_cert), "key": str(ca.server_key)}},
        }
        if token:
            config["auth"] = {"token": token}
        self.config = workdir / f"registry-{self.port}.yml"
        self.config.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ca.client_context(),
                                                   timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def manifest(self, repo: str, tag: str) -> dict:
        """The manifest as the registry serves it (skopeo compresses uncompressed layers when pushing)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ca.client_context(), timeout=10)
        conn.request("GET", f"/v2/{repo}/manifests/{tag}",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        data = conn.getresponse().read()
        conn.close()
        return json.loads(data)

    def blob(self, repo: str, digest: str) -> bytes:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ca.client_context(), timeout=10)
        conn.request("GET", f"/v2/{repo}/blobs/{digest}")
        data = conn.getresponse().read()
        conn.close()
        return data

    def blob_gets(self) -> dict[str, int]:
        """How often each blob was fetched (GET with status 200/206), from the access log."""
        counts: dict[str, int] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            if '"GET /v2/' in line and "/blobs/sha256:" in line and ('" 200 ' in line or '" 206 ' in line):
                digest = line.split("/blobs/", 1)[1].split(" ", 1)[0]
                counts[digest] = counts.get(digest, 0) + 1
        return counts


def push(layout: Path, tag: str, registry_host: str, repo: str, *, all_: bool = False,
         fmt: str | None = None) -> None:
    argv = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
    if all_:
        argv.append("--all")
    if fmt:
        argv += ["--format", fmt]
    run([*argv, f"oci:{layout}:{tag}", f"docker://{registry_host}/{repo}"])


# --- images ---------------------------------------------------------------------------------


class Layout:
    """An OCI layout built with umoci: layers from changes to a bundle's
    rootfs (umoci repack, which writes .wh. whiteouts and lists only what
    changed), crafted layers (umoci raw add-layer), and edits of the JSON
    (zstd recompression, indexes) for what umoci cannot make."""

    def __init__(self, path: Path) -> None:
        self.path = path
        run(["umoci", "init", "--layout", str(path)])

    def new(self, tag: str) -> Path:
        run(["umoci", "new", "--image", f"{self.path}:{tag}"])
        bundle = self.path.parent / f"bundle-{tag}"
        shutil.rmtree(bundle, ignore_errors=True)
        run(["umoci", "unpack", "--image", f"{self.path}:{tag}", str(bundle)])
        return bundle

    def repack(self, tag: str, bundle: Path) -> None:
        run(["umoci", "repack", "--refresh-bundle", "--image", f"{self.path}:{tag}", str(bundle)])

    def add_layer(self, tag: str, tarball: Path, new_tag: str | None = None) -> None:
        argv = ["umoci", "raw", "add-layer", "--image", f"{self.path}:{tag}"]
        if new_tag:
            argv += ["--tag", new_tag]
        run([*argv, str(tarball)])

    def config(self, tag: str, *args: str, new_tag: str | None = None) -> None:
        run(["umoci", "config", "--image", f"{self.path}:{tag}", *(["--tag", new_tag] if new_tag else []), *args])

    def copy_tag(self, tag: str, new_tag: str) -> None:
        self.set_tag(new_tag, self.tagged(tag))

    # JSON edits
    def blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs/sha256" / digest).write_bytes(data)
        return "sha256:" + digest

    def read(self, digest: str) -> bytes:
        return (self.path / "blobs/sha256" / digest.split(":", 1)[1]).read_bytes()

    def index(self) -> dict:
        return json.loads((self.path / "index.json").read_text())

    def tagged(self, tag: str) -> dict:
        for m in self.index()["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return m
        raise KeyError(tag)

    def manifest(self, tag: str) -> dict:
        return json.loads(self.read(self.tagged(tag)["digest"]))

    def set_tag(self, tag: str, desc: dict) -> None:
        idx = self.index()
        idx["manifests"] = [m for m in idx["manifests"]
                            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
        desc = {k: v for k, v in desc.items() if k != "annotations"}
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        idx["manifests"].append(desc)
        (self.path / "index.json").write_text(json.dumps(idx))

    def put_manifest(self, tag: str, manifest: dict) -> None:
        data = json.dumps(manifest).encode()
        self.set_tag(tag, {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": self.blob(data),
                           "size": len(data)})

    def recompress(self, tag: str, n: int, new_tag: str, kind: str = "zstd") -> None:
        """Layer N of TAG as zstd (or uncompressed: KIND "none") under NEW_TAG."""
        man = self.manifest(tag)
        layer = man["layers"][n]
        raw = run(["gzip", "-dc"], input=self.read(layer["digest"])).stdout
        data = run(["zstd", "-q", "-c"], input=raw).stdout if kind == "zstd" else raw
        media = "application/vnd.oci.image.layer.v1.tar" + ("+zstd" if kind == "zstd" else "")
        man["layers"][n] = {"mediaType": media, "digest": self.blob(data), "size": len(data)}
        self.put_manifest(new_tag, man)

    def make_index(self, tag: str, new_tag: str, platforms: list[str]) -> None:
        """An OCI index under NEW_TAG with TAG's image for each PLATFORM
        ("arch" or "arch/variant"; amd64 is TAG itself, the others get a
        config saying their architecture)."""
        base = self.manifest(tag)
        entries = []
        for plat in platforms:
            arch, _, variant = plat.partition("/")
            man = dict(base)
            if arch != "amd64":
                cfg = json.loads(self.read(base["config"]["digest"]))
                cfg["architecture"] = arch
                data = json.dumps(cfg).encode()
                man["config"] = {"mediaType": base["config"]["mediaType"], "digest": self.blob(data),
                                 "size": len(data)}
            data = json.dumps(man).encode()
            p = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": self.blob(data),
                            "size": len(data), "platform": p})
        data = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": entries}).encode()
        self.set_tag(new_tag, {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": self.blob(data),
                               "size": len(data)})

    def layer_entries(self, digest: str, data: bytes | None = None) -> set[str]:
        """The member names of a layer blob (normalized), from GNU tar's listing."""
        data = self.read(digest) if data is None else data
        if data[:4] == b"\x28\xb5\x2f\xfd":
            data = run(["zstd", "-dc"], input=data).stdout
        elif data[:2] == b"\x1f\x8b":
            data = run(["gzip", "-dc"], input=data).stdout
        names = run(["tar", "-t", "--quoting-style=literal"], input=data).stdout.decode().splitlines()
        return {n.removeprefix("./").rstrip("/") for n in names if n.removeprefix("./").rstrip("/")}


def tarball(path: Path, root: Path, members: list[str]) -> Path:
    """An uncompressed layer of exactly MEMBERS of ROOT (no recursion), root-owned."""
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--no-recursion", "-C", str(root), "-cf",
         str(path), *members])
    return path


# --- systemd 262's systemd-pull, the oracle -------------------------------------------------


class SidPull:
    """``chroot SID_ROOT /usr/lib/systemd/systemd-pull oci`` into POOL, bound
    on the root's /var/lib/machines (binds undone by close())."""

    def __init__(self, pool: Path, ca: CA) -> None:
        self.root = SID_ROOT.resolve()
        self.pool = pool
        self.mounts: list[Path] = []
        r = self.root
        for src, dst, opts in ((str(pool), r / "var/lib/machines", ["--bind"]), ("/proc", r / "proc", ["--bind"]),
                               ("/dev", r / "dev", ["--rbind"]), ("tmpfs", r / "tmp", ["-t", "tmpfs"]),
                               (str(ca.bundle), r / "etc/ssl/certs/ca-certificates.crt", ["--bind"])):
            run(["mount", *opts, src, str(dst)])
            self.mounts.append(dst)

    @staticmethod
    def available() -> bool:
        return os.access(SID_ROOT / "usr/lib/systemd/systemd-pull", os.X_OK)

    def pull(self, ref: str, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["chroot", str(self.root), "/usr/lib/systemd/systemd-pull", "oci", *args, ref, name],
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_LEVEL": "info"},
                              capture_output=True, text=True, timeout=300)

    def close(self) -> None:
        for dst in reversed(self.mounts):
            subprocess.run(["umount", "-R", str(dst)], capture_output=True)
        self.mounts.clear()


def sid_importctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """sid's importctl (262) on the host through the root's own loader."""
    r = SID_ROOT.resolve()
    argv = [str(r / "usr/lib64/ld-linux-x86-64.so.2"), "--library-path",
            f"{r}/usr/lib/x86_64-linux-gnu/systemd:{r}/usr/lib/x86_64-linux-gnu", str(r / "usr/bin/importctl"),
            *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


# --- a token server and a fault proxy ----------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 JWTs the registry accepts (x5c = our signing
    certificate, which the registry has as rootcertbundle) to clients that
    send USER:PASSWORD as Basic credentials.  EXPIRED_FIRST: the first
    token issued is expired already (the registry refuses it)."""

    def __init__(self, workdir: Path, ca: CA, user: str, password: str) -> None:
        self.key, self.cert = workdir / "token.key", workdir / "token.crt"
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=token",
             "-keyout", str(self.key), "-out", str(self.cert)])
        der = run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"]).stdout
        self.x5c = base64.b64encode(der).decode()
        self.user, self.password = user, password
        self.expired_first = False
        self.issued = 0
        self.refused = 0
        self.port = free_port()
        self.ca = ca
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                expected = "Basic " + base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                body = json.dumps({"token": server.token(q.get("service", [""])[0], q.get("scope", [""])[0]),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _Server(("127.0.0.1", self.port), Handler)
        self.httpd.socket = ca.server_context().wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def registry_config(self) -> dict[str, str]:
        return {"realm": f"https://127.0.0.1:{self.port}/token", "service": "test-registry",
                "issuer": "test-issuer", "rootcertbundle": str(self.cert)}

    def token(self, service: str, scope: str) -> str:
        self.issued += 1
        now = int(time.time())
        exp = now - 3600 if self.expired_first and self.issued == 1 else now + 300
        access = []
        parts = scope.split(":")
        if len(parts) == 3 and parts[0] == "repository":
            access.append({"type": "repository", "name": parts[1], "actions": parts[2].split(",")})
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": "test-issuer", "sub": self.user, "aud": service, "exp": exp, "nbf": now - 7200,
                  "iat": now - 7200, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode()).stdout
        return f"{signing_input}.{_b64(sig)}"

    def start(self) -> TokenServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultProxy:
    """A TLS reverse proxy to a registry that can break blob downloads:
    ``drop[digest] = N`` cuts the first response for that blob after N
    bytes (the client must resume), ``corrupt`` serves the blob with one byte
    changed, ``missing`` answers 404, ``delay`` seconds per 64 KiB."""

    def __init__(self, ca: CA, upstream_port: int) -> None:
        self.port = free_port()
        self.drop: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.missing: set[str] = set()
        self.delay = 0.0
        self.requests: list[tuple[str, str, int]] = []  # (path, Range, status)
        proxy = self
        upstream_ctx = ca.client_context()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                digest = self.path.split("/blobs/", 1)[1] if "/blobs/" in self.path else ""
                if digest in proxy.missing:
                    proxy.requests.append((self.path, self.headers.get("Range", ""), 404))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPSConnection("127.0.0.1", upstream_port, context=upstream_ctx, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                proxy.requests.append((self.path, self.headers.get("Range", ""), resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                cut = proxy.drop.pop(digest, None) if digest else None
                sent = 0
                first = True
                while chunk := resp.read(65536):
                    if digest in proxy.corrupt and first:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    first = False
                    if cut is not None and sent + len(chunk) > cut:
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        conn.close()
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if proxy.delay:
                        time.sleep(proxy.delay)
                conn.close()

        self.httpd = _Server(("127.0.0.1", self.port), Handler)
        self.httpd.socket = ca.server_context().wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
