"""Child processes, started one way for both services.

Every child
- runs in a process group of its own, so that signalling the group reaches
  whatever it started too;
- is killed (SIGKILL) when the thread that started it dies, so that none
  outlives a killed daemon: ``setpriv --pdeathsig KILL`` is exec'd in front
  of it (the daemons are threaded, so no ``preexec_fn``), and the death
  signal survives the exec of the real program.  Start children from
  long-lived threads: the event loop's worker threads or a job's thread;
- gets the environment it is given (callers pass a small one);
- has its stderr read line by line as it comes, each line handed to a log
  function (our logger by default); the last lines are kept for messages;
- is killed with its whole group and reaped on every way out: an error, a
  cancellation (the CHECK callback raising), a timeout, a ``with`` block
  left early.

Everything here blocks; callers run it in worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger(__name__)

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
TAIL_LINES = 20
LINE_MAX = 4096  # longer stderr lines are cut (hostile input ends up in messages)
_POLL = 0.2  # seconds between looks at CHECK and the deadline

LogFn = Callable[[str], None]
CheckFn = Callable[[], None]


class Timeout(Exception):
    """The child did not finish in time (it has been killed)."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"{name} did not finish within {timeout:g}s")
        self.timeout = timeout


_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    # From the system's directories, whatever $PATH says (util-linux has it).
    setpriv = shutil.which("setpriv", path=_SYSTEM_PATH)
    if setpriv is None:
        log.warning("setpriv not found: children of ours would outlive us if we were killed.")
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--")


class _StderrPump(threading.Thread):
    """Hands each line of the child's stderr to LOG, keeping the last ones."""

    def __init__(self, fd: int, logfn: LogFn, name: str) -> None:
        super().__init__(name=f"{name}-stderr", daemon=True)
        self._file = os.fdopen(fd, "rb", buffering=65536)
        self._log = logfn
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def run(self) -> None:
        skipping = False
        try:
            while raw := self._file.readline(LINE_MAX):
                complete = raw.endswith(b"\n")
                if skipping:  # the rest of an over-long line
                    skipping = not complete
                    continue
                skipping = not complete
                line = raw.decode("utf-8", "replace").rstrip("\n") + ("" if complete else "…")
                if not line.strip():
                    continue
                self.tail.append(line)
                try:
                    self._log(line)
                except Exception:  # a broken log sink must not stop the draining
                    log.exception("log of child's stderr failed")
        except (OSError, ValueError):
            pass

    def finish(self, timeout: float = 5.0) -> None:
        """Once the child is reaped: wait for the rest of what it wrote (a
        grandchild may keep the pipe open; then give up after TIMEOUT)."""
        self.join(timeout)
        if not self.is_alive():
            with contextlib.suppress(OSError):
                self._file.close()


class Child:
    """A running child process (see the module's docstring).

    STDIN and STDOUT are file descriptors, DEVNULL or PIPE.  STDERR_LOG gets
    the child's stderr lines (default: our logger at debug level, prefixed
    with NAME); PASS_FDS are inherited.  TIMEOUT (seconds, from the start)
    bounds wait() and communicate(); UMASK (when not -1) is the child's umask."""

    def __init__(self, argv: Sequence[str], *, stdin: int | None = DEVNULL, stdout: int | None = DEVNULL,
                 stderr_log: LogFn | None = None, env: Mapping[str, str] | None = None, cwd: str | None = "/",
                 pass_fds: Sequence[int] = (), name: str | None = None, timeout: float | None = None,
                 umask: int = -1) -> None:
        self.argv = list(argv)
        self.name = name or os.path.basename(self.argv[0])
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self._lock = threading.Lock()
        logfn = stderr_log or (lambda line: log.debug("%s: %s", self.name, line))
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                [*_pdeathsig_prefix(), *self.argv], stdin=stdin, stdout=stdout, stderr=err_w, close_fds=True,
                pass_fds=tuple(pass_fds), env=dict(env) if env is not None else None, cwd=cwd,
                process_group=0, umask=umask,
            )
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(err_w)
        self._pump = _StderrPump(err_r, logfn, self.name)
        self._pump.start()

    # --- what callers read ---------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.proc.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.proc.stdout

    @property
    def tail(self) -> list[str]:
        """The last lines the child wrote to stderr."""
        return list(self._pump.tail)

    # --- waiting -----------------------------------------------------------------

    def _left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _slice(self) -> float:
        left = self._left()
        if left is not None and left <= 0:
            self.kill()
            raise Timeout(self.name, self.timeout or 0)
        return _POLL if left is None else min(_POLL, left)

    def wait(self, check: CheckFn | None = None) -> int:
        """Wait for the child's exit, calling CHECK (which may raise, e.g. for
        a cancellation) every 200 ms; on any exception the child is killed."""
        try:
            while True:
                if check is not None:
                    check()
                try:
                    rc = self.proc.wait(timeout=self._slice())
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            self.kill()
            raise
        self._pump.finish()
        return rc

    def communicate(self, data: bytes | None = None, check: CheckFn | None = None) -> bytes:
        """Feed DATA to the child's stdin (a PIPE), read its stdout (a PIPE)
        to the end and wait for its exit; returns what it wrote."""
        out: bytes | None = None
        first = True
        try:
            while True:
                if check is not None:
                    check()
                try:
                    out, _ = self.proc.communicate(data if first else None, timeout=self._slice())
                    break
                except subprocess.TimeoutExpired:
                    first = False
        except BaseException:
            self.kill()
            raise
        self._pump.finish()
        return out or b""

    def wait_briefly(self, timeout: float = 5.0) -> int:
        """The child closed its end of a pipe, so it is exiting: reap it (and
        kill it if it doesn't go away within TIMEOUT)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self._pump.finish()
        assert rc is not None
        return rc

    def kill(self) -> None:
        """SIGKILL the child's process group and reap the child (idempotent,
        thread-safe)."""
        with self._lock:
            if self.proc.returncode is None:
                # Not reaped yet, so the group it leads is still ours to signal.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._pump.finish()

    def detach_reaper(self) -> None:
        """The child goes on running after its caller is done with it (a
        helper that parents a shell): a thread of ours waits for it."""
        threading.Thread(target=self.wait_briefly, args=(None,), name=f"reap-{self.pid}", daemon=True).start()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@dataclass
class Completed:
    returncode: int
    stdout: bytes = b""
    stderr: list[str] = field(default_factory=list)  # the last lines

    @property
    def message(self) -> str:
        """The child's last stderr line, or its exit status."""
        return self.stderr[-1] if self.stderr else f"exit status {self.returncode}"


def run(argv: Sequence[str], *, input: bytes | None = None, capture: bool = False, timeout: float | None = None,
        check: CheckFn | None = None, **kwargs: Any) -> Completed:
    """Run ARGV to its end (see Child for the arguments): its exit status,
    its stdout with CAPTURE, and the last lines of its stderr."""
    stdin = PIPE if input is not None else kwargs.pop("stdin", DEVNULL)
    stdout = PIPE if capture else kwargs.pop("stdout", DEVNULL)
    with Child(argv, stdin=stdin, stdout=stdout, timeout=timeout, **kwargs) as child:
        if input is not None or capture:
            out = child.communicate(input, check)
            rc = child.proc.returncode
            assert rc is not None
        else:
            out = b""
            rc = child.wait(check)
        return Completed(rc, out, child.tail)
