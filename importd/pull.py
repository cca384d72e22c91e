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

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from imagepool import btrfs, fsutil, ops
from imagepool.errors import InvalidArgs
from imagepool.image import Pool
from imagepool.locks import image_name_lock
from imagepool.names import image_name_is_valid
from importd import compress, qcow2, sparse, verify
from importd.context import Canceled, JobContext, TransferError, exiting_on_failure
from importd.http import Download, Http, HttpError, HttpOptions, format_bytes, valid_etag

log = logging.getLogger(__name__)
from importd.local import DEFAULT_MAX_IMAGE_SIZE, convert_qcow2_in_place, size_limit, unpack_tar, write_image

SIDECARS_RAW = (
    (".nspawn", "Settings file"),
    (".roothash", "Root hash file"),
    (".roothash.p7s", "Root hash signature file"),
    (".verity", "Verity integrity file"),
)
SIDECARS_TAR = ((".nspawn", "Settings file"),)

TAR_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst", ".tgz", ".txz", ".tbz2", ".tzst", ".tar")
RAW_SUFFIXES = (".xz", ".gz", ".bz2", ".zst", ".raw", ".qcow2", ".img", ".bin")
_ESCAPE = set('/.#"\'\\')
NAME_MAX_CACHE = 240


@dataclass
class PullRequest:
    kind: str  # "tar" or "raw"
    url: str
    local: str  # "": derived from the URL
    verify: verify.VerifyMode
    force: bool = False
    read_only: bool = False
    keep_download: bool = True
    settings: bool = True
    max_size: int = DEFAULT_MAX_IMAGE_SIZE
    http: HttpOptions | None = None
    sync: bool = True  # on disk before it is installed, as systemd-pull's --sync=yes


# --- URLs and names ----------------------------------------------------------------


def url_is_valid(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in url)


def last_component(url: str) -> str:
    path = urlsplit(url).path.rstrip("/")
    return path.rsplit("/", 1)[-1]


def strip_suffixes(name: str, kind: str) -> str:
    if kind == "tar":
        for suffix in TAR_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
        return name
    changed = True
    while changed:
        changed = False
        for suffix in RAW_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def sibling_url(url: str, filename: str) -> str:
    parts = urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/" + filename
    return parts._replace(path=path, query="", fragment="").geturl()


def escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPE or not ch.isprintable() or ord(ch) > 127:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and len(text) >= i + 4:
            try:
                raw.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        raw += text[i].encode()
        i += 1
    return raw.decode("utf-8", "replace")


def _url_part(url: str) -> str:
    escaped = escape(url)
    if len(escaped) >= NAME_MAX_CACHE - 80:
        escaped = hashlib.sha256(url.encode()).hexdigest()[:16]
    return escaped


def cache_base(pool: Pool, kind: str, url: str, etag: str | None) -> str:
    """The cache entry's path without the ".raw" suffix of raw images."""
    name = f".{kind}-{_url_part(url)}"
    if etag:
        name += "." + escape(etag)
    return os.path.join(pool.path, name)


def cached_etags(pool: Pool, kind: str, url: str) -> list[str]:
    prefix = f".{kind}-{_url_part(url)}."
    etags = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(pool.path):
            if not entry.startswith(prefix):
                continue
            rest = entry[len(prefix):]
            if kind == "raw":
                if not rest.endswith(".raw"):
                    continue
                rest = rest[:-4]
            elif any(rest.endswith(e) for e, _ in SIDECARS_RAW):
                continue
            etag = unescape(rest)
            if valid_etag(etag):
                etags.append(etag)
    return etags


# --- the pull ----------------------------------------------------------------------


def local_name_from_url(url: str, kind: str) -> str:
    """The image name systemd-pull derives when none is given."""
    name = strip_suffixes(last_component(url), kind)
    if not name or not image_name_is_valid(name):
        raise TransferError(f"Cannot use '{name}' as local image name, refusing.")
    return name


def pull(ctx: JobContext, req: PullRequest, pool: Pool) -> None:
    name = req.local or local_name_from_url(req.url, req.kind)
    req.local = name
    ctx.log(f"Pulling '{req.url}', saving as '{name}'.")
    if not req.force and pool.exists(name):
        raise TransferError(f"Image '{name}' already exists.")
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
                    sums = verify.verify_cleartext(ctx, sums).encode("utf-8", "surrogateescape")
                else:
                    verify.verify_signature(ctx, sums, _fetch_signature(http, sums_url))
        ctx.progress(0.02)
        cache, info = _download(ctx, http, req, pool, lambda f: ctx.progress(0.02 + f * (weight - 0.05)))
        try:
            if not info.not_modified and sums is not None:
                ctx.progress(weight)
                verify.check_checksum(ctx, req.url, last_component(req.url), info.sha256,
                                      sums.decode("utf-8", "replace"))
            sidecars = _fetch_sidecars(http, req, sums)
            ctx.progress(0.90)
            if req.keep_download:
                _install_cache(ctx, req, pool, cache, info, sidecars)
            ctx.progress(0.95)
            _make_local(ctx, req, pool, cache, sidecars, info)
        finally:
            if not req.keep_download or cache.temporary:
                cache.remove()


@dataclass
class _Cache:
    """Where the downloaded image is: a temporary or the existing cache entry."""

    path: str
    final: str
    temporary: bool

    def remove(self) -> None:
        if self.temporary:
            ops.remove_path(self.path)


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


def _download(ctx: JobContext, http: Http, req: PullRequest, pool: Pool,
              progress: Callable[[float], None]) -> tuple[_Cache, Download]:
    etags = cached_etags(pool, req.kind, req.url)
    limit = size_limit(pool, req.max_size)
    if req.kind == "tar":
        tmp = os.path.join(pool.path, f".#tar{os.urandom(8).hex()}")
    else:
        tmp = os.path.join(pool.path, f".#raw{os.urandom(8).hex()}")
    try:
        info = _stream_into(ctx, http, req, tmp, etags, limit, progress)
    except BaseException as e:
        ops.remove_path(tmp)
        ops.remove_path(tmp + ".qcow2")
        if isinstance(e, HttpError):
            ctx.log(str(e))
            raise TransferError("Failed to retrieve image file.") from None
        raise
    if info.not_modified:
        ops.remove_path(tmp)
        ctx.log(f"Image already downloaded. Skipping download. ({info.etag})")
        ctx.log(f"Download of {req.url} complete.")
        base = cache_base(pool, req.kind, req.url, info.etag)
        path = base + (".raw" if req.kind == "raw" else "")
        if not os.path.lexists(path):
            raise TransferError(f"Cached image {path} vanished.")
        return _Cache(path, path, False), info
    ctx.log(f"Download of {req.url} complete.")
    base = cache_base(pool, req.kind, req.url, info.etag)
    return _Cache(tmp, base + (".raw" if req.kind == "raw" else ""), True), info


class _DirectRaw:
    """Uncompressed raw data (or an uncompressed qcow2 file) needs no decoding:
    the download thread writes it straight to the image file, skipping the
    pipe and the hand-over to the other thread."""

    def __init__(self, tmp: str, head: bytes, writeback: bool) -> None:
        self.out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.qcow = qcow2.is_qcow2(head[:4])
        self.writer = sparse.SparseWriter(self.out, writeback=writeback)
        self.offset = 0
        # (a qcow2 file is cloned from or read once it is complete: written
        # back early, it needs no flush then)
        self.writeback = writeback
        self.written_back = 0

    def write(self, chunk: bytes) -> None:
        if self.qcow:
            view = memoryview(chunk)
            while view:
                n = os.pwrite(self.out, view, self.offset)
                self.offset += n
                view = view[n:]
            if self.writeback and self.offset - self.written_back >= sparse.WRITEBACK_EVERY:
                with contextlib.suppress(OSError):
                    fsutil.start_writeback(self.out, self.written_back, self.offset - self.written_back)
                self.written_back = self.offset
        else:
            self.writer.write(chunk)

    def finish(self, ctx: JobContext, tmp: str, limit: int) -> int:
        try:
            if not self.qcow:
                return self.writer.finish()
            return convert_qcow2_in_place(ctx, self.out, tmp, limit)
        finally:
            self.close()

    def close(self) -> None:
        if self.out >= 0:
            os.close(self.out)
            self.out = -1


def _stream_into(ctx: JobContext, http: Http, req: PullRequest, tmp: str, etags: list[str], limit: int,
                 progress: Callable[[float], None]) -> Download:
    """Download in a helper thread; data that needs decoding goes through a
    pipe to this thread, which unpacks it, so both overlap."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    started = threading.Event()
    result: dict[str, object] = {}
    direct: list[_DirectRaw] = []
    mode: list[str] = []

    def sink(chunk: bytes) -> None:
        if not mode:
            head = bytes(chunk[:6])
            if req.kind == "raw" and len(head) == 6 and compress.detect(head) == compress.Compression.NONE:
                direct.append(_DirectRaw(tmp, head, req.sync))
                mode.append("direct")
            else:
                mode.append("pipe")
            started.set()
        if direct:
            direct[0].write(chunk)
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(write_fd, view):]

    def downloader() -> None:
        try:
            # Hashing costs ~1 CPU-second per GB: only when it will be checked.
            result["info"] = http.stream(req.url, sink, etags=etags, max_size=limit, progress=progress,
                                         hash=req.verify != verify.VerifyMode.NO)
        except BaseException as e:  # handed over to the unpacking side
            result["error"] = e
        finally:
            os.close(write_fd)
            started.set()

    thread = threading.Thread(target=downloader, name="download", daemon=True)
    thread.start()
    try:
        while not started.wait(0.25):
            ctx.check()
        downloaded = "error" not in result and not (isinstance(result.get("info"), Download)
                                                    and result["info"].not_modified)  # type: ignore[union-attr]
        if direct:
            while thread.is_alive():
                thread.join(0.25)
                ctx.check()
            if "error" not in result:
                ctx.log(f"Acquired {format_bytes(direct[0].finish(ctx, tmp, limit))}.")
        elif downloaded:
            acquired = _unpack(ctx, req, read_fd, tmp, limit)
            if "error" not in result:
                ctx.log(f"Acquired {format_bytes(acquired)}.")
    except BaseException:
        http._interrupt()
        os.close(read_fd)
        read_fd = -1
        thread.join()
        error = result.get("error")
        if isinstance(error, (HttpError, TransferError, Canceled)):
            raise error from None
        raise
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        thread.join()
        if direct:
            direct[0].close()
    error = result.get("error")
    if isinstance(error, BaseException):
        raise error
    info = result["info"]
    assert isinstance(info, Download)
    return info


def _unpack(ctx: JobContext, req: PullRequest, read_fd: int, tmp: str, limit: int) -> int:
    """Consume the downloaded stream: returns the size of the unpacked data.
    Progress comes from the download, not from here."""
    quiet = ctx.derive(lambda f: None)
    if req.kind == "tar":
        ops.make_tree_dir(tmp)
        return unpack_tar(quiet, read_fd, tmp, limit)
    return write_image(quiet, read_fd, tmp, limit, writeback=req.sync)


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


def _set_source_xattrs(path: str, url: str, etag: str | None) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, "user.source_url", url.encode(), follow_symlinks=False)
        if etag:
            os.setxattr(path, "user.source_etag", etag.encode(), follow_symlinks=False)


def _install_cache(ctx: JobContext, req: PullRequest, pool: Pool, cache: _Cache, info: Download,
                   sidecars: dict[str, bytes]) -> None:
    """Keep the download as the hidden, read-only cache entry."""
    base = cache.final[:-4] if req.kind == "raw" else cache.final
    if cache.temporary:
        _stamp(cache.path, req, info)
        ops.install_image(cache.path, cache.final, force=True, read_only=True, sync=req.sync)
        cache.path, cache.temporary = cache.final, False
    for suffix, data in sidecars.items():
        _write_file(base + suffix, data, 0o444, replace=True)


def _stamp(path: str, req: PullRequest, info: Download) -> None:
    """Where a download came from (xattrs) and its Last-Modified (mtime)."""
    _set_source_xattrs(path, req.url, info.etag)
    if info.last_modified:
        with contextlib.suppress(OSError):
            os.utime(path, (info.last_modified, info.last_modified))


def _make_local(ctx: JobContext, req: PullRequest, pool: Pool, cache: _Cache, sidecars: dict[str, bytes],
                info: Download) -> None:
    name = req.local
    final = os.path.join(pool.path, name + (".raw" if req.kind == "raw" else ""))
    if not req.force and pool.exists(name):
        raise TransferError(f"Image '{name}' already exists.")
    if cache.temporary:
        # Not keeping the download: the download itself becomes the image.
        _stamp(cache.path, req, info)
        ops.install_image(cache.path, final, force=req.force, read_only=req.read_only, sync=req.sync)
        cache.temporary = False
    else:
        tmp = ops.temp_name(pool.path, name + (".raw" if req.kind == "raw" else ""))
        try:
            if req.kind == "raw":
                ops.copy_file_sparse(cache.path, tmp)
                os.chmod(tmp, 0o644)
            else:
                ops.make_tree_copy(cache.path, tmp, False)
                _writable_top(tmp)
            ctx.check()  # a cancel during the copy: no image
            ops.install_image(tmp, final, force=req.force, read_only=req.read_only, sync=req.sync)
        except BaseException:
            ops.remove_path(tmp)
            raise
    ctx.log(f"Created new local image '{name}'.")
    for suffix, data in sidecars.items():
        path = os.path.join(pool.path, name + suffix)
        if os.path.lexists(path) and not req.force:
            ctx.log(f"Settings file {path} already exists, not replacing." if suffix == ".nspawn"
                    else f"{path} already exists, not replacing.")
            continue
        _write_file(path, data, 0o664 if suffix == ".nspawn" else 0o644, replace=True)
        if suffix == ".nspawn":
            ctx.log(f"Created new settings file {path}.")


def _writable_top(path: str) -> None:
    """A snapshot of the read-only cache is read-only too: make it writable."""
    if btrfs.is_subvolume(path):
        if btrfs.get_read_only(path):
            btrfs.set_read_only(path, False)
    elif fsutil.get_immutable(path):
        fsutil.set_immutable(path, False)


def _write_file(path: str, data: bytes, mode: int, replace: bool) -> None:
    tmp = ops.temp_name(os.path.dirname(path), os.path.basename(path))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, path)
        else:
            ops.rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_request(url: str, local: str, verify_mode: str, check_name: Callable[[str], None]) -> verify.VerifyMode:
    """Argument checks of PullTar/PullRaw, in systemd's order."""
    if not url_is_valid(url):
        raise InvalidArgs(f"URL {url} is invalid")
    if local:
        check_name(local)
    return verify.parse_verify_mode(verify_mode)
