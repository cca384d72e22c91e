"""The per-machine operations: addresses, os-release, UID mapping, ptys,
shells and logins, copies, bind mounts, the root directory, kill and
terminate (systemd's machine-dbus.c and machine.c).

Every function here blocks; machined runs them in worker threads.  None of
them forks machined (a threaded asyncio process).  How each reaches into a
machine:

* Files (os-release, /dev/ptmx, /etc/passwd, the bus socket, both sides of a
  copy) are opened through an fd of /proc/<leader>/root with
  openat2(RESOLVE_IN_ROOT): absolute symlinks and ".." inside the machine
  resolve inside the machine, as they would after a chroot, and the result
  lives in the machine's mount tree (its devpts for /dev/ptmx).  A copy then
  works only with *at() calls on single names with O_NOFOLLOW below the
  directories opened that way, so a machine racing symlinks cannot send it
  elsewhere.
* The network namespace (GetAddresses) is joined by a short-lived thread of
  our own: setns(CLONE_NEWNET) changes only the calling thread, the thread
  opens a netlink socket there and ends; the socket stays in that namespace.
* What needs a process inside the machine (a shell in its PID namespace, a
  mount move in its mount namespace, a bus connection as its root) is done by
  ``machined/nsexec.py`` started as a fresh single-threaded interpreter.  It
  receives the namespace fds we opened from /proc/<leader>/ns, so it never
  looks a PID up itself.
* /proc/<leader> is opened once per call as a directory fd, and when the
  machine carries a pidfd of its leader that pidfd is checked after the open:
  if the leader is still alive, the directory is the leader's and not a
  process that reused its PID.

The host (``.host``) is "our own namespaces": nothing is entered for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imagepool.errors import Errno, InvalidArgs, NotSupported, PoolError
from imagepool.metadata import parse_env_file, read_file_in_root
from machined import machine as _machine
from machined import nsexec
from machined.machine import Machine, MachineClass, NoPrivateNetworking, NoSuchGroupMapping, NoSuchUserMapping

log = logging.getLogger(__name__)

NSEXEC = os.path.abspath(nsexec.__file__)
UID_NOBODY = 65534
HELPER_TIMEOUT = 60.0
TERMINATE_TIMEOUT = 10.0
# systemd's default for services (split-usr build, as Debian's).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROPAGATE_DIR = "/run/systemd/nspawn/propagate"
INCOMING_DIR = "/run/host/incoming"
COPY_DEPTH_MAX = 2048
_NSIG = 65
_PTMX_RDEV = os.makedev(5, 2)
_FICLONE = 0x40049409


# --- the leader ---------------------------------------------------------------------


class _Leader:
    """/proc/<leader> of a container or VM, opened as a directory."""

    def __init__(self, m: Machine) -> None:
        if m.leader <= 0:
            raise Errno(errno.ESRCH)
        self.pid = m.leader
        try:
            self.fd = os.open(f"/proc/{m.leader}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Errno(errno.ESRCH) from None
        if not _leader_alive(m) or self._dead():
            os.close(self.fd)
            raise Errno(errno.ESRCH)

    def _dead(self) -> bool:
        """Exited (a zombie has no namespaces or root any more)."""
        try:
            text = self.read("stat")
            return text[text.rindex(")") + 2] in "ZX"
        except (OSError, ValueError, IndexError):
            return True

    def __enter__(self) -> _Leader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self, name: str, flags: int = os.O_RDONLY) -> int:
        return os.open(name, flags | os.O_CLOEXEC, dir_fd=self.fd)

    def root(self) -> int:
        return self.open("root", os.O_RDONLY | os.O_DIRECTORY)

    def read(self, name: str) -> str:
        fd = self.open(name)
        with os.fdopen(fd, "r") as f:
            return f.read()

    def ns_link(self, kind: str) -> str:
        return os.readlink(f"ns/{kind}", dir_fd=self.fd)

    def namespaces(self, kinds: Iterable[str]) -> dict[str, int]:
        """fds of those of the leader's namespaces that differ from ours."""
        out: dict[str, int] = {}
        try:
            for kind in kinds:
                try:
                    if self.ns_link(kind) == os.readlink(f"/proc/self/ns/{kind}"):
                        continue
                except FileNotFoundError:
                    continue  # the kernel lacks that namespace type
                out[kind] = self.open(f"ns/{kind}")
        except BaseException:
            for fd in out.values():
                os.close(fd)
            raise
        return out


def _pidfd_exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _leader_alive(m: Machine) -> bool:
    """Whether the leader still runs, by its pidfd: once it has exited, its
    PID may be another process's.  (A machine without a pidfd, like .host,
    counts as alive.)"""
    if m.leader_exited:
        return False
    fd = m.dup_pidfd()
    if fd < 0:
        return True
    try:
        return not _pidfd_exited(fd)
    finally:
        os.close(fd)


def _oserror(e: OSError, message: str | None = None) -> Errno:
    code = e.errno or errno.EIO
    return Errno(code, f"{message}: {os.strerror(code)}" if message else None)


def _check_container(m: Machine, error: PoolError) -> None:
    if m.machine_class != MachineClass.CONTAINER:
        raise error


# --- addresses ------------------------------------------------------------------------

_NETLINK_ROUTE = 0
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_F_DEPRECATED = 0x20
_RT_SCOPE_HOST = 254
_RT_SCOPE_NOWHERE = 255
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _dump_addresses(sock: socket.socket) -> list[tuple[int, bytes]]:
    """systemd's local_addresses(NULL, 0, AF_UNSPEC): every address except
    deprecated ones and those of host or nowhere scope (so no loopback),
    IPv4 first, then by scope, interface index and address."""
    seq = 1
    request = _NLMSG_HDR.pack(_NLMSG_HDR.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
    request += _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.sendto(request, (0, 0))
    found: list[tuple[int, int, int, bytes]] = []
    done = False
    while not done:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSG_HDR.unpack_from(data, offset)
            if length < _NLMSG_HDR.size:
                raise Errno(errno.EBADMSG)
            body = data[offset + _NLMSG_HDR.size:offset + length]
            offset += _align4(length)
            if mseq != seq:
                continue
            if mtype == _NLMSG_DONE:
                done = True
                break
            if mtype == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code:
                    raise Errno(code)
                continue
            if mtype != _RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, _plen, flags, scope, ifindex = _IFADDRMSG.unpack_from(body)
            if flags & _IFA_F_DEPRECATED or scope in (_RT_SCOPE_HOST, _RT_SCOPE_NOWHERE):
                continue
            size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
            if size is None:
                continue
            attrs: dict[int, bytes] = {}
            pos = _IFADDRMSG.size
            while pos + _RTATTR.size <= len(body):
                alen, atype = _RTATTR.unpack_from(body, pos)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = body[pos + _RTATTR.size:pos + alen]
                pos += _align4(alen)
            address = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if address is None or len(address) != size:
                continue
            found.append((family, scope, ifindex, address))
    found.sort(key=lambda a: (0 if a[0] == socket.AF_INET else 1, a[1], a[2], a[3]))
    return [(family, address) for family, _scope, _ifindex, address in found]


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)


def _netlink_socket_in(netns_fd: int) -> socket.socket:
    """A netlink socket in another network namespace, made by a thread that
    joins the namespace (which changes that thread only) and then ends."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            nsexec.setns(netns_fd, nsexec.CLONE_NEWNET)
            result["sock"] = _netlink_socket()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    thread = threading.Thread(target=run, name="machined-netns")
    thread.start()
    thread.join()
    if "error" in result:
        error = result["error"]
        if isinstance(error, OSError):
            raise _oserror(error)
        raise error  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def get_addresses(m: Machine) -> list[tuple[int, bytes]]:
    if m.is_host:
        with _netlink_socket() as sock:
            return _dump_addresses(sock)
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported("Requesting IP address data is only supported on container machines.")
    with _Leader(m) as leader:
        try:
            if leader.ns_link("net") == os.readlink("/proc/self/ns/net"):
                raise NoPrivateNetworking(f"Machine {m.name} does not use private networking")
            netns = leader.open("ns/net")
        except OSError as e:
            raise _oserror(e) from None
    try:
        sock = _netlink_socket_in(netns)
    finally:
        os.close(netns)
    with sock:
        return _dump_addresses(sock)


# --- os-release -----------------------------------------------------------------------


def _read_os_release(root_fd: int) -> str | None:
    text = read_file_in_root(root_fd, "/etc/os-release")
    if text is None:
        text = read_file_in_root(root_fd, "/usr/lib/os-release")
    return text


def get_os_release(m: Machine) -> dict[str, str]:
    if m.is_host:
        root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    elif m.machine_class == MachineClass.CONTAINER:
        with _Leader(m) as leader:
            try:
                root = leader.root()
            except OSError as e:
                raise _oserror(e) from None
    else:
        raise NotSupported("Requesting OS release data is only supported on container machines.")
    try:
        text = _read_os_release(root)
    except OSError as e:
        raise _oserror(e) from None
    finally:
        os.close(root)
    if text is None:
        raise PoolError("Machine does not contain OS release information")
    return parse_env_file(text)


# --- UID/GID mapping ---------------------------------------------------------------------


def _uid_is_valid(uid: int) -> bool:
    return 0 <= uid < 0xFFFFFFFF and uid != 0xFFFF


def _parse_id_map(text: str) -> list[tuple[int, int, int]]:
    """Lines of a uid_map/gid_map: (inner base, outer base, count)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise Errno(errno.EBADMSG)
        try:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
        except ValueError:
            raise Errno(errno.EBADMSG) from None
    return out


def _id_map(m: Machine, name: str) -> list[tuple[int, int, int]]:
    with _Leader(m) as leader:
        try:
            return _parse_id_map(leader.read(name))
        except OSError as e:
            raise _oserror(e) from None


def _uid_shift(m: Machine) -> int:
    """systemd's machine_get_uid_shift(): Errno(ENXIO) for a mapping that is
    not a single range starting at 0, covering nobody, equal for groups."""
    if m.is_host:
        return 0
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    try:
        uid_map = _id_map(m, "uid_map")
    except Errno as e:
        if e.errno == errno.ENOENT:
            return 0  # no user namespaces in this kernel
        raise
    if not uid_map:
        raise Errno(errno.ENOMSG)
    base, shift, count = uid_map[0]
    if base != 0 or count < UID_NOBODY or len(uid_map) != 1:
        raise Errno(errno.ENXIO)
    gid_map = _id_map(m, "gid_map")
    if not gid_map:
        raise Errno(errno.ENOMSG)
    if len(gid_map) != 1 or gid_map[0] != uid_map[0]:
        raise Errno(errno.ENXIO)
    return shift


def get_uid_shift(m: Machine) -> int:
    if m.is_host:
        return 0
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported("UID/GID shift may only be determined for container machines.")
    try:
        return _uid_shift(m)
    except Errno as e:
        if e.errno == errno.ENXIO:
            raise NotSupported(f"Machine {m.name} uses a complex UID/GID mapping, cannot determine shift") from None
        raise


def _translate(m: Machine, map_name: str, inner: int) -> int | None:
    """Machine ID -> host ID through any line of the map (None: unmapped)."""
    for base, shift, count in _id_map(m, map_name):
        if base <= inner < base + count:
            outer = inner - base + shift
            if not _uid_is_valid(outer):
                raise Errno(errno.EINVAL)
            return outer
    return None


def map_from_machine_user(m: Machine, uid: int) -> int:
    if not _uid_is_valid(uid):
        raise InvalidArgs(f"Invalid user ID {uid}")
    _check_container(m, InvalidArgs("Not supported for non-container machines."))
    outer = _translate(m, "uid_map", uid)
    if outer is None:
        raise NoSuchUserMapping(f"Machine '{m.name}' has no matching user mappings.")
    return outer


def map_from_machine_group(m: Machine, gid: int) -> int:
    if not _uid_is_valid(gid):
        raise InvalidArgs(f"Invalid group ID {gid}")
    _check_container(m, InvalidArgs("Not supported for non-container machines."))
    outer = _translate(m, "gid_map", gid)
    if outer is None:
        # systemd answers this one with NoSuchUserMapping, not ...Group...
        raise NoSuchUserMapping(f"Machine '{m.name}' has no matching group mappings.")
    return outer


def _find_machine_for(machines: Iterable[Machine], map_name: str, outer: int) -> tuple[Machine, int] | None:
    """systemd's manager_find_machine_for_uid(): the first container whose map
    has a shifted line (outer base != 0) containing OUTER."""
    for m in machines:
        if m.machine_class != MachineClass.CONTAINER:
            continue
        try:
            lines = _id_map(m, map_name)
        except PoolError as e:
            log.debug("Cannot read %s of machine %s, ignoring: %s", map_name, m.name, e)
            continue
        for base, shift, count in lines:
            if shift == 0:
                continue
            if shift <= outer < shift + count:
                inner = outer - shift + base
                if not _uid_is_valid(inner):
                    raise Errno(errno.EINVAL)
                return m, inner
    return None


def map_to_machine_user(machines: Iterable[Machine], uid: int) -> tuple[Machine, int]:
    if not _uid_is_valid(uid):
        raise InvalidArgs(f"Invalid user ID {uid}")
    if uid < 0x10000:
        raise NoSuchUserMapping(f"User {uid} belongs to host UID range")
    found = _find_machine_for(machines, "uid_map", uid)
    if found is None:
        raise NoSuchUserMapping(f"No matching user mapping for {uid}.")
    return found


def map_to_machine_group(machines: Iterable[Machine], gid: int) -> tuple[Machine, int]:
    if not _uid_is_valid(gid):
        raise InvalidArgs(f"Invalid group ID {gid}")
    if gid < 0x10000:
        raise NoSuchGroupMapping(f"Group {gid} belongs to host GID range")
    found = _find_machine_for(machines, "gid_map", gid)
    if found is None:
        raise NoSuchGroupMapping(f"No matching group mapping for {gid}.")
    return found


# --- ptys ----------------------------------------------------------------------------


def _open_ptmx_in_root(root_fd: int) -> int:
    """Open the machine's /dev/ptmx, resolved inside its root: allocates the
    pty in the devpts instance mounted in the machine.  Only a ptmx device
    is opened (a machine could point /dev/ptmx at any device node)."""
    path_fd = nsexec.open_in_root(root_fd, "/dev/ptmx", os.O_PATH)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _PTMX_RDEV:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _allocate_pty(opener) -> tuple[int, str]:
    master = opener()
    try:
        number = nsexec.pty_number(master)
        nsexec.pty_unlock(master)
    except OSError:
        os.close(master)
        raise
    return master, f"/dev/pts/{number}"


def _outer_of(id_map: list[tuple[int, int, int]], inner: int) -> int | None:
    for base, shift, count in id_map:
        if base <= inner < base + count:
            return inner - base + shift
    return None


def _inner_of(id_map: list[tuple[int, int, int]], outer: int) -> int | None:
    for base, shift, count in id_map:
        if shift <= outer < shift + count:
            return outer - shift + base
    return None


def _fix_slave_owner(m: Machine, master: int) -> None:
    """A pty allocated by us belongs to the host's root, which a user
    namespace may not map; then nobody in the machine could open its slave.
    Give it to the machine's root instead, as if root in there had opened it."""
    uid_map = _id_map(m, "uid_map")
    gid_map = _id_map(m, "gid_map")
    slave = nsexec.pty_peer(master)
    try:
        st = os.fstat(slave)
        uid = -1 if _inner_of(uid_map, st.st_uid) is not None else _outer_of(uid_map, 0)
        gid = -1 if _inner_of(gid_map, st.st_gid) is not None else _outer_of(gid_map, 0)
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
            raise _oserror(e) from None
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    with _Leader(m) as leader:
        try:
            root = leader.root()
        except OSError as e:
            raise _oserror(e) from None
    try:
        master, name = _allocate_pty(lambda: _open_ptmx_in_root(root))
    except OSError as e:
        raise _oserror(e) from None
    finally:
        os.close(root)
    try:
        _fix_slave_owner(m, master)
    except BaseException:
        os.close(master)
        raise
    return master, name


# --- helper processes --------------------------------------------------------------------


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait()
    except Exception:  # noqa: BLE001
        log.exception("Failed to wait for helper %d", proc.pid)


def _run_helper(request: dict, fds: list[int], *, site: bool = False, keep: bool = False) -> dict:
    """Run nsexec.py with REQUEST and FDS; return its successful reply or
    raise the error it reports.  With KEEP the helper may go on running after
    it replied (it parents a shell); a thread of ours waits for it then."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    argv = [sys.executable, "-I", *([] if site else ["-S"]), NSEXEC, str(theirs.fileno())]
    try:
        proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, env={}, start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    reply: dict | None = None
    hung = True
    try:
        with ours:
            nsexec.send_message(ours, request, fds)
            ours.settimeout(HELPER_TIMEOUT)
            reply, extra = nsexec.receive_message(ours)
            hung = False
            for fd in extra:
                os.close(fd)
    except OSError as e:
        log.warning("No answer from helper %d: %s", proc.pid, e)
    finally:
        if keep and reply is not None and reply.get("ok"):
            threading.Thread(target=_reap, args=(proc,), name=f"machined-reap-{proc.pid}", daemon=True).start()
        else:
            if hung:
                proc.kill()
            try:
                proc.wait(HELPER_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if reply is None:
        raise PoolError("Helper process failed.")
    if reply.get("ok"):
        return reply
    if reply.get("dbus_name"):
        error = PoolError(reply.get("message") or reply["dbus_name"])
        error.dbus_name = reply["dbus_name"]
        raise error
    raise Errno(int(reply.get("errno") or errno.EIO), reply.get("message") or None)


# --- users inside a machine -----------------------------------------------------------


@dataclass
class _User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: list[int]


_PASSWD_LIMIT = 16 * 1024 * 1024


def _valid_user_name(user: str) -> bool:
    """systemd's relaxed user name rules (User= of a transient unit)."""
    if not user or user in (".", "..") or len(user) > 256:
        return False
    if user != user.strip() or user.startswith("-"):
        return False
    return not any(c in ":/" or ord(c) < 0x20 or ord(c) == 0x7F for c in user)


def _lookup_user(root_fd: int, user: str) -> _User | None:
    """The user from the machine's /etc/passwd (and its groups from
    /etc/group), by name or by numeric UID; root and nobody exist even
    without a record, as in systemd."""
    passwd = read_file_in_root(root_fd, "/etc/passwd", _PASSWD_LIMIT) or ""
    numeric = int(user) if user.isdigit() else None
    found: _User | None = None
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or line.startswith(("#", "+", "-")):
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            continue
        if fields[0] == user or (numeric is not None and uid == numeric):
            found = _User(fields[0], uid, gid, fields[5] or "/", fields[6] or "/bin/sh", [])
            break
    if found is None:
        if user in ("root", "0"):
            found = _User("root", 0, 0, "/root", "/bin/sh", [])
        elif user in ("nobody", str(UID_NOBODY)):
            found = _User("nobody", UID_NOBODY, UID_NOBODY, "/", "/usr/sbin/nologin", [])
        else:
            return None
    groups = {found.gid}
    group = read_file_in_root(root_fd, "/etc/group", _PASSWD_LIMIT) or ""
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and found.name in fields[3].split(","):
            with contextlib.suppress(ValueError):
                groups.add(int(fields[2]))
    found.groups = sorted(groups)
    return found


def _group_id(root_fd: int, name: str) -> int | None:
    group = read_file_in_root(root_fd, "/etc/group", _PASSWD_LIMIT) or ""
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name:
            with contextlib.suppress(ValueError):
                return int(fields[2])
    return None


# --- shells ------------------------------------------------------------------------------

# Like systemd's default for an empty path: the user's login shell as the
# machine's NSS knows it, else the one from its /etc/passwd ($2), else sh.
# systemd's own, for container-shell@.service (the user name is validated).
_UNIT_SHELL_SCRIPT = (
    'shell=$(getent passwd %s 2>/dev/null | { IFS=: read _ _ _ _ _ _ x; echo "$x"; })\n'
    'exec "${shell:-/bin/sh}" -l'
)
_LOGIN_SHELL_SCRIPT = (
    'shell=$(getent passwd "$1" 2>/dev/null | { IFS=: read -r _ _ _ _ _ _ x _; echo "$x"; })\n'
    'exec "${shell:-${2:-/bin/sh}}" -l'
)


def _env_name_valid(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


def _env_valid(env: list[str]) -> bool:
    """systemd's strv_env_is_valid(): NAME=VALUE entries, valid names, no
    control characters but tab and newline in values, no name twice."""
    seen = set()
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not _env_name_valid(name) or name in seen:
            return False
        if any((ord(c) < 0x20 and c not in "\t\n") or ord(c) == 0x7F for c in value):
            return False
        seen.add(name)
    return True


def shell_command(m: Machine, user: str, path: str, args: list[str], env: list[str]) -> tuple[str, str, list[str]]:
    """OpenShell's checks; the user, program and argv as systemd runs them
    in container-shell@.service (no program: the user's login shell)."""
    user = user or "root"
    if not path:
        path = "/bin/sh"
        argv = ["sh", "-c", _UNIT_SHELL_SCRIPT % user]
    else:
        if not path.startswith("/"):
            raise InvalidArgs(f"Specified path '{path}' is not absolute")
        argv = list(args) if args else [path]
    if not _env_valid(env):
        raise InvalidArgs("Invalid environment assignments")
    if not _valid_user_name(user):
        raise InvalidArgs(f"Invalid user name: {user}")
    if not m.is_host and m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    return user, path, argv


def open_shell(m: Machine, user: str, path: str, args: list[str], env: list[str]) -> tuple[int, str]:
    """Start PATH with ARGS as USER inside the machine on a new pty; returns
    the pty master and the slave's path.

    A container that runs its own systemd (org.freedesktop.systemd1 on its
    system bus) gets the shell as container-shell@N.service, started through
    that systemd exactly as systemd's machined asks for it (PAM, utmp, the
    user's login shell).  Otherwise the program runs in all of the machine's namespaces (cgroup, ipc, uts,
    net, pid, mnt, and user if it has one) and root, as the user's IDs there,
    as session leader with the pty slave as controlling terminal, in the
    user's home (else /), with TERM=vt220, PATH, HOME, USER, LOGNAME and
    SHELL set and ENV applied on top.

    Reaping: the program is the child of an nsexec helper (a process outside
    the machine's PID namespace that forked it into that namespace), which
    waits for it and exits with it; machined waits for the helper in a
    thread of its own."""
    login_shell = not path
    user, path, unit_argv = shell_command(m, user, path, args, env)
    argv = ["sh", "-c", _LOGIN_SHELL_SCRIPT, "sh", user] if login_shell else unit_argv
    if not m.is_host:
        started = _shell_unit(m, user, path, unit_argv, env)
        if started is not None:
            return started

    fds: list[int] = []
    request: dict = {"op": "shell", "ns": {}}
    master = -1
    try:
        if m.is_host:
            root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(root)
        else:
            with _Leader(m) as leader:
                try:
                    root = leader.root()
                    fds.append(root)
                    for kind, fd in leader.namespaces(("cgroup", "ipc", "uts", "net", "pid", "mnt", "user")).items():
                        request["ns"][kind] = len(fds)
                        fds.append(fd)
                except OSError as e:
                    raise _oserror(e) from None
            request["root"] = 0
        try:
            account = _lookup_user(root, user)
            tty_gid = _group_id(root, "tty")
        except OSError as e:
            raise _oserror(e) from None
        if account is None:
            raise PoolError(f"Failed to look up user '{user}' in machine {m.name}.")
        if login_shell:
            argv.append(account.shell)

        master, name = open_pty(m)
        try:
            slave = nsexec.pty_peer(master)
        except OSError as e:
            raise _oserror(e) from None
        request["slave"] = len(fds)
        fds.append(slave)
        # What login(1) does: the user owns the terminal, group tty may write.
        uid, gid = account.uid, tty_gid if tty_gid is not None else -1
        if not m.is_host and "user" in request["ns"]:
            uid = _outer_of(_id_map(m, "uid_map"), uid)
            gid = _outer_of(_id_map(m, "gid_map"), gid) if gid >= 0 else -1
            if uid is None:
                raise PoolError(f"User '{user}' is not mapped to the host.")
        try:
            os.fchown(slave, uid, -1 if gid is None else gid)
            os.fchmod(slave, 0o620)
        except OSError as e:
            raise _oserror(e) from None

        environment = {
            "PATH": DEFAULT_PATH,
            "HOME": account.home,
            "LOGNAME": account.name,
            "USER": account.name,
            "SHELL": account.shell,
            "TERM": "vt220",
        }
        for item in env:
            key, _, value = item.partition("=")
            environment[key] = value
        request.update(
            uid=account.uid, gid=account.gid, groups=account.groups, home=account.home,
            path=path, argv=argv, env=[f"{k}={v}" for k, v in environment.items()],
        )
        _run_helper(request, fds, keep=True)
    except BaseException:
        if master >= 0:
            os.close(master)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return master, name


def _systemd_request(m: Machine, request: dict, fds: list[int]) -> None:
    """Fill REQUEST and FDS for a call of the machine's systemd (nsexec's
    "systemd" op): its root and the namespaces that reach its system bus.
    Errno ENOENT when the machine has no system bus."""
    with _Leader(m) as leader:
        try:
            root = leader.root()
            request["root"] = len(fds)
            fds.append(root)
            request["ns"] = {}
            for kind, fd in leader.namespaces(("pid", "mnt", "user")).items():
                request["ns"][kind] = len(fds)
                fds.append(fd)
        except OSError as e:
            raise _oserror(e) from None
    try:
        os.close(nsexec.open_in_root(root, "/run/dbus/system_bus_socket", os.O_PATH))
    except FileNotFoundError:
        raise Errno(errno.ENOENT, f"There is no system bus in container {m.name}.") from None
    except OSError as e:
        raise _oserror(e) from None


def open_login(m: Machine) -> tuple[int, str]:
    """A pty, and container-getty@N.service started for it through the
    machine's system bus (StartUnit, mode "replace")."""
    if m.is_host:
        raise NotSupported("Opening a login on the host is not supported.")
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    master, name = open_pty(m)
    fds: list[int] = []
    try:
        request: dict = {"op": "systemd", "method": "StartUnit", "mode": "replace",
                         "unit": f"container-getty@{name.removeprefix('/dev/pts/')}.service"}
        _systemd_request(m, request, fds)
        _run_helper(request, fds, site=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return master, name


# What tells that a machine's bus has no systemd on it (or that there is none).
_NO_SYSTEMD = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}


def shell_unit_properties(user: str, path: str, argv: list[str], env: list[str], pty_name: str,
                          slave: object) -> list[list]:
    """container-shell@N.service as systemd's machined asks for it, as
    [name, signature, value]; SLAVE stands for the pty slave's fd."""
    properties: list[list] = [
        ["Description", "s", f"Shell for User {user}"],
        ["StandardInputFileDescriptor", "h", slave],
        ["StandardOutputFileDescriptor", "h", slave],
        ["StandardErrorFileDescriptor", "h", slave],
        ["SendSIGHUP", "b", True],
        ["IgnoreSIGPIPE", "b", False],
        ["KillMode", "s", "mixed"],
        ["TTYPath", "s", pty_name],
        ["TTYReset", "b", True],
        ["UtmpIdentifier", "s", pty_name.removeprefix("/dev/")],
        ["UtmpMode", "s", "user"],
        ["PAMName", "s", "login"],
        ["WorkingDirectory", "s", "-~"],
        ["User", "s", user],
    ]
    if env:
        properties.append(["Environment", "as", list(env)])
    properties.append(["ExecStart", "a(sasb)", [[path, list(argv), False]]])
    return properties


def _shell_unit(m: Machine, user: str, path: str, argv: list[str], env: list[str]) -> tuple[int, str] | None:
    """OpenShell through the container's own systemd: a pty, and
    container-shell@N.service (StartTransientUnit, mode "fail") on it.  None
    when the container runs no systemd (no bus, or nobody owns the name)."""
    fds: list[int] = []
    request: dict = {"op": "systemd", "method": "StartTransientUnit", "mode": "fail"}
    try:
        try:
            _systemd_request(m, request, fds)
        except Errno as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        master, name = open_pty(m)
        try:
            try:
                slave = nsexec.pty_peer(master)
            except OSError as e:
                raise _oserror(e) from None
            fds.append(slave)
            request["unit"] = f"container-shell@{name.removeprefix('/dev/pts/')}.service"
            request["properties"] = shell_unit_properties(user, path, argv, env, name, len(fds) - 1)
            try:
                _run_helper(request, fds, site=True)
            except Errno as e:
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    os.close(master)
                    return None
                raise
            except PoolError as e:
                if e.dbus_name in _NO_SYSTEMD:
                    os.close(master)
                    return None
                raise
        except BaseException:
            os.close(master)
            raise
        return master, name
    finally:
        for fd in fds:
            os.close(fd)


# --- copying ------------------------------------------------------------------------------


def _split(path: str) -> tuple[str, str]:
    """Parent directory and file name (systemd's path_extract_filename())."""
    stripped = path.rstrip("/")
    name = os.path.basename(stripped)
    if not name:
        raise Errno(errno.EADDRNOTAVAIL, f"Failed to extract file name of '{path}' path: "
                    f"{os.strerror(errno.EADDRNOTAVAIL)}")
    if name in (".", ".."):
        raise Errno(errno.EINVAL, f"Failed to extract file name of '{path}' path: {os.strerror(errno.EINVAL)}")
    return os.path.dirname(stripped) or "/", name


class _Copier:
    """copy_tree_at() with COPY_REFLINK|COPY_MERGE|COPY_HARDLINKS (and
    COPY_REPLACE): directories merge into existing ones, a file that exists
    is an EEXIST (ignored inside a merged directory, replaced with REPLACE),
    hard links among the copied files are kept, ownership is kept or forced
    to UID:GID, modes, times and user.* xattrs are kept."""

    def __init__(self, uid: int, gid: int, replace: bool) -> None:
        self.uid = uid
        self.gid = gid
        self.replace = replace
        # Hard links: (dev, ino) of a source inode -> where its first copy
        # went, as (fd of that destination directory, name).  One fd per
        # directory, never a path: paths below the destination could be
        # changed under us by the machine.
        self.links: dict[tuple[int, int], tuple[int, str]] = {}
        self.dirs: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        self.links.clear()

    def remember_link(self, st: os.stat_result, ddir: int, dname: str) -> None:
        dst = os.fstat(ddir)
        fd = self.dirs.get((dst.st_dev, dst.st_ino))
        if fd is None:
            fd = self.dirs[dst.st_dev, dst.st_ino] = os.dup(ddir)
        self.links[st.st_dev, st.st_ino] = (fd, dname)

    def owner(self, st: os.stat_result) -> tuple[int, int]:
        return (st.st_uid if self.uid < 0 else self.uid, st.st_gid if self.gid < 0 else self.gid)

    def copy(self, sdir: int, sname: str, ddir: int, dname: str) -> None:
        st = os.stat(sname, dir_fd=sdir, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self.tree(sdir, sname, st, ddir, dname)
        else:
            self.leaf(sdir, sname, st, ddir, dname)

    # Leaves --------------------------------------------------------------------

    def leaf(self, sdir: int, sname: str, st: os.stat_result, ddir: int, dname: str) -> None:
        try:
            self.leaf_once(sdir, sname, st, ddir, dname)
        except FileExistsError:
            if not self.replace:
                raise
            try:
                os.unlink(dname, dir_fd=ddir)
            except OSError:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
            self.leaf_once(sdir, sname, st, ddir, dname)

    def leaf_once(self, sdir: int, sname: str, st: os.stat_result, ddir: int, dname: str) -> None:
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            link_dir, link_name = self.links[key]
            try:
                os.link(link_name, dname, src_dir_fd=link_dir, dst_dir_fd=ddir, follow_symlinks=False)
                return
            except FileExistsError:
                raise
            except OSError:
                pass  # copy it instead
        if stat.S_ISREG(mode):
            self.regular(sdir, sname, st, ddir, dname)
        elif stat.S_ISLNK(mode):
            target = os.readlink(sname, dir_fd=sdir)
            os.symlink(target, dname, dir_fd=ddir)
            os.chown(dname, *self.owner(st), dir_fd=ddir, follow_symlinks=False)
            with contextlib.suppress(OSError):
                os.utime(dname, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=ddir, follow_symlinks=False)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            os.mknod(dname, mode, st.st_rdev, dir_fd=ddir)
            fd = os.open(dname, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ddir)
            try:
                if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(mode):
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
                proc = f"/proc/self/fd/{fd}"  # chmod/chown this very inode, never a swapped-in symlink's target
                os.chown(proc, *self.owner(st))
                os.chmod(proc, mode & 0o7777)
                with contextlib.suppress(OSError):
                    os.utime(proc, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
        else:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if st.st_nlink > 1 and not stat.S_ISLNK(mode):
            self.remember_link(st, ddir, dname)

    def regular(self, sdir: int, sname: str, st: os.stat_result, ddir: int, dname: str) -> None:
        src = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=sdir)
        try:
            sst = os.fstat(src)
            if not stat.S_ISREG(sst.st_mode) or (sst.st_dev, sst.st_ino) != (st.st_dev, st.st_ino):
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # changed under us
            dst = os.open(dname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                          st.st_mode & 0o7777, dir_fd=ddir)
            try:
                _copy_bytes(src, dst)
                os.fchown(dst, *self.owner(st))
                os.fchmod(dst, st.st_mode & 0o7777)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                _copy_xattrs(src, dst)
            except BaseException:
                os.close(dst)
                with contextlib.suppress(OSError):
                    os.unlink(dname, dir_fd=ddir)
                raise
            os.close(dst)
        finally:
            os.close(src)

    # Directories -------------------------------------------------------------------

    def open_dirs(self, sdir: int, sname: str, st: os.stat_result, ddir: int, dname: str) -> tuple[int, int, bool]:
        src = os.open(sname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
        try:
            created = False
            try:
                os.mkdir(dname, st.st_mode & 0o7777, dir_fd=ddir)
                created = True
            except FileExistsError:
                pass  # merge into it, if it is a directory
            try:
                dst = os.open(dname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ddir)
            except OSError as e:
                if not created and e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
                raise
        except BaseException:
            os.close(src)
            raise
        return src, dst, created

    def finish_dir(self, src: int, dst: int, st: os.stat_result, created: bool) -> None:
        try:
            if created:
                os.fchown(dst, *self.owner(st))
                os.fchmod(dst, st.st_mode & 0o7777)
                _copy_xattrs(src, dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(src)
            os.close(dst)

    def tree(self, sdir: int, sname: str, st: os.stat_result, ddir: int, dname: str) -> None:
        """Depth first without recursion; errors below the top are collected
        (the last one is raised at the end), EEXIST below the top ignored."""
        error: OSError | None = None
        src, dst, created = self.open_dirs(sdir, sname, st, ddir, dname)
        stack: list[tuple[int, int, os.stat_result, bool, Iterator[os.DirEntry]]] = []
        try:
            stack.append((src, dst, st, created, iter(list(os.scandir(src)))))
        except BaseException:
            self.finish_dir(src, dst, st, created)
            raise
        try:
            while stack:
                src, dst, dst_st, created, entries = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    stack.pop()
                    try:
                        self.finish_dir(src, dst, dst_st, created)
                    except OSError as e:
                        error = e
                    continue
                try:
                    est = os.stat(entry.name, dir_fd=src, follow_symlinks=False)
                    if stat.S_ISDIR(est.st_mode):
                        if len(stack) >= COPY_DEPTH_MAX:
                            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
                        csrc, cdst, ccreated = self.open_dirs(src, entry.name, est, dst, entry.name)
                        try:
                            children = iter(list(os.scandir(csrc)))
                        except BaseException:
                            self.finish_dir(csrc, cdst, est, ccreated)
                            raise
                        stack.append((csrc, cdst, est, ccreated, children))
                    else:
                        self.leaf(src, entry.name, est, dst, entry.name)
                except FileExistsError:
                    pass  # COPY_MERGE
                except OSError as e:
                    error = e
        finally:
            while stack:
                src, dst, _st, _created, _entries = stack.pop()
                os.close(src)
                os.close(dst)
        if error is not None:
            raise error


def _copy_bytes(src: int, dst: int) -> None:
    """Reflink if the file system can, else copy_file_range, else read/write."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        return
    except OSError:
        pass
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while data := os.read(src, 1 << 20):
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]


def _copy_xattrs(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        for name in os.listxattr(src):
            if name.startswith("user."):
                with contextlib.suppress(OSError):
                    os.setxattr(dst, name, os.getxattr(src, name))


def check_copyable(m: Machine) -> None:
    _check_container(m, NotSupported("Copying files is only supported on container machines."))


def check_copy_paths(src: str, dst: str) -> str:
    """The destination (the source's path when empty), after systemd's checks."""
    if not src.startswith("/"):
        raise InvalidArgs("Source path must be absolute.")
    if not dst:
        return src
    if not dst.startswith("/"):
        raise InvalidArgs("Destination path must be absolute.")
    return dst


def _copy(m: Machine, src: str, dst: str, replace: bool, from_machine: bool) -> None:
    check_copyable(m)
    dst = check_copy_paths(src, dst)
    shift = _uid_shift(m)
    container_path, host_path = (src, dst) if from_machine else (dst, src)
    host_parent, host_name = _split(host_path)
    container_parent, container_name = _split(container_path)
    try:
        host_fd = os.open(host_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _oserror(e, f"Failed to open host directory {host_path}") from None
    copier = None
    try:
        with _Leader(m) as leader:
            try:
                root = leader.root()
            except OSError as e:
                raise _oserror(e) from None
        try:
            container_fd = nsexec.open_in_root(root, container_parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise _oserror(e) from None
        finally:
            os.close(root)
        try:
            # With a UID shift the owner is forced: host root for what comes
            # out, the machine's root for what goes in.  Else kept as is.
            if from_machine:
                copier = _Copier(0 if shift else -1, 0 if shift else -1, replace)
                copier.copy(container_fd, container_name, host_fd, host_name)
            else:
                copier = _Copier(shift if shift else -1, shift if shift else -1, replace)
                copier.copy(host_fd, host_name, container_fd, container_name)
        except OSError as e:
            raise _oserror(e) from None
        finally:
            os.close(container_fd)
    finally:
        if copier is not None:
            copier.close()
        os.close(host_fd)


def copy_from(m: Machine, src: str, dst: str, replace: bool) -> None:
    """Copy SRC in the machine to DST on the host (systemd's CopyFrom)."""
    _copy(m, src, dst, replace, from_machine=True)


def copy_to(m: Machine, src: str, dst: str, replace: bool) -> None:
    """Copy SRC on the host to DST in the machine (systemd's CopyTo)."""
    _copy(m, src, dst, replace, from_machine=False)


# --- bind mounts --------------------------------------------------------------------------


def _path_is_normalized(path: str) -> bool:
    if not path.startswith("/") or len(path) >= 4096:
        return False
    if "//" in path:
        return False
    parts = [p for p in path.split("/") if p]
    return not any(p in (".", "..") or len(p) > 255 for p in parts)


def check_bind_mount(m: Machine, src: str, dst: str) -> str:
    """BindMount's checks before polkit's; the destination (SRC if empty)."""
    _check_container(m, NotSupported("Bind mounting is only supported on container machines."))
    if not _path_is_normalized(src):
        raise InvalidArgs("Source path must be absolute and normalized.")
    if not dst:
        return src
    if not _path_is_normalized(dst):
        raise InvalidArgs("Destination path must be absolute and normalized.")
    return dst


def bind_mount(m: Machine, src: str, dst: str, read_only: bool, mkdir: bool) -> None:
    """Bind mount SRC of the host on DST in the machine.

    The mount is cloned from SRC with open_tree() here, made read-only with
    mount_setattr() if asked (before it is attached anywhere), and attached
    by the nsexec helper in the machine's mount namespace and root.  For a
    container of systemd-nspawn, as systemd does, a second clone is attached
    below its propagation directory /run/systemd/nspawn/propagate/<name>/
    and the helper moves it from /run/host/incoming/ inside; if it did not
    propagate there (the host's /run is not a shared mount, as on a host
    without systemd), the helper attaches the first clone directly."""
    dst = check_bind_mount(m, src, dst)
    if _uid_shift(m) != 0:
        raise NotSupported("Can't bind mount on container with user namespacing applied.")
    message = f"Failed to mount {src} on {dst} in machine's namespace"

    def clone(src_fd: int) -> int:
        tree = nsexec.open_tree(src_fd, "", nsexec.OPEN_TREE_CLONE | nsexec.OPEN_TREE_CLOEXEC | nsexec.AT_EMPTY_PATH)
        if read_only:
            try:
                nsexec.mount_setattr(tree, "", nsexec.AT_EMPTY_PATH, nsexec.MOUNT_ATTR_RDONLY)
            except BaseException:
                os.close(tree)
                raise
        return tree

    fds: list[int] = []
    outside = ""
    outside_mounted = False
    src_fd = -1
    try:
        try:
            src_fd = os.open(src, os.O_PATH | os.O_CLOEXEC)
            is_dir = stat.S_ISDIR(os.fstat(src_fd).st_mode)
            fds.append(clone(src_fd))
        except OSError as e:
            raise _oserror(e, message) from None
        request: dict = {"op": "bind", "ns": {}, "tree": 0, "dest": dst, "mkdir": mkdir, "is_dir": is_dir}
        with _Leader(m) as leader:
            try:
                request["root"] = len(fds)
                fds.append(leader.root())
                for kind, fd in leader.namespaces(("mnt",)).items():
                    request["ns"][kind] = len(fds)
                    fds.append(fd)
            except OSError as e:
                raise _oserror(e, message) from None
        propagate = os.path.join(PROPAGATE_DIR, m.name)
        if os.path.isdir(propagate) and not os.path.islink(propagate):
            try:
                staged = clone(src_fd)
                try:
                    outside = _make_temp(propagate, is_dir)
                    nsexec.move_mount(staged, "", nsexec.AT_FDCWD, outside, nsexec.MOVE_MOUNT_F_EMPTY_PATH)
                    outside_mounted = True
                finally:
                    os.close(staged)
            except OSError as e:
                raise _oserror(e, message) from None
            request["source"] = os.path.join(INCOMING_DIR, os.path.basename(outside))
        try:
            reply = _run_helper(request, fds)
        except Errno as e:
            raise Errno(e.errno, f"{message}: {e.message}") from None
        log.debug("Mounted %s on %s in machine %s%s.", src, dst, m.name,
                  " through nspawn's propagation directory" if reply.get("propagated") else "")
    finally:
        if src_fd >= 0:
            os.close(src_fd)
        for fd in fds:
            os.close(fd)
        if outside_mounted:
            with contextlib.suppress(OSError):
                nsexec.umount2(outside, nsexec.MNT_DETACH)
        if outside:
            with contextlib.suppress(OSError):
                if is_dir:
                    os.rmdir(outside)
                else:
                    os.unlink(outside)


def _make_temp(directory: str, is_dir: bool) -> str:
    """A new, randomly named directory or empty file in DIRECTORY."""
    for _ in range(100):
        path = os.path.join(directory, os.urandom(6).hex())
        try:
            if is_dir:
                os.mkdir(path, 0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))


# --- root directory -------------------------------------------------------------------------


def open_root_directory(m: Machine) -> int:
    if m.is_host:
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if m.machine_class != MachineClass.CONTAINER:
        raise NotSupported("Opening the root directory is only supported on container machines.")
    with _Leader(m) as leader:
        try:
            return leader.root()
        except OSError as e:
            raise _oserror(e) from None


# --- kill and terminate -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    state: str
    start: int


def _read_proc(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    try:
        rest = text[text.rindex(b")") + 2:].split()
        return _Proc(pid, int(rest[1]), rest[0].decode(), int(rest[19]))
    except (ValueError, IndexError):
        return None


def _all_processes() -> dict[int, _Proc]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = _read_proc(int(name))
            if p is not None:
                out[p.pid] = p
    return out


def _ns_id(pid: int, kind: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _cgroup_pids(cgroup: str) -> set[int]:
    pids: set[int] = set()
    top = _machine.CGROUP_ROOT + cgroup
    for dirpath, _dirnames, filenames in os.walk(top):
        if "cgroup.procs" in filenames:
            with contextlib.suppress(OSError):
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids.update(int(line) for line in f if line.strip())
    return pids


def _machine_processes(m: Machine) -> dict[int, _Proc]:
    """The processes of a machine: its cgroup (when machined made one), every
    process in its PID namespace (when it has one of its own, which catches
    shells started by open_shell), and the leader with all descendants of
    any of these.  Zombies are not counted; we are never counted."""
    procs = _all_processes()
    members: set[int] = set()
    if m.leader in procs and _leader_alive(m):
        members.add(m.leader)
        leader_pidns = _ns_id(m.leader, "pid")
        if leader_pidns is not None and leader_pidns != _ns_id(os.getpid(), "pid"):
            for pid in procs:
                if _ns_id(pid, "pid") == leader_pidns:
                    members.add(pid)
    if m.cgroup:
        members.update(pid for pid in _cgroup_pids(m.cgroup) if pid in procs)
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in members:
                members.add(child)
                todo.append(child)
    members.discard(os.getpid())
    members.discard(1)
    return {pid: procs[pid] for pid in members if procs[pid].state not in ("Z", "X")}


def _signal_processes(procs: dict[int, _Proc], signo: int) -> None:
    """Signal each process through a pidfd, after checking that the PID
    still names the process we listed (same start time)."""
    for pid, p in procs.items():
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            now = _read_proc(pid)
            if now is None or now.start != p.start:
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signo)
        finally:
            os.close(pidfd)


def _kill_leader(m: Machine, signo: int) -> None:
    if m.leader_exited:
        raise Errno(errno.ESRCH)
    fd = m.dup_pidfd()
    try:
        if fd >= 0:
            signal.pidfd_send_signal(fd, signo)
        else:
            os.kill(m.leader, signo)
    except OSError as e:
        raise _oserror(e) from None
    finally:
        if fd >= 0:
            os.close(fd)


def kill(m: Machine, whom: str, signo: int) -> None:
    if whom in ("", "all"):
        leader_only = False
    elif whom == "leader":
        leader_only = True
    else:
        raise InvalidArgs(f"Invalid kill parameter '{whom}'")
    if not 0 < signo < _NSIG:
        raise InvalidArgs(f"Invalid signal {signo}")
    if m.is_host:
        raise Errno(errno.EOPNOTSUPP)
    if leader_only:
        _kill_leader(m, signo)
        return
    _signal_processes(_machine_processes(m), signo)


def terminate(m: Machine, timeout: float = TERMINATE_TIMEOUT) -> None:
    """SIGTERM (and SIGCONT, so stopped processes see it) to every process of
    the machine; SIGKILL to what is left after TIMEOUT seconds."""
    start_terminate(m)
    finish_terminate(m, timeout)


def start_terminate(m: Machine) -> None:
    """The first half of terminate(): SIGTERM and SIGCONT to every process."""
    if m.is_host:
        raise Errno(errno.EOPNOTSUPP)
    procs = _machine_processes(m)
    _signal_processes(procs, signal.SIGTERM)
    _signal_processes(procs, signal.SIGCONT)


def finish_terminate(m: Machine, timeout: float = TERMINATE_TIMEOUT) -> None:
    """The second half: wait up to TIMEOUT seconds, then SIGKILL what is left."""
    procs = _machine_processes(m)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while procs and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
        procs = _machine_processes(m)
    for _ in range(50):
        if not procs:
            return
        _signal_processes(procs, signal.SIGKILL)
        time.sleep(0.02)
        procs = _machine_processes(m)
    if procs:
        log.warning("Processes of machine %s survived SIGKILL: %s", m.name, sorted(procs))


__all__ = [
    "bind_mount", "copy_from", "copy_to", "get_addresses", "get_os_release", "get_uid_shift", "kill",
    "map_from_machine_group", "map_from_machine_user", "map_to_machine_group", "map_to_machine_user",
    "open_login", "open_pty", "open_root_directory", "open_shell", "terminate",
]
