"""The per-machine operations: addresses, os-release, UID mapping, ptys,
shells and logins, copies, bind mounts, the root directory, kill and
terminate (systemd's machine-dbus.c and machine.c), one module each.

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


from machined.ops.addresses import get_addresses
from machined.ops.copy import COPY_REPLACE, check_copy_paths, check_copyable, copy_from, copy_to
from machined.ops.files import get_os_release, open_root_directory
from machined.ops.idmap import (
    get_uid_shift,
    map_from_machine,
    map_from_machine_group,
    map_from_machine_user,
    map_to_machine,
    map_to_machine_group,
    map_to_machine_user,
)
from machined.ops.kill import check_kill, finish_terminate, kill, start_terminate, terminate
from machined.ops.mounts import bind_mount, check_bind_mount
from machined.ops.pty import open_pty
from machined.ops.shell import open_login, open_shell, shell_command, shell_polkit_details, shell_unit_properties

__all__ = [
    "COPY_REPLACE", "bind_mount", "check_bind_mount", "check_copy_paths", "check_copyable", "check_kill", "copy_from",
    "copy_to", "finish_terminate", "get_addresses", "get_os_release", "get_uid_shift", "kill", "map_from_machine",
    "map_from_machine_group", "map_from_machine_user", "map_to_machine", "map_to_machine_group",
    "map_to_machine_user", "open_login", "open_pty", "open_root_directory", "open_shell", "shell_command",
    "shell_polkit_details",
    "shell_unit_properties", "start_terminate", "terminate",
]
