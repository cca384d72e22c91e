"""The registry API v2 client of a pull (the distribution spec's pull
side): manifests by tag or digest, and blobs, each verified against its
digest while it streams.

HTTP is importd.http's: the same timeouts, low-speed watchdog, cancellation
and resumption of a dropped body with Range/If-Range (registries serve
blobs with a strong ETag and byte ranges).  Every thread of a pull has an
Http of its own; they share the Authenticator.  A 401 is answered through
the challenge, at most twice per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from importd.context import JobContext, TransferError
from importd.http import Download, Http, HttpError, HttpOptions
from importd.oci import manifest as mf
from importd.oci.auth import Authenticator, CredentialStore
from importd.oci.reference import Reference

Sink = Callable[[bytes], None]
_REAUTH = 2


def check_digest(data: bytes, digest: str, what: str) -> None:
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise TransferError(f"Digest of {what} is {got}, expected {digest}, refusing.")


class RegistrySource:
    """Where a pull from a registry gets its manifests and blobs."""

    def __init__(self, ctx: JobContext, ref: Reference, options: HttpOptions | None,
                 env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.ref = ref
        self.options = options
        self.auth = Authenticator(ref, CredentialStore(ctx, env))
        self.http = Http(ctx, options)

    def close(self) -> None:
        self.http.close()

    def describe(self) -> str:
        return f"{self.ref.registry}/{self.ref.image}:{self.ref.tag}"

    def _authorized(self, http: Http, request: Callable[[dict[str, str]], Download | None], url: str
                    ) -> Download | None:
        for attempt in range(_REAUTH + 1):
            sent = self.auth.headers()
            try:
                return request(sent)
            except HttpError as e:
                if e.status != 401 or attempt == _REAUTH or not self.auth.challenged(http, e.challenge, sent):
                    if e.status == 401:
                        raise TransferError(f"Failed to retrieve {url}: authentication refused.") from None
                    raise
        raise AssertionError("not reached")

    def manifest(self, reference: str | None = None) -> tuple[bytes, str]:
        """(document, media type) of the manifest or index REFERENCE (a tag or
        a digest; the ref's own by default)."""
        url = self.ref.manifest_url(reference)
        result: list[bytes] = []

        def request(headers: dict[str, str]) -> Download | None:
            got = self.http.fetch_small(url, mf.MANIFEST_MAX, headers={**headers, "Accept": mf.ACCEPT})
            if got is None:
                return None
            result.append(got[0])
            return got[1]

        try:
            info = self._authorized(self.http, request, url)
        except HttpError as e:
            raise TransferError(f"Failed to retrieve manifest/index file: HTTP status {e.status}.") from None
        if info is None:
            raise TransferError("Failed to retrieve manifest/index file. (Wrong URL?)")
        data = result[0]
        kind = mf.kind_of(data, info.content_type)
        digest = reference if reference and reference.startswith("sha256:") else None
        header = info.headers.get("docker-content-digest") or info.headers.get("Docker-Content-Digest")
        if digest:
            check_digest(data, digest, f"manifest {url}")
        elif header and header.startswith("sha256:"):
            check_digest(data, header, f"manifest {url}")
        return data, kind

    def blob(self, desc: mf.Descriptor, limit: int) -> bytes:
        """A small blob (the configuration), verified."""
        if desc.size > limit:
            raise TransferError(f"Blob {desc.digest} too large, refusing.")
        url = self.ref.blob_url(desc.digest)
        result: list[bytes] = []

        def request(headers: dict[str, str]) -> Download | None:
            got = self.http.fetch_small(url, limit, headers=headers)
            if got is None:
                return None
            result.append(got[0])
            return got[1]

        if self._authorized(self.http, request, url) is None:
            raise TransferError(f"Blob {desc.digest} is missing on the registry. (HTTP 404)")
        data = result[0]
        if len(data) != desc.size:
            raise TransferError(f"Blob {desc.digest} has {len(data)} bytes, the manifest says {desc.size}, refusing.")
        check_digest(data, desc.digest, f"blob {desc.digest}")
        return data

    def stream(self, ctx: JobContext, desc: mf.Descriptor, sink: Sink, progress: Callable[[float], None]) -> int:
        """Stream the blob DESC into SINK, hashing it as it comes; raises
        TransferError unless it was exactly the blob (the caller must not
        use what SINK got before this returns).  Returns the bytes resumed."""
        url = self.ref.blob_url(desc.digest)
        passed = [0]

        def counting(chunk: bytes) -> None:
            passed[0] += len(chunk)
            sink(chunk)

        with Http(ctx, self.options) as http:
            def request(headers: dict[str, str]) -> Download:
                try:
                    return http.stream(url, counting, max_size=desc.size, progress=progress,
                                       request_headers=headers)
                except HttpError as e:
                    if passed[0]:  # the sink has data already: a new request can't start over
                        raise TransferError(f"Download of {url} failed with code {e.status} after "
                                            f"{passed[0]} bytes.") from None
                    raise

            try:
                info = self._authorized(http, request, url)
            except HttpError as e:
                if e.status == 404:
                    raise TransferError(f"Layer {desc.digest} is missing on the registry. (HTTP 404)") from None
                raise
        assert info is not None
        if info.size != desc.size:
            raise TransferError(f"Blob {desc.digest} has {info.size} bytes, the manifest says {desc.size}, refusing.")
        if "sha256:" + info.sha256 != desc.digest:
            raise TransferError(f"Digest of blob {desc.digest} is sha256:{info.sha256}: the download is corrupt, "
                                "refusing.")
        return info.resumes
