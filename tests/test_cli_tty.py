"""machined-py in a real pseudo-terminal (pexpect), its output read back
through a terminal emulator (pyte; and tmux, which rewraps lines when the
window gets narrower): the live bar appears and updates, several bars for
several transfers, a window resize redraws without garbage, Ctrl-C cancels
the transfer (importd reports it canceled, no image is left), --detach
leaves it running, and ``shell`` relays a pty.

The HTTP test server throttles the downloads so that each takes a few
seconds, also on a loaded machine; every wait is for what the screen shows,
with generous time limits, never a fixed sleep."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pyte
import pytest

from imagepool import dev as world
from tests.conftest import Daemons, Pool
from tests.httpserver import Fault, TestServer
from tests.test_cli import client, image_names, raw_bytes, transfers_idle
from tests.test_machines import Nspawn, make_root

BAR = re.compile(r"^(\d+) (pull-raw|pull-tar|import-\w+|export-\w+) (\S+)\s+(?:\S+\s+)?(\d+)%(?:\s+(.*))?$")
RATE_TEXT = r"\d(?:\.\d)?[BKMGT]/s"
SIZE = 24 << 20
RATE = 4 << 20          # bytes/s: a 24 MiB pull takes 6 s


def tty_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX", "STY", "VTE_VERSION")}
    env.update(TERM="xterm-256color", MACHINED_PY_REFLOW="0", LANG="C.UTF-8", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Term:
    """The command on a pty of ROWS x COLS, and the screen it draws."""

    def __init__(self, *args: str, rows: int = 24, cols: int = 100, env: dict[str, str] | None = None) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(sys.executable, ["-m", "machinedpy_cli", *args], env=env or tty_env(),
                                   dimensions=(rows, cols))
        self.raw = bytearray()
        self.eof = False

    def pump(self, timeout: float = 0.05) -> None:
        try:
            while True:
                data = self.child.read_nonblocking(65536, timeout=timeout)
                self.raw += data
                self.stream.feed(data)
                timeout = 0.01
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(line for line in self.lines())

    def bars(self) -> list[re.Match[str]]:
        return [m for m in (BAR.match(line) for line in self.lines()) if m]

    def wait(self, predicate: Callable[[Term], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            value = predicate(self)
            if value:
                return value
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"{'exited' if self.eof else 'timed out'} waiting for {what}; "
                                     f"screen:\n{self.text()}")

    def resize(self, rows: int, cols: int) -> None:
        self.pump()
        self.child.setwinsize(rows, cols)
        self.screen.resize(rows, cols)

    def exit_status(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; screen:\n{self.text()}")
            self.pump(0.1)
        self.child.close()
        assert self.child.signalstatus is None, f"killed by signal {self.child.signalstatus}"
        return int(self.child.exitstatus)

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def bar_of(term: Term, name: str) -> re.Match[str] | None:
    for m in term.bars():
        if m.group(3) == name:
            return m
    return None


def bar_lines(term: Term) -> list[str]:
    """Every line that looks like (a piece of) a bar: the bar glyphs or a percentage."""
    return [line for line in term.lines() if "━" in line or "╸" in line or "╺" in line or re.search(r"\d%", line)]


def progressing(name: str, above: int = 0) -> Callable[[Term], re.Match[str] | None]:
    """The bar of NAME, once it shows more than ABOVE percent and a measured rate."""
    def check(term: Term) -> re.Match[str] | None:
        m = bar_of(term, name)
        if m and int(m.group(4)) > above and re.search(RATE_TEXT, m.group(5) or ""):
            return m
        return None

    return check


@pytest.fixture
def web(pool: Pool, services: Daemons, tmp_path: Path):
    www = tmp_path / "www"
    www.mkdir()
    server = TestServer(www).start()
    terms: list[Term] = []
    try:
        yield www, server, terms
    finally:
        for term in terms:
            term.kill()
        server.stop()
        world.wait_for(transfers_idle, 60, "no transfers")
        assert not server.errors, server.errors


def slow_file(www: Path, server: TestServer, name: str, size: int = SIZE, rate: int = RATE) -> str:
    (www / f"{name}.raw").write_bytes(raw_bytes(size))
    server.faults[f"{name}.raw"] = Fault(rate=rate)
    return server.url(f"{name}.raw")


def pull(terms: list[Term], url: str, name: str, *extra: str, rows: int = 24, cols: int = 100) -> Term:
    term = Term("pull-raw", "--verify=no", "-N", *extra, url, name, rows=rows, cols=cols)
    terms.append(term)
    return term


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_live_bar_appears_and_updates(pool: Pool, web) -> None:
    www, server, terms = web
    term = pull(terms, slow_file(www, server, "live"), "live")
    first = term.wait(progressing("live"), "the bar with a rate")
    assert first.group(1).isdigit() and first.group(2) == "pull-raw"
    percent = int(first.group(4))
    stats = first.group(5)
    assert re.search(r"~?\d+(?:\.\d)?[KM] of ~24M", stats), stats  # bytes: the size from the log, approximate
    assert re.search(r"\d+(?:\.\d)?[KM]/s", stats) and re.search(r"ETA \d+s", stats), stats
    later = term.wait(progressing("live", percent), "the bar to move on")
    assert int(later.group(4)) > percent and later.group(0) != first.group(0)
    assert len(bar_lines(term)) == 1, term.text()       # one bar, no leftovers of earlier draws
    assert "Got " not in term.text(), "the percentage lines are shown by the bar, not printed"
    assert term.exit_status() == 0
    lines = [line for line in term.lines() if line]
    final = BAR.match(lines[-1])
    assert final and final.group(4) == "100" and "done" in final.group(5), term.text()
    assert "Created new local image 'live'." in term.text() and len(bar_lines(term)) == 1
    assert b"\x1b[" in term.raw, "drawn with escape sequences"
    assert "live" in image_names()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_several_bars(pool: Pool, web) -> None:
    """watch: a bar for the running transfer, and one more for the one that
    starts while it watches."""
    www, server, terms = web
    urls = {name: slow_file(www, server, name, rate=rate) for name, rate in (("one", 3 << 20), ("two", 4 << 20))}

    def detached(name: str) -> str:
        r = subprocess.run([sys.executable, "-m", "machinedpy_cli", "pull-raw", "--detach", "--verify=no", "-N",
                            urls[name], name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    ids = [detached("one")]
    term = Term("watch")
    terms.append(term)
    term.wait(lambda t: bar_of(t, "one"), "the first bar")
    ids.append(detached("two"))

    def both_moving(t: Term) -> bool:
        return bool(progressing("one")(t) and progressing("two")(t))

    term.wait(both_moving, "two moving bars")
    assert [m.group(1) for m in term.bars()] == ids and len(bar_lines(term)) == 2, term.text()
    assert term.exit_status() == 0
    final = {m.group(3): m for m in term.bars()}
    assert set(final) == {"one", "two"} and all(m.group(4) == "100" for m in final.values()), term.text()
    assert len(bar_lines(term)) == 2, term.text()
    assert f"[{ids[0]}] Created new local image 'one'." in term.text()
    assert f"[{ids[1]}] Created new local image 'two'." in term.text()
    assert {"one", "two"} <= image_names()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_resize_redraws(pool: Pool, web) -> None:
    www, server, terms = web
    term = pull(terms, slow_file(www, server, "resized", rate=3 << 20), "resized", cols=100)
    before = term.wait(progressing("resized"), "the bar")
    assert len(before.group(0)) > 50
    term.resize(24, 50)

    def redrawn_narrow(t: Term) -> bool:
        bars = bar_lines(t)
        return len(bars) == 1 and 40 <= len(bars[0]) <= 50 and "…" in bars[0]

    term.wait(redrawn_narrow, "the bar redrawn at 50 columns", timeout=10)
    assert not any(len(line) > 50 for line in term.lines())
    term.resize(24, 120)

    def redrawn_wide(t: Term) -> bool:
        bars = bar_lines(t)
        return len(bars) == 1 and "…" not in bars[0] and "ETA" in bars[0] and "of ~24M" in bars[0]

    term.wait(redrawn_wide, "the bar redrawn at 120 columns", timeout=10)
    assert term.exit_status() == 0
    assert len(bar_lines(term)) == 1, term.text()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make deps installs it)")
@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_resize_in_a_reflowing_terminal(pool: Pool, web, tmp_path: Path) -> None:
    """tmux rewraps lines when its window gets narrower: the old bar, drawn
    at 100 columns, takes two rows at 45.  They must be erased, not left."""
    www, server, _terms = web
    url = slow_file(www, server, "reflow", rate=3 << 20)
    tmux = ["tmux", "-L", f"machined-py-test-{os.getpid()}", "-f", "/dev/null"]
    env = " ".join(f"{k}={v}" for k, v in (("DBUS_SYSTEM_BUS_ADDRESS", os.environ["DBUS_SYSTEM_BUS_ADDRESS"]),
                                            ("TERM", "tmux-256color"), ("LANG", "C.UTF-8")))
    status = tmp_path / "status"
    command = (f"env -u COLUMNS -u LINES {env} {sys.executable} -m machinedpy_cli pull-raw --verify=no -N {url} "
               f"reflow; echo $? > {status}; sleep 600")
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", "-s", "t", command], check=True,
                   cwd=str(Path(__file__).parent.parent))

    def screen() -> list[str]:
        r = subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True, check=True)
        return r.stdout.splitlines()

    try:
        def bars() -> list[str]:
            return [line for line in screen() if "━" in line or "╸" in line or "╺" in line or re.search(r"\d%", line)]

        world.wait_for(lambda: any(re.search(RATE_TEXT, line) for line in bars()), 60, "the bar", interval=0.1)
        subprocess.run([*tmux, "resize-window", "-t", "t", "-x", "45", "-y", "30"], check=True)
        world.wait_for(lambda: len(bars()) == 1 and len(bars()[0]) <= 45, 10, "one bar at 45 columns",
                       interval=0.1)
        subprocess.run([*tmux, "resize-window", "-t", "t", "-x", "110", "-y", "30"], check=True)
        world.wait_for(lambda: len(bars()) == 1 and "ETA" in bars()[0], 10, "one bar at 110 columns",
                       interval=0.1)
        world.wait_for(status.exists, 90, "the pull to end", interval=0.1)
        assert status.read_text().strip() == "0"
        assert len(bars()) == 1 and "100%" in bars()[0], "\n".join(screen())
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_ctrl_c_cancels(pool: Pool, services: Daemons, web) -> None:
    www, server, terms = web
    term = pull(terms, slow_file(www, server, "cancelme", rate=2 << 20), "cancelme")
    m = term.wait(progressing("cancelme"), "the bar")
    transfer_id = m.group(1)
    assert not transfers_idle()
    term.child.sendintr()                    # ^C on the terminal: SIGINT from the line discipline
    term.wait(lambda t: f"Canceling transfer {transfer_id}…" in t.text(), "the cancel message", timeout=10)
    assert term.exit_status() == 1
    assert f"Transfer {transfer_id} canceled." in term.text(), term.text()
    final = bar_of(term, "cancelme")
    assert final and "canceled" in (final.group(5) or ""), term.text()
    # importd's own account of it, and what it left: nothing.
    world.wait_for(transfers_idle, 30, "no transfers")
    log = services.log_of("importd").read_text()
    assert f"Transfer {transfer_id} finished: canceled" in log, log
    assert "cancelme" not in image_names()
    assert not [p for p in os.listdir(pool.path) if p.startswith(".#") or "cancelme" in p]


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_detach_leaves_it_running(pool: Pool, web) -> None:
    www, server, terms = web
    url = slow_file(www, server, "detached", rate=3 << 20)
    started = time.monotonic()
    term = pull(terms, url, "detached", "--detach")
    assert term.exit_status(timeout=30) == 0
    assert time.monotonic() - started < 15
    transfer_id = term.lines()[0].strip()
    assert transfer_id.isdigit(), term.text()
    listed = client("importctl", "list-transfers").stdout
    assert re.search(rf"^\s*{transfer_id}\s.*pull-raw\s+machine\s+detached\s", listed, re.M), listed
    # watch it, then stop watching with ^C: the transfer goes on.
    watcher = Term("watch", transfer_id)
    terms.append(watcher)
    watcher.wait(lambda t: bar_of(t, "detached") is not None, "the bar of the detached transfer")
    watcher.child.sendintr()
    assert watcher.exit_status() == 1
    assert "Stopped watching" in watcher.text()
    assert re.search(rf"^\s*{transfer_id}\s", client("importctl", "list-transfers").stdout, re.M)
    world.wait_for(transfers_idle, 60, "the detached transfer to end", interval=0.2)
    assert "detached" in image_names()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_shell_relays_the_pty(pool: Pool, services: Daemons, tmp_path: Path) -> None:
    c = Nspawn(make_root(tmp_path / "root"), "c1")
    try:
        c.wait_registered()
        term = Term("shell", "c1", rows=24, cols=100)
        term.wait(lambda t: "Connected to machine c1. Press ^] three times within 1s to exit session." in t.text(),
                  "the greeting")
        term.wait(lambda t: "#" in t.text(), "the prompt")
        term.child.send("stty size; echo $((6*7))\r")
        term.wait(lambda t: "24 100" in t.lines() and "42" in t.lines(), "the answers")
        term.resize(30, 90)
        term.child.send("stty size\r")
        term.wait(lambda t: "30 90" in t.lines(), "the new size inside")
        term.child.send("\x03")              # raw mode: ^C goes to the shell, not to us
        term.child.send("echo still-here\r")
        term.wait(lambda t: "still-here" in t.lines(), "the shell to survive ^C")
        term.child.send("\x1d\x1d\x1d")
        term.wait(lambda t: "Connection to machine c1 terminated." in t.text(), "the goodbye")
        assert term.exit_status() == 0
    finally:
        c.stop()


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
def test_listings_page_on_a_terminal(pool: Pool, services: Daemons) -> None:
    (pool / "img1").mkdir()
    env = tty_env(SYSTEMD_PAGER="sed s/^/paged:/")
    term = Term("list-images", env=env)
    assert term.exit_status() == 0
    assert any(line.startswith("paged:img1 ") for line in term.lines()), term.text()
    term = Term("--no-pager", "list-images", env=env)
    assert term.exit_status() == 0
    assert any(line.startswith("img1 ") for line in term.lines()) and "paged:" not in term.text(), term.text()
