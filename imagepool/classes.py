"""The image classes and where their images are, as systemd 262 has them
(discover-image.c): machines, portable services, system extensions and
configuration extensions, each with a search path and a pool (the
directory below /var/lib that images are put in).

``Roots`` is where one service looks: systemd's directories, or the same
below a prefix (``--image-prefix``: ``make run`` and the tests keep every
class there, so that nothing of the host's is read or written), with the
machine pool possibly elsewhere (``--pool``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from imagepool.image import Pool

CLASSES = ("machine", "portable", "sysext", "confext")

# First match wins, in this order.  /etc and /run are for symlinks; below
# /usr nothing can be changed; extensions are never kept below /usr (they
# extend it).
SEARCH_PATHS: dict[str, tuple[str, ...]] = {
    "machine": ("/etc/machines", "/run/machines", "/var/lib/machines", "/var/lib/container",
                "/usr/local/lib/machines", "/usr/lib/machines"),
    "portable": ("/etc/portables", "/run/portables", "/var/lib/portables", "/usr/local/lib/portables",
                 "/usr/lib/portables"),
    "sysext": ("/etc/extensions", "/run/extensions", "/var/lib/extensions"),
    "confext": ("/run/confexts", "/var/lib/confexts", "/usr/local/lib/confexts", "/usr/lib/confexts"),
}

POOLS = {"machine": "/var/lib/machines", "portable": "/var/lib/portables", "sysext": "/var/lib/extensions",
         "confext": "/var/lib/confexts"}


def class_is_valid(image_class: str) -> bool:
    return image_class in POOLS


@dataclass(frozen=True)
class Roots:
    """PREFIX: every class's directories below it ("": systemd's own);
    MACHINE_POOL: the machine pool, if not the (prefixed) /var/lib/machines;
    QUOTA: what the pools do about btrfs quotas ("keep" or "simple")."""

    prefix: str = ""
    machine_pool: str | None = None
    quota: str = "keep"  # btrfs quotas of the pools (imagepool.ops.quotas_ready)

    def __post_init__(self) -> None:
        if self.prefix and (not os.path.isabs(self.prefix) or os.path.normpath(self.prefix) == "/"):
            raise ValueError(f"image prefix {self.prefix!r} is not an absolute directory below /")

    def rebase(self, path: str) -> str:
        """PATH (absolute) below the prefix."""
        return os.path.normpath(self.prefix + path) if self.prefix else path

    def pool_path(self, image_class: str) -> str:
        if image_class == "machine" and self.machine_pool:
            return os.path.abspath(self.machine_pool)
        return self.rebase(POOLS[image_class])

    def search_paths(self, image_class: str) -> list[str]:
        """The class's search path, its pool in the place of /var/lib/<class>."""
        pool = self.pool_path(image_class)
        return [pool if path == POOLS[image_class] else self.rebase(path) for path in SEARCH_PATHS[image_class]]

    def vendor_paths(self, image_class: str) -> list[str]:
        """The directories of the search path whose images can't be changed
        (those below /usr)."""
        return [self.rebase(p) for p in SEARCH_PATHS[image_class] if p.startswith("/usr/")]

    def pool(self, image_class: str) -> Pool:
        return Pool(self.pool_path(image_class), self.search_paths(image_class),
                    vendor_paths=self.vendor_paths(image_class), host=image_class == "machine", quota=self.quota)

    def below_prefix(self, path: str) -> str:
        """A directory a client named (Varlink's imageRoot): below the prefix
        too, so that a prefixed service never writes outside it."""
        return self.rebase(path)
