"""pull-oci (PullOci) with real components: Debian's docker-registry over
TLS on loopback, images built with umoci and pushed with skopeo, sid's
importctl 262 as the client, sid's systemd-pull 262 as the oracle of the
tree on disk and ``umoci unpack`` as the oracle of the flattened tree."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from importd.manager import FLAG_PULL_OCI_FLATTEN
from tests.conftest import busctl
from tests.ocienv import CA, FaultProxy, Layout, Registry, SidPull, missing_tools, push, sid_importctl, tarball

pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(missing_tools()), reason=f"missing {missing_tools()}")]

IMPORT1 = ["org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager"]
MACHINE1 = ["org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"]


def _rich_base(root: Path) -> None:
    for d in ("etc", "usr/bin", "var/tmp", "opt/keep", "opt/gone", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text('ID=test\nPRETTY_NAME="OCI Test"\n')
    hello = root / "usr/bin/hello"
    hello.write_text("#!/bin/sh\necho hello\n")
    os.chmod(hello, 0o4755)
    owned = root / "data/owned"
    owned.write_text("owned\n")
    os.chown(owned, 1000, 1001)
    os.chmod(owned, 0o640)
    (root / "data/xattr").write_text("x\n")
    os.setxattr(root / "data/xattr", "user.foo", b"bar")
    (root / "data/hl1").write_text("link\n")
    os.link(root / "data/hl1", root / "data/hl2")
    os.symlink("../etc/os-release", root / "data/sym")
    os.mknod(root / "data/null", 0o20644, os.makedev(1, 3))
    os.mkfifo(root / "data/fifo")
    os.chmod(root / "var/tmp", 0o1777)
    (root / "opt/keep/a").write_text("keep\n")
    (root / "opt/gone/b").write_text("gone\n")
    (root / "data/todelete").write_text("del\n")
    os.chown(root / "opt", 0, 42)
    os.chmod(root / "opt", 0o750)


@pytest.fixture(scope="module")
def oci(tmp_path_factory: pytest.TempPathFactory):
    """The CA (installed), a registry with the test images, a fault proxy."""
    work = tmp_path_factory.mktemp("oci")
    ca = CA(work / "ca")
    ca.install()
    registry = Registry(work, ca, work / "storage").start()
    proxy = FaultProxy(ca, registry.port).start()
    try:
        layout = _build_images(work, registry)
        yield {"ca": ca, "registry": registry, "proxy": proxy, "layout": layout, "work": work}
    finally:
        proxy.stop()
        registry.stop()
        ca.uninstall()


def _build_images(work: Path, registry: Registry) -> Layout:
    layout = Layout(work / "layout")
    bundle = layout.new("v1")
    rootfs = bundle / "rootfs"
    _rich_base(rootfs)
    layout.repack("v1", bundle)
    (rootfs / "data/todelete").unlink()
    shutil.rmtree(rootfs / "opt/gone")
    (rootfs / "opt/gone").mkdir()
    (rootfs / "opt/gone/c").write_text("new\n")
    (rootfs / "etc/os-release2").write_text("changed\n")
    with open(rootfs / "data/owned", "a") as f:
        f.write("v2\n")
    layout.repack("v1", bundle)
    craft = work / "craft"
    (craft / "opt/keep").mkdir(parents=True)
    (craft / "data").mkdir()
    (craft / "srv").mkdir()
    (craft / "opt/keep/.wh..wh..opq").write_text("")
    (craft / "opt/keep/new").write_text("new\n")
    (craft / "data/.wh.hl1").write_text("")
    (craft / "srv/h1").write_text("hard\n")
    os.link(craft / "srv/h1", craft / "srv/h2")
    layout.add_layer("v1", tarball(work / "craft.tar", craft, ["opt/keep/.wh..wh..opq", "opt/keep/new",
                                                               "data/.wh.hl1", "srv/h1", "srv/h2"]))
    layout.config("v1", "--config.cmd", "/usr/bin/hello", "--config.cmd", "arg with space", "--config.env",
                  "FOO=bar", "--config.workingdir", "/data", "--config.user", "app")
    layout.recompress("v1", 2, "zst", "zstd")
    layout.recompress("zst", 1, "zst", "none")
    layout.make_index("zst", "multi", ["arm64/v8", "amd64"])
    layout.make_index("zst", "armonly", ["arm64/v8"])
    layout.make_index("v1", "multigz", ["arm64/v8", "amd64"])  # Docker's formats have no zstd
    more = work / "more"
    (more / "extra").mkdir(parents=True)
    (more / "extra/file").write_text("extra\n")
    layout.add_layer("zst", tarball(work / "more.tar", more, ["extra", "extra/file"]), new_tag="second")
    big = work / "big"
    (big / "big").mkdir(parents=True)
    for i in range(2):
        (big / f"big/blob{i}").write_bytes(os.urandom(2 << 20))
    layout.add_layer("zst", tarball(work / "big.tar", big, ["big", "big/blob0", "big/blob1"]), new_tag="big")
    for tag in ("v1", "zst", "second", "big"):
        push(layout.path, tag, registry.host, f"test/img:{tag}")
    for tag in ("multi", "armonly"):
        push(layout.path, tag, registry.host, f"test/img:{tag}", all_=True)
    push(layout.path, "v1", registry.host, "test/docker:v1", fmt="v2s2")
    push(layout.path, "multigz", registry.host, "test/docker:multi", all_=True, fmt="v2s2")
    return layout


@pytest.fixture
def env(oci, pool, daemons):
    daemons.start("machined")
    daemons.start("importd", extra=("--stall-timeout", "3", "--retries", "3"))
    yield oci, pool
    daemons.stop()


def leftovers(pool) -> list[str]:
    return sorted(p for p in os.listdir(pool.path) if p.startswith(".#") and not p.endswith(".lck"))


def layers_in(pool) -> set[str]:
    return {p for p in os.listdir(pool.path) if p.startswith(".oci-sha256:")}


def pull_oci(ref: str, name: str = "", flags: int = 0, image_class: str = "machine") -> subprocess.CompletedProcess:
    """PullOci over the bus, then wait for the transfer's end (the pool shows the result)."""
    return busctl("call", *IMPORT1, "PullOci", "ssst", ref, name, image_class, str(flags))


def wait_transfers(timeout: float = 120) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = busctl("call", *IMPORT1, "ListTransfers")
        if r.stdout.startswith("a(usssdo) 0"):
            return
        time.sleep(0.2)
    raise TimeoutError("transfers still running")


# --- describing trees -----------------------------------------------------------------


def describe(root: Path, skip_dirs: set[str] = frozenset()) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(
                (a, os.getxattr(p, a, follow_symlinks=False)) for a in os.listxattr(p, follow_symlinks=False)
                if not a.startswith(("trusted.", "security."))))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",) if rel in skip_dirs else (st.st_mode, st.st_uid, st.st_gid, xattrs)
                continue
            content = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            hard = groups.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, content, link, xattrs, hard,
                        None if whiteout else int(st.st_mtime))
    return out


def as_overlay(desc: dict[str, tuple]) -> dict[str, tuple]:
    """systemd 262's layer tree (OCI markers as plain files) as it must look
    once the markers are overlayfs ones."""
    out = dict(desc)
    for rel in sorted(desc):
        base, parent = os.path.basename(rel), os.path.dirname(rel)
        if not base.startswith(".wh."):
            continue
        del out[rel]
        if base == ".wh..wh..opq":
            if len(out[parent]) == 1:  # a directory the layer does not list: compared elsewhere
                continue
            mode, uid, gid, xattrs = out[parent]
            out[parent] = (mode, uid, gid, tuple(sorted((*xattrs, ("user.overlay.opaque", b"y")))))
            continue
        target = os.path.join(parent, base[4:])
        if target not in desc:
            out[target] = (stat.S_IFCHR, 0, 0, 0, None, None, (), None, None)
    return out


def layer_dirs(oci, digest: str) -> set[str]:
    """The members the layer blob lists (directories not listed were made by tar)."""
    return oci["layout"].layer_entries(digest, oci["registry"].blob("test/img", digest))


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.skipif(not SidPull.available(), reason="no sid root with systemd 262")
def test_importctl_262_pull_matches_systemd_pull_262(env, tmp_path: Path) -> None:
    oci, pool = env
    ref = f"{oci['registry'].host}/test/img:zst"
    r = sid_importctl("pull-oci", "-m", ref, "img")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Image 127.0.0.1" in r.stderr and "has 3 layers, 0 already present." in r.stderr, r.stderr
    oracle_pool = tmp_path / "oracle"
    oracle_pool.mkdir(mode=0o700)
    sid = SidPull(oracle_pool, oci["ca"])
    try:
        o = sid.pull(ref, "img")
        assert o.returncode == 0, o.stderr
    finally:
        sid.close()
    try:
        manifest = oci["registry"].manifest("test/img", "zst")
        digests = [layer["digest"] for layer in manifest["layers"]]
        assert layers_in(pool) == {".oci-" + d for d in digests}
        for digest in digests:
            listed = layer_dirs(oci, digest)
            ours = pool / (".oci-" + digest)
            theirs = oracle_pool / (".oci-" + digest)
            implicit = {str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_dir() and not p.is_symlink()
                        and str(p.relative_to(theirs)) not in listed}
            assert describe(ours, implicit) == as_overlay(describe(theirs, implicit)), digest
            for rel in implicit:  # 262: 0700; ours: what the layers below have (or 0755)
                assert stat.S_IMODE(os.stat(theirs / rel).st_mode) == 0o700
                assert stat.S_IMODE(os.stat(ours / rel).st_mode) in (0o755, 0o750), rel
            if pool.btrfs:
                ro = subprocess.run(["btrfs", "property", "get", str(ours), "ro"], capture_output=True, text=True)
                assert ro.stdout.strip() == "ro=true"
            else:
                assert "i" in subprocess.run(["lsattr", "-d", str(ours)], capture_output=True,
                                             text=True).stdout.split()[0]
        # data/todelete is whited out by layer 1, opt/keep opaque in layer 2, opt keeps its 0750 in layer 1
        l1, l2 = pool / (".oci-" + digests[1]), pool / (".oci-" + digests[2])
        assert stat.S_ISCHR(os.lstat(l1 / "data/todelete").st_mode) and os.lstat(l1 / "data/todelete").st_rdev == 0
        assert os.getxattr(l2 / "opt/keep", "user.overlay.opaque") == b"y"
        assert stat.S_IMODE(os.stat(l1 / "opt").st_mode) == 0o750 and os.stat(l1 / "opt").st_gid == 42
        stack = pool / "img.mstack"
        assert sorted(os.listdir(stack)) == sorted(os.listdir(oracle_pool / "img.mstack")) == \
            ["layer@0", "layer@1", "layer@2", "rw"]
        for k, digest in enumerate(digests):
            assert os.readlink(stack / f"layer@{k}") == os.readlink(oracle_pool / f"img.mstack/layer@{k}") == \
                f"../.oci-{digest}"
        assert stat.S_IMODE(os.stat(stack).st_mode) == stat.S_IMODE(os.stat(oracle_pool / "img.mstack").st_mode)
        for side in ("img.nspawn", "img.oci-config"):
            assert (pool / side).read_bytes() == (oracle_pool / side).read_bytes(), side
            assert stat.S_IMODE(os.stat(pool / side).st_mode) == stat.S_IMODE(os.stat(oracle_pool / side).st_mode)
        assert "User=app\n" in (pool / "img.nspawn").read_text()
        assert 'Parameters=/usr/bin/hello "arg with space"\n' in (pool / "img.nspawn").read_text()
        listing = busctl("call", *MACHINE1, "ListImages")
        assert re.search(r'"img" "mstack" false', listing.stdout), listing.stdout
        assert leftovers(pool) == []
    finally:
        subprocess.run(["chattr", "-R", "-i", str(oracle_pool)], capture_output=True)


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_flatten_matches_umoci_unpack(env, tmp_path: Path) -> None:
    oci, pool = env
    # (umoci 0.4.7 unpacks no zstd layers: the gzip-only image)
    r = pull_oci(f"{oci['registry'].host}/test/img:v1", "flat", FLAG_PULL_OCI_FLATTEN)
    assert r.returncode == 0, r.stderr
    wait_transfers()
    bundle = tmp_path / "umoci"
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{oci['layout'].path}:v1", str(bundle)], check=True,
                   capture_output=True)
    assert describe(pool / "flat") == describe(bundle)
    assert not (pool / "flat/data/todelete").exists() and not (pool / "flat/data/hl1").exists()
    assert sorted(os.listdir(pool / "flat/opt/keep")) == ["new"]
    assert (pool / "flat.nspawn").exists() and (pool / "flat.oci-config").exists()
    assert re.search(r'"flat" "subvolume" false', busctl("call", *MACHINE1, "ListImages").stdout)
    assert leftovers(pool) == []


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_indexes_and_docker_formats(env) -> None:
    oci, pool = env
    host = oci["registry"].host
    for ref, name in ((f"{host}/test/img:multi", "multi"), (f"{host}/test/docker:v1", "docker"),
                      (f"{host}/test/docker:multi", "dmulti")):
        assert pull_oci(ref, name).returncode == 0
        wait_transfers()
        assert (pool / f"{name}.mstack/rw").is_dir(), name
    r = sid_importctl("pull-oci", "-m", f"{host}/test/img:armonly", "arm")
    assert r.returncode != 0 and "No suitable OCI image manifest found for local system (linux/amd64)" in r.stderr
    assert not (pool / "arm.mstack").exists() and leftovers(pool) == []


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_shared_layers_download_once_and_clean_pool(env) -> None:
    oci, pool = env
    registry = oci["registry"]
    host = registry.host
    before = registry.blob_gets()
    r = sid_importctl("pull-oci", "-m", f"{host}/test/img:zst", "one")
    assert r.returncode == 0, r.stderr
    r = sid_importctl("pull-oci", "-m", "--read-only", f"{host}/test/img:second", "two")
    assert r.returncode == 0, r.stderr
    assert "has 4 layers, 3 already present." in r.stderr
    after = registry.blob_gets()
    second = registry.manifest("test/img", "second")["layers"]
    for layer in second:
        assert after.get(layer["digest"], 0) - before.get(layer["digest"], 0) == 1, layer["digest"]
    assert not (pool / "two.mstack/rw").exists()
    assert re.search(r'"two" "mstack" true', busctl("call", *MACHINE1, "ListImages").stdout)
    # "hidden" keeps the layers the stacks use; "layers" removes those none uses.
    r = busctl("call", *MACHINE1, "CleanPool", "s", "hidden")
    assert r.returncode == 0 and ".oci-sha256" not in r.stdout, r.stdout
    assert busctl("call", *MACHINE1, "RemoveImage", "s", "two").returncode == 0
    assert not (pool / "two.nspawn").exists() and not (pool / "two.oci-config").exists()
    r = busctl("call", *MACHINE1, "CleanPool", "s", "layers")
    extra = ".oci-" + second[3]["digest"]
    assert r.returncode == 0 and r.stdout.startswith("a(st) 1 ") and extra in r.stdout, r.stdout
    assert layers_in(pool) == {".oci-" + d["digest"] for d in second[:3]}
    r = busctl("call", *MACHINE1, "RenameImage", "ss", "one", "x")
    assert "Failed to rename image: Operation not supported" in r.stderr


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_faults_leave_nothing_behind(env) -> None:
    oci, pool = env
    proxy: FaultProxy = oci["proxy"]
    manifest = oci["registry"].manifest("test/img", "zst")
    big = manifest["layers"][0]["digest"]
    ref = f"{proxy.host}/test/img:zst"
    # A dropped download is resumed with a Range request.
    proxy.drop[big] = 300
    proxy.requests.clear()
    r = sid_importctl("pull-oci", "-m", ref, "resumed")
    assert r.returncode == 0, r.stderr
    assert "resuming in" in r.stderr, r.stderr
    assert any(path.endswith(big) and rng.startswith("bytes=") for path, rng, _ in proxy.requests)
    assert (pool / "resumed.mstack").is_dir()
    assert busctl("call", *MACHINE1, "RemoveImage", "s", "resumed").returncode == 0
    assert busctl("call", *MACHINE1, "CleanPool", "s", "layers").returncode == 0
    assert layers_in(pool) == set()
    # A blob whose digest is wrong, a missing layer: the pull fails, the pool is as it was.
    for fault, message in (("corrupt", "the download is corrupt"), ("missing", "is missing on the registry")):
        getattr(proxy, fault).add(big)
        r = sid_importctl("pull-oci", "-m", ref, "bad")
        getattr(proxy, fault).discard(big)
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert os.listdir(pool.path) == [] or set(os.listdir(pool.path)) <= {".#.oci-" + big + ".lck"}, \
            os.listdir(pool.path)


def test_importd_checks_pull_oci_arguments_as_262(oci, daemons) -> None:
    daemons.start("importd")
    host = oci["registry"].host

    def call(*args: str) -> str:
        return busctl("call", *IMPORT1, "PullOci", "ssst", "--", *args).stderr.strip()

    assert call("bad ref!", "x", "bogus", "0") == "Call failed: Image class 'bogus' not known"
    assert call("bad ref!", "x", "machine", "4") == "Call failed: Flags 0x4 invalid"
    assert call("bad ref!", "bad/name", "machine", "0") == "Call failed: Reference 'bad ref!' is invalid"
    assert call(f"{host}/test/img:zst", "bad/name", "machine", "0") == \
        "Call failed: Local image name bad/name is invalid"
    introspection = busctl("introspect", *IMPORT1[:2], IMPORT1[2]).stdout
    assert re.search(r"\.PullOci\s+method\s+ssst\s+uo", introspection), introspection


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_offline_layout_and_archives(env, tmp_path: Path) -> None:
    oci, pool = env
    layout = oci["layout"].path
    archive = tmp_path / "img.tar"
    darchive = tmp_path / "docker.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:zst", f"oci-archive:{archive}:zst"], check=True)
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:v1", f"docker-archive:{darchive}:test/img:v1"],
                   check=True)
    for ref, name in ((f"oci:{layout}:zst", "fromdir"), (f"oci-archive:{archive}:zst", "fromarchive"),
                      (f"docker-archive:{darchive}", "fromdocker")):
        r = pull_oci(ref, name)
        assert r.returncode == 0, r.stderr
        wait_transfers()
        assert (pool / f"{name}.mstack/rw").is_dir(), name
    # The same layers where they are the same blobs (writing the archive, skopeo compressed the
    # uncompressed layer 1 of the layout); the layout's layer 1 is the uncompressed tar.
    stacks = {n: [os.readlink(pool / f"{n}.mstack" / f"layer@{k}") for k in range(3)]
              for n in ("fromdir", "fromarchive")}
    assert stacks["fromdir"][0::2] == stacks["fromarchive"][0::2]
    assert oci["layout"].manifest("zst")["layers"][1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert stacks["fromdir"][1] == "../.oci-" + oci["layout"].manifest("zst")["layers"][1]["digest"]
    assert json.loads((pool / "fromdocker.oci-config").read_text())["config"]["User"] == "app"
    assert leftovers(pool) == []


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_token_authentication_with_auth_file_and_expired_token(oci, pool, daemons, tmp_path: Path) -> None:
    """A registry that wants bearer tokens (the same storage), a token server
    that wants Basic credentials and whose first token is expired already."""
    from tests.ocienv import TokenServer

    tokens = TokenServer(tmp_path, oci["ca"], "alice", "s3cret").start()
    tokens.expired_first = True
    registry = Registry(tmp_path, oci["ca"], oci["work"] / "storage", token=tokens.registry_config()).start()
    auth = tmp_path / "auth.json"
    try:
        for password, ok in (("wrong", False), ("s3cret", True)):
            encoded = __import__("base64").b64encode(f"alice:{password}".encode()).decode()
            auth.write_text(json.dumps({"auths": {registry.host: {"auth": encoded}}}))
            daemons.start("importd", env={"REGISTRY_AUTH_FILE": str(auth)})
            r = sid_importctl("pull-oci", "-m", f"{registry.host}/test/img:zst", "authed")
            if ok:
                assert r.returncode == 0, r.stderr
                assert tokens.issued >= 2  # the expired one, then a good one
            else:
                assert r.returncode != 0 and "credentials refused" in r.stderr, r.stderr
            daemons.stop("importd")
        assert (pool / "authed.mstack").is_dir() and leftovers(pool) == []
        # Docker's config.json with a credential helper (a real program, run by importd).
        helper_dir = tmp_path / "bin"
        helper_dir.mkdir()
        helper = helper_dir / "docker-credential-testhelper"
        helper.write_text("#!/bin/sh\nread server\n"
                          f"[ \"$server\" = {registry.host} ] || exit 1\n"
                          "echo '{\"ServerURL\":\"x\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}'\n")
        helper.chmod(0o755)
        (tmp_path / "docker").mkdir()
        (tmp_path / "docker/config.json").write_text(json.dumps({"credHelpers": {registry.host: "testhelper"}}))
        daemons.start("importd", env={"DOCKER_CONFIG": str(tmp_path / "docker"), "REGISTRY_AUTH_FILE": "",
                                      "PATH": f"{helper_dir}:{os.environ['PATH']}"})
        r = sid_importctl("pull-oci", "-m", f"{registry.host}/test/img:zst", "helped")
        assert r.returncode == 0, r.stderr
        daemons.stop("importd")
    finally:
        registry.stop()
        tokens.stop()


@pytest.mark.parametrize("pool", ["btrfs"], indirect=True)
def test_progress_counts_all_layers_and_cancel_leaves_nothing(env) -> None:
    import time

    oci, pool = env
    proxy: FaultProxy = oci["proxy"]
    proxy.delay = 0.03  # per 64 KiB: the 4 MiB layer takes about 2 s
    try:
        r = pull_oci(f"{proxy.host}/test/img:big", "slow")
        assert r.returncode == 0, r.stderr
        path = r.stdout.split('"')[1]
        seen = []
        for _ in range(100):
            got = busctl("get-property", "org.freedesktop.import1", path, "org.freedesktop.import1.Transfer",
                         "Progress")
            if got.returncode == 0:
                seen.append(float(got.stdout.split()[1]))
            if seen and 0.2 < seen[-1] < 0.9:
                break
            time.sleep(0.05)
        assert seen and 0.0 < seen[-1] < 1.0 and seen == sorted(seen), seen
        transfer_id = r.stdout.split()[1]
        assert busctl("call", *IMPORT1, "CancelTransfer", "u", transfer_id).returncode == 0
        wait_transfers()
    finally:
        proxy.delay = 0.0
    assert not (pool / "slow.mstack").exists()
    assert leftovers(pool) == [] and layers_in(pool) == set(), os.listdir(pool.path)
