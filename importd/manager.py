"""importd's domain: the pools of the image classes, the transfers, and how
a pull, an import or an export is checked and started, whichever front end
asks.

Front ends authorize, call the ``check_*`` functions in the order systemd
checks, then start the transfer here; the job runs in a worker thread.  A
file descriptor handed to ``start_import``/``start_export`` belongs to the
transfer from then on and is closed when it ends (or at once when it can't
start)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from imagepool import classes, ops, tree
from imagepool.errors import Errno, InvalidArgs
from imagepool.image import Image, Pool
from imagepool.names import hostname_is_valid, image_name_is_valid
from importd import local, oci, pull
from importd.context import JobContext
from importd.http import HttpOptions
from importd.transfer import Transfer, TransferManager, TransferType
from importd.verify import VerifyMode, parse_verify_mode

FLAG_FORCE = 1
FLAG_READ_ONLY = 2
FLAG_PULL_KEEP_DOWNLOAD = 4
# PullOci: flatten the layers into one plain tree instead of a mount stack.
# Ours (systemd 262 refuses every bit but force and read-only): a high bit,
# clear of the ones systemd hands out from the bottom.
FLAG_PULL_OCI_FLATTEN = 1 << 32



@dataclass
class Options:
    max_image_size: int = local.DEFAULT_MAX_IMAGE_SIZE
    http: HttpOptions = field(default_factory=HttpOptions)
    sync: bool = True  # images on disk before they get their final name
    oci_parallel: int = oci.DEFAULT_PARALLEL  # layers of a pull-oci downloaded at once
    keyring: str | None = None  # verifies pulls' signatures; None: the first of verify.DEFAULT_KEYRINGS


# --- argument checks --------------------------------------------------------------


def check_class(image_class: str) -> None:
    if not classes.class_is_valid(image_class):
        raise InvalidArgs(f"Image class '{image_class}' not known")


def check_flags(flags: int, allowed: int) -> None:
    if flags & ~allowed:
        raise InvalidArgs(f"Flags 0x{flags:x} invalid")


def check_local_name(name: str, legacy: bool) -> None:
    """systemd 252's methods (LEGACY) take machine names (host names) and say
    so in their words; the newer (*Ex) ones take any image name."""
    if legacy:
        if not hostname_is_valid(name):
            raise InvalidArgs(f"Local name {name} is invalid")
    elif not image_name_is_valid(name):
        raise InvalidArgs(f"Local image name {name} is invalid")


def check_pull(url: str, local_name: str, verify_mode: str, legacy: bool) -> VerifyMode:
    """Argument checks of a pull, in systemd's order."""
    if not pull.url_is_valid(url):
        raise InvalidArgs(f"URL {url} is invalid")
    if local_name:
        check_local_name(local_name, legacy)
    return parse_verify_mode(verify_mode)


def check_oci_pull(ref: str, local_name: str) -> None:
    """Argument checks of PullOci (after class and flags), in 262's words."""
    if not oci.ref_is_valid(ref):
        raise InvalidArgs(f"Reference '{ref}' is invalid")
    if local_name:
        check_local_name(local_name, False)


def image_root_is_valid(path: str) -> bool:
    """An absolute, normalized directory name (Varlink's imageRoot)."""
    return path.startswith("/") and os.path.normpath(path) == path and "\0" not in path


def check_stream_fd(fd: int) -> None:
    """Imports read, exports write: a regular file or a pipe, nothing else."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise Errno(errno.EINVAL)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
        raise Errno(errno.EINVAL)


def check_dir_fd(fd: int) -> None:
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise Errno(errno.EINVAL)


# --- the manager -----------------------------------------------------------------------


def _setup_pool(pool: Pool) -> None:
    tree.setup_pool(pool.path)
    ops.prepare_quotas(pool)


class ImportManager:
    def __init__(self, roots: classes.Roots, options: Options | None = None) -> None:
        self.roots = roots
        self.options = options or Options()
        self.transfers = TransferManager()
        self._pools = {c: roots.pool(c) for c in classes.CLASSES}

    def pool_directories(self) -> list[str]:
        """The pool directories of all classes (where our temporaries are)."""
        return [self.pool_for(c).path for c in classes.CLASSES]

    def pool_for(self, image_class: str) -> Pool:
        return self._pools[image_class]

    async def _setup_pool(self, image_class: str) -> Pool:
        pool = self.pool_for(image_class)
        await asyncio.to_thread(_setup_pool, pool)
        return pool

    def _start(self, type: TransferType, local_name: str, job: Callable[[JobContext], None], fd: int,
               image_class: str, remote: str = "", verify: str = "") -> Transfer:
        def run(ctx: JobContext) -> None:
            try:
                job(ctx)
            finally:
                if fd >= 0:
                    os.close(fd)

        try:
            return self.transfers.create(type, local_name, run, image_class=image_class, remote=remote,
                                         verify=verify)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    async def start_pull(self, type: TransferType, url: str, local_name: str, image_class: str, mode: VerifyMode,
                         *, force: bool, read_only: bool, keep_download: bool,
                         image_root: str | None = None) -> Transfer:
        """IMAGE_ROOT (Varlink's imageRoot) puts the image in that directory
        instead of the class's pool."""
        if image_root is None:
            pool = await self._setup_pool(image_class)
        else:
            root = self.roots.below_prefix(image_root)
            pool = Pool(root, [root], host=False, quota=self.roots.quota)
            await asyncio.to_thread(_setup_pool, pool)
        o = self.options
        req = pull.PullRequest(
            kind="tar" if type == TransferType.PULL_TAR else "raw", url=url, local=local_name, verify=mode,
            force=force, read_only=read_only, keep_download=keep_download, settings=image_class == "machine",
            max_size=o.max_image_size, http=o.http, sync=o.sync, keyring=o.keyring)
        job = functools.partial(pull.pull, req=req, pool=pool)
        return self._start(type, local_name, job, -1, image_class, remote=url, verify=str(mode))

    async def start_pull_oci(self, ref: str, local_name: str, image_class: str, *, force: bool, read_only: bool,
                             flatten: bool) -> Transfer:
        pool = await self._setup_pool(image_class)
        o = self.options
        req = oci.OciPullRequest(ref=ref, local=local_name, force=force, read_only=read_only, flatten=flatten,
                                 parallel=o.oci_parallel, max_size=o.max_image_size, http=o.http, sync=o.sync)
        job = functools.partial(oci.pull_oci, req=req, pool=pool)
        return self._start(TransferType.PULL_OCI, local_name, job, -1, image_class, remote=ref)

    async def start_import(self, type: TransferType, fd: int, name: str, image_class: str, *, force: bool,
                           read_only: bool) -> Transfer:
        try:
            pool = await self._setup_pool(image_class)
        except BaseException:
            os.close(fd)
            raise
        o = self.options
        job: Callable[[JobContext], None]
        if type == TransferType.IMPORT_TAR:
            job = functools.partial(local.import_tar, fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, max_size=o.max_image_size, sync=o.sync)
        elif type == TransferType.IMPORT_RAW:
            job = functools.partial(local.import_raw, fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, max_size=o.max_image_size, sync=o.sync)
        else:
            job = functools.partial(local.import_fs, dir_fd=fd, pool=pool, name=name, force=force,
                                    read_only=read_only, sync=o.sync)
        return self._start(type, name, job, fd, image_class)

    def start_export(self, type: TransferType, name: str, image_class: str, fd: int, fmt: str) -> Transfer:
        pool = self.pool_for(image_class)
        export = local.export_tar if type == TransferType.EXPORT_TAR else local.export_raw
        job = functools.partial(export, pool=pool, name=name, out_fd=fd, fmt=fmt)
        return self._start(type, name, job, fd, image_class)

    # --- listing and cancelling --------------------------------------------------------

    def list_transfers(self, image_class: str = "") -> list[Transfer]:
        return [t for t in sorted(self.transfers.transfers.values(), key=lambda t: t.id)
                if not image_class or t.image_class == image_class]

    async def list_images(self, image_class: str = "") -> list[tuple[str, Image]]:
        """(class, image) of every image of IMAGE_CLASS (all classes: "")."""
        result = []
        for cls in [image_class] if image_class else list(classes.CLASSES):
            images = await asyncio.to_thread(self.pool_for(cls).discover)
            result += [(cls, i) for name, i in sorted(images.items())]  # .host too, as systemd 262
        return result

    def get(self, transfer_id: int) -> Transfer:
        return self.transfers.get(transfer_id)

    def cancel(self, transfer: Transfer) -> None:
        self.transfers.cancel(transfer)

    async def shutdown(self) -> None:
        await self.transfers.shutdown()
