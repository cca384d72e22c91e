"""Offline sources of a pull: an OCI layout directory (``oci:PATH[:TAG]``),
a tar archive of one (``oci-archive:PATH[:TAG]``, what ``skopeo copy ...
oci-archive:`` writes) and ``docker save`` output (``docker-archive:PATH``).

They answer like a registry (importd.oci.registry): manifests and blobs,
each blob checked against its digest as it is read, so an offline pull
shares the layer store, the checks and the unpacking with a registry pull.
Members of archives are read by GNU tar (``tar -xO``, confined like the
unpacking tar), never by a tar parser of ours.  A docker-archive has no
manifest: one is made from its manifest.json (the layers' digests are
their files' SHA-256, which ``docker save`` also uses as their names).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Generator
from typing import Any

from imagepool import spawn
from importd import compress, tar
from importd.context import JobContext, TransferError
from importd.oci import manifest as mf
from importd.oci.reference import Reference
from importd.oci.registry import check_digest

CHUNK = 1 << 20
_REF_NAME = "org.opencontainers.image.ref.name"


def _member_name(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return name.lstrip("/")


class _Files:
    """The files of a layout: a directory, or the members of a tar archive."""

    def __init__(self, ctx: JobContext, path: str, archive: bool) -> None:
        self.ctx = ctx
        self.path = path
        self.archive = archive
        self.members: dict[str, str] = {}
        if archive:
            if not os.path.isfile(path):
                raise TransferError(f"Archive {path} not found.")
            for line in self._run(["-tf", path]).decode("utf-8", "surrogateescape").splitlines():
                self.members.setdefault(_member_name(line), line)
        elif not os.path.isdir(path):
            raise TransferError(f"OCI layout {path} not found.")

    def _argv(self, args: list[str]) -> list[str]:
        return [*tar.confinement(("dac_override",), self.ctx), tar._tar_binary(), "--no-wildcards",
                "--quoting-style=literal", *args]

    def _run(self, args: list[str]) -> bytes:
        result = spawn.run(self._argv(args), capture=True, check=self.ctx.check, env={"LC_ALL": "C",
                           "PATH": os.environ.get("PATH") or os.defpath}, name="tar")
        if result.returncode != 0:
            raise TransferError(f"Failed to read {self.path}: {result.message}")
        return result.stdout

    def exists(self, name: str) -> bool:
        return name in self.members if self.archive else os.path.isfile(os.path.join(self.path, name))

    def size(self, name: str) -> int | None:
        if self.archive:
            return None
        return os.stat(os.path.join(self.path, name)).st_size

    def chunks(self, name: str) -> Generator[bytes, None, None]:
        if not self.exists(name):
            raise TransferError(f"{name} is missing in {self.path}.")
        if not self.archive:
            with open(os.path.join(self.path, name), "rb") as f:
                while data := f.read(CHUNK):
                    self.ctx.check()
                    yield data
            return
        child = spawn.Child(self._argv(["-xOf", self.path, "--occurrence=1", "--", self.members[name]]),
                            stdout=spawn.PIPE, env={"LC_ALL": "C", "PATH": os.environ.get("PATH") or os.defpath},
                            name="tar")
        try:
            assert child.stdout is not None
            while data := child.stdout.read(CHUNK):
                self.ctx.check()
                yield data
            rc = child.wait(self.ctx.check)
            if rc != 0:
                raise TransferError(f"Failed to read {name} from {self.path}: {child.tail[-1:] or rc}")
        finally:
            child.kill()

    def read(self, name: str, limit: int) -> bytes:
        data = bytearray()
        for chunk in self.chunks(name):
            data += chunk
            if len(data) > limit:
                raise TransferError(f"{name} in {self.path} is too large, refusing.")
        return bytes(data)


class LocalSource:
    def __init__(self, ctx: JobContext, ref: Reference) -> None:
        self.ctx = ctx
        self.ref = ref
        self.files = _Files(ctx, ref.path, archive=ref.transport != "oci")
        self.synthetic: dict[str, tuple[bytes, str]] = {}  # digest -> (document, media type)
        self.blob_names: dict[str, str] = {}  # digest -> file, for docker archives
        if ref.transport == "docker-archive":
            self._docker_manifest()

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return str(self.ref)

    def _blob_name(self, digest: str) -> str:
        return self.blob_names.get(digest) or "blobs/sha256/" + digest.split(":", 1)[1]

    # --- manifests -------------------------------------------------------------------

    def manifest(self, reference: str | None = None) -> tuple[bytes, str]:
        if reference and reference in self.synthetic:
            return self.synthetic[reference]
        if reference:
            data = self.files.read(self._blob_name(reference), mf.MANIFEST_MAX)
            check_digest(data, reference, f"manifest {reference}")
            return data, mf.kind_of(data, None)
        if self.ref.transport == "docker-archive":
            return next(iter(self.synthetic.values()))
        index = json.loads(self.files.read("index.json", mf.MANIFEST_MAX) or b"{}")
        entries = [e for e in index.get("manifests", []) if isinstance(e, dict)] if isinstance(index, dict) else []
        if self.ref.tag:
            entries = [e for e in entries if (e.get("annotations") or {}).get(_REF_NAME) == self.ref.tag]
        if len(entries) != 1:
            what = f"tag '{self.ref.tag}'" if self.ref.tag else "a single image (give a :TAG)"
            raise TransferError(f"{self.ref.path} has {len(entries)} manifests for {what}, refusing.")
        desc = mf.parse_index(json.dumps({"schemaVersion": 2, "manifests": entries}).encode(), "")[0]
        data = self.files.read(self._blob_name(desc.digest), mf.MANIFEST_MAX)
        check_digest(data, desc.digest, f"manifest {desc.digest}")
        return data, desc.media_type if desc.media_type in mf.INDEXES + mf.MANIFESTS else mf.kind_of(data, None)

    def _docker_manifest(self) -> None:
        doc: Any = json.loads(self.files.read("manifest.json", mf.MANIFEST_MAX))
        if not isinstance(doc, list) or not doc:
            raise TransferError(f"{self.ref.path} has no manifest.json entries, refusing.")
        entries = [e for e in doc if isinstance(e, dict)]
        if self.ref.tag:
            tag = self.ref.tag
            entries = [e for e in entries if any(tag in (t, t.rsplit("/", 1)[-1]) or t.endswith("/" + tag)
                                                 for t in e.get("RepoTags") or [] if isinstance(t, str))]
        if len(entries) != 1 or not isinstance(entries[0].get("Config"), str) or \
                not isinstance(entries[0].get("Layers"), list):
            raise TransferError(f"{self.ref.path} has no single image for '{self.ref.tag or '-'}', refusing.")
        entry = entries[0]
        config_name = _member_name(entry["Config"])
        config = self.files.read(config_name, mf.CONFIG_MAX)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self.blob_names[config_digest] = config_name
        layers = []
        for name in entry["Layers"]:
            if not isinstance(name, str):
                raise TransferError(f"Bad layer entry in {self.ref.path}, refusing.")
            name = _member_name(name)
            h, size, head = hashlib.sha256(), 0, b""
            for chunk in self.files.chunks(name):
                head = head or chunk[:8]
                h.update(chunk)
                size += len(chunk)
            digest = "sha256:" + h.hexdigest()
            self.blob_names[digest] = name
            gz = compress.detect(head) == compress.Compression.GZIP
            layers.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar" + (".gzip" if gz else ""),
                           "digest": digest, "size": size})
        document = json.dumps({"schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST,
                               "config": {"mediaType": mf.DOCKER_CONFIG, "digest": config_digest,
                                          "size": len(config)},
                               "layers": layers}).encode()
        self.synthetic["sha256:" + hashlib.sha256(document).hexdigest()] = (document, mf.DOCKER_MANIFEST)

    # --- blobs ---------------------------------------------------------------------------

    def blob(self, desc: mf.Descriptor, limit: int) -> bytes:
        data = self.files.read(self._blob_name(desc.digest), limit)
        if len(data) != desc.size:
            raise TransferError(f"Blob {desc.digest} has {len(data)} bytes, the manifest says {desc.size}, refusing.")
        check_digest(data, desc.digest, f"blob {desc.digest}")
        return data

    def stream(self, ctx: JobContext, desc: mf.Descriptor, sink: Callable[[bytes], None],
               progress: Callable[[float], None]) -> int:
        name = self._blob_name(desc.digest)
        if not self.files.exists(name):
            raise TransferError(f"Layer {desc.digest} is missing in {self.ref.path}.")
        h, size = hashlib.sha256(), 0
        with contextlib.closing(self.files.chunks(name)) as chunks:
            for chunk in chunks:
                size += len(chunk)
                if size > desc.size:
                    raise TransferError(f"Blob {desc.digest} is larger than the manifest says, refusing.")
                h.update(chunk)
                sink(chunk)
                if desc.size:
                    progress(size / desc.size)
        if size != desc.size or "sha256:" + h.hexdigest() != desc.digest:
            raise TransferError(f"Blob {desc.digest} in {self.ref.path} is corrupt, refusing.")
        return 0
