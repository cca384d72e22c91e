"""OCI image references, parsed as systemd 262 parses them, plus what 262
lacks: digests and local sources.

A registry reference is ``[REGISTRY/]IMAGE[:TAG][@sha256:HEX]``:

- with a '/', the first component is always the registry (262: ``test/img``
  is the image ``img`` on the registry ``test``), a DNS name with an optional
  port (1..65535);
- IMAGE is '/'-separated components of ``[a-z0-9_+-][a-z0-9._+-]*``;
- TAG ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``, default from the registry
  database or "latest"; a digest (``@sha256:`` and 64 hex digits) pins the
  manifest (not supported by 262) and then wins over the tag.

The registry database is systemd's: ``registry.<R>.oci-registry`` when a
registry is given, else ``image.<NAME>.oci-registry``, else
``default.oci-registry``, searched in /etc, /run, /usr/local/lib and /usr/lib
(``systemd/oci-registry``); JSON with ``defaultProtocol``,
``overrideRegistry``, ``defaultRegistry``, ``overrideImage``,
``shortImagePrefix``, ``defaultTag``.  Where no such file exists at all, the
entries systemd 262 ships are used (``SHIPPED``).

Local sources, our extension: ``oci:PATH[:TAG]`` (an OCI layout directory),
``oci-archive:PATH[:TAG]`` (a tar of one) and ``docker-archive:PATH[:REF]``
(``docker save`` output), PATH absolute.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from imagepool.names import image_name_is_valid
from importd.context import TransferError

SEARCH_DIRS = ("/etc/systemd/oci-registry", "/run/systemd/oci-registry", "/usr/local/lib/systemd/oci-registry",
               "/usr/lib/systemd/oci-registry")
_DOCKER = {"shortImagePrefix": "library/", "overrideRegistry": "registry-1.docker.io"}
_FEDORA = {"overrideRegistry": "registry.fedoraproject.org"}
#: systemd 262's /usr/lib/systemd/oci-registry/ (src/import/oci-registry/).
SHIPPED: dict[str, dict[str, str]] = {
    "default.oci-registry": _DOCKER,
    "registry.docker.io.oci-registry": _DOCKER,
    "registry.fedora.oci-registry": _FEDORA,
    **{f"image.{n}.oci-registry": _DOCKER for n in ("alpine", "archlinux", "debian", "ubuntu")},
    **{f"image.{n}.oci-registry": _FEDORA for n in ("fedora", "fedora-minimal")},
}

LOCAL_TRANSPORTS = ("oci", "oci-archive", "docker-archive")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_COMPONENT = re.compile(r"[a-z0-9_+-][a-z0-9._+-]*")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REF_MAX = 4096


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]; "" for a local source
    image: str  # repository path on the registry
    tag: str
    digest: str = ""  # "sha256:HEX", pins the manifest
    protocol: str = "https"
    transport: str = ""  # "" (a registry) or one of LOCAL_TRANSPORTS
    path: str = ""  # the layout or archive of a local source

    @property
    def local(self) -> bool:
        return bool(self.transport)

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag

    def manifest_url(self, ref: str | None = None) -> str:
        return f"{self.protocol}://{self.registry}/v2/{self.image}/manifests/{ref or self.manifest_ref}"

    def blob_url(self, digest: str) -> str:
        return f"{self.protocol}://{self.registry}/v2/{self.image}/blobs/{digest}"

    def __str__(self) -> str:
        if self.transport:
            return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")
        return f"{self.registry}/{self.image}:{self.tag}" + (f"@{self.digest}" if self.digest else "")


def registry_is_valid(registry: str) -> bool:
    host, colon, port = registry.partition(":")
    if colon and not (port.isdigit() and port.isascii() and 0 < int(port) <= 65535):
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def image_is_valid(image: str) -> bool:
    return bool(image) and all(_COMPONENT.fullmatch(c) for c in image.split("/"))


def tag_is_valid(tag: str) -> bool:
    return bool(_TAG.fullmatch(tag))


def digest_is_valid(digest: str) -> bool:
    return bool(_DIGEST.fullmatch(digest))


def _invalid(ref: str) -> TransferError:
    return TransferError(f"OCI ref '{ref}' is invalid.")


def split(ref: str) -> tuple[str, str, str, str]:
    """(registry or "", image, tag or "", digest or "") of a registry
    reference, syntax only; TransferError when it is malformed."""
    if not ref or len(ref) > REF_MAX or any(c.isspace() or not c.isprintable() for c in ref):
        raise _invalid(ref)
    rest, at, digest = ref.partition("@")
    if at and not digest_is_valid(digest):
        raise _invalid(ref)
    registry = ""
    if "/" in rest:
        registry, rest = rest.split("/", 1)
        if not registry_is_valid(registry):
            raise _invalid(ref)
    last = rest.rsplit("/", 1)[-1]
    tag = ""
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not tag_is_valid(tag):
            raise _invalid(ref)
    if not image_is_valid(rest):
        raise _invalid(ref)
    return registry, rest, tag, digest


def _escape(text: str) -> str:
    """systemd's urlescape(): all but [A-Za-z0-9.-_] as %xx."""
    return "".join(c if c.isascii() and (c.isalnum() or c in ".-_") else "".join(f"%{b:02x}" for b in c.encode())
                   for c in text)


def _rules(filename: str, search_dirs: tuple[str, ...]) -> dict[str, str] | None:
    for directory in search_dirs:
        path = os.path.join(directory, filename)
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(1 << 16))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise TransferError(f"Failed to read OCI registry database {path}: {e}") from None
        if not isinstance(data, dict):
            raise TransferError(f"OCI registry database {path} is not a JSON object.")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    if not any(os.path.isdir(d) for d in search_dirs):
        return SHIPPED.get(filename)
    return None


def parse(ref: str, search_dirs: tuple[str, ...] = SEARCH_DIRS) -> Reference:
    """The normalized reference REF (registry database applied)."""
    for transport in LOCAL_TRANSPORTS:
        if ref.startswith(transport + ":"):
            return _parse_local(ref, transport)
    registry, image, tag, digest = split(ref)
    if registry:
        rules = _rules(f"registry.{_escape(registry)}.oci-registry", search_dirs) or {}
    else:
        rules = (_rules(f"image.{_escape(image)}.oci-registry", search_dirs)
                 or _rules("default.oci-registry", search_dirs) or {})
    protocol = rules.get("defaultProtocol") or "https"
    if rules.get("overrideRegistry"):
        registry = rules["overrideRegistry"]
    elif not registry and rules.get("defaultRegistry"):
        registry = rules["defaultRegistry"]
    if rules.get("overrideImage"):
        image = rules["overrideImage"]
    elif rules.get("shortImagePrefix") and "/" not in image:
        image = rules["shortImagePrefix"] + image
    tag = tag or rules.get("defaultTag") or "latest"
    if not registry:
        raise TransferError("No suitable registry found.")
    if protocol not in ("https", "http") or not registry_is_valid(registry) or not image_is_valid(image):
        raise _invalid(ref)
    return Reference(registry, image, tag, digest, protocol)


def _parse_local(ref: str, transport: str) -> Reference:
    rest = ref[len(transport) + 1:]
    path, tag = rest, ""
    head, colon, tail = rest.rpartition(":")
    if transport == "docker-archive":  # PATH[:REFERENCE], and a reference has ':' and '/' of its own
        colons = [i for i, c in enumerate(rest) if c == ":"]
        cut = next((i for i in colons if os.path.isfile(rest[:i])), colons[0] if colons else -1)
        head, colon, tail = (rest[:cut], ":", rest[cut + 1:]) if cut >= 0 else (rest, "", "")
    if colon and ("/" not in tail or transport == "docker-archive"):
        path, tag = head, tail
        if transport == "docker-archive":
            if not tail:
                raise _invalid(ref)
            split(tail)  # a reference, checked for its syntax only
        elif not tag_is_valid(tag):
            raise _invalid(ref)
    if not path.startswith("/") or "\0" in path or len(path) > REF_MAX:
        raise _invalid(ref)
    return Reference("", "", tag, "", "", transport, os.path.normpath(path))


def is_valid(ref: str) -> bool:
    """Whether REF parses (for the argument checks of the D-Bus methods)."""
    try:
        if ref.startswith(tuple(t + ":" for t in LOCAL_TRANSPORTS)):
            parse(ref)
        else:
            split(ref)
    except TransferError:
        return False
    return True


def default_local_name(ref: Reference) -> str:
    """The image name when none is given: the last component of the image
    (262), or of a local source's tag or path."""
    if ref.transport:
        base = ref.tag.rsplit("/", 1)[-1].split(":")[0] if ref.tag else os.path.basename(ref.path)
        for suffix in (".tar", ".oci"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
        name = base
    else:
        name = ref.image.rsplit("/", 1)[-1]
    if not image_name_is_valid(name):
        raise TransferError(f"Cannot use '{name}' as local image name, refusing.")
    return name
