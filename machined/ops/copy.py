"""Copies between the host and a container (machine-dbus.c: CopyFrom,
CopyTo).

Both sides are opened through directory fds: the container's through
/proc/<leader>/root with openat2(RESOLVE_IN_ROOT), so absolute symlinks and
".." inside the machine resolve inside it.  Below those, only *at() calls on
single names with O_NOFOLLOW are made, so a machine racing symlinks cannot
send the copy elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from imagepool.errors import Errno, InvalidArgs, NotSupported
from imagepool.syscalls import open_in_root
from machined.machine import Machine
from machined.ops.idmap import uid_shift
from machined.ops.leader import check_container, leader_root, oserror

COPY_DEPTH_MAX = 2048
COPY_REPLACE = 1  # the flag of CopyFromWithFlags/CopyToWithFlags
_FICLONE = 0x40049409


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
        stack: list[tuple[int, int, os.stat_result, bool, Iterator[os.DirEntry[str]]]] = []
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
    check_container(m, NotSupported("Copying files is only supported on container machines."))


def check_copy_paths(src: str, dst: str) -> str:
    """The destination (the source's path when empty), after systemd's checks."""
    if not src.startswith("/"):
        raise InvalidArgs("Source path must be absolute.", "source")
    if not dst:
        return src
    if not dst.startswith("/"):
        raise InvalidArgs("Destination path must be absolute.", "destination")
    return dst


def _copy(m: Machine, src: str, dst: str, replace: bool, from_machine: bool) -> None:
    check_copyable(m)
    dst = check_copy_paths(src, dst)
    shift = uid_shift(m)
    container_path, host_path = (src, dst) if from_machine else (dst, src)
    host_parent, host_name = _split(host_path)
    container_parent, container_name = _split(container_path)
    try:
        host_fd = os.open(host_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise oserror(e, f"Failed to open host directory {host_path}") from None
    copier = None
    try:
        root = leader_root(m)
        try:
            container_fd = open_in_root(root, container_parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise oserror(e) from None
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
            raise oserror(e) from None
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
