"""The leader of a machine, and the helper process that works inside it.

/proc/<leader> is opened once per operation as a directory fd; when the
machine carries a pidfd of its leader, that pidfd is checked after the open:
if the leader is still alive, the directory is the leader's and not a
process's that reused its PID.

What needs a process inside the machine (a shell in its PID namespace, a
mount move in its mount namespace, a bus connection as its root) is done by
``machined/nsexec.py``, started as a fresh single-threaded interpreter
through ``imagepool.spawn``.  It receives the namespace fds we opened from
/proc/<leader>/ns, so it never looks a PID up itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from imagepool import spawn
from imagepool.errors import Errno, PoolError, RemoteError
from machined import nsexec
from machined.machine import Machine, MachineClass

log = logging.getLogger(__name__)

NSEXEC = os.path.abspath(nsexec.__file__)
HELPER_TIMEOUT = 60.0


class Leader:
    """/proc/<leader> of a container or VM, opened as a directory."""

    def __init__(self, m: Machine) -> None:
        if m.leader <= 0:
            raise Errno(errno.ESRCH)
        self.pid = m.leader
        try:
            self.fd = os.open(f"/proc/{m.leader}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Errno(errno.ESRCH) from None
        if not leader_alive(m) or self._dead():
            os.close(self.fd)
            raise Errno(errno.ESRCH)

    def _dead(self) -> bool:
        """Exited (a zombie has no namespaces or root any more)."""
        try:
            text = self.read("stat")
            return text[text.rindex(")") + 2] in "ZX"
        except (OSError, ValueError, IndexError):
            return True

    def __enter__(self) -> Leader:
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


def pidfd_exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def leader_alive(m: Machine) -> bool:
    """Whether the leader still runs, by its pidfd: once it has exited, its
    PID may be another process's.  (A machine without a pidfd, like .host,
    counts as alive.)"""
    if m.leader_exited:
        return False
    fd = m.dup_pidfd()
    if fd < 0:
        return True
    try:
        return not pidfd_exited(fd)
    finally:
        os.close(fd)


def oserror(e: OSError, message: str | None = None) -> Errno:
    code = e.errno or errno.EIO
    return Errno(code, f"{message}: {os.strerror(code)}" if message else None)


def leader_root(m: Machine) -> int:
    """A directory fd of the machine's root, through its leader."""
    with Leader(m) as leader:
        try:
            return leader.root()
        except OSError as e:
            raise oserror(e) from None


def add_entry(m: Machine, request: dict[str, Any], fds: list[int], kinds: Iterable[str],
              message: str | None = None) -> int:
    """Give a helper REQUEST the machine's root and those of its namespaces
    KINDS that are not ours (their fds appended to FDS, which the caller
    closes); returns the root's fd."""
    with Leader(m) as leader:
        try:
            root = leader.root()
            request["root"] = len(fds)
            fds.append(root)
            ns = request.setdefault("ns", {})
            for kind, fd in leader.namespaces(kinds).items():
                ns[kind] = len(fds)
                fds.append(fd)
        except OSError as e:
            raise oserror(e, message) from None
    return root


@contextlib.contextmanager
def helper_fds() -> Iterator[list[int]]:
    """A list for the fds to hand a helper: all of them closed at the end."""
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def closed_on_error(fd: int) -> Iterator[None]:
    """FD is the caller's to return: closed only if something fails first."""
    try:
        yield
    except BaseException:
        os.close(fd)
        raise


def check_container(m: Machine, error: PoolError) -> None:
    if m.machine_class != MachineClass.CONTAINER:
        raise error


def run_helper(request: dict[str, Any], fds: list[int], *, site: bool = False, keep: bool = False) -> dict[str, Any]:
    """Run nsexec.py with REQUEST and FDS; return its successful reply or
    raise the error it reports.  With KEEP the helper may go on running after
    it replied (it parents a shell); a thread of ours waits for it then."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    argv = [sys.executable, "-I", *([] if site else ["-S"]), NSEXEC, str(theirs.fileno())]
    try:
        child = spawn.Child(argv, pass_fds=[theirs.fileno()], env={}, name="nsexec",
                            stderr_log=lambda line: log.warning("nsexec: %s", line))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    reply: dict[str, Any] | None = None
    try:
        with ours:
            nsexec.send_message(ours, request, fds)
            ours.settimeout(HELPER_TIMEOUT)
            reply, extra = nsexec.receive_message(ours)
            for fd in extra:
                os.close(fd)
    except OSError as e:
        log.warning("No answer from helper %d: %s", child.pid, e)
        child.kill()
    finally:
        if keep and reply is not None and reply.get("ok"):
            child.detach_reaper()
        else:
            child.wait_briefly(HELPER_TIMEOUT)
    if reply is None:
        raise PoolError("Helper process failed.")
    if reply.get("ok"):
        return reply
    if reply.get("dbus_name"):
        raise RemoteError(reply["dbus_name"], reply.get("message") or reply["dbus_name"])
    raise Errno(int(reply.get("errno") or errno.EIO), reply.get("message") or None)
