"""What machined-py adds over D-Bus beyond systemd's API, on an object and
interface of its own, so that systemd's clients never see it (machinectl's
show verbs print every property of systemd's objects):

    /org/machined_py/machine1  org.machined_py.Images1
        UsageStatus(s name) -> (s status)   why an image's usage is unknown,
                                            or which limit it has reached
"""

from __future__ import annotations

from sdbus import DbusInterfaceCommonAsync

from imagepool import dbus
from machined.images import ImageManager

PATH = "/org/machined_py/machine1"
INTERFACE = "org.machined_py.Images1"


class ExtrasObject(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, images: ImageManager) -> None:
        super().__init__()
        self.images = images

    @dbus.method("s", "s", "UsageStatus", ["name"], ["status"])
    async def usage_status(self, name: str) -> str:
        return await self.images.usage_status(await self.images.find(name))
