"""Image references as systemd 262 parses them (facts in
/work/research/oci/FACTS.md, observed against its systemd-pull), and the
manifest checks; no privileges needed."""

from __future__ import annotations

import json

import pytest

from importd.context import TransferError
from importd.oci import manifest as mf
from importd.oci.auth import parse_challenge
from importd.oci.install import nspawn_settings
from importd.oci.reference import default_local_name, is_valid, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("ref, url", [
    ("test/img:v2", "https://test/v2/img/manifests/v2"),
    ("img:v2", "https://registry-1.docker.io/v2/library/img/manifests/v2"),
    ("debian", "https://registry-1.docker.io/v2/library/debian/manifests/latest"),
    ("fedora:40", "https://registry.fedoraproject.org/v2/fedora/manifests/40"),
    ("docker.io/library/debian", "https://registry-1.docker.io/v2/library/debian/manifests/latest"),
    ("docker.io/x", "https://registry-1.docker.io/v2/library/x/manifests/latest"),
    ("quay.io/foo/bar", "https://quay.io/v2/foo/bar/manifests/latest"),
    ("localhost:5000/foo", "https://localhost:5000/v2/foo/manifests/latest"),
    ("foo.example:5000/a/b/c:t", "https://foo.example:5000/v2/a/b/c/manifests/t"),
    ("UPPER.example/x", "https://UPPER.example/v2/x/manifests/latest"),
    ("x.example/a__b", "https://x.example/v2/a__b/manifests/latest"),
    ("127.0.0.1:5443/test/img", "https://127.0.0.1:5443/v2/test/img/manifests/latest"),
    (f"127.0.0.1:5443/test/img@{D}", f"https://127.0.0.1:5443/v2/test/img/manifests/{D}"),
    (f"q.example/i:t@{D}", f"https://q.example/v2/i/manifests/{D}"),
])
def test_reference_urls_as_262(ref: str, url: str) -> None:
    r = parse(ref, search_dirs=("/nonexistent",))
    assert r.manifest_url() == url


@pytest.mark.parametrize("ref", ["127.0.0.1:5443/test/img:", "a:b:c", "127.0.0.1:99999/x", "x.example/a/b/",
                                 "x.example//a", "x.example/a:-t", "x.example/a:.t", "ghcr.io/A/b", "bad ref!",
                                 "x.example/a/.b", "x.example/a@sha256:abcd", "oci:relative/path", ""])
def test_invalid_references(ref: str) -> None:
    assert not is_valid(ref)
    with pytest.raises(TransferError):
        parse(ref, search_dirs=("/nonexistent",))


def test_local_sources_and_names() -> None:
    r = parse("oci:/srv/layout:v1")
    assert (r.transport, r.path, r.tag) == ("oci", "/srv/layout", "v1")
    assert default_local_name(parse("oci-archive:/srv/img.tar")) == "img"
    assert default_local_name(parse("127.0.0.1:5443/test/img", search_dirs=("/nonexistent",))) == "img"
    assert parse("docker-archive:/x/d.tar:test/img:v1").tag == "test/img:v1"


def test_index_picks_this_machine() -> None:
    def entry(arch: str, variant: str = "") -> dict:
        platform = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        return {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 1, "platform": platform}
    entries = mf.parse_index(json.dumps({"schemaVersion": 2, "manifests": [entry("arm64", "v8"), entry("amd64")]})
                             .encode(), mf.OCI_INDEX)
    assert mf.pick(entries, "amd64", "").platform["architecture"] == "amd64"
    assert mf.pick(entries, "arm64", "v8").platform["variant"] == "v8"
    with pytest.raises(TransferError, match="linux/s390x"):
        mf.pick(entries, "s390x", "")


def test_manifests_refused() -> None:
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+xz", "digest": D, "size": 1}
    doc = {"schemaVersion": 2, "config": {"mediaType": mf.OCI_CONFIG, "digest": D, "size": 2}, "layers": [layer]}
    with pytest.raises(TransferError, match="unsupported media type"):
        mf.parse_manifest(json.dumps(doc).encode(), mf.OCI_MANIFEST)
    doc["layers"] = [dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar", digest="sha512:00")]
    with pytest.raises(TransferError, match="digest"):
        mf.parse_manifest(json.dumps(doc).encode(), mf.OCI_MANIFEST)
    with pytest.raises(TransferError, match="schema 1"):
        mf.kind_of(b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws")


def test_challenge_and_settings() -> None:
    scheme, params = parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x/y:pull"')
    assert scheme == "bearer" and params == {"realm": "https://a/token", "service": "reg",
                                             "scope": "repository:x/y:pull"}
    cfg = {"config": {"User": "1000:1000", "Env": ["A=b c", "bad"], "Cmd": ["/bin/sh", "-c", "echo $x", ""],
                      "WorkingDir": "/", "StopSignal": "SIGKILL"}}
    text = nspawn_settings(type("Ctx", (), {"log": lambda self, line: None})(), cfg).decode()  # type: ignore[arg-type]
    assert text == ("# Generated from OCI configuration object\n[Exec]\nBoot=no\nKillSignal=KILL\n"
                    "# User=1000:1000 (not a user name; systemd-nspawn's User= takes names only)\n"
                    "Environment=A=b c\nParameters=/bin/sh -c \"echo $x\" \"\"\n")
