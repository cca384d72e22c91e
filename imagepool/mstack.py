"""Mount stacks (systemd 262's ``NAME.mstack/``) and the OCI layers they
stand on.

A mount stack is a directory ``NAME.mstack`` in the pool with entries
``layer@0``, ``layer@1``, ... (bottom first; importd writes them as symlinks
``../.oci-sha256:HEX`` to the shared, read-only layer directories) and
``rw/`` (the writable upper directory; absent when the image is
read-only); systemd also knows ``root``, ``work``, ``bind@``, ``robind@``
and ``tmpfs@`` entries.  As systemd's mstack_is_read_only(): a stack
without ``root``, ``rw``, ``bind@`` or ``tmpfs@`` entries is read-only, and
so is one that does not load (an unknown entry, a layer that is missing).
"""

from __future__ import annotations

import os
import re
import stat

SUFFIX = ".mstack"
LAYER_PREFIX = ".oci-sha256:"
_LAYER_NAME = re.compile(r"\.oci-sha256:[0-9a-f]{64}")
_ENTRY = re.compile(r"(layer|bind|robind|tmpfs)@.+|root|rw|work")
_WRITABLE = ("root", "rw", "bind@", "tmpfs@")


def is_layer_name(name: str) -> bool:
    return bool(_LAYER_NAME.fullmatch(name))


def layer_name(digest: str) -> str:
    """".oci-sha256:HEX" of "sha256:HEX"."""
    return ".oci-" + digest


def read_only(path: str) -> bool:
    """Whether the stack at PATH is read-only (see the module docstring)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return True
    writable = False
    for entry in entries:
        if not _ENTRY.fullmatch(entry):
            return True
        full = os.path.join(path, entry)
        if entry.startswith("layer@") and not os.path.isdir(full):
            return True
        if entry.startswith(_WRITABLE):
            writable = True
    return not writable


def layers_of(path: str) -> list[str]:
    """The names of the pool's layers the stack at PATH refers to (entries
    ``layer@N`` that are symlinks into the same directory)."""
    names = []
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    parent = os.path.dirname(os.path.abspath(path))
    for entry in entries:
        if not entry.startswith("layer@"):
            continue
        try:
            target = os.readlink(os.path.join(path, entry))
        except OSError:
            continue
        resolved = os.path.normpath(os.path.join(path, target))
        if os.path.dirname(resolved) == parent and is_layer_name(os.path.basename(resolved)):
            names.append(os.path.basename(resolved))
    return names


def referenced_layers(pool: str) -> set[str]:
    """Every layer name a stack in the directory POOL refers to."""
    found: set[str] = set()
    try:
        entries = os.listdir(pool)
    except OSError:
        return found
    for entry in entries:
        if not entry.endswith(SUFFIX) or entry.startswith(".#"):
            continue
        full = os.path.join(pool, entry)
        try:
            if not stat.S_ISDIR(os.lstat(full).st_mode):
                continue
        except OSError:
            continue
        found.update(layers_of(full))
    return found
