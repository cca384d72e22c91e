"""Tarballs in and out of image trees, through a confined GNU tar child.

Unpacking never uses Python's tarfile: a GNU tar child process does it, with
the argument list systemd 252's importd uses (``import_fork_tar_x()``), with
larger reads of the pipe (``-b 256 -B``, see unpack_argv)::

    tar --ignore-zeros --numeric-owner -b 256 -B -C DIR -pxf - --xattrs --xattrs-include=* --no-selinux

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
non-printable bytes escaped) and runs in a process group of its own (no preexec_fn: the
daemon is multi-threaded); it is started through ``imagepool.spawn``, so every
exit path kills (SIGKILL to its process group) and reaps it.  Its stderr lines
go to the job log as they come.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import threading
from collections.abc import Iterator

from imagepool import spawn
from importd.context import JobContext, TransferError

log = logging.getLogger(__name__)

#: Capabilities tar keeps, as systemd 252's import_fork_tar_x()/_c() keep them.
UNPACK_CAPS = ("chown", "dac_override", "fowner", "fsetid", "mknod", "setfcap")
PACK_CAPS = ("dac_override",)

CHUNK = 1024 * 1024  # pipe size we ask for, and the largest chunk pack_tar yields
_POLL_MS = 200  # how often blocking waits look at the cancel flag
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

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
    # -b 256 -B: tar reads the pipe 128 KiB at a time instead of 10 KiB (its
    # default record), so the writer is woken an eighth as often (pull-oci of
    # 286 MB: 20,000 reads of tar's -> 2,500).
    return [
        _tar_binary(), "--ignore-zeros", "--numeric-owner", "-b", "256", "-B", "-C", directory, "-pxf", "-",
        "--xattrs", "--xattrs-include=*", _selinux_flag(),
    ]


def pack_argv(directory: str) -> list[str]:
    return [
        _tar_binary(), "-C", directory, "-c", "-f", "-", "--format=posix", "--numeric-owner", "--sparse",
        "--xattrs", "--xattrs-include=*", _selinux_flag(), ".",
    ]


def _summary(tail: list[str]) -> str:
    lines = [line for line in tail if line not in _NOISE][-3:]
    return (" Last messages: " + "; ".join(lines)) if lines else ""


def _status_error(rc: int, child: spawn.Child) -> TransferError:
    """systemd's wording (wait_for_terminate_and_check()), then tar's last
    messages; all of them are in ``.tar_messages``."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return _with_tail(f"tar terminated by signal {name}.", child)
    return _with_tail(f"tar failed with exit status {rc}.", child)


def _with_tail(message: str, child: spawn.Child) -> TransferError:
    tail = child.tail
    err = TransferError(message + _summary(tail))
    err.tar_messages = tail  # type: ignore[attr-defined]
    return err


def _start(argv: list[str], caps: tuple[str, ...], ctx: JobContext, stdin: int, stdout: int,
           umask: int = -1) -> spawn.Child:
    """A confined tar child, its stderr lines going to the job log."""
    try:
        return spawn.Child(confinement(caps, ctx) + argv, stdin=stdin, stdout=stdout, stderr_log=ctx.log,
                           env=_child_env(), cwd="/", name="tar", umask=umask)
    except OSError as e:
        raise TransferError(f"Failed to execute tar: {e.strerror or e}") from None


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

    UMASK, if given, is tar's umask: it only shapes the directories tar
    makes for members whose parents the archive does not list (-p keeps the
    modes of listed members); 0o777 makes them mode 0 and so recognizable
    (importd.oci does that to give them their lower layers' attributes).

    As a context manager, leaving the block always calls abort(): a no-op
    after a successful finish(), and a kill otherwise, so a stream is only
    ever complete after an explicit finish()::

        with TarUnpacker(path, ctx) as tar:
            for chunk in source:
                tar.write(chunk)
            tar.finish()
    """

    def __init__(self, directory: str, ctx: JobContext, umask: int = -1) -> None:
        self.directory = os.path.abspath(directory)
        self.ctx = ctx
        self._finished = False  # finish() succeeded
        self._aborted = False  # tar was killed, or has exited with an error
        self._closed = False  # our end of tar's stdin
        self._lock = threading.Lock()
        r, w = os.pipe()
        try:
            _grow_pipe(w)
            self._child = _start(unpack_argv(self.directory), UNPACK_CAPS, ctx, stdin=r, stdout=spawn.DEVNULL,
                                 umask=umask)
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
        return self._child.returncode

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
            rc = self._child.wait(self.ctx.check)
            if rc != 0:
                raise _status_error(rc, self._child)
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
            raise _with_tail("tar exited before the end of the stream.", self._child)
        raise _status_error(rc, self._child)


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
        child = _start(pack_argv(os.path.abspath(directory)), PACK_CAPS, ctx, stdin=spawn.DEVNULL, stdout=w)
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
        rc = child.wait(ctx.check)
        if rc != 0:
            raise _status_error(rc, child)
    finally:
        os.close(r)
        child.kill()
