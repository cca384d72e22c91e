"""machined-py, our command-line client, off a terminal, against our own
daemons on the private bus, next to systemd 262's machinectl and importctl
(the sid root's, tests/sid.py) on the same daemons: verb by verb, line by
line, with messages and exit status; where the verbs change the pool, each
client runs the same steps on a freshly prepared one.  What only we print
(image-status's usage status, --detach, watch, --json on machinectl's
verbs) is checked on its own, and machinectl 252 only where importd 252's
old methods are the point.  The terminal (bars, Ctrl-C, resize) is in
test_cli_tty.py."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagepool import dev as world
from machinedpy_cli.fmt import Column, Table
from tests import sid
from tests.conftest import Daemons, Pool
from tests.httpserver import Fault, TestServer
from tests.imagetree import make_os_tree, normalize, populate
from tests.test_machinectl_vs_reference import MUTATIONS
from tests.test_machines import Nspawn, call_ex, make_root

CLI = [sys.executable, "-m", "machinedpy_cli"]
XZ, GZIP, BZIP2, ZSTD = b"\xfd7zXZ\x00", b"\x1f\x8b", b"BZh", b"\x28\xb5\x2f\xfd"
# Ctrl-C cancels the transfer machined-py started; importctl 262 leaves it running.
ENQUEUED_OURS, ENQUEUED_262 = "Press C-c to cancel it.", "Press C-c to continue download in background."
TIMING = re.compile(r"^(Got|Imported|Exported) \d+%")   # how many there are, at which percentages, is timing
USAGE_STATUS = "\t   Usage: unknown ("                   # machined-py's own line in image-status


def cli(*args: str, input: bytes | None = None, stdin: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    with open(stdin or os.devnull, "rb") as f:
        r = subprocess.run([*CLI, *args], capture_output=True, input=input, timeout=timeout,
                           stdin=None if input is not None else f)
    result = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                         r.stderr.decode(errors="replace"))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    r = cli(*args)
    assert r.returncode == 0, f"machined-py {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


def client(program: str, *args: str, stdin: Path | None = None) -> subprocess.CompletedProcess[str]:
    """PROGRAM (machinectl, importctl) of systemd 262, from the sid root."""
    assert sid.available(), f"the sid root is missing ({sid.ROOT}): run make deps"
    with open(stdin or os.devnull, "rb") as f:
        return sid.run(program, "--no-pager", *args, stdin=f)


def transcript(r: subprocess.CompletedProcess[str]) -> str:
    """Output, messages and exit status, without what differs between runs:
    times (in JSON too), transfer ids, progress."""
    text = normalize(f"{r.stdout}{r.stderr}rc={r.returncode}")
    text = re.sub(r'("(?:created|modified|crtime|mtime)" ?: ?)[1-9][0-9]*', r"\1T", text)
    text = "\n".join(line for line in text.split("\n") if not TIMING.match(line))
    text = re.sub(r" +\d{1,3}% ", " P% ", re.sub(r"(\"progress\" ?: ?)\d+", r"\1P", text))
    return re.sub(r"transfer job \d+", "transfer job N", text)


def as_262(text: str) -> str:
    """Our transcript with what we say on purpose otherwise in 262's words."""
    return "\n".join(line for line in text.split("\n") if not line.startswith(USAGE_STATUS)).replace(
        ENQUEUED_OURS, ENQUEUED_262)


def compare(program: str, steps: list[list[str]], prepare: Callable[[], object] | None = None,
            stdin: Path | None = None, theirs_first: tuple[str, ...] = ()) -> list[str]:
    """Each step through PROGRAM 262 (THEIRS_FIRST in front of its
    arguments), then through machined-py, each run on a pool PREPAREd
    afresh: the same transcripts, step by step.  Ours are returned."""
    if prepare:
        prepare()
    theirs = [(" ".join(s), transcript(client(program, *theirs_first, *s, stdin=stdin))) for s in steps]
    if prepare:
        prepare()
    ours = [transcript(cli("--no-pager", *s, stdin=stdin)) for s in steps]
    sid.Steps().same([(" ".join(s), as_262(text)) for s, text in zip(steps, ours, strict=True)], theirs)
    return ours


def image_names() -> set[str]:
    r = client("machinectl", "list-images", "--no-legend", "--all")
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def transfers_idle() -> bool:
    return client("importctl", "list-transfers").stdout.strip() == "No transfers."


def show(image: str, prop: str) -> str:
    return client("machinectl", "show-image", "-P", prop, image).stdout.strip()


# --- images -----------------------------------------------------------------------------------------------------------

READ_VERBS = [
    ["list-images"], ["list-images", "--all"], ["list-images", "--no-legend"], ["list-images", "-a", "--no-legend"],
    ["list-images", "-o", "json"], ["list-images", "-o", "json-pretty", "--all"], ["list-images", "-o", "json-sse"],
    ["list-images", "-o", "json-seq"], ["list-images", "-o", "bogus"],
    ["image-status", "sv1"], ["image-status", "dir1"], ["image-status", "raw1"], ["image-status", ".hidden1"],
    ["image-status", "sv1", "raw1"], ["image-status"], ["image-status", "sv1", "nosuch"],
    ["show-image", "sv1"], ["show-image", "dir1"], ["show-image", "raw1"], ["show-image", "--all", "raw1"],
    ["show-image", "-p", "Type", "sv1"], ["show-image", "-p", "Name", "--value", "sv1", "dir1"],
    ["show-image", "-P", "ReadOnly", "raw1"], ["show-image"], ["show-image", "-a"],
    ["image-status", "nosuch"], ["show-image", "nosuch"], ["image-status", "../etc"],
    ["remove", "nosuch"], ["rename", "nosuch", "x"], ["clone", "nosuch", "x"], ["read-only", "nosuch"],
    ["read-only", "sv1", "maybe"], ["set-limit", "sv1", "lots"], ["clone", "sv1", "../x"], ["clone", "sv1", ".#x"],
    ["rename", "sv1", "dir1"], ["remove", ".host"], ["clone", "a"], ["rename", "a", "b", "c"], ["frobnicate"],
]


def test_image_listings_match_262(pool: Pool, services: Daemons) -> None:
    populate(pool.path, pool.btrfs, raw_data=True)
    ours = dict(zip((" ".join(v) for v in READ_VERBS), compare("machinectl", READ_VERBS), strict=True))
    # Sizes as systemd 262 writes them, and our reason why a usage is unknown.
    assert re.search(r"^raw1 +raw +no +10M ", ours["list-images"], re.M) and "3 images listed." in ours["list-images"]
    quotas = "btrfs quotas are off (start the services with --quota=simple, or turn them on)"
    sv1_usage = f"\t   Usage: unknown ({quotas})" if pool.btrfs else (
        "\t   Usage: unknown (not a btrfs subvolume: the usage of a plain directory is not counted)")
    assert sv1_usage in ours["image-status sv1"].splitlines() and "\tHostname: myhost" in ours["image-status sv1"]
    assert "Usage: unknown" not in ours["image-status raw1"] and "\t   Usage: 10M" in ours["image-status raw1"]
    # --json=short is -o json, --json=pretty -o json-pretty.
    assert ok("list-images", "--json=short").stdout == client("machinectl", "list-images", "-o", "json").stdout
    assert ok("list-images", "--json=pretty").stdout == client("machinectl", "list-images", "-o", "json-pretty").stdout
    assert ok("-o", "help").stdout == client("machinectl", "-o", "help").stdout


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_image_json(pool: Pool, services: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    listed = json.loads(ok("list-images", "--all", "-j").stdout)           # off a terminal: short
    assert [i["name"] for i in listed] == [".hidden1", ".host", "dir1", "raw1", "sv1"]
    assert "images listed" not in ok("list-images", "--json=short").stdout     # no legend with JSON
    # --json=off: no JSON, and no legend either, as importctl has it.
    assert ok("list-images", "--json=off").stdout == ok("list-images", "--no-legend").stdout
    assert ok("--json=help").stdout == client("importctl", "--json=help").stdout
    status = json.loads(ok("image-status", "--json=short", "sv1").stdout)
    assert status["Name"] == "sv1" and status["Type"] == "directory" and status["ReadOnly"] is False
    assert status["Hostname"] == "myhost" and status["MachineID"] == "0123456789abcdef0123456789abcdef"
    assert status["OSRelease"]["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert status["MachineInfo"]["DEPLOYMENT"] == "testing"
    assert status["Usage"] is None            # unknown off btrfs: null, not 2^64-1
    several = json.loads(ok("image-status", "--json=pretty", "sv1", "raw1").stdout)
    assert [s["Name"] for s in several] == ["sv1", "raw1"] and several[1]["Type"] == "raw"
    assert json.loads(ok("image-status", "--json=short").stdout)["PoolPath"] == str(pool.path)
    shown = json.loads(ok("show-image", "--json=short", "-p", "Type", "-p", "ReadOnly", "raw1").stdout)
    assert shown == {"Type": "raw", "ReadOnly": False}
    assert json.loads(ok("show-image", "--json=short").stdout)["PoolPath"] == str(pool.path)
    r = cli("list-images", "--json=yaml")
    assert r.returncode == 1 and "--json=" in r.stderr


def test_image_mutations(pool: Pool, services: Daemons) -> None:
    def prepare() -> None:
        pool.wipe()
        populate(pool.path, pool.btrfs, raw_data=True)

    ours = compare("machinectl", MUTATIONS, prepare)
    assert "Could not clone image: File exists\nrc=1" in ours[1] and image_names() == {".host"}
    if pool.btrfs:  # limits and usage need quotas (never turned on otherwise)
        services.start("machined", extra=("--quota=simple",))
        # (The pool's usage is left out: btrfs counts it when it gets to it.)
        ours = compare("machinectl", [["set-limit", "sv1", "1G"], ["set-limit", "2G"], ["image-status", "sv1"],
                                      ["list-images"], ["clone", "sv1", ".hid"], ["clean"], ["clean", "--all"]],
                       prepare)
        assert "\t   Limit: 1G\n" in ours[2] and re.search(r"Freed exclusive disk space: \d+K$", ours[5], re.M)
        assert "\t   Limit: 2G\n" in ok("image-status").stdout
    prepare()
    cleaned = json.loads(ok("clean", "--all", "--json=short").stdout)
    assert sorted(c["name"] for c in cleaned) == [".hidden1", "dir1", "raw1", "sv1"]


# --- machines ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machine_verbs(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    """A plain container, one with a user namespace, one with a veth, and a
    VM registered by this process (its supervisor)."""
    sleeper = subprocess.Popen(["sleep", "1000"])
    machines = [Nspawn(make_root(tmp_path / "c1"), "c1"),
                Nspawn(make_root(tmp_path / "pu1"), "pu1", "--private-users=pick", "--private-users-ownership=chown"),
                Nspawn(make_root(tmp_path / "veth1"), "veth1", "--network-veth")]
    try:
        for c in machines:
            c.wait_registered()
        pidfd = os.pidfd_open(sleeper.pid)
        assert call_ex("RegisterMachineEx", "vm1", [("Class", ("s", "vm")), ("Service", ("s", "qemu")),
                                                      ("LeaderPIDFD", ("h", pidfd))])[0] == "ok"
        os.close(pidfd)
        leader = client("machinectl", "show", "-P", "Leader", "c1").stdout.strip()
        world.wait_for(lambda: Path(f"/proc/{leader}/comm").read_text() == "sleep\n", 10, "the leader to be sleep")
        steps = [["list"], ["list", "--all"], ["list", "--no-legend"], ["list", "-o", "json"],
                 ["list", "-o", "json-pretty"], ["list", "--max-addresses=0"], ["list", "-l", "--max-addresses=all"],
                 ["status", "c1"], ["status", "pu1"], ["status", "veth1"], ["status", "vm1"], ["status", "c1", "vm1"],
                 ["show", "c1"], ["show", "-a", "c1"], ["show", "-p", "Leader", "--value", "c1"], ["show"],
                 ["status", "nosuch"], ["show", "nosuch"], ["kill", "nosuch"], ["terminate", "nosuch"],
                 ["kill", "-s", "BOGUS", "c1"], ["shell", "c1", "/bin/sh", "-c", "echo $TERM; id -u"],
                 ["shell", "-E", "FOO=bar", "--uid=root", "c1", "/bin/sh", "-c", "echo $FOO-$(hostname)"],
                 ["shell", "root@c1", "/bin/echo", "-n", "hi"], ["shell", "@c1"], ["shell", "nosuch", "/bin/true"]]
        ours = dict(zip((" ".join(s) for s in steps), compare("machinectl", steps), strict=True))
        assert f"\t  Leader: {leader} (sleep)" in ours["status c1"] and "\tID Shift: " in ours["status pu1"]
        assert f"\t Superv.: {os.getpid()} " in ours["status vm1"] and "\t   Iface: ve-veth1" in ours["status veth1"]
        assert "dumb\n0" in ours["shell c1 /bin/sh -c echo $TERM; id -u"].replace("\r", "")
        assert json.loads(ok("list", "--json=short").stdout) == json.loads(client("machinectl", "list", "-o",
                                                                                  "json").stdout)
        status = json.loads(ok("status", "--json=short", "c1").stdout)
        assert status["Name"] == "c1" and status["Leader"] == int(leader) and status["Class"] == "container"
        assert status["OSRelease"]["ID"] == "busybox" and status["Addresses"] == []
        assert json.loads(ok("show", "--json=short", "-p", "State", "c1").stdout) == {"State": "running"}
        # kill: a harmless signal, by name and by number, to the leader and to all.
        for args in (["--signal=CONT"], ["--kill-whom=leader", "-s", "SIGCONT"], ["-s", "18"]):
            ok("kill", *args, "c1")
        assert client("machinectl", "show", "-P", "State", "c1").stdout == "running\n"
        ok("terminate", "c1")
        world.wait_for(lambda: client("machinectl", "show", "c1").returncode != 0, 20, "c1 to go away")
    finally:
        for c in machines:
            c.stop()
        sleeper.kill()
        sleeper.wait()


# --- transfers --------------------------------------------------------------------------------------------------------


def tar_of(tree: Path, compressor: list[str] | None = None) -> bytes:
    data = subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-c", "."], capture_output=True,
                          check=True).stdout
    if compressor:
        data = subprocess.run(compressor, input=data, capture_output=True, check=True).stdout
    return data


def raw_bytes(size: int = 8 << 20) -> bytes:
    data = bytearray(size)
    data[: 1 << 20] = os.urandom(1 << 20)
    data[-4096:] = b"\x5a" * 4096
    return bytes(data)


@pytest.fixture
def web(tmp_path: Path, services: Daemons):
    www = tmp_path / "www"
    www.mkdir()
    server = TestServer(www).start()
    try:
        yield www, server
    finally:
        server.stop()
        assert not server.errors, server.errors


def transfer_steps(pool: Pool, steps: list[list[str]], stdin: Path | None = None) -> list[str]:
    """importctl 262 with --class=machine (what machinectl 262's transfer
    verbs run), and machined-py without: its default."""
    return compare("importctl", steps, pool.wipe, stdin=stdin, theirs_first=("--class=machine",))


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_pulls(pool: Pool, services: Daemons, web, tmp_path: Path) -> None:
    www, server = web
    tree = tmp_path / "tree"
    make_os_tree(tree)
    (www / "img.tar.xz").write_bytes(tar_of(tree, ["xz", "-c"]))
    data = raw_bytes()
    (www / "disk.raw").write_bytes(data)
    (www / "other.raw").write_bytes(data)
    url = server.url
    ours = transfer_steps(pool, [
        ["pull-tar", "--verify=no", url("img.tar.xz")],                    # the name from the URL, suffix stripped
        ["pull-tar", "--verify=no", url("img.tar.xz")],                    # exists
        ["pull-tar", "--verify=no", "--force", url("img.tar.xz"), "img"],  # replaced, from the kept download
        ["pull-raw", "--verify=no", url("disk.raw"), "disk"],
        ["pull-raw", "--verify=no", "--read-only", "--keep-download=no", url("other.raw"), "other"],
        ["pull-raw", "--verify=no", url("nosuch.raw"), "nosuch"],
        ["pull-raw", "ftp://example.com/x.raw"], ["pull-raw", url("disk.raw"), "a/b"],
        ["pull-raw", "--verify=maybe", url("disk.raw")], ["pull-raw", "--class=bogus", url("disk.raw")],
        ["pull-raw", "-q", "--verify=no", "--force", "-N", url("disk.raw"), "disk"],
        ["list-images", "--class=machine"], ["list-images", "--class=machine", "--json=short"],
        ["list-images", "-m", "--no-legend"], ["list-images", "-C", "--json=short"]])
    assert "Created new local image 'img'." in ours[0] and "\x1b[" not in "".join(ours)
    assert "Image 'img' already exists.\nrc=1" in ours[1] and ours[10] == "rc=0"
    assert (pool / "img/etc/os-release").exists() and (pool / "disk.raw").read_bytes() == data
    assert show("other", "ReadOnly") == "yes" and not [p for p in os.listdir(pool.path) if p.startswith(".raw-") and
                                                       "other" in p]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_imports_and_exports(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    data = raw_bytes()
    (tmp_path / "vm.raw.xz").write_bytes(lzma.compress(data))
    (tmp_path / "ct.tar.gz").write_bytes(tar_of(tree, ["gzip", "-c"]))
    (tmp_path / "stdin.raw").write_bytes(data)
    out = {name: str(tmp_path / name) for name in ("ct.tar.zst", "ct.tgz", "ct.txz", "vm.raw.xz", "vm.raw.bz2",
                                                   "ct.tar", "vm-as-gzip.xz", "vm.tar", "x")}
    exports = [("export-tar", "ct", "ct.tar.zst"), ("export-tar", "ct", "ct.tgz"), ("export-tar", "ct", "ct.txz"),
               ("export-raw", "vm", "vm.raw.xz"), ("export-raw", "vm", "vm.raw.bz2"), ("export-tar", "ct", "ct.tar")]
    transfer_steps(pool, [
        ["import-raw", str(tmp_path / "vm.raw.xz")], ["import-tar", "--read-only", str(tmp_path / "ct.tar.gz")],
        ["import-fs", str(tree), "fs1"], ["import-fs", str(tree), "fs1"], ["import-fs", "--force", str(tree), "fs1"],
        ["import-raw", "-", "fromstdin"], ["import-raw", "-"], ["import-raw", str(tmp_path / "nosuch.raw")],
        ["import-tar", f"{tmp_path}/"],
        *([verb, image, out[name]] for verb, image, name in exports),      # the compression from the suffix
        ["export-raw", "--format=gzip", "vm", out["vm-as-gzip.xz"]],     # --format wins over the suffix
        ["export-tar", "vm", out["vm.tar"]],                              # a raw image as tar: fails
        ["export-raw", "--format=lz4", "vm", out["x"]], ["export-raw", "../x", out["x"]]], stdin=tmp_path / "stdin.raw")
    assert (pool / "vm.raw").read_bytes() == data and (pool / "fromstdin.raw").read_bytes() == data
    assert show("ct", "ReadOnly") == "yes" and (pool / "ct/etc/os-release").exists()
    assert (pool / "fs1/etc/os-release").read_text() == (tree / "etc/os-release").read_text()
    for name, magic in (("ct.tar.zst", ZSTD), ("ct.tgz", GZIP), ("ct.txz", XZ), ("vm.raw.xz", XZ),
                        ("vm.raw.bz2", BZIP2), ("vm-as-gzip.xz", GZIP), ("ct.tar", None)):
        head = Path(out[name]).read_bytes()[:6]
        assert head.startswith(magic) if magic else not any(head.startswith(m) for m in (XZ, GZIP, BZIP2, ZSTD))
    assert lzma.decompress(Path(out["vm.raw.xz"]).read_bytes()) == data
    assert gzip.decompress(Path(out["vm-as-gzip.xz"]).read_bytes()) == data
    # To standard output (a file here: importd keeps the fds it exported to, so a pipe would never see its end).
    with open(tmp_path / "stdout.raw", "wb") as f:
        r = subprocess.run([*CLI, "export-raw", "vm", "-"], stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0 and (tmp_path / "stdout.raw").read_bytes() == data, r.stderr


def slow_pull(argv: list[str], server: TestServer, www: Path, name: str) -> subprocess.Popen[str]:
    """ARGV pull-raw of a 16 MiB image at 2 MiB/s."""
    (www / f"{name}.raw").write_bytes(raw_bytes(16 << 20))
    server.faults[f"{name}.raw"] = Fault(rate=2 << 20)
    return subprocess.Popen([*argv, "pull-raw", "--verify=no", "-N", server.url(f"{name}.raw"), name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_listed(name: str, timeout: float = 30, moving: bool = False) -> str:
    """The list-transfers line of NAME, once there (and MOVING: with 1% done)."""
    def listed() -> str | None:
        return next((line for line in client("importctl", "list-transfers", "--no-legend").stdout.splitlines()
                     if line.split()[4:5] == [name] and (not moving or line.split()[1] not in ("-", "0%"))), None)

    world.wait_for(listed, timeout, f"transfer {name} to be listed")
    return listed() or ""


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_list_and_cancel_transfers(pool: Pool, services: Daemons, web) -> None:
    www, server = web
    views = [["list-transfers"], ["list-transfers", "--no-legend"], ["list-transfers", "--json=short"],
             ["list-transfers", "--json=pretty"], ["list-transfers", "-j"], ["list-transfers", "--json=off"],
             ["list-transfers", "--class=machine"], ["list-transfers", "--class=portable"],
             ["cancel-transfer", "abc"], ["cancel-transfer", "4711"]]
    assert compare("importctl", views)[0] == "No transfers.\nrc=0"
    followers = {"ours": slow_pull(CLI, server, www, "slow1"),
                 "262": slow_pull(sid.argv("importctl", "--class=machine"), server, www, "slow2")}
    try:
        ids = {who: wait_listed(name, moving=True).split()[0] for who, name in (("ours", "slow1"), ("262", "slow2"))}
        ours = compare("importctl", views)
        assert re.search(r"^ID +PROGRESS +TYPE +CLASS +LOCAL +REMOTE$", ours[0], re.M), ours[0]
        assert "2 transfers listed." in ours[0]
        assert {t["local"] for t in json.loads(ok("list-transfers", "--json=short").stdout)} == {"slow1", "slow2"}
        assert client("importctl", "cancel-transfer", ids["ours"]).returncode == 0     # each cancels the other's
        assert cli("cancel-transfer", ids["262"]).returncode == 0
        texts = {}
        for who, p in followers.items():
            out, err = p.communicate(timeout=60)
            texts[who] = re.sub(r"slow[12]", "slow", as_262(transcript(subprocess.CompletedProcess([], p.returncode,
                                                                                               out, err))))
        assert texts["ours"] == texts["262"] and texts["ours"].endswith("Transfer canceled.\nrc=1"), texts
    finally:
        for p in followers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    world.wait_for(transfers_idle, 30, "no transfers")
    assert not {"slow1", "slow2"} & image_names() and not [p for p in os.listdir(pool.path) if p.startswith(".#")]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_detach_and_watch_off_terminal(pool: Pool, services: Daemons, web) -> None:
    """Ours only: --detach, watch, list-transfers --follow."""
    www, server = web
    (www / "bg.raw").write_bytes(raw_bytes(8 << 20))
    server.faults["bg.raw"] = Fault(rate=4 << 20)
    started = time.monotonic()
    r = ok("pull-raw", "--detach", "--verify=no", "-N", server.url("bg.raw"), "bg")
    transfer_id = int(r.stdout.strip())
    assert time.monotonic() - started < 2, "--detach waited for the transfer"
    assert f"watch {transfer_id}" in r.stderr
    assert wait_listed("bg").split()[0] == str(transfer_id)
    # watch off a terminal: the log lines with the id in front, exit status from the result.
    r = ok("watch", str(transfer_id))
    assert f"[{transfer_id}] Created new local image 'bg'." in r.stderr, r.stderr
    assert "\x1b[" not in r.stderr and "bg" in image_names()
    assert ok("watch").stderr == "No transfers.\n"
    assert ok("list-transfers", "--follow").stderr == "No transfers.\n"
    r = cli("watch", "4711")
    assert r.returncode == 1 and "No transfer by id 4711" in r.stderr


def test_fallback_to_old_methods(pool: Pool, daemons: Daemons, tmp_path: Path) -> None:
    """Against systemd-importd 252, which has no *Ex methods and no
    ListTransfersEx: the old methods, on UnknownMethod; the same transcript
    as machinectl 252's for an import."""
    daemons.start("machined")
    daemons.start("importd", ours=False)
    data = raw_bytes(4 << 20)
    (tmp_path / "old.raw").write_bytes(data)
    r = ok("import-raw", str(tmp_path / "old.raw"))
    assert (pool / "old.raw").read_bytes() == data, r.stderr
    theirs = subprocess.run(["machinectl", "import-raw", "--force", str(tmp_path / "old.raw")], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert as_262(transcript(cli("import-raw", "--force", str(tmp_path / "old.raw")))) == transcript(theirs)
    assert ok("list-transfers").stdout == "No transfers.\n"
    tree = tmp_path / "tree"
    make_os_tree(tree)
    ok("import-fs", str(tree), "oldfs")
    ok("export-raw", "old", str(tmp_path / "back.raw.xz"))
    assert lzma.decompress((tmp_path / "back.raw.xz").read_bytes()) == data
    # What only the Ex methods can do is refused, not silently dropped.
    r = cli("import-raw", "--class=portable", str(tmp_path / "old.raw"), "p1")
    assert r.returncode == 1 and "ImportRawEx" in r.stderr, r.stderr


# --- the command itself -----------------------------------------------------------------------------------------------


def test_command_line() -> None:
    script = Path(sys.executable).parent / "machined-py"
    assert script.exists(), "the console script is installed with the project"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("machined-py ")
    # It shadows neither of systemd's tools.
    assert shutil.which("machinectl") == "/usr/bin/machinectl" and script.name not in ("machinectl", "importctl")
    r = cli("--help")
    assert r.returncode == 0 and "watch [ID...]" in r.stdout and "--detach" in r.stdout
    assert cli("help").stdout == r.stdout
    for args, message in ((["--frobnicate"], "unrecognized option '--frobnicate'"),
                          (["list-images", "--class=nosuch"], "Failed to parse --class= parameter: nosuch"),
                          (["-o", "bogus", "list"], "Unknown output 'bogus'.")):
        r = cli(*args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)


def test_table_header_alignment() -> None:
    """format-table: cells take the alignment of the cell above, so
    importctl's ID header stays left of its right-aligned numbers."""
    table = Table([Column("id", right=True, header_right=False), Column("usage", right=True), Column("name")])
    table.add([7, 1], ["7", "1K", "a"])
    table.add([123, 2], ["123", "10M", "b"])
    assert table.render() == "ID  USAGE NAME\n  7    1K a\n123   10M b\n"
    assert table.render(header=False) == "  7  1K a\n123 10M b\n"


def test_no_bus(tmp_path: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/nosuch")
    r = subprocess.run([*CLI, "list-images"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
