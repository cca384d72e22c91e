"""Tarballs in and out of image trees, through a confined GNU tar child.

Unpacking never uses Python's tarfile: a GNU tar child process does it, with
the argument list systemd 252's importd uses (``import_fork_tar_x()``)::

    tar --ignore-zeros --numeric-owner -C DIR -pxf - --xattrs --xattrs-include=* --no-selinux

(``--selinux`` instead when SELinux is enabled; never ``-P``/``--absolute-names``).
GNU tar protects the target directory by itself: it strips leading ``/`` from
member names and hard link targets, refuses (skips, exit status 2) member names
that contain ``..``, and extracts symlinks that are absolute or contain ``..``
as empty placeholder files that become symlinks only once everything else is
extracted, so nothing is ever written through them.  Any non-zero exit status
fails the import.

The child runs confined, as systemd does it in-process after fork()::

    unshare --net -- setpriv --bounding-set=-all,+chown,... --inh-caps=-all -- tar ...

``unshare`` comes first: it needs CAP_SYS_ADMIN, which setpriv drops.  The
bounding set keeps what systemd keeps (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER,
CAP_FSETID, CAP_MKNOD, CAP_SETFCAP for unpacking; CAP_DAC_OVERRIDE for
packing); as root, tar's effective set is then exactly that.  Consequence, as
with systemd 252: ``trusted.*`` extended attributes (they need CAP_SYS_ADMIN)
are silently left out when packing, and when unpacking tar warns ("Cannot set
'trusted.x' extended attribute ...: Operation not permitted") and still exits 0.

tar gets a minimal environment (no ``TAR_OPTIONS``, ``TAPE``,
``POSIXLY_CORRECT`` of ours; ``LC_ALL=C`` so its messages are ASCII with
non-printable bytes escaped) and runs in a new session (no preexec_fn: the
daemon is multi-threaded); every exit path kills (SIGKILL to its process
group) and reaps it.  Its stderr lines go to the job log as they come.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator

from importd.context import JobContext, TransferError

log = logging.getLogger(__name__)

#: Capabilities tar keeps, as systemd 252's import_fork_tar_x()/_c() keep them.
UNPACK_CAPS = ("chown", "dac_override", "fowner", "fsetid", "mknod", "setfcap")
PACK_CAPS = ("dac_override",)

CHUNK = 1024 * 1024  # pipe size we ask for, and the largest chunk pack_tar yields
_POLL_MS = 200  # how often blocking waits look at the cancel flag
_TAIL = 20  # stderr lines kept for error messages
_LINE_MAX = 4096  # longer stderr lines are cut (hostile member names)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)

# Lines that say nothing beyond the exit status; left out of error messages.
_NOISE = ("tar: Exiting with failure status due to previous errors", "tar: Error is not recoverable: exiting now")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH") or os.defpath)


def _tar_binary() -> str:
    # systemd tries "gtar" first: some systems install another tar as "tar".
    return _which("gtar") or _which("tar") or "tar"


def _selinux_flag() -> str:
    return "--selinux" if os.path.exists("/sys/fs/selinux/enforce") else "--no-selinux"


def _child_env() -> dict[str, str]:
    """A minimal environment: nothing of ours can add tar options."""
    return {"PATH": os.environ.get("PATH") or os.defpath, "LC_ALL": "C"}


def confinement(caps: tuple[str, ...], ctx: JobContext | None = None) -> list[str]:
    """The argv prefix that runs a command without network and with only CAPS.
    A missing setpriv or unshare is logged and tolerated (the command then
    runs with full capabilities or with network access); anything else that
    goes wrong fails the child, and so the transfer."""
    prefix: list[str] = []
    unshare = _which("unshare")
    setpriv = _which("setpriv")
    if unshare:
        prefix += [unshare, "--net", "--"]
    else:
        _warn(ctx, "unshare not found, tar is not locked into a network namespace.")
    if setpriv:
        prefix += [setpriv, "--bounding-set=-all," + ",".join("+" + c for c in caps), "--inh-caps=-all", "--"]
    else:
        _warn(ctx, "setpriv not found, tar runs with all capabilities.")
    return prefix


def _warn(ctx: JobContext | None, message: str) -> None:
    log.warning("%s", message)
    if ctx is not None:
        ctx.log(message)


def unpack_argv(directory: str) -> list[str]:
    return [
        _tar_binary(), "--ignore-zeros", "--numeric-owner", "-C", directory, "-pxf", "-",
        "--xattrs", "--xattrs-include=*", _selinux_flag(),
    ]


def pack_argv(directory: str) -> list[str]:
    return [
        _tar_binary(), "-C", directory, "-c", "-f", "-", "--format=posix", "--numeric-owner", "--sparse",
        "--xattrs", "--xattrs-include=*", _selinux_flag(), ".",
    ]


class _StderrPump(threading.Thread):
    """Reads the child's stderr line by line, hands each line to LOG and keeps
    the last few for the error message."""

    def __init__(self, fd: int, logfn: Callable[[str], None]) -> None:
        super().__init__(name="tar-stderr", daemon=True)
        self._file = os.fdopen(fd, "rb", buffering=65536)
        self._log = logfn
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL)

    def run(self) -> None:
        skipping = False
        try:
            while True:
                raw = self._file.readline(_LINE_MAX)
                if not raw:
                    break
                complete = raw.endswith(b"\n")
                if skipping:  # the rest of an over-long line
                    skipping = not complete
                    continue
                skipping = not complete
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if not complete:
                    line += "…"
                if not line.strip():
                    continue
                self.tail.append(line)
                try:
                    self._log(line)
                except Exception:  # a broken log sink must not stop the draining
                    log.exception("job log failed")
        except (OSError, ValueError):
            pass

    def finish(self, timeout: float = 5.0) -> None:
        """After the child was reaped: wait for the rest of its output."""
        self.join(timeout)
        if not self.is_alive():
            with contextlib.suppress(OSError):
                self._file.close()

    def summary(self) -> str:
        lines = [line for line in self.tail if line not in _NOISE][-3:]
        return (" Last messages: " + "; ".join(lines)) if lines else ""


def _status_error(rc: int, pump: _StderrPump) -> TransferError:
    """systemd's wording (wait_for_terminate_and_check()), then tar's last
    messages; all of them are in ``.tar_messages``."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return _with_tail(f"tar terminated by signal {name}.", pump)
    return _with_tail(f"tar failed with exit status {rc}.", pump)


def _with_tail(message: str, pump: _StderrPump) -> TransferError:
    err = TransferError(message + pump.summary())
    err.tar_messages = list(pump.tail)  # type: ignore[attr-defined]
    return err


class _Child:
    """A tar child in its own session, its stderr pumped into the job log."""

    def __init__(self, argv: list[str], caps: tuple[str, ...], ctx: JobContext, stdin: int, stdout: int) -> None:
        self.argv = confinement(caps, ctx) + argv
        err_r, err_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=err_w, close_fds=True,
                start_new_session=True, env=_child_env(), cwd="/",
            )
        except OSError as e:
            os.close(err_r)
            raise TransferError(f"Failed to execute tar: {e.strerror or e}") from None
        finally:
            os.close(err_w)
        self.pump = _StderrPump(err_r, ctx.log)
        self.pump.start()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the child's process group and reap the child (idempotent)."""
        with self._lock:
            if self.proc.returncode is None:
                # Not reaped yet, so the pid (and the group it leads) is still ours.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.pump.finish()

    def wait(self, ctx: JobContext) -> int:
        """Wait for the child to exit, looking at the cancel flag meanwhile."""
        while True:
            ctx.check()
            try:
                rc = self.proc.wait(timeout=_POLL_MS / 1000)
                break
            except subprocess.TimeoutExpired:
                continue
        self.pump.finish()
        return rc

    def wait_briefly(self, timeout: float = 5.0) -> int:
        """The child closed its end of a pipe: it is exiting; reap it (kill
        it if it does not go away)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self.pump.finish()
        return rc


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK)


class TarUnpacker:
    """Unpacks a tar stream fed with write() into DIRECTORY (which exists).

    write() and finish() are blocking calls for the job's worker thread; they
    look at ``ctx.cancel`` at least every 200 ms and raise Canceled once it is
    set.  Whenever write() or finish() raise (Canceled, TransferError or
    anything else), tar has been killed and reaped already, so the caller may
    remove the half-unpacked tree right away.

    As a context manager, leaving the block always calls abort(): a no-op
    after a successful finish(), and a kill otherwise, so a stream is only
    ever complete after an explicit finish()::

        with TarUnpacker(path, ctx) as tar:
            for chunk in source:
                tar.write(chunk)
            tar.finish()
    """

    def __init__(self, directory: str, ctx: JobContext) -> None:
        self.directory = os.path.abspath(directory)
        self.ctx = ctx
        self._finished = False  # finish() succeeded
        self._aborted = False  # tar was killed, or has exited with an error
        self._closed = False  # our end of tar's stdin
        self._lock = threading.Lock()
        r, w = os.pipe()
        try:
            _grow_pipe(w)
            self._child = _Child(unpack_argv(self.directory), UNPACK_CAPS, ctx, stdin=r, stdout=subprocess.DEVNULL)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._fd = w
        os.set_blocking(w, False)
        self._poll = select.poll()
        self._poll.register(w, select.POLLOUT)

    # -- public API -------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return self._child.argv

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.proc.returncode

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Feed DATA to tar, all of it.  Raises Canceled when canceled and
        TransferError (with tar's last messages) when tar has exited early."""
        try:
            self._write(memoryview(data).cast("B"))
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        """End of stream: close tar's stdin and wait for it.  A non-zero exit
        status raises TransferError("tar failed with exit status N. ...")."""
        if self._finished:
            return
        try:
            self._check_usable()
            self._close_stdin()
            rc = self._child.wait(self.ctx)
            if rc != 0:
                raise _status_error(rc, self._child.pump)
            self._finished = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Kill and reap tar (idempotent, thread-safe; no-op once finished)."""
        self._close_stdin()
        self._child.kill()
        if not self._finished:
            self._aborted = True

    def __enter__(self) -> TarUnpacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    # -- internals ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._finished or self._aborted or self._closed:
            raise TransferError("The tar stream was already finished or aborted.")

    def _close_stdin(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def _write(self, view: memoryview) -> None:
        self.ctx.check()
        self._check_usable()
        while view:
            with self._lock:
                if self._closed:
                    raise TransferError("The tar stream was aborted.")
                try:
                    n = os.write(self._fd, view[:CHUNK])
                except BlockingIOError:
                    n = 0
                except BrokenPipeError:
                    n = -1
            if n < 0:
                self._died_early()
            view = view[n:]
            if view:
                self.ctx.check()
                self._poll.poll(_POLL_MS)

    def _died_early(self) -> None:
        self._close_stdin()
        rc = self._child.wait_briefly()
        self._aborted = True
        if rc == 0:
            raise _with_tail("tar exited before the end of the stream.", self._child.pump)
        raise _status_error(rc, self._child.pump)


def pack_tar(directory: str, ctx: JobContext) -> Iterator[bytes]:
    """Pack DIRECTORY into a POSIX (pax) tar stream, yielded in chunks of at
    most 1 MiB.  Owners are numeric; xattrs (and with them ACLs, which are the
    system.posix_acl_* xattrs) are kept; sparse files stay sparse.  Raises
    Canceled once ``ctx.cancel`` is set and TransferError when tar fails; tar
    is killed and reaped on every way out, including an early close() of the
    generator."""
    r, w = os.pipe()
    try:
        _grow_pipe(w)
        child = _Child(pack_argv(os.path.abspath(directory)), PACK_CAPS, ctx, stdin=subprocess.DEVNULL, stdout=w)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    poller = select.poll()
    poller.register(r, select.POLLIN)
    try:
        while True:
            ctx.check()
            if not poller.poll(_POLL_MS):
                continue
            data = os.read(r, CHUNK)
            if not data:
                break
            yield data
        rc = child.wait(ctx)
        if rc != 0:
            raise _status_error(rc, child.pump)
    finally:
        os.close(r)
        child.kill()


# -- import_mangle_os_tree ------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437
_RESOLVE_IN_ROOT = 0x10
_libc.syscall.restype = ctypes.c_long


def _exists_in_root(root_fd: int, path: str) -> bool:
    """Does PATH exist below ROOT_FD, symlinks resolved as if ROOT_FD were "/"
    (like chase_symlinks(CHASE_PREFIX_ROOT))?  O_PATH: nothing is opened for
    real, so a device node or fifo there has no effect.  ENOENT is False, any
    other error is raised."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(root_fd), os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return False
        raise OSError(code, os.strerror(code), path)
    os.close(fd)
    return True


def _is_os_tree_at(root_fd: int) -> bool:
    """systemd's path_is_os_tree(): does /etc/os-release or, failing with
    ENOENT, /usr/lib/os-release exist (of any type)?  Other errors (ENOTDIR
    when etc is a file, ELOOP) are raised, as systemd returns them."""
    return _exists_in_root(root_fd, "/etc/os-release") or _exists_in_root(root_fd, "/usr/lib/os-release")


def _rename_noreplace(old_dir: int, old: str, new_dir: int, new: str) -> None:
    if _libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def mangle_os_tree(directory: str, ctx: JobContext | None = None) -> bool:
    """Like systemd's import_mangle_os_tree(): some tarballs wrap the OS tree in
    one top-level directory; move its contents one level up.

    Only when DIRECTORY is no OS tree itself, contains exactly one entry
    (besides "." and "..": hidden names count), that entry is a directory (not
    a symlink to one) and that directory is an OS tree.  The inner directory
    is first renamed to an unguessable name, then each entry moved up with
    RENAME_NOREPLACE, the emptied directory removed, and its timestamps, mode
    and ownership given to DIRECTORY.  Returns whether it rearranged."""
    say = ctx.log if ctx is not None else (lambda line: None)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise TransferError(f"Failed to open directory '{directory}': {e.strerror}") from None
    try:
        try:
            if _is_os_tree_at(dfd):
                log.debug("Directory tree '%s' is a valid OS tree.", directory)
                return False
        except OSError as e:
            raise TransferError(f"Failed to determine whether '{directory}' is an OS tree: {e.strerror}") from None
        entries = os.listdir(dfd)
        if len(entries) != 1:
            return False
        child = entries[0]
        joined = os.path.join(directory, child)
        try:
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        try:
            cfd = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise TransferError(f"Can't open directory '{joined}': {e.strerror}") from None
        try:
            try:
                if not _is_os_tree_at(cfd):
                    return False
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    return False
                raise TransferError(f"Failed to determine whether '{joined}' is an OS tree: {e.strerror}") from None
            say(f"Rearranging '{joined}', moving OS tree one directory up.")
            temp = f".#{child}{secrets.token_hex(8)}"
            try:
                _rename_noreplace(dfd, child, dfd, temp)
            except OSError as e:
                raise TransferError(f"Unable to rename '{joined}' to '{directory}/{temp}': {e.strerror}") from None
            for name in os.listdir(cfd):
                try:
                    _rename_noreplace(cfd, name, dfd, name)
                except OSError as e:
                    raise TransferError(
                        f"Unable to move '{directory}/{temp}/{name}' to '{directory}/{name}': {e.strerror}"
                    ) from None
            try:
                os.rmdir(temp, dir_fd=dfd)
            except OSError as e:
                raise TransferError(f"Failed to remove temporary directory '{directory}/{temp}': {e.strerror}") from None
        finally:
            os.close(cfd)
        with contextlib.suppress(OSError):
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            os.chown(dfd, st.st_uid, st.st_gid)
            os.chmod(dfd, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise TransferError(f"Failed to adjust top-level directory mode/ownership '{directory}': {e.strerror}") from None
        say("Successfully rearranged OS tree.")
        return True
    finally:
        os.close(dfd)
