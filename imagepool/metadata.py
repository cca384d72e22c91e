"""Metadata of an OS tree: hostname, machine-id, machine-info, os-release.

Files are opened with openat2(RESOLVE_IN_ROOT), so absolute or ``..`` symlinks
inside an image resolve within the image, never on the host.  Each file is
capped in size: an image is untrusted input.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from imagepool.syscalls import open_in_root

MAX_FILE = 64 * 1024


@dataclass
class ImageMetadata:
    hostname: str = ""
    machine_id: bytes = b""
    machine_info: dict[str, str] = field(default_factory=dict)
    os_release: dict[str, str] = field(default_factory=dict)


def read_file_in_root(root_fd: int, path: str, limit: int = MAX_FILE) -> str | None:
    """The text of a regular file inside the tree, None if it is missing."""
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)
    return data.decode("utf-8", "replace")


def parse_env_file(text: str) -> dict[str, str]:
    """Parse KEY=VALUE lines as systemd's parse_env_file() does: comments,
    single and double quotes, backslash escapes, line continuations."""
    result: dict[str, str] = {}
    lines = text.replace("\\\n", "").splitlines()
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        result[key] = _unquote(rest.strip())
    return result


def _unquote(value: str) -> str:
    out = []
    i = 0
    quote = ""
    while i < len(value):
        c = value[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                out.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < len(value) and value[i + 1] in '"\\`$':
                i += 1
                out.append(value[i])
            else:
                out.append(c)
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(value):
            i += 1
            out.append(value[i])
        elif c == "#" and (not out or out[-1].isspace()):
            break
        else:
            out.append(c)
        i += 1
    return "".join(out).rstrip() if not quote else "".join(out)


def parse_machine_id(text: str | None) -> bytes:
    if not text:
        return b""
    value = text.strip()
    if len(value) != 32:
        return b""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return b""
    return b"" if raw == bytes(16) else raw


def parse_hostname(text: str | None) -> str:
    if not text:
        return ""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


def read_os_release(root_fd: int) -> str | None:
    """The os-release text of the tree at ROOT_FD: /etc's, else /usr/lib's."""
    text = read_file_in_root(root_fd, "/etc/os-release")
    if text is None:
        text = read_file_in_root(root_fd, "/usr/lib/os-release")
    return text


def read_tree_metadata(root: str) -> ImageMetadata:
    """Read the metadata files of the OS tree at ROOT."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os_release = read_os_release(root_fd)
        machine_info = read_file_in_root(root_fd, "/etc/machine-info")
        return ImageMetadata(
            hostname=parse_hostname(read_file_in_root(root_fd, "/etc/hostname")),
            machine_id=parse_machine_id(read_file_in_root(root_fd, "/etc/machine-id")),
            machine_info=parse_env_file(machine_info) if machine_info else {},
            os_release=parse_env_file(os_release) if os_release else {},
        )
    finally:
        os.close(root_fd)

