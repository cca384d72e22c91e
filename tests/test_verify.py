"""importd.verify: checksum lists and OpenPGP signatures, with a real gpg.

Two throw-away keys (ed25519 and rsa3072) are generated per module in a
temporary GNUPGHOME; their public keys are exported into binary keyrings:
``ring_all`` holds both, ``ring_ed`` only the ed25519 one (so a signature by
the RSA key is a signature by a key not in the keyring).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from imagepool.errors import InvalidArgs
from importd import verify
from importd.context import Canceled, JobContext, TransferError
from importd.verify import (
    DEFAULT_KEYRINGS,
    VerifyMode,
    check_checksum,
    checksum_urls,
    find_checksum,
    find_keyring,
    parse_verify_mode,
    signature_urls,
    verify_cleartext,
    verify_signature,
)

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg not installed")

ED_UID = "Importd Test Ed25519 <ed25519@example.invalid>"
RSA_UID = "Importd Test RSA <rsa3072@example.invalid>"
FAILED = "DOWNLOAD INVALID: Signature verification failed."


class Log:
    """A JobContext whose log lines are collected."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ctx = JobContext(log=self.lines.append)


def _gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    env = dict(os.environ, GNUPGHOME=str(home))
    return subprocess.run(
        ["gpg", "--batch", "--quiet", "--no-tty", *args],
        input=input, env=env, check=True, capture_output=True, timeout=60,
    ).stdout


class Keys:
    def __init__(self, base: Path) -> None:
        self.home = base / "signer"
        self.home.mkdir(mode=0o700)
        _gpg(self.home, "--passphrase", "", "--quick-gen-key", ED_UID, "ed25519", "sign", "never")
        _gpg(self.home, "--passphrase", "", "--quick-gen-key", RSA_UID, "rsa3072", "sign", "never")
        self.ring_all = base / "ring-all.gpg"
        self.ring_all.write_bytes(_gpg(self.home, "--export"))
        self.ring_ed = base / "ring-ed.gpg"
        self.ring_ed.write_bytes(_gpg(self.home, "--export", "ed25519@example.invalid"))

    def detach(self, data: bytes, who: str, armor: bool = False) -> bytes:
        return _gpg(self.home, "--local-user", who, *(["--armor"] if armor else []),
                    "--detach-sign", "--output", "-", input=data)

    def clearsign(self, data: bytes, who: str) -> bytes:
        return _gpg(self.home, "--local-user", who, "--clearsign", "--output", "-", input=data)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                       capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def keys():
    base = Path(tempfile.mkdtemp(prefix="test-verify-keys-"))
    k = Keys(base)
    try:
        yield k
    finally:
        k.close()
        shutil.rmtree(base, ignore_errors=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


IMAGE = b"not really a disk image\n" * 100
OTHER = b"another file\n"
SUMS = (f"{_sha(IMAGE)} *image.raw.xz\n{_sha(OTHER)}  image.nspawn\n").encode()


def _our_gpghomes() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(verify.GPGHOME_PREFIX)}


def _gpg_processes_using(prefix: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if prefix in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path, monkeypatch):
    """Every test: no temp gpg home or gpg process of ours is left behind, HOME
    is not changed, and no ~/.gnupg is created (HOME points at an empty dir)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    before = _our_gpghomes()
    yield
    assert _our_gpghomes() == before
    assert _gpg_processes_using(os.path.join(tempfile.gettempdir(), verify.GPGHOME_PREFIX)) == []
    assert os.environ["HOME"] == str(home)
    assert not (home / ".gnupg").exists()
    assert list(home.iterdir()) == []


# --------------------------------------------------------------------------
# modes and URLs


def test_parse_verify_mode():
    assert parse_verify_mode("") is VerifyMode.SIGNATURE
    assert parse_verify_mode("no") is VerifyMode.NO
    assert parse_verify_mode("checksum") is VerifyMode.CHECKSUM
    assert parse_verify_mode("signature") is VerifyMode.SIGNATURE
    assert VerifyMode.CHECKSUM == "checksum"
    with pytest.raises(InvalidArgs) as e:
        parse_verify_mode("gpg")
    assert str(e.value) == "Unknown verification mode gpg"
    with pytest.raises(InvalidArgs):
        parse_verify_mode("Signature")


@pytest.mark.parametrize("url, per_file, per_dir", [
    ("https://h.example/d/image.raw.xz", "https://h.example/d/image.raw.xz.sha256",
     "https://h.example/d/SHA256SUMS"),
    ("https://h.example/d/image.raw.xz?x=1#frag", "https://h.example/d/image.raw.xz.sha256",
     "https://h.example/d/SHA256SUMS"),
    ("https://h.example/a/b/image.tar.gz/", "https://h.example/a/b/image.tar.gz.sha256",
     "https://h.example/a/b/SHA256SUMS"),
    ("http://h.example:8080/image.raw", "http://h.example:8080/image.raw.sha256",
     "http://h.example:8080/SHA256SUMS"),
    ("https://h.example/", "https://h.example/SHA256SUMS", "https://h.example/SHA256SUMS"),
])
def test_checksum_urls(url, per_file, per_dir):
    assert checksum_urls(url) == (per_file, per_dir)


def test_signature_urls():
    assert signature_urls("https://h.example/d/SHA256SUMS") == [
        "https://h.example/d/SHA256SUMS.gpg", "https://h.example/d/SHA256SUMS.asc"]


def test_invalid_url():
    with pytest.raises(InvalidArgs):
        checksum_urls("no-scheme-here")


# --------------------------------------------------------------------------
# checksum lists

H = "0123456789abcdef" * 4
H2 = "fedcba9876543210" * 4


@pytest.mark.parametrize("text, name, expected", [
    (f"{H} *image.raw\n", "image.raw", H),                       # binary marker
    (f"{H}  image.raw\n", "image.raw", H),                       # text mode, two spaces
    (f"{H}  image.raw", "image.raw", H),                         # no final newline
    (f"{H2}  a\r\n{H} *image.raw\r\n", "image.raw", H),          # CRLF
    (f"{H.upper()}  image.raw\n", "image.raw", H),               # upper-case hex -> lower
    (f"{H}  my image.raw\n", "my image.raw", H),                 # spaces in the name
    (f"{H}  image.raw \n", "image.raw", None),                   # trailing space is part of the name
    (f"{H}  image.raw.xz\n{H2}  image.raw\n", "image.raw", H2),  # other files ignored
    (f"{H}  image.raw.xz\n", "image.raw", None),                 # prefix is no match
    (f"{H}  dir/image.raw\n", "image.raw", None),                # path is no match
    (f"{H} image.raw\n", "image.raw", None),                     # one space (not in v252)
    (f"{H[:-1]}  image.raw\n", "image.raw", None),               # short hex
    (f"{H[:-1]}g  image.raw\n", "image.raw", None),              # not hex
    (f"# {H}  image.raw\n\n", "image.raw", None),                # comment, blank
    (f"# comment\n\n{H}  image.raw\n", "image.raw", H),
    ("", "image.raw", None),
])
def test_find_checksum(text, name, expected):
    assert find_checksum(text, name) == expected


def test_find_checksum_cleartext_armor():
    signed = (
        "junk before\n"
        f"{H2}  image.raw\n"                        # outside the signed part: ignored
        "-----BEGIN PGP SIGNED MESSAGE-----\n"
        "Hash: SHA512\n"
        "\n"
        f"{H}  image.raw\n"
        "- -dash escaped line\n"
        "-----BEGIN PGP SIGNATURE-----\n"
        "\n"
        "iHUEARYKAB0WIQ...\n"
        f"{H2}  other\n"
        "-----END PGP SIGNATURE-----\n"
    )
    assert find_checksum(signed, "image.raw") == H
    assert find_checksum(signed, "other") is None
    assert find_checksum(signed.replace("\n", "\r\n"), "image.raw") == H


def test_check_checksum_valid():
    log = Log()
    check_checksum(log.ctx, "https://h.example/d/image.raw.xz", "image.raw.xz", _sha(IMAGE), SUMS.decode())
    check_checksum(log.ctx, "https://h.example/d/image.nspawn", "image.nspawn",
                   _sha(OTHER).upper(), SUMS.decode())
    assert log.lines == ["SHA256 checksum of https://h.example/d/image.raw.xz is valid.",
                         "SHA256 checksum of https://h.example/d/image.nspawn is valid."]


@pytest.mark.parametrize("filename, digest, text, message", [
    ("image.raw.xz", _sha(b"tampered"), SUMS.decode(),
     "DOWNLOAD INVALID: Checksum of image.raw.xz file did not check out, file has been tampered with."),
    ("missing.raw", _sha(IMAGE), SUMS.decode(),
     "DOWNLOAD INVALID: Checksum of missing.raw file did not check out, file has been tampered with."),
    ("image.raw.xz", _sha(IMAGE), "", "Checksum is empty, cannot verify."),
    ("SHA256SUMS", _sha(IMAGE), SUMS.decode(), "Cannot verify checksum/signature files via themselves."),
    ("x.sha256", _sha(IMAGE), SUMS.decode(), "Cannot verify checksum/signature files via themselves."),
    ("SHA256SUMS.gpg", _sha(IMAGE), SUMS.decode(), "Cannot verify checksum/signature files via themselves."),
    ("", _sha(IMAGE), SUMS.decode(), "Cannot verify checksum, could not determine server-side file name."),
])
def test_check_checksum_invalid(filename, digest, text, message):
    log = Log()
    with pytest.raises(TransferError) as e:
        check_checksum(log.ctx, f"https://h.example/d/{filename}", filename, digest, text)
    assert str(e.value) == message
    assert log.lines == []


def test_check_checksum_canceled():
    log = Log()
    log.ctx.cancel.set()
    with pytest.raises(Canceled):
        check_checksum(log.ctx, "https://h.example/image.raw.xz", "image.raw.xz", _sha(IMAGE), SUMS.decode())


# --------------------------------------------------------------------------
# keyrings


def test_find_keyring_order(tmp_path):
    a, b, c = (tmp_path / n for n in ("etc.gpg", "vendor.gpg", "vendor.pgp"))
    paths = [str(a), str(b), str(c)]
    assert find_keyring(paths) is None
    c.write_bytes(b"")
    assert find_keyring(paths) == str(c)
    b.write_bytes(b"")
    assert find_keyring(paths) == str(b)
    a.write_bytes(b"")
    assert find_keyring(paths) == str(a)


def test_default_keyrings():
    """The admin's keyring first, by systemd 262's name (.pgp) and 252's
    (.gpg), then the vendor's."""
    assert DEFAULT_KEYRINGS == ("/etc/systemd/import-pubring.pgp",
                                "/etc/systemd/import-pubring.gpg",
                                "/usr/lib/systemd/import-pubring.pgp",
                                "/usr/lib/systemd/import-pubring.gpg")


VENDOR = "/usr/lib/systemd/import-pubring.gpg"


@pytest.mark.skipif(not os.path.exists(VENDOR), reason="no vendor import keyring on this machine")
def test_vendor_keyring_loads(tmp_path):
    if not any(os.path.exists(f"/etc/systemd/import-pubring.{ext}") for ext in ("pgp", "gpg")):
        assert find_keyring() == VENDOR
    home = tmp_path / "gh"
    home.mkdir(mode=0o700)
    r = subprocess.run(
        ["gpg", "--no-options", "--no-default-keyring", "--batch", f"--homedir={home}",
         f"--keyring={VENDOR}", "--with-colons", "--list-keys"],
        capture_output=True, timeout=30, env=dict(os.environ, HOME=str(home)))
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith(b"pub:") for ln in r.stdout.splitlines())


@pytest.mark.skipif(not os.path.exists(VENDOR), reason="no vendor import keyring on this machine")
def test_vendor_keyring_rejects_our_key(keys):
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, keys.detach(SUMS, "ed25519@example.invalid"), keyring=VENDOR)
    assert str(e.value) == FAILED


# --------------------------------------------------------------------------
# detached signatures


@pytest.mark.parametrize("who", ["ed25519@example.invalid", "rsa3072@example.invalid"])
@pytest.mark.parametrize("armor", [False, True])
def test_detached_valid(keys, who, armor):
    sig = keys.detach(SUMS, who, armor=armor)
    assert sig.startswith(b"-----BEGIN PGP SIGNATURE-----") == armor
    before = (keys.ring_all.read_bytes(), keys.ring_all.stat().st_mtime_ns, sorted(os.listdir(keys.ring_all.parent)))
    log = Log()
    verify_signature(log.ctx, SUMS, sig, keyring=str(keys.ring_all))
    assert log.lines[-1] == "Signature verification succeeded."
    assert any("Good signature" in ln for ln in log.lines)  # gpg's stderr is passed on
    # The keyring is only read: same bytes, same mtime, no lock or backup files.
    after = (keys.ring_all.read_bytes(), keys.ring_all.stat().st_mtime_ns, sorted(os.listdir(keys.ring_all.parent)))
    assert after == before


def test_detached_tampered_data(keys):
    sig = keys.detach(SUMS, "ed25519@example.invalid")
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS.replace(b"image.nspawn", b"image.nspawm"), sig, keyring=str(keys.ring_all))
    assert str(e.value) == FAILED
    assert "Signature verification succeeded." not in log.lines


@pytest.mark.parametrize("armor", [False, True])
def test_detached_key_not_in_keyring(keys, armor):
    sig = keys.detach(SUMS, "rsa3072@example.invalid", armor=armor)
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, sig, keyring=str(keys.ring_ed))
    assert str(e.value) == FAILED
    # the same signature is fine with the full keyring
    verify_signature(Log().ctx, SUMS, sig, keyring=str(keys.ring_all))


def test_missing_keyring(keys, tmp_path):
    sig = keys.detach(SUMS, "ed25519@example.invalid")
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, sig, keyring=str(tmp_path / "nonexistent.gpg"))
    assert str(e.value) == FAILED
    assert any("No keyring found" in ln for ln in log.lines)


def test_no_keyring_at_all(keys, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "DEFAULT_KEYRINGS", (str(tmp_path / "a.gpg"),))
    monkeypatch.setattr(verify, "find_keyring", lambda paths=None: None)
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, keys.detach(SUMS, "ed25519@example.invalid"))
    assert str(e.value) == FAILED
    assert any("No keyring found" in ln for ln in log.lines)


@pytest.mark.parametrize("sig", [
    b"this is not a signature\n",
    bytes(range(256)),
    b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n",
])
def test_garbage_signature(keys, sig):
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, sig, keyring=str(keys.ring_all))
    assert str(e.value) == FAILED


def test_empty_signature(keys):
    with pytest.raises(TransferError) as e:
        verify_signature(Log().ctx, SUMS, b"", keyring=str(keys.ring_all))
    assert str(e.value) == "Signature is empty, cannot verify."


def test_cleartext_signature_is_no_detached_signature(keys):
    # A cleartext-signed file passed as a "detached signature" must not pass.
    signed = keys.clearsign(SUMS, "ed25519@example.invalid")
    with pytest.raises(TransferError):
        verify_signature(Log().ctx, b"anything", signed, keyring=str(keys.ring_all))


# --------------------------------------------------------------------------
# cleartext-signed per-file .sha256


def test_cleartext_valid(keys):
    text = f"{_sha(IMAGE)}  image.raw.xz\n".encode()
    signed = keys.clearsign(text, "rsa3072@example.invalid")
    log = Log()
    payload = verify_cleartext(log.ctx, signed, keyring=str(keys.ring_all))
    assert log.lines[-1] == "Signature verification succeeded."
    assert find_checksum(payload, "image.raw.xz") == _sha(IMAGE)
    check_checksum(log.ctx, "https://h.example/image.raw.xz", "image.raw.xz", _sha(IMAGE), payload)
    # and in checksum mode the armored file can be used as is
    assert find_checksum(signed.decode(), "image.raw.xz") == _sha(IMAGE)


def test_cleartext_tampered(keys):
    text = f"{_sha(IMAGE)}  image.raw.xz\n".encode()
    signed = keys.clearsign(text, "ed25519@example.invalid")
    bad = signed.replace(_sha(IMAGE).encode(), _sha(b"evil").encode())
    assert bad != signed
    log = Log()
    with pytest.raises(TransferError) as e:
        verify_cleartext(log.ctx, bad, keyring=str(keys.ring_all))
    assert str(e.value) == FAILED
    assert "Signature verification succeeded." not in log.lines


def test_cleartext_wrong_key(keys):
    signed = keys.clearsign(b"x\n", "rsa3072@example.invalid")
    with pytest.raises(TransferError):
        verify_cleartext(Log().ctx, signed, keyring=str(keys.ring_ed))


def test_cleartext_unsigned_text(keys):
    with pytest.raises(TransferError):
        verify_cleartext(Log().ctx, f"{_sha(IMAGE)}  image.raw.xz\n".encode(), keyring=str(keys.ring_all))


def test_cleartext_injected_text_is_not_returned(keys):
    text = f"{_sha(IMAGE)}  image.raw.xz\n".encode()
    signed = keys.clearsign(text, "ed25519@example.invalid")
    evil = f"{_sha(b'evil')}  evil.raw\n".encode()
    try:
        payload = verify_cleartext(Log().ctx, evil + signed + evil, keyring=str(keys.ring_all))
    except TransferError:
        return  # rejecting it outright is fine too
    assert find_checksum(payload, "evil.raw") is None
    assert find_checksum(payload, "image.raw.xz") == _sha(IMAGE)


# --------------------------------------------------------------------------
# timeout and cancellation (a fake gpg that hangs)


@pytest.fixture
def hanging_gpg(tmp_path, monkeypatch):
    """A fake gpg that never finishes and starts a child of its own; both
    must be gone afterwards (the kill takes gpg's whole process group)."""
    fake = tmp_path / "fake-gpg"
    pidfile = tmp_path / "pids"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nsleep 30 &\necho $! >> {pidfile}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(verify, "GPG_CANDIDATES", (str(fake),))
    yield
    pids = pidfile.read_text().split()
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    for pid in pids:
        while True:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z" or time.monotonic() > deadline:
                assert state == "Z", f"process {pid} of the fake gpg survived"
                break
            time.sleep(0.05)


def test_timeout_kills_gpg(keys, hanging_gpg):
    log = Log()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        verify_signature(log.ctx, SUMS, b"sig", keyring=str(keys.ring_all), timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert str(e.value) == FAILED
    assert any("did not finish" in ln for ln in log.lines)


def test_cancel_kills_gpg(keys, hanging_gpg):
    log = Log()
    timer = threading.Timer(0.3, log.ctx.cancel.set)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Canceled):
            verify_cleartext(log.ctx, b"text", keyring=str(keys.ring_all), timeout=30)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 5
