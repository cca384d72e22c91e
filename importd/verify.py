"""Verification of pulled downloads, as systemd-pull (v252) does it.

Three modes: ``no`` (nothing), ``checksum`` (the SHA-256 of every downloaded
file must be listed in the checksum list) and ``signature`` (the checksum list
must in addition carry a valid OpenPGP signature by a key in the import
keyring).

The checksum list is ``<image URL>.sha256`` (per file, SUSE style, may be a
cleartext-signed message), falling back to ``SHA256SUMS`` in the same
directory (per directory, with a detached ``SHA256SUMS.gpg``; we also accept
the armored ``SHA256SUMS.asc``).

Signatures are checked by running gpg directly (``imagepool.spawn``), with the
options systemd-pull uses, a throw-away home directory and the import keyring.
Everything here blocks; it is meant to run in a transfer's worker thread and
honours the job's cancellation.

Deliberate differences from systemd-pull 252 (all more lenient in parsing,
stricter in trusting):
- checksum lines may end in CRLF, may lack the final newline, and may carry
  upper-case hex; systemd does an exact, case-sensitive byte search for
  ``<lower hex> *<file>\\n`` / ``<lower hex>  <file>\\n``;
- in a cleartext-signed list only the signed part counts (systemd searches
  the whole file, armor and anything around it included);
- besides gpg's exit status we require a ``VALIDSIG`` status line for every
  signature gpg saw and no ``BADSIG``/``ERRSIG``/``REVKEYSIG``/``ERROR``;
- gpg is killed after a timeout or when the job is canceled;
- with no keyring at all we log which files were looked for before failing
  (systemd passes the vendor path anyway and lets gpg fail); the error the
  client sees is the same "DOWNLOAD INVALID: Signature verification failed.".
"""

from __future__ import annotations

import enum
import os
import shutil
import tempfile
from collections.abc import Sequence

from imagepool import spawn
from imagepool.errors import InvalidArgs

from .context import JobContext, TransferError

# ---------------------------------------------------------------------------
# Modes


class VerifyMode(enum.StrEnum):
    NO = "no"
    CHECKSUM = "checksum"
    SIGNATURE = "signature"


def parse_verify_mode(s: str) -> VerifyMode:
    """The Verify argument of PullTar/PullRaw: empty means signature."""
    if not s:
        return VerifyMode.SIGNATURE
    try:
        return VerifyMode(s)
    except ValueError:
        raise InvalidArgs(f"Unknown verification mode {s}") from None


# ---------------------------------------------------------------------------
# URLs (import-util.c semantics: query and fragment are cut off and not
# re-added, trailing slashes are ignored)


def _path_start(url: str) -> int:
    """Index where the path begins, after "<scheme>:" + slashes + host."""
    colon = url.find(":")
    if colon <= 0:
        raise InvalidArgs(f"Invalid URL: {url}")
    i = colon + 1
    while i < len(url) and url[i] == "/":
        i += 1
    j = i
    while j < len(url) and url[j] not in "/?#":
        j += 1
    if j == i:
        raise InvalidArgs(f"Invalid URL: {url}")
    return j


def _path_end(url: str, start: int) -> int:
    end = start
    while end < len(url) and url[end] not in "?#":
        end += 1
    while end > start and url[end - 1] == "/":
        end -= 1
    return end


def url_last_component(url: str) -> str | None:
    """The last non-empty path component (the server-side file name), or None
    if the URL has no path."""
    start = _path_start(url)
    end = _path_end(url, start)
    p = end
    while p > start and url[p - 1] != "/":
        p -= 1
    return url[p:end] or None


def url_change_last_component(url: str, new: str) -> str:
    """Replace the last path component by ``new`` (query/fragment dropped)."""
    start = _path_start(url)
    end = _path_end(url, start)
    while end > start and url[end - 1] != "/":
        end -= 1
    while end > start and url[end - 1] == "/":
        end -= 1
    return url[:end] + "/" + new


CHECKSUM_LIST = "SHA256SUMS"
SIGNATURE_FILES = ("SHA256SUMS.gpg", "SHA256SUMS.asc")


def is_checksum_file(filename: str | None) -> bool:
    return filename is not None and (filename == CHECKSUM_LIST or filename.endswith(".sha256"))


def is_signature_file(filename: str | None) -> bool:
    return bool(filename) and (
        filename is not None and (filename in SIGNATURE_FILES or filename.endswith((".sha256.gpg", ".sha256.asc")))
    )


def checksum_urls(image_url: str) -> tuple[str, str]:
    """(per-file ``<file>.sha256``, per-directory ``SHA256SUMS``) to try in this
    order.  Without a file name in the URL both are the ``SHA256SUMS`` URL."""
    per_dir = url_change_last_component(image_url, CHECKSUM_LIST)
    fn = url_last_component(image_url)
    if not fn:
        return per_dir, per_dir
    return url_change_last_component(image_url, fn + ".sha256"), per_dir


def signature_urls(sums_url: str) -> list[str]:
    """Detached signatures of a per-directory checksum list, in the order to
    try: ``SHA256SUMS.gpg`` (systemd), ``SHA256SUMS.asc`` (our extension)."""
    return [url_change_last_component(sums_url, n) for n in SIGNATURE_FILES]


# ---------------------------------------------------------------------------
# Checksum lists

_CLEARSIGN_BEGIN = "-----BEGIN PGP SIGNED MESSAGE-----"
_SIGNATURE_BEGIN = "-----BEGIN PGP SIGNATURE-----"
_HEX = frozenset("0123456789abcdefABCDEF")


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _strip_cleartext_armor(lines: list[str]) -> list[str]:
    """The signed body of a cleartext-signed message (dash-escaping undone);
    text that is not such a message is returned unchanged."""
    try:
        begin = next(i for i, ln in enumerate(lines) if ln.rstrip() == _CLEARSIGN_BEGIN)
    except StopIteration:
        return lines
    i = begin + 1
    while i < len(lines) and lines[i].strip():  # armor headers ("Hash: ...")
        i += 1
    body: list[str] = []
    for ln in lines[i + 1 :]:
        if ln.rstrip() == _SIGNATURE_BEGIN:
            break
        body.append(ln[2:] if ln.startswith("- ") else ln)
    return body


def checksum_entries(sums_text: str, filename: str) -> list[str]:
    """All checksums (lower-case hex) the list gives for ``filename``."""
    found = []
    for ln in _strip_cleartext_armor(_lines(sums_text)):
        # "<64 hex><space><' ' text | '*' binary><file name>" (sha256sum format)
        if len(ln) < 67 or ln[64] != " " or ln[65] not in " *":
            continue
        digest = ln[:64]
        if not _HEX.issuperset(digest):
            continue
        if ln[66:] == filename:
            found.append(digest.lower())
    return found


def find_checksum(sums_text: str, filename: str) -> str | None:
    """The SHA-256 (lower-case hex) listed for ``filename``, or None."""
    entries = checksum_entries(sums_text, filename)
    return entries[0] if entries else None


def check_checksum(ctx: JobContext, url: str, filename: str, sha256_hex: str, sums_text: str) -> None:
    """Check a downloaded file's SHA-256 against a checksum list, like
    systemd-pull's verify_one(): a missing entry fails just like a wrong one."""
    ctx.check()
    if not sums_text:
        raise TransferError("Checksum is empty, cannot verify.")
    if not filename or "/" in filename or filename in (".", ".."):
        raise TransferError("Cannot verify checksum, could not determine server-side file name.")
    if is_checksum_file(filename) or is_signature_file(filename):
        raise TransferError("Cannot verify checksum/signature files via themselves.")
    if sha256_hex.lower() not in checksum_entries(sums_text, filename):
        raise TransferError(
            f"DOWNLOAD INVALID: Checksum of {filename} file did not check out, "
            "file has been tampered with."
        )
    ctx.log(f"SHA256 checksum of {url} is valid.")


# ---------------------------------------------------------------------------
# Signatures

# The first that exists: the admin's (systemd 262's name, then 252's), then
# the vendor's.
DEFAULT_KEYRINGS: tuple[str, ...] = (
    "/etc/systemd/import-pubring.pgp",
    "/etc/systemd/import-pubring.gpg",
    "/usr/lib/systemd/import-pubring.pgp",
    "/usr/lib/systemd/import-pubring.gpg",
)

GPG_CANDIDATES: tuple[str, ...] = ("gpg2", "gpg")  # systemd tries gpg2 first
GPGHOME_PREFIX = "importd-gpghome-"

SIGNATURE_FAILED = "DOWNLOAD INVALID: Signature verification failed."

_GPG_OPTIONS = (
    "--no-options",
    "--no-default-keyring",
    "--no-auto-key-locate",
    "--no-auto-check-trustdb",
    "--batch",
    "--trust-model=always",
)
_BAD_STATUS = frozenset({"BADSIG", "ERRSIG", "REVKEYSIG", "ERROR", "FAILURE"})


def find_keyring(keyring_paths: Sequence[str] = DEFAULT_KEYRINGS) -> str | None:
    """The first keyring of ``keyring_paths`` that exists, or None."""
    for path in keyring_paths:
        if os.path.exists(path):
            return path
    return None


def _find_gpg() -> str | None:
    for name in GPG_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_gpg(
    ctx: JobContext, args: list[str], stdin: bytes, keyring: str | None, timeout: float, home: str
) -> bool:
    """Run gpg with the fixed options, ``--homedir=home``, the keyring and
    ``args``; feed ``stdin``.  Returns True if gpg exited 0 and its status
    lines report only valid signatures (and at least one).  gpg's stderr goes
    to the job's log as it comes, as systemd-pull's stderr would."""
    gpg = _find_gpg()
    if gpg is None:
        ctx.log("Failed to execute gpg: No such file or directory")
        return False
    if keyring is None or not os.path.exists(keyring):
        looked = keyring if keyring is not None else ", ".join(DEFAULT_KEYRINGS)
        ctx.log(f"No keyring found ({looked}), cannot verify signature.")
        return False

    argv = [gpg, *_GPG_OPTIONS, f"--homedir={home}", f"--keyring={keyring}", "--status-fd", "1", *args]
    env = dict(os.environ)
    env.update(HOME=home, GNUPGHOME=home)
    env.pop("GPG_AGENT_INFO", None)

    try:
        with spawn.Child(argv, stdin=spawn.PIPE, stdout=spawn.PIPE, stderr_log=ctx.log, cwd=home, env=env,
                         name="gpg", timeout=timeout) as child:
            out = child.communicate(stdin, ctx.check)
            returncode = child.returncode
    except spawn.Timeout:
        ctx.log(f"gpg did not finish within {timeout:g}s, killed it.")
        return False

    status = [
        ln[len("[GNUPG:] ") :].split(" ", 1)[0]
        for ln in out.decode("utf-8", "replace").splitlines()
        if ln.startswith("[GNUPG:] ")
    ]
    n_valid = status.count("VALIDSIG")
    return (
        returncode == 0
        and n_valid >= 1
        and n_valid >= status.count("NEWSIG")
        and not _BAD_STATUS.intersection(status)
    )


def _default_keyring(keyring: str | None) -> str | None:
    return keyring if keyring is not None else find_keyring()


def verify_signature(
    ctx: JobContext,
    data: bytes,
    signature: bytes,
    keyring: str | None = None,
    timeout: float = 60,
) -> None:
    """Verify a detached signature (binary or ASCII-armored) over ``data``
    with the import keyring (``find_keyring()`` unless given)."""
    ctx.check()
    if not signature:
        raise TransferError("Signature is empty, cannot verify.")
    home = tempfile.mkdtemp(prefix=GPGHOME_PREFIX)  # mode 0700
    try:
        sig_path = os.path.join(home, "signature")
        fd = os.open(sig_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signature)
        ok = _run_gpg(ctx, ["--verify", sig_path, "-"], data, _default_keyring(keyring), timeout, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if not ok:
        raise TransferError(SIGNATURE_FAILED)
    ctx.log("Signature verification succeeded.")


def verify_cleartext(
    ctx: JobContext,
    signed_text: bytes,
    keyring: str | None = None,
    timeout: float = 60,
) -> str:
    """Verify a cleartext-signed (inline) message, e.g. a signed per-file
    ``.sha256``, and return the signed text as gpg extracted it -- parse that,
    not the input, so that nothing outside the signature can sneak in."""
    ctx.check()
    home = tempfile.mkdtemp(prefix=GPGHOME_PREFIX)
    try:
        out_path = os.path.join(home, "payload")
        ok = _run_gpg(
            ctx, ["--output", out_path, "--verify", "-"], signed_text, _default_keyring(keyring), timeout, home
        )
        payload = b""
        if ok:
            try:
                with open(out_path, "rb") as f:
                    payload = f.read()
            except FileNotFoundError:
                ok = False
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if not ok:
        raise TransferError(SIGNATURE_FAILED)
    ctx.log("Signature verification succeeded.")
    return payload.decode("utf-8", "surrogateescape")
