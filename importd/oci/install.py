"""The local image of a pull, as systemd 262 writes it: ``NAME.mstack/``
(``layer@N`` symlinks to ``../.oci-sha256:HEX``, and ``rw/`` unless
read-only), ``NAME.nspawn`` made from the image configuration and
``NAME.oci-config`` (the configuration blob as it is); or, flattened, a
plain tree ``NAME`` (importd.oci.flatten) with the same two side files.

Everything is built under a ``.#`` name and renamed into place; with force
an existing image of the name is swapped out atomically, then removed.

The settings file is 262's, line for line, except where 262 fails the pull
after having written the stack: a ``User`` that is no plain user name
(``1000``, ``1000:1000``, ``app:grp``), an ``Env`` entry that is no
assignment, a relative ``WorkingDir``; those are left out with a comment and
a log line, and the pull goes on.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from imagepool import fsutil, tree
from imagepool.image import Pool
from imagepool.mstack import SUFFIX, layer_name
from importd.context import JobContext
from importd.oci import flatten
from importd.oci.manifest import Config

SETTINGS_MODE = 0o640  # as systemd 262 leaves NAME.nspawn and NAME.oci-config
_SAFE = re.compile(r"[A-Za-z0-9=+\-_/;.:,]+")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}\$?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)


def cescape(text: str) -> str:
    """systemd's cescape(): C escapes, other control and non-ASCII bytes as \\xHH."""
    named = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v", 92: "\\\\", 34: '\\"',
             39: "\\'"}
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        if b in named:
            out.append(named[b])
        elif b < 32 or b >= 127:
            out.append(f"\\x{b:02x}")
        else:
            out.append(chr(b))
    return "".join(out)


def _quote(arg: str) -> str:
    if not arg:
        return '""'
    if _SAFE.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _signal_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return "TERM"
    text = value.upper().removeprefix("SIG")
    try:
        number = int(text) if text.isdigit() else signal.Signals["SIG" + text].value
        return signal.Signals(number).name.removeprefix("SIG")
    except (KeyError, ValueError):
        return "TERM"


def nspawn_settings(ctx: JobContext, config: dict[str, Any]) -> bytes:
    c = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(c, dict)
    lines = ["# Generated from OCI configuration object", "[Exec]", "Boot=no",
             f"KillSignal={_signal_name(c.get('StopSignal'))}"]
    user = c.get("User")
    if isinstance(user, str) and user and user not in ("root", "0"):
        if _USER.fullmatch(user):
            lines.append(f"User={cescape(user)}")
        else:
            ctx.log(f"User '{user}' of the image is not a user name systemd-nspawn takes, leaving it out.")
            lines.append(f"# User={cescape(user)} (not a user name; systemd-nspawn's User= takes names only)")
    workdir = c.get("WorkingDir")
    if isinstance(workdir, str) and workdir and os.path.normpath(workdir) != "/":
        if workdir.startswith("/"):
            lines.append(f"WorkingDirectory={cescape(workdir)}")
        else:
            ctx.log(f"WorkingDir '{workdir}' of the image is not absolute, leaving it out.")
    for entry in c.get("Env") or []:
        if isinstance(entry, str) and _ENV.fullmatch(entry):
            lines.append(f"Environment={cescape(entry)}")
        else:
            ctx.log(f"Env entry {entry!r} of the image is not an assignment, leaving it out.")
    argv = [a for a in (c.get("Entrypoint") or []) + (c.get("Cmd") or []) if isinstance(a, str)]
    if argv:
        lines.append("Parameters=" + " ".join(_quote(a) for a in argv))
    return ("\n".join(lines) + "\n").encode()


def _write_mstack(pool: Pool, tmp: str, digests: list[str], read_only: bool) -> None:
    os.mkdir(tmp, 0o755)
    os.chmod(tmp, 0o755)
    for k, digest in enumerate(digests):
        os.symlink(os.path.join("..", layer_name(digest)), os.path.join(tmp, f"layer@{k}"))
    if not read_only:
        os.mkdir(os.path.join(tmp, "rw"), 0o755)
        os.chmod(os.path.join(tmp, "rw"), 0o755)


def make_local(ctx: JobContext, pool: Pool, name: str, digests: list[str], layer_paths: list[str],
               config: Config, *, force: bool, read_only: bool, flat: bool, sync: bool) -> None:
    final = os.path.join(pool.path, name if flat else name + SUFFIX)
    existing = pool.find(name)
    tmp = tree.temp_name(pool.path, os.path.basename(final))
    try:
        if flat:
            flatten.build(ctx, layer_paths, tmp)
        else:
            _write_mstack(pool, tmp, digests, read_only)
        ctx.check()
        tree.install_image(tmp, final, force=force, read_only=read_only and flat, sync=sync)
    except BaseException:
        tree.remove_path(tmp)
        raise
    if existing is not None and existing.path != final and force:
        if fsutil.get_immutable(existing.path):
            fsutil.set_immutable(existing.path, False)
        tree.remove_path(existing.path)  # another kind of image of that name would hide this one
    ctx.log(f"Mount stack written to '{final}'." if not flat else f"Created new local image '{name}'.")
    if config.empty:
        ctx.log("Image has no configuration, not saving.")
        return
    settings = os.path.join(pool.path, name + ".nspawn")
    tree.write_small_file(settings, nspawn_settings(ctx, config.data), SETTINGS_MODE)
    ctx.log(f"systemd-nspawn settings file written to '{settings}'.")
    oci_config = os.path.join(pool.path, name + ".oci-config")
    tree.write_small_file(oci_config, config.raw, SETTINGS_MODE)
    ctx.log(f"OCI config written to '{oci_config}'.")
