"""ptys of machines: allocated in the machine's own devpts (its /dev/ptmx,
resolved inside its root), owned so that the machine's root can open them."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from imagepool.errors import Errno
from imagepool.syscalls import open_in_root
from machined import nsexec
from machined.machine import Machine, MachineClass
from machined.ops.idmap import id_map, inner_of, outer_of
from machined.ops.leader import leader_root, oserror

_PTMX_RDEV = os.makedev(5, 2)


def _open_ptmx_in_root(root_fd: int) -> int:
    """Open the machine's /dev/ptmx, resolved inside its root: allocates the
    pty in the devpts instance mounted in the machine.  Only a ptmx device
    is opened (a machine could point /dev/ptmx at any device node)."""
    path_fd = open_in_root(root_fd, "/dev/ptmx", os.O_PATH)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _PTMX_RDEV:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _allocate_pty(opener: Callable[[], int]) -> tuple[int, str]:
    master = opener()
    try:
        number = nsexec.pty_number(master)
        nsexec.pty_unlock(master)
    except OSError:
        os.close(master)
        raise
    return master, f"/dev/pts/{number}"


def _fix_slave_owner(m: Machine, master: int) -> None:
    """A pty allocated by us belongs to the host's root, which a user
    namespace may not map; then nobody in the machine could open its slave.
    Give it to the machine's root instead, as if root in there had opened it."""
    uid_map = id_map(m, "uid")
    gid_map = id_map(m, "gid")
    slave = nsexec.pty_peer(master)
    try:
        st = os.fstat(slave)
        uid = -1 if inner_of(uid_map, st.st_uid) is not None else outer_of(uid_map, 0)
        gid = -1 if inner_of(gid_map, st.st_gid) is not None else outer_of(gid_map, 0)
        if (uid is not None and uid != -1) or (gid is not None and gid != -1):
            os.fchown(slave, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(slave)


def open_pty(m: Machine) -> tuple[int, str]:
    """A pty master allocated in the machine's /dev/pts and the slave's path
    as seen inside the machine."""
    if m.is_host:
        try:
            return _allocate_pty(lambda: os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError as e:
            raise oserror(e) from None
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    root = leader_root(m)
    try:
        master, name = _allocate_pty(lambda: _open_ptmx_in_root(root))
    except OSError as e:
        raise oserror(e) from None
    finally:
        os.close(root)
    try:
        _fix_slave_owner(m, master)
    except BaseException:
        os.close(master)
        raise
    return master, name
