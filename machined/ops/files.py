"""Files of a running machine: its os-release and its root directory."""

from __future__ import annotations

import os

from imagepool.errors import NoOSRelease, NotSupported
from imagepool.metadata import parse_env_file, read_os_release
from machined.machine import Machine, MachineClass
from machined.ops.leader import leader_root, oserror


def _root(m: Machine, what: str) -> int:
    """A directory fd of the machine's root (the host's for .host)."""
    if m.is_host:
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported(f"{what} is only supported on container machines.")
    return leader_root(m)


def get_os_release(m: Machine) -> dict[str, str]:
    root = _root(m, "Requesting OS release data")
    try:
        text = read_os_release(root)
    except OSError as e:
        raise oserror(e) from None
    finally:
        os.close(root)
    if text is None:
        raise NoOSRelease("Machine does not contain OS release information")
    return parse_env_file(text)


def open_root_directory(m: Machine) -> int:
    return _root(m, "Opening the root directory")
