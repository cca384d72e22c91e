"""The layer store: each layer once in the pool, as the hidden read-only
tree ``.oci-sha256:HEX`` (a btrfs subvolume, or a directory marked
immutable), as systemd 262 keeps them, and the locks that let pulls share
them.

A pull holds the lock of every layer it uses until its image is in place:
shared for a layer that is there, exclusive for one it downloads.  The lock
is the image lock systemd-machined and we take for the layer as an image
(``.#.oci-sha256:HEX.lck`` next to it), so removing a layer a pull is using
fails with EBUSY, and CleanPool skips it.  Locks are taken in the order of
the digests, so two pulls that share layers wait for each other instead of
deadlocking; one waiting for a layer another pull is downloading gets it
from that pull when it is done (nothing is downloaded twice), or downloads
it itself when that pull failed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from imagepool import mstack, tree
from imagepool.image import Pool
from imagepool.locks import LockFile, make_lock_file
from importd.context import JobContext

_WAIT = 0.1


class LayerLock:
    def __init__(self, lock: LockFile, exclusive: bool) -> None:
        self.lock = lock
        self.exclusive = exclusive

    def release(self) -> None:
        self.lock.release()


class LayerStore:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def path(self, digest: str) -> str:
        return os.path.join(self.pool.path, mstack.layer_name(digest))

    def present(self, digest: str) -> bool:
        return os.path.isdir(self.path(digest)) and not os.path.islink(self.path(digest))

    def _lock_path(self, digest: str) -> str:
        return os.path.join(self.pool.path, f".#{mstack.layer_name(digest)}.lck")

    def acquire(self, ctx: JobContext, digest: str, waiting: list[bool] | None = None) -> LayerLock:
        """Shared if the layer is there, else exclusive (the caller then
        makes it); waits (cancellably) while another pull holds it."""
        path = self._lock_path(digest)
        told = False
        while True:
            ctx.check()
            exclusive = not self.present(digest)
            try:
                lock = make_lock_file(path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                if not told:
                    ctx.log(f"Layer {digest} is in use by another transfer, waiting.")
                    told = True
                    if waiting is not None:
                        waiting.append(True)
                time.sleep(_WAIT)
                continue
            if exclusive == (not self.present(digest)):
                return LayerLock(lock, exclusive)
            lock.release()  # it appeared or vanished meanwhile: the other kind of lock

    def install(self, tmp: str, digest: str, sync: bool) -> None:
        tree.install_image(tmp, self.path(digest), force=False, read_only=True, sync=sync)

    def remove(self, digest: str) -> None:
        tree.remove_path(self.path(digest))

    def unreferenced(self) -> list[str]:
        """Layers (names) in the pool that no mount stack refers to."""
        used = mstack.referenced_layers(self.pool.path)
        try:
            entries = os.listdir(self.pool.path)
        except OSError:
            return []
        return sorted(e for e in entries if mstack.is_layer_name(e) and e not in used)
