"""Shells and logins in machines (machine-dbus.c: OpenShell, OpenLogin).

A container that runs its own systemd gets its shell as
container-shell@N.service and its login as container-getty@N.service,
started through that systemd on the container's system bus, as systemd's
machined does.  A container without one gets the program directly: the
nsexec helper forks it into all of the machine's namespaces and root.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from typing import Any

from imagepool.errors import Errno, InvalidArgs, NoIPC, NotSupported, PoolError, RemoteError
from imagepool.metadata import read_file_in_root
from imagepool.syscalls import open_in_root
from machined import nsexec
from machined.machine import Machine, MachineClass
from machined.ops.idmap import UID_NOBODY, id_map, outer_of
from machined.ops.leader import add_entry, closed_on_error, helper_fds, oserror, run_helper
from machined.ops.pty import open_pty

# systemd's default for services (split-usr build, as Debian's).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


# systemd 262's machine_default_shell_args(): what polkit is told a shell without a program runs.
_DEFAULT_SHELL_SCRIPT = (
    'shell=$(getent passwd "$1" 2>/dev/null | { IFS=: read _ _ _ _ _ _ x; echo "$x"; })\n'
    'exec "${shell:-/bin/sh}" -l'
)


def shell_polkit_details(user: str, path: str, args: list[str]) -> dict[str, str]:
    """The user, program and command line of a shell as systemd 262 names
    them to polkit (user root, and its default shell, when not given)."""
    user = user or "root"
    if not path:
        path, argv = "/bin/sh", ["sh", "-c", _DEFAULT_SHELL_SCRIPT, "sh", user]
    else:
        argv = list(args) if args else [path]
    return {"user": user, "program": path, "command_line": " ".join(argv)}


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

    request: dict[str, Any] = {"op": "shell", "ns": {}}
    with helper_fds() as fds:
        if m.is_host:
            root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(root)
        else:
            root = add_entry(m, request, fds, ("cgroup", "ipc", "uts", "net", "pid", "mnt", "user"))
        try:
            account = _lookup_user(root, user)
            tty_gid = _group_id(root, "tty")
        except OSError as e:
            raise oserror(e) from None
        if account is None:
            raise PoolError(f"Failed to look up user '{user}' in machine {m.name}.")
        if login_shell:
            argv.append(account.shell)
        master, name = open_pty(m)
        with closed_on_error(master):
            try:
                slave = nsexec.pty_peer(master)
            except OSError as e:
                raise oserror(e) from None
            request["slave"] = len(fds)
            fds.append(slave)
            _own_terminal(m, slave, user, account, tty_gid, "user" in request["ns"])
            environment = {"PATH": DEFAULT_PATH, "HOME": account.home, "LOGNAME": account.name,
                           "USER": account.name, "SHELL": account.shell, "TERM": "vt220"}
            environment.update(item.partition("=")[::2] for item in env)
            request.update(uid=account.uid, gid=account.gid, groups=account.groups, home=account.home, path=path,
                           argv=argv, env=[f"{k}={v}" for k, v in environment.items()])
            run_helper(request, fds, keep=True)
    return master, name


def _own_terminal(m: Machine, slave: int, user: str, account: _User, tty_gid: int | None, userns: bool) -> None:
    """What login(1) does: the user owns the terminal, group tty may write
    (IDs of the machine's user namespace, seen from the host, with USERNS)."""
    uid: int | None = account.uid
    gid: int | None = tty_gid if tty_gid is not None else -1
    if not m.is_host and userns:
        uid = outer_of(id_map(m, "uid"), account.uid)
        gid = outer_of(id_map(m, "gid"), tty_gid) if tty_gid is not None else -1
    if uid is None:
        raise PoolError(f"User '{user}' is not mapped to the host.")
    try:
        os.fchown(slave, uid, -1 if gid is None else gid)
        os.fchmod(slave, 0o620)
    except OSError as e:
        raise oserror(e) from None


def _systemd_request(m: Machine, request: dict[str, Any], fds: list[int]) -> None:
    """Fill REQUEST and FDS for a call of the machine's systemd (nsexec's
    "systemd" op): its root and the namespaces that reach its system bus.
    Errno ENOENT when the machine has no system bus."""
    root = add_entry(m, request, fds, ("pid", "mnt", "user"))
    try:
        os.close(open_in_root(root, "/run/dbus/system_bus_socket", os.O_PATH))
    except FileNotFoundError:
        raise NoIPC(f"There is no system bus in container {m.name}.") from None
    except OSError as e:
        raise oserror(e) from None


def open_login(m: Machine) -> tuple[int, str]:
    """A pty, and container-getty@N.service started for it through the
    machine's system bus (StartUnit, mode "replace")."""
    if m.is_host:
        raise NotSupported("Opening a login on the host is not supported.")
    if m.machine_class != MachineClass.CONTAINER:
        raise Errno(errno.EOPNOTSUPP)
    master, name = open_pty(m)
    with closed_on_error(master), helper_fds() as fds:
        request: dict[str, Any] = {"op": "systemd", "method": "StartUnit", "mode": "replace",
                                   "unit": f"container-getty@{name.removeprefix('/dev/pts/')}.service"}
        _systemd_request(m, request, fds)
        run_helper(request, fds, site=True)
    return master, name


# What tells that a machine's bus has no systemd on it (or that there is none).
_NO_SYSTEMD = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}


def shell_unit_properties(user: str, path: str, argv: list[str], env: list[str], pty_name: str,
                          slave: object) -> list[list[Any]]:
    """container-shell@N.service as systemd's machined asks for it, as
    [name, signature, value]; SLAVE stands for the pty slave's fd."""
    properties: list[list[Any]] = [
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
    request: dict[str, Any] = {"op": "systemd", "method": "StartTransientUnit", "mode": "fail"}
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
                raise oserror(e) from None
            fds.append(slave)
            request["unit"] = f"container-shell@{name.removeprefix('/dev/pts/')}.service"
            request["properties"] = shell_unit_properties(user, path, argv, env, name, len(fds) - 1)
            try:
                run_helper(request, fds, site=True)
            except Errno as e:
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    os.close(master)
                    return None
                raise
            except RemoteError as e:
                if e.name in _NO_SYSTEMD:
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
