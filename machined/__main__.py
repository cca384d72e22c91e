"""systemd-machined in Python: ``machined --pool PATH``."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from imagepool import daemon, logcontrol, ops
from imagepool.classes import Roots
from machined.dbus.extras import PATH as EXTRAS_PATH
from machined.dbus.extras import ExtrasObject
from machined.dbus.manager import PATH, ManagerObject
from machined.images import ImageManager
from machined.machines import OPERATIONS_MAX, MachineManager
from machined.userdb import UserDatabase
from machined.varlink import serve as serve_varlink

log = logging.getLogger("machined")

BUS_NAME = "org.freedesktop.machine1"


async def serve(roots: Roots, stop: asyncio.Event) -> None:
    # Copies, helpers and image operations wait in worker threads: enough of
    # them that OPERATIONS_MAX long copies don't hold up everything else.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=OPERATIONS_MAX + 16, thread_name_prefix="machined"))
    bus = daemon.open_system_bus()
    images = ImageManager(roots.pool("machine"))
    await asyncio.to_thread(ops.prepare_quotas, images.pool)
    cleanup = daemon.clean_up_after_crashes("machined", [images.pool.path])
    os.makedirs("/run/systemd/machines", mode=0o755, exist_ok=True)
    machines = MachineManager()
    machines.start()
    manager = ManagerObject(images, machines)
    manager.export_to_dbus(PATH)
    extras = ExtrasObject(images)
    extras.export_to_dbus(EXTRAS_PATH)
    log_control = logcontrol.LogControl("machined")
    log_control.export_to_dbus(logcontrol.PATH)
    manager.start()
    userdb: UserDatabase | None = UserDatabase(lambda: machines.registry)
    try:
        await userdb.start()  # type: ignore[union-attr]
    except OSError as e:
        log.warning("Not serving the user database: %s", e)
        userdb = None
    await images.discover()
    images.start_watching()
    varlink = await serve_varlink(images, machines)
    await daemon.request_name(bus, BUS_NAME)
    daemon.sd_notify("READY=1\nSTATUS=Processing requests...")
    log.info("machined ready, pool %s", images.pool.path)
    await stop.wait()
    daemon.sd_notify("STOPPING=1")
    images.stop_watching()
    await varlink.stop()
    if userdb:
        await userdb.stop()
    machines.close()
    await cleanup
    bus.close()


def main(argv: list[str] | None = None) -> int:
    # Our own user lookups must not come back to our own userdb socket.
    os.environ["SYSTEMD_BYPASS_USERDB"] = "io.systemd.Machine"
    args = daemon.parse_args("machined", argv)
    daemon.setup_logging(args.debug)
    roots = daemon.image_roots(args)
    return daemon.run(lambda stop: serve(roots, stop))


if __name__ == "__main__":
    raise SystemExit(main())
