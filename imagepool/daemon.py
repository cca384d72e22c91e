"""What both daemons share at run time: command line, logging with syslog
priority prefixes, sd_notify, the system bus, and clean exit on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import sdbus
import sdbus.dbus_exceptions

from imagepool import classes, temporaries, tree
from imagepool.image import DEFAULT_POOL

log = logging.getLogger("imagepool")

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _SyslogPrefixFormatter(logging.Formatter):
    """``<6>message``: the form journald and systemd read from stderr."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


# syslog levels -> logging's (notice is logged as info)
_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR, 4: logging.WARNING,
           5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}
_log_level = 6


def get_log_level() -> int:
    """The most verbose syslog level logged (0-7)."""
    return _log_level


def set_log_level(level: int) -> None:
    """Log syslog LEVEL (0-7) and what is more important, from now on."""
    global _log_level
    _log_level = level
    logging.getLogger().setLevel(_LEVELS[level])
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level >= 7 else logging.WARNING)


@functools.cache
def listen_fds() -> dict[str, int]:
    """The sockets systemd passed (socket activation), by their names."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    fds = {}
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID"):
        os.environ.pop(key, None)
    return fds


_log_target = "auto"
_handler: logging.Handler | None = None


def get_log_target() -> str:
    return _log_target


def set_log_target(target: str) -> None:
    """Where log lines go (org.freedesktop.LogControl1's LogTarget): stderr
    with syslog prefixes, without them ("console"), or nowhere ("null")."""
    global _log_target
    _log_target = target
    if _handler is not None:
        _handler.setFormatter(logging.Formatter("%(message)s") if target == "console"
                              else _SyslogPrefixFormatter("%(message)s"))
        _handler.setLevel(logging.CRITICAL + 1 if target == "null" else logging.NOTSET)


def setup_logging(debug: bool = False) -> None:
    global _handler
    handler = logging.StreamHandler(sys.stderr)
    _handler = handler
    handler.setFormatter(_SyslogPrefixFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # One line per HTTP request is noise in a service log (unless debugging).
    set_log_level(7 if debug else _env_log_level(os.environ.get("SYSTEMD_LOG_LEVEL", "")))


_LEVEL_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def _env_log_level(value: str) -> int:
    """$SYSTEMD_LOG_LEVEL as systemd's daemons read it: a name or 0-7;
    info when unset or not understood."""
    value = value.strip().lower()
    if value in _LEVEL_NAMES:
        return _LEVEL_NAMES.index(value)
    return int(value) if value.isdigit() and int(value) <= 7 else 6


def sd_notify(message: str) -> bool:
    """Send MESSAGE to $NOTIFY_SOCKET; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)
        return False
    return True


def make_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--pool", default=None,
                        help=f"the machine image pool (default: {DEFAULT_POOL}, below --image-prefix if given)")
    parser.add_argument("--image-prefix", default="", metavar="DIR",
                        help="look for and keep the images of every class (machine, portable, sysext, confext) "
                             "below DIR instead of in systemd's directories, e.g. DIR/var/lib/extensions")
    parser.add_argument("--quota", choices=("keep", "simple"), default="keep",
                        help="btrfs quotas of the pools: keep them as they are (limits need quotas turned on "
                             "already), or turn on simple quotas (Linux 6.7) at start and when a limit is set; "
                             "full qgroups are never turned on (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def parse_args(prog: str, argv: list[str] | None) -> argparse.Namespace:
    return make_parser(prog).parse_args(argv)


def image_roots(args: argparse.Namespace) -> classes.Roots:
    """Where the images of each class are, from --image-prefix and --pool."""
    try:
        return classes.Roots(os.path.abspath(args.image_prefix) if args.image_prefix else "", args.pool,
                             args.quota)
    except ValueError as e:
        raise SystemExit(f"{e}") from None


def parse_size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (1024-based)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def open_system_bus() -> sdbus.SdBus:
    """The system bus; sd-bus honours $DBUS_SYSTEM_BUS_ADDRESS."""
    bus = sdbus.sd_bus_open_system()
    sdbus.set_default_bus(bus)
    return bus


async def request_name(bus: sdbus.SdBus, name: str) -> None:
    await bus.request_name_async(name, 0)


def clean_up_after_crashes(service: str, directories: list[str]) -> asyncio.Task[list[str]]:
    """Register this service's temporaries from now on, and remove, in the
    background, those in DIRECTORIES that no live service is making: what a
    killed predecessor left behind (imagepool.temporaries)."""
    temporaries.start_registry(service)
    return asyncio.get_running_loop().create_task(asyncio.to_thread(tree.clean_temporaries, directories))


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A D-Bus error raised on purpose where sdbus can't turn it into a reply
    (a property setter refusing a value; the caller gets an error all the
    same) is a warning, not a crash report."""
    exc = context.get("exception")
    if isinstance(exc, sdbus.dbus_exceptions.DbusFailedError):
        log.warning("Refused: %s", exc)
        return
    loop.default_exception_handler(context)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run MAIN(stop_event) until it returns; SIGTERM and SIGINT set the event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.set_exception_handler(_exception_handler)
        await main(stop)

    try:
        asyncio.run(runner())
    except Exception:
        log.exception("Fatal error")
        return 1
    return 0
