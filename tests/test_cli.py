"""machined-py, our command-line client, off a terminal, against our own
daemons on the private bus: every verb, its output next to machinectl's view
of the same pool (and machinectl's own JSON), --json parsed, exit codes.
The terminal side (live bars, Ctrl-C, resize) is in test_cli_tty.py."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepool import dev as world
from tests.conftest import Daemons, Pool, machinectl
from tests.httpserver import Fault, TestServer
from tests.imagetree import make_os_tree, normalize, populate
from tests.test_machines import Nspawn, make_root

CLI = [sys.executable, "-m", "machinedpy_cli"]
XZ, GZIP, BZIP2, ZSTD = b"\xfd7zXZ\x00", b"\x1f\x8b", b"BZh", b"\x28\xb5\x2f\xfd"


def cli(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, *args], capture_output=True, input=input, timeout=timeout,
                       stdin=None if input is not None else subprocess.DEVNULL)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def ok(*args: str) -> subprocess.CompletedProcess:
    r = cli(*args)
    assert r.returncode == 0, f"machined-py {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def both(*args: str) -> tuple[str, str]:
    """The same verb through machinectl and through us: (theirs, ours), with
    output, messages and exit status."""
    theirs = machinectl(*args)
    ours = cli("--no-pager", *args)
    assert "Traceback" not in ours.stderr, ours.stderr
    return (normalize(f"{theirs.stdout}{theirs.stderr}rc={theirs.returncode}"),
            normalize(f"{ours.stdout}{ours.stderr}rc={ours.returncode}"))


def image_names(all: bool = True) -> set[str]:
    r = machinectl("list-images", "--no-legend", *(["--all"] if all else []))
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def transfers_idle() -> bool:
    return machinectl("list-transfers").stdout.strip() == "No transfers."


# --- images -----------------------------------------------------------------------------------------------------------

READ_VERBS = [
    ["list-images"], ["list-images", "--all"], ["list-images", "--no-legend"], ["list-images", "-a", "--no-legend"],
    ["image-status", "sv1"], ["image-status", "dir1"], ["image-status", "raw1"], ["image-status", ".hidden1"],
    ["image-status", "sv1", "raw1"], ["image-status"],
    ["show-image", "sv1"], ["show-image", "dir1"], ["show-image", "raw1"], ["show-image", "--all", "raw1"],
    ["show-image", "-p", "Type", "sv1"], ["show-image", "-p", "Name", "--value", "sv1", "dir1"],
    ["show-image", "-p", "ReadOnly", "--value", "raw1"], ["show-image"], ["show-image", "-a"],
    ["image-status", "nosuch"], ["show-image", "nosuch"], ["image-status", "../etc"],
    ["remove", "nosuch"], ["rename", "nosuch", "x"], ["clone", "nosuch", "x"], ["read-only", "nosuch"],
    ["read-only", "sv1", "maybe"], ["set-limit", "sv1", "lots"],
    ["clone", "sv1", "../x"], ["clone", "sv1", ".#x"], ["rename", "sv1", "dir1"], ["remove", ".host"],
]


def test_image_listings_match_machinectl(pool: Pool, services: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    for verb in READ_VERBS:
        theirs, ours = both(*verb)
        # Ours says why the usage is unknown (machinectl says nothing).
        ours = "\n".join(line for line in ours.split("\n") if not line.startswith("\t   Usage: unknown ("))
        assert ours == theirs, f"{verb}\n--- machinectl\n{theirs}\n--- machined-py\n{ours}"
    quotas = "btrfs quotas are off (start the services with --quota=simple, or turn them on)"
    sv1_usage = f"\t   Usage: unknown ({quotas})" if pool.btrfs else (
        "\t   Usage: unknown (not a btrfs subvolume: the usage of a plain directory is not counted)")
    assert sv1_usage in cli("image-status", "sv1").stdout.splitlines()
    assert "Usage: unknown" not in cli("image-status", "raw1").stdout
    # Real output, not two empty strings.
    assert "sv1" in cli("list-images").stdout and "3 images listed." in cli("list-images").stdout
    assert "\tHostname: myhost" in cli("image-status", "sv1").stdout
    assert ok("show-image", "-P", "Type", "raw1").stdout == "raw\n"           # -P: newer than machinectl 252


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_image_json(pool: Pool, services: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    for extra in ([], ["--all"]):
        theirs = json.loads(machinectl("list-images", "-o", "json", *extra).stdout)
        short = ok("list-images", "--json=short", *extra).stdout
        assert short.count("\n") == 1 and json.loads(short) == theirs
        pretty = ok("list-images", "--json=pretty", *extra).stdout
        assert "\n\t{\n\t\t\"name\" : " in pretty and json.loads(pretty) == theirs
        assert json.loads(ok("list-images", "-j", *extra).stdout) == theirs     # off a terminal: short
    assert [i["name"] for i in theirs] == [".hidden1", ".host", "dir1", "raw1", "sv1"]
    assert "images listed" not in ok("list-images", "--json=short").stdout     # no legend with JSON
    assert ok("list-images", "--json=off").stdout == ok("list-images").stdout

    status = json.loads(ok("image-status", "--json=short", "sv1").stdout)
    assert status["Name"] == "sv1" and status["Type"] == "directory" and status["ReadOnly"] is False
    assert status["Hostname"] == "myhost" and status["MachineID"] == "0123456789abcdef0123456789abcdef"
    assert status["OSRelease"]["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert status["MachineInfo"]["DEPLOYMENT"] == "testing"
    assert status["Usage"] is None            # unknown off btrfs: null, not 2^64-1
    several = json.loads(ok("image-status", "--json=pretty", "sv1", "raw1").stdout)
    assert [s["Name"] for s in several] == ["sv1", "raw1"] and several[1]["Type"] == "raw"
    pool_status = json.loads(ok("image-status", "--json=short").stdout)
    assert pool_status["PoolPath"] == str(pool.path)
    shown = json.loads(ok("show-image", "--json=short", "-p", "Type", "-p", "ReadOnly", "raw1").stdout)
    assert shown == {"Type": "raw", "ReadOnly": False}
    manager = json.loads(ok("show-image", "--json=short").stdout)
    assert manager["PoolPath"] == str(pool.path)
    r = cli("list-images", "--json=yaml")
    assert r.returncode == 1 and "--json=" in r.stderr


def test_image_mutations(pool: Pool, services: Daemons) -> None:
    populate(pool.path, pool.btrfs, raw_data=True)
    ok("clone", "sv1", "sv2")
    ok("clone", "--read-only", "dir1", "dir2")
    assert {"sv2", "dir2"} <= image_names()
    assert machinectl("show-image", "-p", "ReadOnly", "--value", "dir2").stdout == "yes\n"
    theirs, ours = both("clone", "sv1", "sv2")          # exists already
    assert ours == theirs and "rc=1" in ours
    ok("rename", "sv2", "sv3")
    assert "sv3" in image_names() and "sv2" not in image_names()
    ok("read-only", "sv3")
    assert machinectl("show-image", "-p", "ReadOnly", "--value", "sv3").stdout == "yes\n"
    ok("read-only", "sv3", "no")
    assert machinectl("show-image", "-p", "ReadOnly", "--value", "sv3").stdout == "no\n"
    for verb in (["set-limit", "sv3", "1G"], ["set-limit", "512M"], ["set-limit", "infinity"]):
        theirs_rc = machinectl(*verb).returncode
        assert cli(*verb).returncode == theirs_rc, verb
    if pool.btrfs:
        services.start("machined", extra=("--quota=simple",))  # limits need quotas (never turned on otherwise)
        ok("set-limit", "sv3", "1G")
        assert machinectl("show-image", "-p", "Limit", "--value", "sv3").stdout == f"{1 << 30}\n"
    ok("remove", "sv3", "dir2")
    assert not {"sv3", "dir2"} & image_names()
    r = ok("clean")
    assert "Removed image '.hidden1'" in r.stderr and "Removed 1 images in total." in r.stderr
    assert ".hidden1" not in image_names()
    cleaned = json.loads(ok("clean", "--all", "--json=short").stdout)
    assert sorted(c["name"] for c in cleaned) == ["dir1", "raw1", "sv1"]
    assert image_names() == {".host"}


# --- machines ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_machine_verbs(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    c = Nspawn(make_root(tmp_path / "root"), "c1")
    try:
        c.wait_registered()
        leader = machinectl("show", "-p", "Leader", "--value", "c1").stdout.strip()
        world.wait_for(lambda: Path(f"/proc/{leader}/comm").read_text() == "sleep\n", 10, "the leader to be sleep")
        for verb in (["list"], ["list", "--all"], ["list", "--no-legend"], ["status", "c1"], ["show", "c1"],
                     ["show", "-a", "c1"], ["show", "-p", "Leader", "--value", "c1"], ["show"], ["status", "nosuch"],
                     ["show", "nosuch"], ["kill", "nosuch"], ["terminate", "nosuch"]):
            theirs, ours = both(*verb)
            assert ours == theirs, f"{verb}\n--- machinectl\n{theirs}\n--- machined-py\n{ours}"
        assert "c1" in cli("list").stdout and f"Leader: {leader} (sleep)" in cli("status", "c1").stdout
        # Accepted as machinectl has them (there is no agent to ask for passwords, no ellipsis to turn off).
        assert ok("list", "--no-ask-password", "-l", "--max-addresses=all").stdout == ok("list").stdout
        assert json.loads(ok("list", "--json=short").stdout) == json.loads(machinectl("list", "-o", "json").stdout)
        status = json.loads(ok("status", "--json=short", "c1").stdout)
        assert status["Name"] == "c1" and status["Leader"] == int(leader) and status["Class"] == "container"
        assert status["OSRelease"]["ID"] == "busybox" and status["Addresses"] == []
        assert json.loads(ok("show", "--json=short", "-p", "State", "c1").stdout) == {"State": "running"}

        # shell: a command, the environment, the user (off a terminal; the pty relay is in test_cli_tty).
        r = ok("shell", "-E", "FOO=bar", "--uid=root", "c1", "/bin/sh", "-c", "echo hello-$(hostname) $FOO; id -u")
        assert r.stdout.replace("\r", "").splitlines() == ["hello-c1 bar", "0"], r.stdout
        assert "Connected to machine c1." in r.stderr and "Connection to machine c1 terminated." in r.stderr
        r = ok("shell", "root@c1", "/bin/echo", "-n", "hi")        # options after NAME are the command's
        assert r.stdout.replace("\r", "") == "hi\n", r.stdout
        r = cli("shell", "@c1")
        assert r.returncode == 1 and "Failed to parse machine specification" in r.stderr
        r = cli("shell", "nosuch", "/bin/true")
        assert r.returncode == 1 and "Failed to get shell PTY: No machine 'nosuch' known" in r.stderr

        # kill: a harmless signal first, by name and by number, to the leader and to all.
        ok("kill", "--signal=CONT", "c1")
        ok("kill", "--kill-whom=leader", "-s", "SIGCONT", "c1")
        ok("kill", "-s", "18", "c1")
        assert cli("kill", "-s", "NOSUCH", "c1").returncode == 1
        assert machinectl("show", "-p", "State", "--value", "c1").stdout == "running\n"
        ok("terminate", "c1")
        world.wait_for(lambda: machinectl("show", "c1").returncode != 0, 20, "c1 to go away")
        assert "No machines." in cli("list").stdout
    finally:
        c.stop()


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


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_pulls(pool: Pool, services: Daemons, web, tmp_path: Path) -> None:
    www, server = web
    tree = tmp_path / "tree"
    make_os_tree(tree)
    (www / "img.tar.xz").write_bytes(tar_of(tree, ["xz", "-c"]))
    data = raw_bytes()
    (www / "disk.raw").write_bytes(data)
    (www / "other.raw").write_bytes(data)

    r = ok("pull-tar", "--verify=no", server.url("img.tar.xz"))       # the name from the URL, suffix stripped
    assert (pool / "img/etc/os-release").exists()
    assert "Enqueued transfer job" in r.stderr and "Created new local image 'img'." in r.stderr
    assert "\x1b[" not in r.stderr, "escape sequences off a terminal"
    r = ok("pull-raw", "--verify=no", server.url("disk.raw"), "disk")
    assert (pool / "disk.raw").read_bytes() == data
    assert {"img", "disk"} <= image_names()
    # --read-only and --keep-download=no exist only in PullRawEx: the image is read-only, and no cache is left.
    ok("pull-raw", "--verify=no", "--read-only", "--keep-download=no", server.url("other.raw"), "other")
    assert machinectl("show-image", "-p", "ReadOnly", "--value", "other").stdout == "yes\n"
    assert not [p for p in os.listdir(pool.path) if "other" in p and p.startswith(".raw-")]
    # An image that exists: refused without --force, replaced with it.
    r = cli("pull-raw", "--verify=no", server.url("disk.raw"), "disk")
    assert r.returncode == 1 and "Transfer" in r.stderr and "failed" in r.stderr, r.stderr
    ok("pull-raw", "--verify=no", "--force", "-N", server.url("disk.raw"), "disk")
    # Failures: a missing file (the transfer fails: 1), bad arguments (refused before any call: 1).
    r = cli("pull-raw", "--verify=no", server.url("nosuch.raw"), "nosuch")
    assert r.returncode == 1 and "Transfer" in r.stderr and "failed." in r.stderr, r.stderr
    assert "nosuch" not in image_names()
    for args, message in ((["ftp://example.com/x.raw"], "URL 'ftp://example.com/x.raw' is not valid."),
                          ([server.url("disk.raw"), "a/b"], "Local name a/b is not a suitable image name."),
                          (["--verify=maybe", server.url("disk.raw")], "Failed to parse --verify= setting: maybe")):
        r = cli("pull-raw", *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
    # -q: only what is not "info".
    r = ok("pull-raw", "-q", "--verify=no", "--force", "-N", server.url("disk.raw"), "disk")
    assert r.stderr == "", r.stderr


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_imports_and_exports(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_os_tree(tree)
    data = raw_bytes()
    (tmp_path / "vm.raw.xz").write_bytes(lzma.compress(data))
    (tmp_path / "ct.tar.gz").write_bytes(tar_of(tree, ["gzip", "-c"]))

    r = ok("import-raw", str(tmp_path / "vm.raw.xz"))          # NAME from the file: "vm"
    assert (pool / "vm.raw").read_bytes() == data and "Enqueued transfer job" in r.stderr
    ok("import-tar", "--read-only", str(tmp_path / "ct.tar.gz"))
    assert (pool / "ct/etc/os-release").exists()
    assert machinectl("show-image", "-p", "ReadOnly", "--value", "ct").stdout == "yes\n"
    ok("import-fs", str(tree), "fs1")
    assert (pool / "fs1/etc/os-release").read_text() == (tree / "etc/os-release").read_text()
    r = cli("import-fs", str(tree), "fs1")
    assert r.returncode == 1, r.stderr
    ok("import-fs", "--force", str(tree), "fs1")
    # From standard input: a name is needed.
    r = cli("import-raw", "-", "fromstdin", input=data)
    assert r.returncode == 0, r.stderr
    assert (pool / "fromstdin.raw").read_bytes() == data
    r = cli("import-raw", "-")
    assert r.returncode == 1 and "Need either path or local name." in r.stderr
    r = cli("import-raw", str(tmp_path / "nosuch.raw"))
    assert r.returncode == 1 and "Failed to open" in r.stderr
    assert {"vm", "ct", "fs1", "fromstdin"} <= image_names()

    # Exports: the compression from the suffix, or --format.
    for verb, name, out, magic in (("export-tar", "ct", "ct.tar.zst", ZSTD), ("export-tar", "ct", "ct.tgz", GZIP),
                                   ("export-tar", "ct", "ct.txz", XZ), ("export-raw", "vm", "vm.raw.xz", XZ),
                                   ("export-raw", "vm", "vm.raw.bz2", BZIP2), ("export-tar", "ct", "ct.tar", None)):
        ok(verb, name, str(tmp_path / out))
        head = (tmp_path / out).read_bytes()[:6]
        if magic is None:
            assert not any(head.startswith(m) for m in (XZ, GZIP, BZIP2, ZSTD)), (out, head)
        else:
            assert head.startswith(magic), (out, head)
    assert lzma.decompress((tmp_path / "vm.raw.xz").read_bytes()) == data
    assert subprocess.run(["tar", "-tf", str(tmp_path / "ct.tar")], capture_output=True).stdout.count(b"etc/") >= 1
    ok("export-raw", "--format=gzip", "vm", str(tmp_path / "vm-as-gzip.xz"))      # --format wins over the suffix
    assert gzip.decompress((tmp_path / "vm-as-gzip.xz").read_bytes()) == data
    # To standard output (a file here: importd keeps the fds it exported to, so a pipe would never see its end).
    with open(tmp_path / "stdout.raw", "wb") as out:
        r = subprocess.run([*CLI, "export-raw", "vm", "-"], stdout=out, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0 and (tmp_path / "stdout.raw").read_bytes() == data, r.stderr
    r = cli("export-tar", "vm", str(tmp_path / "vm.tar"))                   # a raw image as tar: fails
    assert r.returncode == 1 and "failed" in r.stderr
    r = cli("export-raw", "--format=lz4", "vm", str(tmp_path / "x"))
    assert r.returncode == 1 and "Unknown format: lz4" in r.stderr
    r = cli("export-raw", "../x", str(tmp_path / "x"))
    assert r.returncode == 1 and "Image name ../x is not valid." in r.stderr


def _start_slow_pull(server: TestServer, www: Path, name: str, size: int = 16 << 20, rate: int = 2 << 20,
                     *extra: str) -> subprocess.Popen:
    (www / f"{name}.raw").write_bytes(raw_bytes(size))
    server.faults[f"{name}.raw"] = Fault(rate=rate)
    return subprocess.Popen([*CLI, "pull-raw", "--verify=no", "-N", *extra, server.url(f"{name}.raw"), name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_listed(name: str, timeout: float = 30) -> str:
    def listed() -> str | None:
        for line in machinectl("list-transfers").stdout.splitlines():
            if f" {name} " in line:
                return line
        return None

    world.wait_for(listed, timeout, f"transfer {name} to be listed")
    return listed() or ""


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_list_and_cancel_transfers(pool: Pool, services: Daemons, web) -> None:
    www, server = web
    assert ok("list-transfers").stdout == "No transfers.\n"
    assert ok("list-transfers", "--json=short").stdout == "[]\n"
    assert ok("list-transfers", "--no-legend").stdout == ""
    slow = _start_slow_pull(server, www, "slow")
    try:
        theirs = _wait_listed("slow").split()          # ID PERCENT TYPE LOCAL REMOTE
        r = ok("list-transfers")
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["ID", "PROGRESS", "TYPE", "CLASS", "LOCAL", "REMOTE"]
        row = lines[1].split()
        assert [row[0], row[2], row[4], row[5]] == [theirs[0], theirs[2], theirs[3], theirs[4]]
        assert row[3] == "machine" and lines[-1] == "1 transfers listed."
        [listed] = json.loads(ok("list-transfers", "--json=short").stdout)
        assert listed["id"] == int(theirs[0]) and listed["type"] == "pull-raw" and listed["local"] == "slow"
        assert listed["remote"] == server.url("slow.raw") and listed["class"] == "machine"
        assert listed["progress"] is None or 0 <= listed["progress"] <= 100
        assert ok("list-transfers", "--class=machine", "--no-legend").stdout.split()[0] == theirs[0]
        assert ok("list-transfers", "--class=portable").stdout == "No transfers.\n"

        ok("cancel-transfer", theirs[0])
        out, err = slow.communicate(timeout=60)
        assert slow.returncode == 1, err
        assert f"Transfer {theirs[0]} canceled." in err, err
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    world.wait_for(transfers_idle, 30, "no transfers")
    assert "slow" not in image_names()
    assert not [p for p in os.listdir(pool.path) if p.startswith(".#")]
    for bad, message in (("abc", "Failed to parse transfer id: abc"),
                         ("4711", "Could not cancel transfer: No transfer by id 4711")):
        r = cli("cancel-transfer", bad)
        assert r.returncode == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_detach_and_watch_off_terminal(pool: Pool, services: Daemons, web) -> None:
    www, server = web
    (www / "bg.raw").write_bytes(raw_bytes(8 << 20))
    server.faults["bg.raw"] = Fault(rate=4 << 20)
    started = time.monotonic()
    r = ok("pull-raw", "--detach", "--verify=no", "-N", server.url("bg.raw"), "bg")
    transfer_id = int(r.stdout.strip())
    assert time.monotonic() - started < 2, "--detach waited for the transfer"
    assert f"watch {transfer_id}" in r.stderr
    assert _wait_listed("bg").split()[0] == str(transfer_id)
    # watch off a terminal: the log lines with the id in front, exit status from the result.
    r = ok("watch", str(transfer_id))
    assert f"[{transfer_id}] Created new local image 'bg'." in r.stderr, r.stderr
    assert "\x1b[" not in r.stderr
    assert "bg" in image_names()
    assert ok("watch").stderr == "No transfers.\n"
    assert ok("list-transfers", "--follow").stderr == "No transfers.\n"
    r = cli("watch", "4711")
    assert r.returncode == 1 and "No transfer by id 4711" in r.stderr


def test_fallback_to_old_methods(pool: Pool, daemons: Daemons, tmp_path: Path) -> None:
    """Against systemd-importd 252, which has no *Ex methods and no
    ListTransfersEx: the old methods, on UnknownMethod."""
    daemons.start("machined")
    daemons.start("importd", ours=False)
    data = raw_bytes(4 << 20)
    (tmp_path / "old.raw").write_bytes(data)
    r = ok("import-raw", str(tmp_path / "old.raw"))
    assert (pool / "old.raw").read_bytes() == data, r.stderr
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
    for args, message in ((["frobnicate"], "Unknown command verb 'frobnicate'."),
                          (["--frobnicate"], "unrecognized option '--frobnicate'"),
                          (["clone", "a"], "Too few arguments."),
                          (["rename", "a", "b", "c"], "Too many arguments."),
                          (["list-images", "--class=nosuch"], "Failed to parse --class= parameter: nosuch"),
                          (["kill", "-s", "BOGUS", "x"], "Failed to parse signal string")):
        r = cli(*args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)


def test_no_bus(tmp_path: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/nosuch")
    r = subprocess.run([*CLI, "list-images"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
