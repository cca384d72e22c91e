"""Manifests, indexes and image configurations: parsed strictly, as hostile
input, and the platform picked from an index.

Accepted: OCI image indexes and Docker manifest lists (schema 2); OCI image
manifests and Docker v2 schema 2 manifests; layers that are tar archives,
uncompressed, gzip or zstd (OCI and Docker media types, non-distributable
ones included).  Every digest is ``sha256:`` and 64 lowercase hex digits;
every size a non-negative integer.  Anything else is refused with a message
saying what it was (systemd 262 skips layers it does not know, which builds
a different file system than the image's: we never do).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

from importd.context import TransferError
from importd.oci.reference import digest_is_valid

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)
#: What we ask a registry for, best first.
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

#: Layer media types and the compression they declare.
LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

MANIFEST_MAX = 4 << 20  # bytes of a manifest or index (the distribution spec's limit)
CONFIG_MAX = 16 << 20
LAYERS_MAX = 4096  # as systemd 262's LAYER_MAX

# Go architecture names (what OCI uses) of Linux machine names.
_GO_ARCH = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "i386": ("386", ""), "i486": ("386", ""),
    "i586": ("386", ""), "i686": ("386", ""), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"), "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""), "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}


def host_platform() -> tuple[str, str]:
    """(architecture, variant) of this machine, in OCI's (Go's) words."""
    machine = platform.machine()
    return _GO_ARCH.get(machine, (machine, ""))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass
class Config:
    raw: bytes  # the blob, byte for byte (NAME.oci-config)
    data: dict[str, Any]
    diff_ids: list[str]

    @property
    def empty(self) -> bool:
        return self.raw.strip() == b"{}"


def _json(data: bytes, what: str) -> dict[str, Any]:
    if b"\0" in data:
        raise TransferError(f"Embedded NUL byte in {what}, refusing.")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise TransferError(f"Failed to parse {what}: {e}") from None
    if not isinstance(value, dict):
        raise TransferError(f"The {what} is not a JSON object, refusing.")
    return value


def _descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise TransferError(f"Bad descriptor in {what}, refusing.")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise TransferError(f"Descriptor without media type or digest in {what}, refusing.")
    if not digest_is_valid(digest):
        raise TransferError(f"Unsupported or malformed digest '{digest[:80]}' in {what}, refusing.")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TransferError(f"Bad size of {digest} in {what}, refusing.")
    plat = value.get("platform")
    plat = {k: v for k, v in plat.items() if isinstance(v, str)} if isinstance(plat, dict) else {}
    return Descriptor(media_type, digest, size, plat)


def _schema2(data: dict[str, Any], media_type: str, expected: tuple[str, ...], what: str) -> None:
    if data.get("schemaVersion") != 2:
        raise TransferError(f"{what} has unsupported schema version {data.get('schemaVersion')!r}, refusing.")
    declared = data.get("mediaType")
    if declared is not None and declared not in expected:
        raise TransferError(f"{what} has unexpected media type '{declared}', refusing.")
    if declared and media_type and declared != media_type:
        raise TransferError(f"{what} is '{declared}' but was served as '{media_type}', refusing.")


def kind_of(data: bytes, content_type: str | None) -> str:
    """OCI_INDEX/DOCKER_LIST or OCI_MANIFEST/DOCKER_MANIFEST: from the
    Content-Type, else (local layouts, file servers) from the document."""
    media_type = (content_type or "").split(";")[0].strip()
    if media_type in DOCKER_SCHEMA1:
        raise TransferError("Docker schema 1 manifests are not supported, refusing.")
    if media_type in INDEXES or media_type in MANIFESTS:
        return media_type
    if media_type not in ("", "application/json", "application/octet-stream", "text/plain"):
        raise TransferError(f"Unexpected content type '{media_type}', refusing.")
    doc = _json(data, "manifest")
    declared = doc.get("mediaType")
    if declared in INDEXES or declared in MANIFESTS:
        return str(declared)
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def parse_index(data: bytes, media_type: str) -> list[Descriptor]:
    doc = _json(data, "image index")
    _schema2(doc, media_type, INDEXES, "Image index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise TransferError("Image index has no manifest list, refusing.")
    if len(entries) > LAYERS_MAX:
        raise TransferError("Image index has too many entries, refusing.")
    return [_descriptor(e, "image index") for e in entries]


def pick(entries: list[Descriptor], arch: str | None = None, variant: str | None = None) -> Descriptor:
    """The manifest of an index for linux on ARCH/VARIANT (this machine's by
    default): an exact variant first, then one without a variant, then any."""
    if arch is None:
        arch, variant = host_platform()
    candidates = [e for e in entries if e.media_type in MANIFESTS
                  and e.platform.get("os", "linux") == "linux" and e.platform.get("architecture", arch) == arch]
    if not candidates:
        found = sorted({f"{e.platform.get('os', '?')}/{e.platform.get('architecture', '?')}"
                        + (f"/{e.platform['variant']}" if e.platform.get("variant") else "")
                        for e in entries})
        raise TransferError(f"No suitable OCI image manifest found for local system (linux/{arch}); "
                            f"the image has: {', '.join(found) or 'nothing'}.")
    for want in (variant, ""):
        for e in candidates:
            if e.platform.get("variant", "") == want:
                return e
    return candidates[0]


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    doc = _json(data, "image manifest")
    _schema2(doc, media_type, MANIFESTS, "Image manifest")
    config = _descriptor(doc.get("config"), "image manifest")
    if config.media_type not in CONFIGS:
        raise TransferError(f"Manifest config has media type '{config.media_type}': not a container image, "
                            "refusing.")
    if config.size > CONFIG_MAX:
        raise TransferError("Image configuration too large, refusing.")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list) or not layers_doc:
        raise TransferError("Manifest has no recognized file system layers, refusing.")
    if len(layers_doc) > LAYERS_MAX:
        raise TransferError(f"Too many layers in manifest (> {LAYERS_MAX}), refusing.")
    layers = [_descriptor(layer, "image manifest") for layer in layers_doc]
    for layer in layers:
        if layer.media_type not in LAYERS:
            raise TransferError(f"Layer {layer.digest} has unsupported media type '{layer.media_type}', refusing.")
    return Manifest(media_type or str(doc.get("mediaType") or OCI_MANIFEST), config, layers)


def parse_config(data: bytes, layers: int) -> Config:
    doc = _json(data, "image configuration")
    if data.strip() == b"{}":
        return Config(data, doc, [])
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and digest_is_valid(d) for d in diff_ids):
        raise TransferError("Image configuration has no valid rootfs.diff_ids, refusing.")
    if len(diff_ids) != layers:
        raise TransferError(f"Image configuration lists {len(diff_ids)} layers, the manifest {layers}, refusing.")
    return Config(data, doc, list(diff_ids))
