"""Registry authentication: credentials from the files skopeo, podman and
Docker keep (and Docker's credential helpers), and the answers to a
registry's WWW-Authenticate challenge (anonymous or with credentials:
Bearer tokens from the realm the registry names, or Basic).

Credential files, first match wins: ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``/run/containers/UID/auth.json``,
``~/.config/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``.  In each: ``credHelpers`` for the registry, then
``auths`` (the most specific key: ``host/namespace/repo`` before ``host``;
Docker's ``https://index.docker.io/v1/`` for Docker Hub), then ``credsStore``.
A helper is ``docker-credential-NAME get`` (the server on stdin, JSON out),
run through imagepool.spawn with a timeout and a small environment.

Tokens are kept until shortly before they expire; a token the registry
refuses is fetched anew (the registry client does that at most twice per
request), so an expired token costs one round trip, and a registry that
keeps refusing ends the pull instead of looping.  Credentials go over HTTPS only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pwd
import re
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from imagepool import spawn
from importd.context import JobContext, TransferError
from importd.http import Http, HttpError
from importd.oci.reference import Reference

HELPER_TIMEOUT = 30.0
TOKEN_MAX = 64 << 10
DEFAULT_TOKEN_LIFETIME = 60  # seconds, when the token server does not say (distribution's token spec)
_DOCKER_HUB = ("registry-1.docker.io", "index.docker.io", "docker.io")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str
    source: str  # where they came from, for messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme in lower case, parameters) of a WWW-Authenticate value."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.environ.get("HOME", "/root")


def auth_files(env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ) if env is None else env
    home = env.get("HOME") or _home()
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers/auth.json"))
    files.append(f"/run/containers/{os.getuid()}/auth.json")
    files.append(os.path.join(home, ".config/containers/auth.json"))
    files.append(os.path.join(env.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json"))
    return files


def _key_host(key: str) -> tuple[str, str]:
    """(host, path) of an auths key: "https://host/v1/" and "host/ns" alike."""
    if "://" in key:
        parts = urlsplit(key)
        return parts.netloc, parts.path.strip("/") if parts.path.strip("/") not in ("v1", "v2") else ""
    host, _, path = key.partition("/")
    return host, path.strip("/")


def _same_registry(a: str, b: str) -> bool:
    return a == b or (a in _DOCKER_HUB and b in _DOCKER_HUB)


class CredentialStore:
    def __init__(self, ctx: JobContext, env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.env = dict(os.environ) if env is None else env

    def lookup(self, ref: Reference) -> Credentials | None:
        for path in auth_files(self.env):
            doc = self._load(path)
            if doc is None:
                continue
            found = self._from_doc(doc, path, ref)
            if found is not None:
                return found
        return None

    def _load(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.ctx.log(f"Ignoring credentials file {path}: {e}")
            return None
        return doc if isinstance(doc, dict) else None

    def _from_doc(self, doc: dict[str, Any], path: str, ref: Reference) -> Credentials | None:
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if isinstance(helper, str) and _same_registry(_key_host(key)[0], ref.registry):
                    return self._helper(helper, ref.registry)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            best: tuple[int, dict[str, Any]] | None = None
            for key, entry in auths.items():
                host, sub = _key_host(key)
                if not isinstance(entry, dict) or not _same_registry(host, ref.registry):
                    continue
                if sub and not (ref.image == sub or ref.image.startswith(sub + "/")):
                    continue
                if best is None or len(sub) > best[0]:
                    best = (len(sub), entry)
            if best is not None:
                creds = self._decode(best[1], path)
                if creds is not None:
                    return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return self._helper(store, ref.registry, missing_ok=True)
        return None

    @staticmethod
    def _decode(entry: dict[str, Any], path: str) -> Credentials | None:
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, colon, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise TransferError(f"Malformed credentials for the registry in {path}.") from None
            if colon:
                return Credentials(user, secret, path)
        name, password = entry.get("username"), entry.get("password")
        if isinstance(name, str) and isinstance(password, str) and name:
            return Credentials(name, password, path)
        return None

    def _helper(self, name: str, registry: str, missing_ok: bool = False) -> Credentials | None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise TransferError(f"Bad credential helper name '{name}'.")
        binary = shutil.which(f"docker-credential-{name}", path=self.env.get("PATH") or os.defpath)
        if binary is None:
            if missing_ok:
                return None
            raise TransferError(f"Credential helper docker-credential-{name} not found.")
        env = {k: v for k, v in self.env.items() if k in ("PATH", "HOME", "XDG_RUNTIME_DIR", "DOCKER_CONFIG")}
        try:
            result = spawn.run([binary, "get"], input=registry.encode(), capture=True, timeout=HELPER_TIMEOUT,
                               check=self.ctx.check, env=env, name=f"docker-credential-{name}",
                               stderr_log=lambda line: None)
        except spawn.Timeout:
            raise TransferError(f"Credential helper docker-credential-{name} did not answer in time.") from None
        except OSError as e:
            raise TransferError(f"Failed to run docker-credential-{name}: {e.strerror}") from None
        if result.returncode != 0:
            if missing_ok or b"credentials not found" in result.stdout.lower():
                return None
            raise TransferError(f"Credential helper docker-credential-{name} failed: {result.message}")
        try:
            doc = json.loads(result.stdout[:1 << 16])
            user, secret = doc["Username"], doc["Secret"]
        except (ValueError, KeyError, TypeError):
            raise TransferError(f"Credential helper docker-credential-{name} answered nonsense.") from None
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TransferError(f"Credential helper docker-credential-{name} answered nonsense.")
        return Credentials(user, secret, f"docker-credential-{name}")


@dataclass
class _Token:
    value: str
    expires: float


class Authenticator:
    """What to send to one registry for one repository, shared by the
    threads of a pull."""

    def __init__(self, ref: Reference, store: CredentialStore) -> None:
        self.ref = ref
        self.store = store
        self._lock = threading.Lock()
        self._header: str | None = None
        self._token: _Token | None = None
        self._credentials: Credentials | None = None
        self._looked_up = False

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is not None and time.monotonic() >= self._token.expires:
                self._header = None  # renewed on the registry's next challenge
            return {"Authorization": self._header} if self._header else {}

    def _creds(self) -> Credentials | None:
        if not self._looked_up:
            self._credentials = self.store.lookup(self.ref)
            self._looked_up = True
        return self._credentials

    def challenged(self, http: Http, challenge: str | None, sent: dict[str, str]) -> bool:
        """A 401 with CHALLENGE came back for a request sent with SENT:
        whether to try again (with what headers() now says)."""
        if not challenge:
            return False
        scheme, params = parse_challenge(challenge)
        with self._lock:
            if self._header and sent.get("Authorization") != self._header:
                return True  # another thread renewed it meanwhile
            if scheme == "basic":
                creds = self._creds()
                if creds is None or sent.get("Authorization") == creds.basic():
                    return False
                self._header = creds.basic()
                return True
            if scheme != "bearer":
                raise TransferError(f"Authentication mechanism '{scheme}' not recognized, cannot authenticate.")
            self._token = self._fetch_token(http, params)
            self._header = f"Bearer {self._token.value}"
            return True

    def _fetch_token(self, http: Http, params: dict[str, str]) -> _Token:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise TransferError("Authentication realm is not an URL, don't know how to proceed.")
        if parts.scheme == "http" and self.ref.protocol == "https":
            raise TransferError(f"Refusing to fetch a token over plain HTTP from {realm}.")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        query.setdefault("scope", f"repository:{self.ref.image}:pull")
        url = realm + ("&" if parts.query else "?") + urlencode(query)
        headers = {}
        creds = self._creds()
        if creds is not None:
            headers["Authorization"] = creds.basic()
        try:
            got = http.fetch_small(url, TOKEN_MAX, headers=headers)
        except HttpError as e:
            raise TransferError(f"Failed to retrieve bearer token: HTTP status {e.status}"
                                + (" (credentials refused)" if e.status in (401, 403) and creds else "")) from None
        if got is None:
            raise TransferError("Failed to retrieve bearer token. (Wrong URL?)")
        try:
            doc = json.loads(got[0])
        except ValueError:
            raise TransferError("Bearer token is not JSON.") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise TransferError("Bearer token lacks 'token' field.")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return _Token(token, time.monotonic() + max(lifetime - 5, 1))
