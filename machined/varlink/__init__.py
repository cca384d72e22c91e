"""machined's Varlink front end: io.systemd.Machine and io.systemd.MachineImage
on /run/systemd/machine/, as systemd 262's machined serves them."""

from __future__ import annotations

import importlib.resources
import logging

from imagepool import daemon
from imagepool.varlink_service import Service
from machined.images import ImageManager
from machined.machines import MachineManager
from machined.varlink.image import ImageInterface
from machined.varlink.machine import MachineInterface

SOCKET_DIR = "/run/systemd/machine"
SOCKETS = (f"{SOCKET_DIR}/io.systemd.Machine", f"{SOCKET_DIR}/io.systemd.MachineImage")


def idl(name: str) -> str:
    return importlib.resources.files(__name__).joinpath(f"{name}.varlink").read_text()


async def serve(images: ImageManager, machines: MachineManager) -> Service:
    """Both interfaces (and io.systemd.service) on both sockets, or on the
    sockets systemd passed (socket activation)."""
    service = Service("machined-py (systemd-machined in Python)")
    service.add(idl("io.systemd.Machine"), MachineInterface(machines).handlers())
    service.add(idl("io.systemd.MachineImage"), ImageInterface(images).handlers())
    service.add_service_interface(daemon.get_log_level, daemon.set_log_level)
    passed = daemon.listen_fds().get("varlink")
    for path in SOCKETS:
        if passed is not None and path != SOCKETS[0]:
            continue  # socket activation: the unit links this path to the one socket
        try:
            await service.listen(path, passed if path == SOCKETS[0] else None)
        except OSError as e:
            logging.getLogger(__name__).warning("Not serving Varlink on %s: %s", path, e)
    return service
