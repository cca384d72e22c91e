"""Processes and cgroups, as machined looks at them: pidfds and their ids,
start times, a process's cgroup and unit, and the cgroups machined makes for
machines when there is no systemd to make a scope."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from imagepool import fsutil

log = logging.getLogger(__name__)

PIDFS_MAGIC = 0x50494446
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_POLL_INTERVAL = 0.5

_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".target", ".device", ".automount",
                  ".timer", ".path")


def now_usec() -> tuple[int, int]:
    """CLOCK_REALTIME and CLOCK_MONOTONIC, in µs."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000, time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def unit_name_escape(text: str) -> str:
    """systemd's unit name escaping: "/" becomes "-", other unsafe bytes \\xNN."""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_") or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


# --- pidfds -------------------------------------------------------------------------


def pidfd_id(pidfd: int) -> int:
    """The pidfd's inode number, unique per process on pidfs (Linux 6.9+);
    0 where pidfds share one anonymous inode."""
    try:
        if fsutil.statfs(pidfd).magic != PIDFS_MAGIC:
            return 0
    except OSError:
        return 0
    return os.fstat(pidfd).st_ino


def pidfd_pid(pidfd: int) -> int:
    """The PID a pidfd refers to (fdinfo's "Pid:"; -1 once it has exited)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def pid_id(pid: int) -> int:
    """pidfd_id() of PID's process (0 when gone or without pidfs)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        return pidfd_id(fd)
    finally:
        os.close(fd)


# --- /proc -----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _stat_number(pid: int, index: int) -> int:
    fields = _stat_fields(pid)
    try:
        return int(fields[index]) if fields else 0
    except (ValueError, IndexError):
        return 0


def process_start(pid: int) -> int:
    """A process's start time in clock ticks after boot (0 if gone)."""
    return _stat_number(pid, 19)


def parent_pid(pid: int) -> int:
    return _stat_number(pid, 1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_cgroup(pid: int) -> str:
    """A process's cgroup v2 path ("" if unknown)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return ""


def cgroup_unit(path: str) -> str:
    """systemd's cg_path_get_unit(): the first component below the slices,
    if it is a unit's name ("" otherwise)."""
    for component in path.split("/"):
        if not component or component.endswith(".slice"):
            continue
        return component if component.endswith(_UNIT_SUFFIXES) and not component.startswith(".") else ""
    return ""


def process_unit(pid: int) -> str:
    """The systemd unit of a process, from its cgroup path ("" if none)."""
    return cgroup_unit(process_cgroup(pid))


# --- cgroups of our own ---------------------------------------------------------------


def make_machine_cgroup(name: str, pid: int) -> str:
    """Put PID in a cgroup of its own (machine.slice/machine-<name>.scope) when
    the cgroup v2 hierarchy is writable; returns the cgroup path or ""."""
    rel = f"/machine.slice/machine-{unit_name_escape(name)}.scope"
    path = CGROUP_ROOT + rel
    try:
        if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.procs")):
            return ""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        return rel
    except OSError as e:
        log.debug("No cgroup for machine %s: %s", name, e)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return ""


def cgroup_populated(rel: str) -> bool:
    """Whether the cgroup (or one below it) has processes (cgroup.events)."""
    if not rel:
        return False
    try:
        with open(CGROUP_ROOT + rel + "/cgroup.events") as f:
            return "populated 1" in f.read().splitlines()
    except OSError:
        return False


def cgroup_pids(rel: str) -> set[int]:
    """Every process in the cgroup and below it."""
    pids: set[int] = set()
    for dirpath, _dirnames, filenames in os.walk(CGROUP_ROOT + rel):
        if "cgroup.procs" in filenames:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.update(int(line) for line in f if line.strip())
    return pids


def remove_cgroup(rel: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(CGROUP_ROOT + rel)
