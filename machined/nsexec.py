"""Namespace plumbing for the per-machine operations, and the helper process
that runs the few operations needing a process *inside* a machine.

Two halves share this file:

* Thin ctypes wrappers (``setns``, ``open_tree``, ``move_mount``,
  ``mount_setattr``, ``mount``, ``umount2``) and the request/reply framing,
  imported by ``machined.ops``.

* ``main()``: the helper.  machined never forks itself (it is threaded and
  runs an event loop); instead ``machined.ops.leader`` starts this file as a fresh,
  single-threaded interpreter (``python -I -S nsexec.py FD``).  Only a
  single-threaded process may join a mount or user namespace, and only a
  process can be the parent of a program running in a machine's PID
  namespace.  The helper reads one request (JSON plus file descriptors over
  SCM_RIGHTS) from the socket FD, enters the machine's namespaces and root
  through the descriptors it was given (it never looks up /proc paths
  itself, so it cannot be raced into another process's namespaces), does
  the operation and replies ``{"ok": true, ...}`` or
  ``{"errno": N, "message": "..."}``.

The file uses the standard library only, so that it runs with ``-I -S``
(about 30 ms to start).  Before it enters a machine's mount namespace or root
it disables path-based imports: from then on a lazy ``import`` would search
the *machine's* file system for code to run as root on the host.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
from typing import Any

# --- system calls -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "cgroup": CLONE_NEWCGROUP,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "net": CLONE_NEWNET,
    "pid": CLONE_NEWPID,
    "mnt": CLONE_NEWNS,
    "user": CLONE_NEWUSER,
}
# Joined in this order; the user namespace last, after the root is changed,
# so that every other setns() and chroot() still runs with the capabilities
# of the initial user namespace.
ENTER_ORDER = ("cgroup", "ipc", "uts", "net", "pid", "mnt")

# New-style system calls have the same number on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_RDONLY = 0x00000001

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MNT_DETACH = 2

# <asm-generic/ioctls.h>; x86, arm, arm64, riscv, s390 and loongarch use these.
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        if path is None:
            raise OSError(code, f"{what}: {os.strerror(code)}")
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
    return result


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return int(_check(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(dirfd), os.fsencode(path),
                                    ctypes.c_uint(flags)), "open_tree", path))


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int) -> None:
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(from_dirfd), os.fsencode(from_path),
                         ctypes.c_int(to_dirfd), os.fsencode(to_path), ctypes.c_uint(flags)),
           "move_mount", to_path)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(dirfd), os.fsencode(path), ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr", path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount", target)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount2", target)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(RESOLVE_IN_ROOT): PATH as if ROOT_FD were "/" (absolute
    symlinks and ".." stay below it), no magic links; close-on-exec, and
    without a controlling tty unless the open is O_PATH (which takes no
    other flags)."""
    flags |= os.O_CLOEXEC
    if not flags & os.O_PATH:
        flags |= os.O_NOCTTY
    how = _OpenHow(flags, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    return int(_check(_libc.syscall(_SYS_OPENAT2, ctypes.c_int(root_fd), os.fsencode(path), ctypes.byref(how),
                                    ctypes.c_size_t(ctypes.sizeof(how))), "openat2", path))


def pty_number(master: int) -> int:
    buf = fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0")
    number: int = struct.unpack("I", buf)[0]
    return number


def pty_unlock(master: int) -> None:
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))


def pty_peer(master: int, flags: int = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC) -> int:
    """The slave side of MASTER, opened without any path lookup."""
    return fcntl.ioctl(master, TIOCGPTPEER, flags)


# --- framing ---------------------------------------------------------------------

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


def send_message(sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it (close-on-exec);
    (None, []) at end of file."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


# --- the helper ------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _lock_imports() -> None:
    """No more imports from the file system: only built-in and frozen
    modules can still be imported."""
    sys.path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") in ("BuiltinImporter", "FrozenImporter")]


def _enter(req: dict[str, Any], fds: list[int]) -> None:
    """Join the namespaces and the root directory named in REQ."""
    _lock_imports()
    ns = req.get("ns", {})
    for kind in ENTER_ORDER:
        if kind in ns:
            try:
                setns(fds[ns[kind]], NAMESPACE_FLAGS[kind])
            except OSError as e:
                message = f"Failed to join {kind} namespace: {os.strerror(e.errno or 0)}"
                raise _Failure(e.errno or errno.EIO, message) from None
    root = req.get("root")
    if root is not None:
        try:
            os.fchdir(fds[root])
            os.chroot(".")
            os.chdir("/")
        except OSError as e:
            message = f"Failed to change root directory: {os.strerror(e.errno or 0)}"
            raise _Failure(e.errno or errno.EIO, message) from None
    if "user" in ns:
        try:
            setns(fds[ns["user"]], CLONE_NEWUSER)
        except OSError as e:
            message = f"Failed to join user namespace: {os.strerror(e.errno or 0)}"
            raise _Failure(e.errno or errno.EIO, message) from None


def _become_root_in_userns(req: dict[str, Any]) -> None:
    """After joining a user namespace, become its root (the process still has
    the host's root UID, which the namespace may not map)."""
    if "user" not in req.get("ns", {}):
        return
    try:
        os.setgroups([])
    except PermissionError:
        pass  # setgroups is "deny" in that namespace
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _op_bind(req: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
    dest = req["dest"]
    if req.get("mkdir"):
        # As systemd: create the parents and the mount point, ignoring errors;
        # the mount reports what is still missing.
        parent = os.path.dirname(dest.rstrip("/")) or "/"
        try:
            os.makedirs(parent, 0o755, exist_ok=True)
        except OSError:
            pass
        try:
            if req["is_dir"]:
                os.mkdir(dest, 0o700)
            else:
                os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY, 0o600))
        except OSError:
            pass
    propagated = False
    try:
        if "source" in req:
            # Moved out of /run/host/incoming/, where the host's mount showed
            # up through propagation.  EINVAL: it did not (the host's /run
            # is not a shared mount), so attach our own clone instead.
            try:
                mount(req["source"], dest, None, MS_MOVE)
                propagated = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not propagated:
            move_mount(fds[req["tree"]], "", AT_FDCWD, dest, MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as e:
        raise _Failure(e.errno or errno.EIO, os.strerror(e.errno or errno.EIO)) from None
    send_message(sock, {"ok": True, "propagated": propagated})


def _default_signals() -> None:
    for signo in range(1, signal.NSIG):
        try:
            signal.signal(signo, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _shell_child(req: dict[str, Any], slave: int, status_fd: int) -> None:
    """In the forked child, inside the machine: become the session leader on
    the pty, drop to the user and exec.  Never returns."""
    stage = "Failed to set up the terminal"
    try:
        _default_signals()
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
        stage = "Failed to change to the user"
        try:
            os.setgroups(req["groups"])
        except PermissionError:
            if "user" not in req.get("ns", {}):
                raise
        os.setresgid(req["gid"], req["gid"], req["gid"])
        os.setresuid(req["uid"], req["uid"], req["uid"])
        os.chdir("/")
        try:
            os.chdir(req["home"])  # WorkingDirectory=-~: the home if it works
        except OSError:
            pass
        env = dict(item.split("=", 1) for item in req["env"])
        stage = f"Failed to execute {req['path']}"
        os.execve(req["path"], req["argv"], env)
    except OSError as e:
        os.write(status_fd, json.dumps([e.errno or errno.EIO, stage]).encode())
    except BaseException:
        os.write(status_fd, json.dumps([errno.EIO, stage]).encode())
    os._exit(127)


def _op_shell(req: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
    """Start the program on the pty slave, report, then stay as its parent
    until it exits: machined reaps this helper, this helper reaps the
    program.  The program is in the machine's PID namespace (we joined it
    above, so the fork lands there), this process is not."""
    slave = fds[req["slave"]]
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        sock.close()
        _shell_child(req, slave, write_end)
    os.close(write_end)
    for fd in fds:
        os.close(fd)  # the slave, the namespaces: the program holds what it needs
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    if data:
        os.waitpid(pid, 0)
        code, stage = json.loads(data)
        raise _Failure(code, f"{stage}: {os.strerror(code)}")
    send_message(sock, {"ok": True, "pid": pid})
    sock.close()
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except ChildProcessError:
            break
        except InterruptedError:
            continue


def unit_properties(properties: list[list[Any]], fds: list[int]) -> list[tuple[str, tuple[str, Any]]]:
    """[name, signature, value] from the request as sd-bus wants them; an
    "h" value is the index of the fd."""
    out = []
    for name, signature, value in properties:
        if signature == "h":
            value = fds[value]
        elif signature == "a(sasb)":
            value = [tuple(item) for item in value]
        out.append((name, (signature, value)))
    return out


def _op_systemd(req: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
    """StartUnit or StartTransientUnit on the machine's system bus, as the
    machine's root, from a child in its PID namespace (so that the bus sees
    a PID of its own)."""
    sbi = sys.modules["sdbus.sd_bus_internals"]  # imported before the root changed
    pid = os.fork()
    if pid == 0:
        try:
            try:
                bus = sbi.sd_bus_open_system()
                msg = bus.new_method_call_message("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                                  "org.freedesktop.systemd1.Manager", req["method"])
                if req["method"] == "StartTransientUnit":
                    msg.append_data("ssa(sv)a(sa(sv))", req["unit"], req["mode"],
                                    unit_properties(req["properties"], fds), [])
                else:
                    msg.append_data("ss", req["unit"], req["mode"])
                reply = bus.call(msg)
                send_message(sock, {"ok": True, "job": str(reply.get_contents())})
            except sbi.SdBusUnmappedMessageError as e:
                name, text = (list(e.args) + ["", ""])[:2]
                send_message(sock, {"errno": 0, "dbus_name": str(name), "message": str(text)})
            except sbi.SdBusBaseError as e:
                name = getattr(e, "dbus_error_name", "org.freedesktop.DBus.Error.Failed")
                text = str(e.args[0]) if e.args else str(e)
                send_message(sock, {"errno": 0, "dbus_name": name, "message": text})
            except OSError as e:
                code = e.errno or errno.EIO
                message = f"Failed to connect to the system bus: {os.strerror(code)}"
                send_message(sock, {"errno": code, "message": message})
        finally:
            os._exit(0)
    sock.close()
    os.waitpid(pid, 0)


OPS = {"bind": _op_bind, "shell": _op_shell, "systemd": _op_systemd}


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(sock.fileno(), False)
    req, fds = receive_message(sock)
    if req is None:
        return 1
    try:
        op = OPS[req["op"]]
        if req["op"] == "systemd":
            # Loaded now, from the host: once inside, imports are locked.
            import sdbus.sd_bus_internals  # noqa: F401

            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        _enter(req, fds)
        if req["op"] == "systemd":
            _become_root_in_userns(req)
        op(req, fds, sock)
    except _Failure as e:
        send_message(sock, {"errno": e.code, "message": e.message})
        return 1
    except OSError as e:
        send_message(sock, {"errno": e.errno or errno.EIO, "message": os.strerror(e.errno or errno.EIO)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
