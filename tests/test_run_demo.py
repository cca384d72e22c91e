"""``make run``'s runtime (``python -m imagepool.dev run STATE``, the command
the Makefile runs) and the README's walkthrough against it: the signed demo
image it serves on loopback is pulled with --verify=signature by machined-py,
by machinectl 252 and by importctl 262, cloned, listed and exported with
machined-py and machinectl; a tampered SHA256SUMS and a tampered image are
refused.  The demo's key is only in the run's own keyring (importd
--keyring), so every good signature here proves that keyring is the one used.

The run is in a mount namespace of its own, /run there being STATE/run; every
client is run as make shell runs it (tools/run-shell STATE: nsenter into that
namespace, the bus address and PATH set by the script, not by the test).
Nothing of the caller's /run may change: the suite's own /run/systemd (a
tmpfs of the suite's namespace, see conftest) is compared entry by entry,
/run/varlink too, and the host's /run by its entries' names and types.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepool import demo
from tests import sid

pytestmark = pytest.mark.root

CHECKOUT = Path(__file__).resolve().parent.parent
RUN_SHELL = CHECKOUT / "tools" / "run-shell"  # what make shell runs
OS_LINE = "OS: machined-py demo (busybox)"


@dataclass
class Run:
    state: Path
    proc: subprocess.Popen[str]
    banner: str
    url: str
    pid: int
    namespace: str

    @property
    def env(self) -> dict[str, str]:
        # No bus address: make shell's script sets it (and PATH, where machined-py is found).
        env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        return env

    @property
    def site(self) -> Path:
        return self.state / "demo" / "site"

    def inside(self, path: Path) -> Path:
        """PATH as the run's namespace sees it (the pool is mounted there only)."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    @property
    def pool(self) -> Path:
        return self.inside(self.state / "pool")

    def client(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(RUN_SHELL), str(self.state), *argv], capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def ours(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client(["machined-py", *args])

    def machinectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client(["machinectl", "--no-pager", *args])

    def importctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client(sid.argv("importctl", "--no-pager", *args))


def _ours_running(state: Path) -> list[str]:
    """Processes whose command line names the run's directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def _tree(top: str, times: bool = True) -> dict[str, tuple[int, ...]]:
    """Every entry below TOP (TOP included; symbolic links not followed): its
    type and mode, and with TIMES its size and modification time (of
    directories too: an entry made and removed again changes it)."""
    entries: dict[str, tuple[int, ...]] = {}
    for directory, dirs, files in os.walk(top):
        for path in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            entries[path] = (st.st_mode, st.st_size, st.st_mtime_ns) if times else (st.st_mode,)
    return entries


def _caller_run() -> dict[str, dict[str, tuple[int, ...]]]:
    """The caller's /run: the suite's private /run/systemd and /run/varlink
    exactly; the rest (the host's, which other programs may write meanwhile)
    by its entries' names, types and modes."""
    rest = {p: e for p, e in _tree("/run", times=False).items()
            if not p.startswith(("/run/systemd/", "/run/varlink/")) and p not in ("/run/systemd", "/run/varlink")}
    return {"/run/systemd": _tree("/run/systemd"), "/run/varlink": _tree("/run/varlink"), "/run": rest}


def _in_namespace(namespace: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == namespace:
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    state = tmp_path_factory.mktemp("make-run") / ".run"
    before = _caller_run()
    proc = subprocess.Popen([sys.executable, "-m", "imagepool.dev", "run", str(state)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(CHECKOUT)))
    assert proc.stdout is not None
    lines = []
    shell = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("machined-py pull-tar"):
                break
        banner = "".join(lines)
        url = re.search(r"^demo image: (http://127\.0\.0\.1:\d+/demo\.tar\.xz) ", banner, re.M)
        assert url, f"make run printed:\n{banner}"
        fields = dict(ln.split("=", 1) for ln in (state / "namespace").read_text().splitlines())
        r = Run(state, proc, banner, url.group(1), int(fields["PID"]), fields["NAMESPACE"])
        assert r.pid == proc.pid and os.readlink(f"/proc/{proc.pid}/ns/mnt") == r.namespace
        # The pool's loop device (mounted in the run's namespace only).
        loops = [ln.split(" - ")[1].split()[1] for ln in Path(f"/proc/{r.pid}/mountinfo").read_text().splitlines()
                 if ln.split()[4] == str(state / "pool")]
        assert len(loops) == 1 and loops[0].startswith("/dev/loop"), loops
        # A shell left in the namespace (make shell, forgotten): stopping the run ends it.
        shell = subprocess.Popen([str(RUN_SHELL), str(state), "sleep", "infinity"], env=r.env,
                                 stdin=subprocess.DEVNULL)
        yield r
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        if shell is not None:
            try:
                shell.wait(timeout=10)
            except subprocess.TimeoutExpired:
                shell.kill()
                shell.wait()
                raise
    assert proc.returncode == 0, "".join(lines) + rest
    assert rest.rstrip().endswith("stopped"), rest
    assert "Traceback" not in rest, rest
    # Nothing left running or mounted, the namespace gone (no process in it), the demo kept for the next run.
    assert shell.returncode == -signal.SIGHUP, shell.returncode
    assert not _ours_running(state)
    assert not _in_namespace(r.namespace)
    assert str(state) not in Path("/proc/self/mountinfo").read_text()
    backing = Path("/sys/block") / Path(loops[0]).name / "loop" / "backing_file"
    assert not backing.exists() or str(state) not in backing.read_text(), backing.read_text()
    assert not (state / "namespace").exists()
    assert demo.Demo(state / "demo").complete()
    # Nothing of the caller's /run changed; what the services made below /run is in the run's directory.
    after = _caller_run()
    for top in before:
        assert after[top] == before[top], (top, sorted(set(after[top].items()) ^ set(before[top].items())))
    for made in ("systemd/machine/io.systemd.Machine", "systemd/machine/io.systemd.MachineImage",
                 "systemd/io.systemd.Import", "systemd/userdb/io.systemd.Machine", "systemd/nspawn/locks",
                 "systemd/system"):
        assert os.path.lexists(state / "run" / made), made


def _names(listing: str) -> set[str]:
    lines = listing.splitlines()
    assert lines[0].split()[:2] == ["NAME", "TYPE"], listing
    return {ln.split()[0] for ln in lines[1:] if ln.strip() and not ln.endswith("images listed.")}


def _pulled(r: subprocess.CompletedProcess[str], url: str, name: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for line in (f"Pulling '{url}', saving as '{name}'.",
                 "Signature verification succeeded.",
                 f"SHA256 checksum of {url} is valid.",
                 f"Created new local image '{name}'.",
                 "Operation completed successfully."):
        assert line in out, f"{line!r} missing:\n{out}"
    assert 'Good signature from "machined-py demo image <demo@machined-py.invalid>"' in out, out


def _tree_is_demo(root: Path) -> None:
    assert (root / "usr/bin/busybox").read_bytes() == Path(demo.BUSYBOX).read_bytes()
    assert os.readlink(root / "bin") == "usr/bin" and os.readlink(root / "usr/bin/sh") == "busybox"
    assert (root / "etc/os-release").read_text() == demo.OS_RELEASE
    assert oct((root / "tmp").stat().st_mode & 0o7777) == "0o1777"


def test_make_run_banner(run: Run) -> None:
    """make run says where the pool is, how to enter its namespace, where the demo is."""
    assert f"pool: {run.state / 'pool'} (btrfs on a loop device, mounted in the run's namespace only)" in run.banner
    assert f"bus: unix:path={run.state / 'bus/system_bus_socket'}\n" in run.banner
    assert (f"a mount namespace of its own (pid {run.pid}): /run there is {run.state / 'run'}, "
            "the host's /run is not written") in run.banner
    assert f"make shell (or make shell CMD='machinectl list-images'; that is {RUN_SHELL} {run.state} " in run.banner
    assert f"machined-py pull-tar --verify=signature {run.url} demo" in run.banner
    assert sorted(p.name for p in run.site.iterdir()) == ["SHA256SUMS", "SHA256SUMS.gpg", "demo.tar.xz"]
    # The run's keyring, nothing of /etc: importd names it on its command line.
    importd = [ln for ln in _ours_running(run.state) if "-m importd " in ln]
    assert len(importd) == 1 and f"--keyring {run.state / 'demo/import-pubring.gpg'}" in importd[0], importd
    assert not [p for p in os.listdir("/etc/systemd") if p.startswith("import-pubring")]


def test_namespace(run: Run) -> None:
    """The run is in a mount namespace of its own, where /run is STATE/run and
    the pool is mounted; make shell's script enters it, with the bus address
    and PATH set, and systemd's clients find the services at their fixed
    paths there; a second run with the same directory is refused."""
    assert run.namespace != os.readlink("/proc/self/ns/mnt")
    ns_run = os.stat(run.inside(Path("/run")))
    assert (ns_run.st_dev, ns_run.st_ino) == (os.stat(run.state / "run").st_dev, os.stat(run.state / "run").st_ino)
    assert str(run.state / "pool") not in Path("/proc/self/mountinfo").read_text()
    assert f" {run.state / 'pool'} " in Path(f"/proc/{run.pid}/mountinfo").read_text()
    r = run.client(["sh", "-c", 'readlink /proc/self/ns/mnt; echo "$DBUS_SYSTEM_BUS_ADDRESS"; command -v machined-py; '
                    'pwd; test -S /run/systemd/machine/io.systemd.Machine && test -d /run/systemd/system && echo ok'])
    assert r.returncode == 0 and r.stdout.splitlines() == [
        run.namespace, f"unix:path={run.state / 'bus/system_bus_socket'}",
        str(Path(sys.executable).parent / "machined-py"), os.getcwd(), "ok"], r
    # Varlink at systemd's path (varlinkctl 262), D-Bus through the address (busctl 252).
    r = run.client(sid.argv("varlinkctl", "info", "/run/systemd/machine/io.systemd.MachineImage"))
    assert r.returncode == 0 and "io.systemd.MachineImage" in r.stdout, r
    r = run.client(["busctl", "--system", "get-property", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                    "org.freedesktop.machine1.Manager", "PoolPath"])
    assert r.returncode == 0 and r.stdout == f's "{run.state / "pool"}"\n', r
    # make shell is tools/run-shell on the checkout's .run, CMD given to bash as written.
    cmd = "CMD=echo \"$DBUS_SYSTEM_BUS_ADDRESS\" 'a  b'"
    made = subprocess.run(["make", "-s", "-n", "-C", str(CHECKOUT), "shell", cmd], capture_output=True, text=True,
                          check=True).stdout
    assert f"tools/run-shell {CHECKOUT / '.run'} " in made, made
    r = subprocess.run(["bash", "-c", made.replace(f"tools/run-shell {CHECKOUT / '.run'} ",
                                                   f"{RUN_SHELL} {run.state} ")],
                       cwd=CHECKOUT, capture_output=True, text=True, env=run.env)
    assert r.returncode == 0 and r.stdout == f"unix:path={run.state / 'bus/system_bus_socket'} a  b\n", r
    again = subprocess.run([sys.executable, "-m", "imagepool.dev", "run", str(run.state)], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(CHECKOUT)), timeout=60)
    assert again.returncode == 1 and again.stderr == (
        f"make run is already running with {run.state} (pid {run.pid}); make shell enters it\n"), again
    r = subprocess.run([str(RUN_SHELL), str(run.state / "elsewhere"), "true"], capture_output=True, text=True)
    assert r.returncode == 1 and "make run is not running" in r.stderr, r


def test_walkthrough(run: Run, tmp_path: Path) -> None:
    """Pull (three clients), clone, list, export (ours and machinectl)."""
    url = run.url
    _pulled(run.ours("pull-tar", "--verify=signature", url, "demo"), url, "demo")
    _pulled(run.machinectl("pull-tar", "--verify=signature", url, "demo252"), url, "demo252")
    _pulled(run.importctl("pull-tar", "--class=machine", "--verify=signature", url, "demo262"), url, "demo262")
    for name in ("demo", "demo252", "demo262"):
        _tree_is_demo(run.pool / name)

    for client, source, clone in ((run.ours, "demo", "work"), (run.machinectl, "demo252", "work252")):
        r = client("clone", source, clone)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
        r = client("image-status", clone)
        assert r.returncode == 0 and OS_LINE in r.stdout and f"Path: {run.state / 'pool' / clone}" in r.stdout, r
    _tree_is_demo(run.pool / "work")
    # No quotas turned on behind the admin's back (make run's default --quota=keep).
    r = run.machinectl("set-limit", "work252", "1G")
    assert r.returncode == 1 and r.stderr == (
        "Could not set limit: Quotas are off on this btrfs file system: start the services with --quota=simple "
        "to use simple quotas, or turn quotas on yourself\n"), r

    expected = {"demo", "demo252", "demo262", "work", "work252"}
    for client in (run.ours, run.machinectl):
        r = client("list-images")
        assert r.returncode == 0 and _names(r.stdout) == expected, r.stdout
        assert r.stdout.rstrip().endswith("5 images listed."), r.stdout

    for client, name, target, magic in ((run.ours, "work", "work.tar.zst", b"\x28\xb5\x2f\xfd"),
                                        (run.machinectl, "work252", "work252.tar.xz", b"\xfd7zXZ\x00")):
        out = tmp_path / target
        r = client("export-tar", name, str(out))
        assert r.returncode == 0, r
        assert f"Exporting '{run.state / 'pool' / name}', saving to '{out}'" in r.stderr, r.stderr
        assert "Operation completed successfully." in r.stderr, r.stderr
        assert out.read_bytes().startswith(magic)
        unpacked = tmp_path / f"{name}.tree"
        unpacked.mkdir()
        subprocess.run(["tar", "-xf", str(out), "-C", str(unpacked)], check=True)
        _tree_is_demo(unpacked)


def test_tampered_is_refused(run: Run) -> None:
    """A SHA256SUMS changed after signing fails the signature; an image
    changed after its checksum was signed fails the checksum.  No image
    is left behind."""
    sums = run.site / "SHA256SUMS"
    image = run.site / demo.IMAGE
    good_sums, good_image = sums.read_bytes(), image.read_bytes()
    try:
        sums.write_bytes(bytes([good_sums[0] ^ 1]) + good_sums[1:])  # one hex digit changed
        for name, r in (("bad", run.ours("pull-tar", "--verify=signature", run.url, "bad")),
                        ("bad252", run.machinectl("pull-tar", "--verify=signature", run.url, "bad252")),
                        ("bad262", run.importctl("pull-tar", "--class=machine", "--verify=signature", run.url,
                                                 "bad262"))):
            out = r.stdout + r.stderr
            assert r.returncode == 1, out
            assert 'BAD signature from "machined-py demo image' in out, out
            assert "DOWNLOAD INVALID: Signature verification failed." in out, out
            assert "Created new local image" not in out and not (run.pool / name).exists()
        sums.write_bytes(good_sums)
        image.write_bytes(_other_tar())
        r = run.ours("pull-tar", "--verify=signature", run.url, "bad")
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        assert "Signature verification succeeded." in out, out
        assert (f"DOWNLOAD INVALID: Checksum of {demo.IMAGE} file did not check out, "
                "file has been tampered with.") in out, out
        assert not (run.pool / "bad").exists()
    finally:
        sums.write_bytes(good_sums)
        image.write_bytes(good_image)
    r = run.ours("list-images")
    assert not {n for n in _names(r.stdout) if n.startswith("bad")}, r.stdout


def _other_tar() -> bytes:
    """A good xz-compressed tar, but not the one whose checksum was signed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz") as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"evil!\n"))
    return out.getvalue()


def test_demo_is_made_once(tmp_path: Path) -> None:
    """A second run keeps the key, the image and the signature."""
    d = demo.Demo(tmp_path / "demo").prepare()
    files = [d.keyring, d.site / demo.IMAGE, d.site / "SHA256SUMS", d.site / "SHA256SUMS.gpg"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]
    demo.Demo(tmp_path / "demo").prepare()
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    assert not _ours_running(tmp_path)  # no gpg-agent outlives the signing
