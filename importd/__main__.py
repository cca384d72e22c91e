"""systemd-importd in Python: ``importd --pool PATH``.

So far it claims org.freedesktop.import1; transfers come next."""

from __future__ import annotations

import asyncio
import logging

from imagepool import daemon

log = logging.getLogger("importd")

BUS_NAME = "org.freedesktop.import1"


async def serve(pool_path: str, stop: asyncio.Event) -> None:
    bus = daemon.open_system_bus()
    await daemon.request_name(bus, BUS_NAME)
    daemon.sd_notify("READY=1")
    log.info("importd ready, pool %s", pool_path)
    await stop.wait()
    daemon.sd_notify("STOPPING=1")
    bus.close()


def main(argv: list[str] | None = None) -> int:
    args = daemon.parse_args("importd", argv)
    daemon.setup_logging(args.debug)
    return daemon.run(lambda stop: serve(args.pool, stop))


if __name__ == "__main__":
    raise SystemExit(main())
