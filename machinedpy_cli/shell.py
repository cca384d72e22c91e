"""``shell``: OpenMachineShell, then relay the pty it returns to our
terminal, as machinectl's pty forwarder does: the terminal in raw mode, the
window size passed on (and again on SIGWINCH), ^] three times within a
second to leave, and the end when the shell hangs up or the machine goes
away."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import stat
import sys
import termios
import time
import tty

from machinedpy_cli.bus import MACHINE1, MACHINE1_MANAGER, MACHINE1_PATH, BusError
from machinedpy_cli.context import Context

ESCAPE = 0x1D           # ^]
ESCAPE_COUNT = 3
ESCAPE_WINDOW = 1.0     # seconds


def parse_machine_uid(spec: str | None, uid: str | None) -> tuple[str, str | None]:
    """[USER@]NAME: (machine, user); "@NAME" is refused as ssh does."""
    user = None
    machine = None
    if spec:
        if "@" in spec:
            at = spec.index("@")
            if at == 0:
                raise ValueError(spec)
            user, machine = spec[:at], spec[at + 1:]
        else:
            machine = spec
    if uid and not user:
        user = uid
    return (machine or ".host"), user


def _copy_winsize(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)


class Forwarder:
    def __init__(self, master: int, stdin: int, stdout: int) -> None:
        self.master = master
        self.stdin = stdin
        self.stdout = stdout
        self.done = asyncio.get_running_loop().create_future()
        self.escapes: list[float] = []
        self.last_char = b"\n"
        self.pending_out = bytearray()      # to the terminal
        self.pending_in = bytearray()       # to the pty
        self.stdin_open = True

    def finish(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def on_master(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""          # EIO: the other side hung up
        if not data:
            self.finish("hangup")
            return
        self.pending_out += data
        self.last_char = data[-1:]
        self._write_out()

    def _write_out(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending_out:
            try:
                n = os.write(self.stdout, self.pending_out)
            except BlockingIOError:
                loop.add_writer(self.stdout, self._write_out)
                return
            except OSError:
                self.finish("output closed")
                return
            del self.pending_out[:n]
        loop.remove_writer(self.stdout)

    def on_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = os.read(self.stdin, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # End of input: stop reading it; a shell fed from a pipe gets an EOF (^D) on its terminal.
            with contextlib.suppress(OSError):
                loop.remove_reader(self.stdin)
            self.stdin_open = False
            if not os.isatty(self.stdin):
                self.pending_in += b"\x04"
                self._write_in()
            return
        now = time.monotonic()
        for byte in data:
            if byte == ESCAPE:
                self.escapes = [t for t in self.escapes if now - t < ESCAPE_WINDOW] + [now]
                if len(self.escapes) >= ESCAPE_COUNT:
                    self.finish("escape")
                    return
            else:
                self.escapes.clear()
        self.pending_in += data
        self._write_in()

    def read_all_stdin(self) -> None:
        while self.stdin_open and not self.done.done():
            self.on_stdin()

    def _write_in(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending_in:
            try:
                n = os.write(self.master, self.pending_in)
            except BlockingIOError:
                loop.add_writer(self.master, self._write_in)
                return
            except OSError:
                self.finish("hangup")
                return
            del self.pending_in[:n]
        loop.remove_writer(self.master)


def _is_dev_null(fd: int) -> bool:
    try:
        st, null = os.fstat(fd), os.stat("/dev/null")
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def terminal_is_dumb() -> bool:
    """systemd's terminal_is_dumb(): output not to a terminal (and not all to
    /dev/null), or $TERM unset or "dumb"."""
    if not (os.isatty(1) and os.isatty(2)) and not (_is_dev_null(1) and _is_dev_null(2)):
        return True
    return os.environ.get("TERM", "dumb") == "dumb"


async def shell(ctx: Context, args: list[str]) -> int:
    try:
        machine, user = parse_machine_uid(args[0] if args else None, ctx.opts.uid)
    except ValueError:
        return ctx.error("Failed to parse machine specification: Invalid argument")
    path = args[1] if len(args) >= 2 and args[1] else ""
    argv = args[1:] if len(args) > 2 else []
    env = list(ctx.opts.setenv)
    if terminal_is_dumb():
        # machinectl 262: a dumb terminal or a pipe gets TERM=dumb (no escape sequences from the shell).
        if not any(e.startswith("TERM=") for e in env):
            env.append("TERM=dumb")
    else:
        for var in ("TERM", "COLORTERM", "NO_COLOR"):
            if not any(e.startswith(var + "=") for e in env) and var in os.environ:
                env.append(f"{var}={os.environ[var]}")

    removed = asyncio.get_running_loop().create_future()

    def on_removed(message: object) -> None:
        contents = message.get_contents()  # type: ignore[attr-defined]
        if isinstance(contents, tuple) and contents and contents[0] == machine and not removed.done():
            removed.set_result(None)

    await ctx.bus.match(MACHINE1, MACHINE1_PATH, MACHINE1_MANAGER, "MachineRemoved", on_removed)
    try:
        fd, _pty_path = await ctx.bus.machine1("OpenMachineShell", "sssasas", machine, user or "", path, argv, env)
    except BusError as e:
        return ctx.error(f"Failed to get shell PTY: {e}")
    master = os.dup(fd)
    try:
        return await _forward(ctx, master, machine, removed)
    finally:
        os.close(master)


async def _forward(ctx: Context, master: int, machine: str, removed: asyncio.Future[None]) -> int:
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    if machine == ".host":
        ctx.info("Connected to the local host. Press ^] three times within 1s to exit session.")
    else:
        ctx.info(f"Connected to machine {machine}. Press ^] three times within 1s to exit session.")
    saved_tty = None
    if os.isatty(stdin):
        saved_tty = termios.tcgetattr(stdin)
        tty.setraw(stdin)
        _copy_winsize(stdin, master)
    elif os.isatty(stdout):
        _copy_winsize(stdout, master)
    blocking = {fd: os.get_blocking(fd) for fd in (stdin, stdout, master)}
    for fd in blocking:
        os.set_blocking(fd, False)
    fwd = Forwarder(master, stdin, stdout)
    removed.add_done_callback(lambda _f: fwd.finish("removed"))
    loop.add_reader(master, fwd.on_master)
    try:
        loop.add_reader(stdin, fwd.on_stdin)
    except OSError:
        # A regular file or /dev/null (epoll refuses them): reading never blocks, take it all now.
        loop.call_soon(fwd.read_all_stdin)
    winch_src = stdin if saved_tty is not None else stdout
    loop.add_signal_handler(signal.SIGWINCH, _copy_winsize, winch_src, master)
    # As machinectl: ^C and friends go to the machine (raw mode); SIGTERM ends the session.
    loop.add_signal_handler(signal.SIGTERM, fwd.finish, "terminated")
    loop.add_signal_handler(signal.SIGINT, fwd.finish, "interrupted")
    try:
        reason = await fwd.done
        if reason == "removed":
            # Let what the machine still wrote reach us.
            await asyncio.sleep(0.5)
    finally:
        loop.remove_reader(master)
        loop.remove_reader(stdin)
        loop.remove_writer(master)
        loop.remove_writer(stdout)
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        for fd, mode in blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, mode)
        if saved_tty is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved_tty)
    if fwd.last_char != b"\n":
        os.write(stdout, b"\n")
    if reason == "removed":
        ctx.info(f"Machine {machine} terminated.")
    elif machine == ".host":
        ctx.info("Connection to the local host terminated.")
    else:
        ctx.info(f"Connection to machine {machine} terminated.")
    return 0
