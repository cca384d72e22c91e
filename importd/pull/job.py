"""pull-tar and pull-raw: download, verify, unpack, cache, install.

The flow of one pull, as systemd-pull does it:

1. check the local name; fetch the checksum list (and its signature) first
   when verifying, so a pull that can't be verified fails before the big
   download;
2. download the image with If-None-Match for the ETags of cached copies; the
   body streams through a pipe into the unpacker (tar child or sparse raw
   writer) while it is hashed, so download, hashing, decompression and
   writing overlap;
3. verify the checksum of what was downloaded; fetch the side files
   (.nspawn settings; for raw images .roothash, .roothash.p7s, .verity);
4. install the download as the hidden cache ``.tar-<URL>.<ETag>`` /
   ``.raw-<URL>.<ETag>.raw`` and make the local image from it (a snapshot or
   reflink), or move it into place when the download is not kept.

Everything is built under ``.#`` names and renamed into place at the end;
every failure or cancel removes what was written.
"""

from __future__ import annotations

import logging

from imagepool.image import Pool
from imagepool.locks import image_name_lock
from importd import verify
from importd.context import JobContext, TransferError, exiting_on_failure
from importd.http import Http, HttpError
from importd.pull.common import (
    SIDECARS_RAW,
    SIDECARS_TAR,
    PullRequest,
    last_component,
    local_name_from_url,
    sibling_url,
    strip_suffixes,
)
from importd.pull.download import download
from importd.pull.install import install_cache, make_local

log = logging.getLogger(__name__)


def pull(ctx: JobContext, req: PullRequest, pool: Pool) -> None:
    name = req.local or local_name_from_url(req.url, req.kind)
    req.local = name
    if not req.force and pool.exists(name):
        raise TransferError(f"Image '{name}' already exists.")
    ctx.log(f"Pulling '{req.url}', saving as '{name}'.")
    ctx.log(f"Operating on image directory '{pool.path}'.")
    with exiting_on_failure(ctx):
        _pull(ctx, req, pool, name)
    ctx.progress(1.0)
    ctx.log("Operation completed successfully.")
    ctx.log("Exiting.")


def _pull(ctx: JobContext, req: PullRequest, pool: Pool, name: str) -> None:
    weight = 0.85 if req.kind == "tar" else 0.80
    with Http(ctx, req.http) as http, image_name_lock(name):
        sums = None
        if req.verify != verify.VerifyMode.NO:
            sums, sums_url, per_file = _fetch_checksums(http, req.url)
            if req.verify == verify.VerifyMode.SIGNATURE:
                if per_file:
                    # A per-file list carries its signature inline (cleartext-signed).
                    sums = verify.verify_cleartext(ctx, sums, req.keyring).encode("utf-8", "surrogateescape")
                else:
                    verify.verify_signature(ctx, sums, _fetch_signature(http, sums_url), req.keyring)
        # No progress before the first bytes of the image (as systemd-pull:
        # a pull that fails to start reports none).
        cache, info = download(ctx, http, req, pool, lambda f: ctx.progress(0.02 + f * (weight - 0.05)))
        try:
            if not info.not_modified and sums is not None:
                ctx.progress(weight)
                verify.check_checksum(ctx, req.url, last_component(req.url), info.sha256,
                                      sums.decode("utf-8", "replace"))
            sidecars = _fetch_sidecars(http, req, sums)
            ctx.progress(0.90)
            if req.keep_download:
                install_cache(ctx, req, pool, cache, info, sidecars)
            ctx.progress(0.95)
            make_local(ctx, req, pool, cache, sidecars, info)
        finally:
            if not req.keep_download or cache.temporary:
                cache.remove()


def _fetch_checksums(http: Http, url: str) -> tuple[bytes, str, bool]:
    """The checksum list as systemd-pull 252 finds it: the per-file
    "<image>.sha256" first and, if that is not there (404), the directory's
    SHA256SUMS.  Returns (list, its URL, whether it is the per-file one)."""
    per_file_url, per_dir_url = verify.checksum_urls(url)
    if per_file_url != per_dir_url:
        got = http.fetch_small(per_file_url)
        if got is not None:
            return got[0], per_file_url, True
        log.debug("Got 404 for %s, now trying to get SHA256SUMS instead.", per_file_url)
    got = http.fetch_small(per_dir_url)
    if got is None:
        raise TransferError("Failed to retrieve SHA256 checksum, cannot verify. (Try --verify=no?)")
    return got[0], per_dir_url, False


def _fetch_signature(http: Http, sums_url: str) -> bytes:
    for signature_url in verify.signature_urls(sums_url):
        got = http.fetch_small(signature_url)
        if got is not None:
            return got[0]
    raise TransferError("Failed to retrieve signature file, cannot verify. (Try --verify=no?)")


def _fetch_sidecars(http: Http, req: PullRequest, sums: bytes | None) -> dict[str, bytes]:
    """The optional side files; missing ones are logged and skipped."""
    found: dict[str, bytes] = {}
    stem = strip_suffixes(last_component(req.url), req.kind)
    for suffix, what in (SIDECARS_TAR if req.kind == "tar" else SIDECARS_RAW):
        if suffix == ".nspawn" and not req.settings:
            continue
        url = sibling_url(req.url, stem + suffix)
        try:
            got = http.fetch_small(url)
        except TransferError as e:  # any failure: as systemd, go on without it
            if not isinstance(e, HttpError):
                http.ctx.log(str(e))
            got = None
        if got is None:
            http.ctx.log(f"{what} could not be retrieved, proceeding without.")
            continue
        data, info = got
        if sums is not None:
            verify.check_checksum(http.ctx, url, stem + suffix, info.sha256, sums.decode("utf-8", "replace"))
        found[suffix] = data
    return found


