"""Authorization: the one question both front ends ask before a privileged
operation, in the terms of polkit (an action id and its details, as systemd
asks them), answered as systemd 262's bus-polkit.c answers it.

- A caller with our UID (root) is allowed without asking.
- Anybody else: polkitd is asked (CheckAuthorization, imagepool.polkit), with interactive
  authorization when the caller allowed it (the D-Bus message flag, or
  Varlink's ``allowInteractiveAuthentication``).
- authorized: go on; challenge: InteractiveAuthorizationRequired (262's
  words, imagepool.errors); not authorized, polkit's
  Failed/Cancelled/NotAuthorized errors, or no polkit on the bus:
  PermissionDenied (EACCES: D-Bus AccessDenied "Permission denied", Varlink
  org.varlink.service.PermissionDenied); any other error of polkit's (or no
  answer in 25 s) is passed on (PolkitFailure).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from imagepool import polkit
from imagepool.errors import InteractiveAuthorizationRequired, PermissionDenied, PolkitFailure

log = logging.getLogger(__name__)

MACHINE1 = "org.freedesktop.machine1"
IMPORT1 = "org.freedesktop.import1"


@dataclass(frozen=True)
class Caller:
    """Who asks: a D-Bus peer (BUS_NAME) or a Varlink one (PID, and the
    connection's SOCKET), with the UID it runs as; INTERACTIVE: it allows
    interactive authentication."""

    uid: int
    pid: int = 0
    bus_name: str = ""
    interactive: bool = False
    socket: socket.socket | None = field(default=None, compare=False, repr=False)


def detail_pairs(*pairs: str | None) -> dict[str, str]:
    """polkit details from KEY, VALUE, ... as systemd's STRV_MAKE() builds
    them: the list ends at the first missing (None) value."""
    out: dict[str, str] = {}
    for i in range(0, len(pairs) - 1, 2):
        key, value = pairs[i], pairs[i + 1]
        if key is None or value is None:
            break
        out[key] = value
    return out


def privileged(caller: Caller) -> bool:
    """sd_bus_query_sender_privilege() / varlink_check_peer_privilege():
    the caller runs as we do, or as root when we do not."""
    ours = os.getuid()
    return caller.uid == ours or (ours != 0 and caller.uid == 0)


async def authorize(caller: Caller, action: str, details: Mapping[str, str] | None = None) -> None:
    """Allow CALLER to do ACTION (a polkit action id) or raise."""
    if privileged(caller):
        return
    pidfd = None
    try:
        if caller.bus_name:
            subject = polkit.bus_name_subject(caller.bus_name)
        else:
            pidfd = polkit.peer_pidfd(caller.socket) if caller.socket is not None else None
            subject = polkit.process_subject(caller.pid, caller.uid, pidfd)
        log.debug("Asking polkit for '%s' (%s), for %s, %sinteractive.", action, dict(details or {}), subject[0],
                  "" if caller.interactive else "not ")
        answer = await polkit.check(subject, action, details or {}, caller.interactive)
    except polkit.Absent:
        log.debug("Polkit found to be unavailable while trying to authorize action '%s'.", action)
        raise PermissionDenied() from None
    except polkit.Failed as e:
        if e.name in polkit.REFUSALS:
            log.debug("Polkit authorization for action '%s' failed with an polkit error: %s", action, e.name)
            raise PermissionDenied() from None
        log.debug("Polkit authorization for action '%s' failed with an unexpected error: %s", action, e.name)
        raise PolkitFailure(e.name, e.message) from None
    except (FileNotFoundError, ProcessLookupError):  # a Varlink caller gone before we could name it
        raise PermissionDenied() from None
    finally:
        polkit.close(pidfd)
    if answer.authorized:
        log.debug("Polkit authorization for action '%s' succeeded.", action)
        return
    if answer.challenge:
        log.debug("Polkit authorization for action '%s' requires interactive authentication, which we didn't "
                  "allow.", action)
        raise InteractiveAuthorizationRequired()
    log.debug("Polkit authorization for action '%s' denied.", action)
    raise PermissionDenied()
