"""What both daemons share at run time: command line, logging with syslog
priority prefixes, sd_notify, the system bus, and clean exit on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import sdbus

from imagepool import temporaries, tree
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


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SyslogPrefixFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # One line per HTTP request is noise in a service log.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


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
    parser.add_argument("--pool", default=DEFAULT_POOL, help="image pool directory (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def parse_args(prog: str, argv: list[str] | None) -> argparse.Namespace:
    return make_parser(prog).parse_args(argv)


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


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run MAIN(stop_event) until it returns; SIGTERM and SIGINT set the event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except Exception:
        log.exception("Fatal error")
        return 1
    return 0
