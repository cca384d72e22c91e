"""systemd-importd in Python: ``importd --pool PATH``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from imagepool import daemon
from imagepool.image import Pool
from importd import local
from importd.dbus.manager import PATH, ImportManagerObject
from importd.http import DEFAULT_STALL_TIMEOUT, MAX_RETRIES, HttpOptions
from importd.local import DEFAULT_MAX_IMAGE_SIZE
from importd.manager import ImportManager, Options

log = logging.getLogger("importd")

BUS_NAME = "org.freedesktop.import1"


async def serve(pool_path: str, options: Options, stop: asyncio.Event) -> None:
    bus = daemon.open_system_bus()
    manager = ImportManager(Pool(pool_path), options)
    cleanup = daemon.clean_up_after_crashes("importd", manager.pool_directories())
    front = ImportManagerObject(manager)
    front.export_to_dbus(PATH)
    await daemon.request_name(bus, BUS_NAME)
    daemon.sd_notify("READY=1\nSTATUS=Processing requests...")
    log.info("importd ready, pool %s", pool_path)
    await stop.wait()
    daemon.sd_notify("STOPPING=1")
    # Cancel running transfers: each removes what it wrote.
    await manager.shutdown()
    await cleanup
    bus.close()


def main(argv: list[str] | None = None) -> int:
    parser = daemon.make_parser("importd")
    parser.add_argument("--max-image-size", type=daemon.parse_size, default=DEFAULT_MAX_IMAGE_SIZE,
                        help="largest image an import or pull may write, e.g. 10G (default: 64G); "
                             "the pool's free space caps it too")
    parser.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT,
                        help="fail a download that receives no data for this many seconds (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=MAX_RETRIES,
                        help="how often a dropped download is resumed (default: %(default)s)")
    parser.add_argument("--sync", action=argparse.BooleanOptionalAction, default=local.sync_default(),
                        help="have an image on disk before it is installed, as systemd-import and systemd-pull "
                             "do (default: yes, or $SYSTEMD_IMPORT_SYNC)")
    args = parser.parse_args(argv)
    daemon.setup_logging(args.debug)
    options = Options(max_image_size=args.max_image_size, sync=args.sync,
                      http=HttpOptions(stall_timeout=args.stall_timeout, retries=args.retries))
    return daemon.run(lambda stop: serve(args.pool, options, stop))


if __name__ == "__main__":
    raise SystemExit(main())
