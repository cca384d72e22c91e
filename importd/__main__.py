"""systemd-importd in Python: ``importd --pool PATH``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from imagepool import daemon, logcontrol, syscalls
from imagepool.classes import Roots
from importd import local, oci
from importd.dbus.manager import PATH, ImportManagerObject
from importd.http import DEFAULT_STALL_TIMEOUT, MAX_RETRIES, HttpOptions
from importd.local import DEFAULT_MAX_IMAGE_SIZE
from importd.manager import ImportManager, Options
from importd.varlink import serve as serve_varlink
from importd.verify import DEFAULT_KEYRINGS

log = logging.getLogger("importd")

BUS_NAME = "org.freedesktop.import1"


async def serve(roots: Roots, options: Options, stop: asyncio.Event) -> None:
    bus = daemon.open_system_bus()
    manager = ImportManager(roots, options)
    cleanup = daemon.clean_up_after_crashes("importd", manager.pool_directories())
    front = ImportManagerObject(manager)
    front.export_to_dbus(PATH)
    log_control = logcontrol.LogControl("importd")
    log_control.export_to_dbus(logcontrol.PATH)
    varlink = await serve_varlink(manager)
    await daemon.request_name(bus, BUS_NAME)
    daemon.sd_notify("READY=1\nSTATUS=Processing requests...")
    log.info("importd ready, pool %s", roots.pool_path("machine"))
    await stop.wait()
    daemon.sd_notify("STOPPING=1")
    # Cancel running transfers: each removes what it wrote.
    await manager.shutdown()
    await varlink.stop()
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
    parser.add_argument("--oci-parallel", type=int, default=oci.DEFAULT_PARALLEL,
                        help="layers a pull-oci downloads at once (default: one per CPU, 2 to 4: %(default)s)")
    parser.add_argument("--keyring", metavar="FILE", type=os.path.abspath,
                        help="the keyring that verifies the signatures of pulls (default: the first of "
                             + ", ".join(DEFAULT_KEYRINGS) + " that exists)")
    args = parser.parse_args(argv)
    daemon.setup_logging(args.debug)
    syscalls.keep_buffers_mapped()
    options = Options(max_image_size=args.max_image_size, sync=args.sync, oci_parallel=max(1, args.oci_parallel),
                      http=HttpOptions(stall_timeout=args.stall_timeout, retries=args.retries),
                      keyring=args.keyring)
    roots = daemon.image_roots(args)
    return daemon.run(lambda stop: serve(roots, options, stop))


if __name__ == "__main__":
    raise SystemExit(main())
