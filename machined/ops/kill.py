"""Signals to machines: kill (the leader, or all of its processes) and
terminate (SIGTERM, then SIGKILL for what is left) for machines that are not
systemd's to signal (machine.c: machine_kill, machine_stop)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass

from imagepool.errors import Errno, InvalidArgs
from machined.machine import Machine
from machined.ops.leader import leader_alive, oserror
from machined.procs import cgroup_pids

log = logging.getLogger(__name__)

TERMINATE_TIMEOUT = 10.0
_NSIG = 65


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


def _machine_processes(m: Machine) -> dict[int, _Proc]:
    """The processes of a machine: its cgroup (when machined made one), every
    process in its PID namespace (when it has one of its own, which catches
    shells started by open_shell), and the leader with all descendants of
    any of these.  Zombies are not counted; we are never counted."""
    procs = _all_processes()
    members: set[int] = set()
    if m.leader in procs and leader_alive(m):
        members.add(m.leader)
        leader_pidns = _ns_id(m.leader, "pid")
        if leader_pidns is not None and leader_pidns != _ns_id(os.getpid(), "pid"):
            for pid in procs:
                if _ns_id(pid, "pid") == leader_pidns:
                    members.add(pid)
    if m.cgroup:
        members.update(pid for pid in cgroup_pids(m.cgroup) if pid in procs)
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
        raise oserror(e) from None
    finally:
        if fd >= 0:
            os.close(fd)


def check_kill(whom: str, signo: int) -> None:
    """KillMachine's argument checks (before polkit's)."""
    if whom not in ("", "all", "leader", "supervisor"):
        raise InvalidArgs(f"Invalid kill parameter '{whom}'")
    if not 0 < signo < _NSIG:
        raise InvalidArgs(f"Invalid signal {signo}")


def kill(m: Machine, whom: str, signo: int) -> None:
    check_kill(whom, signo)
    if m.is_host:
        raise Errno(errno.EOPNOTSUPP)
    if whom == "supervisor":
        if not m.supervisor:
            raise Errno(errno.ESRCH)
        try:
            fd = os.pidfd_open(m.supervisor)
        except OSError as e:
            raise oserror(e) from None
        try:
            signal.pidfd_send_signal(fd, signo)
        except OSError as e:
            raise oserror(e) from None
        finally:
            os.close(fd)
        return
    if whom == "leader":
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
