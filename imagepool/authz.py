"""Authorization: the one question both front ends ask before a privileged
operation, in the terms of polkit (an action id and its details, as systemd
asks them).

Root is always allowed.  Anybody else is refused the way systemd refuses
when polkit does not allow it: EACCES, "Permission denied".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagepool.errors import PermissionDenied

MACHINE1 = "org.freedesktop.machine1"
IMPORT1 = "org.freedesktop.import1"


@dataclass(frozen=True)
class Caller:
    """Who asks: a D-Bus peer (BUS_NAME) or a Varlink one (PID), with the
    UID it runs as; INTERACTIVE: it allows interactive authentication."""

    uid: int
    pid: int = 0
    bus_name: str = ""
    interactive: bool = False


async def authorize(caller: Caller, action: str, details: Mapping[str, str] | None = None) -> None:
    """Allow CALLER to do ACTION (a polkit action id) or raise."""
    if caller.uid == 0:
        return
    raise PermissionDenied()
