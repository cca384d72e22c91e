"""Starting transfers: pull-tar, pull-raw, import-tar, import-raw, import-fs,
export-tar, export-raw, their arguments and options, as importctl 262
checks them (the class defaults to machine, as machinectl's pulls, which
run ``importctl --class=machine``, have it).

A transfer verb subscribes to importd's signals first (``monitor``), then
calls the ``*Ex`` method (falling back to the old one on UnknownMethod), and
follows its transfer until TransferRemoved says how it ended: 0 for "done",
1 for "failed" or "canceled".  Ctrl-C (or SIGTERM) cancels it
(CancelTransfer) and waits for importd to confirm; a second one leaves at
once.  With ``--detach`` the verb prints the transfer's id and returns
while it runs."""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from machinedpy_cli import names
from machinedpy_cli.bus import UNKNOWN_METHOD, BusError
from machinedpy_cli.context import PROGRAM, Context
from machinedpy_cli.display import Display, make_display
from machinedpy_cli.monitor import Monitor, follow
from machinedpy_cli.progress import TransferState

FLAG_FORCE = 1
FLAG_READ_ONLY = 2
FLAG_PULL_KEEP_DOWNLOAD = 4

Call = tuple[str, str, tuple[Any, ...]]     # method, signature, arguments


async def _start_transfer(ctx: Context, ex: Call, old: Call | None, state: TransferState) -> int:
    """Call EX (or OLD on UnknownMethod), then follow the new transfer."""
    display: Display | None = None
    monitor: Monitor | None = None
    if not ctx.opts.detach:
        display = make_display(ctx, prefix=False)
        monitor = Monitor(ctx, display)
        await monitor.subscribe()
    try:
        try:
            transfer_id, path = await ctx.bus.import1(ex[0], ex[1], *ex[2])
        except BusError as e:
            if e.name != UNKNOWN_METHOD:
                raise
            if old is None:
                return ctx.error(f"importd has no {ex[0]}, and its older method cannot do this "
                                 f"(class {state.image_class}, these flags).")
            transfer_id, path = await ctx.bus.import1(old[0], old[1], *old[2])
    except BusError as e:
        return ctx.error(f"Failed to transfer image: {e}")
    state.id, state.path, state.ours = int(transfer_id), str(path), True
    if ctx.opts.detach or monitor is None or display is None:
        to_stderr = state.output_fd == 1
        print(state.id, file=sys.stderr if to_stderr else sys.stdout, flush=True)
        ctx.info(f"Transfer {state.id} continues in the background. Use \"{PROGRAM} watch {state.id}\" to follow "
                 f"it, \"{PROGRAM} cancel-transfer {state.id}\" to cancel it.")
        return 0
    display.start()
    display.message(f"Enqueued transfer job {state.id}. Press C-c to cancel it.")
    monitor.track(state)
    return await follow(ctx, monitor, display, watching=False)


def _class(ctx: Context) -> str:
    return ctx.opts.image_class or "machine"


def _keep_download(ctx: Context) -> bool:
    return ctx.opts.keep_download if ctx.opts.keep_download is not None else _class(ctx) == "machine"


async def pull(ctx: Context, args: list[str], kind: str) -> int:
    remote = args[0]
    if not names.url_is_valid(remote):
        return ctx.error(f"URL '{remote}' is not valid.")
    if len(args) >= 2:
        local: str | None = args[1]
    else:
        local = names.url_last_component(remote)
        if local is None:
            return ctx.error("Failed to get final component of URL: Invalid argument")
    if local in ("", "-"):
        local = None
    if local:
        local = names.tar_strip_suffixes(local) if kind == "tar" else names.raw_strip_suffixes(local)
        if not names.image_name_is_valid(local):
            return ctx.error(f"Local name {local} is not a suitable image name.")
    flags = (FLAG_FORCE if ctx.opts.force else 0) | (FLAG_READ_ONLY if ctx.opts.read_only else 0) | \
        (FLAG_PULL_KEEP_DOWNLOAD if _keep_download(ctx) else 0)
    method = "PullTar" if kind == "tar" else "PullRaw"
    klass = _class(ctx)
    ex = (f"{method}Ex", "sssst", (remote, local or "", klass, ctx.opts.verify, flags))
    old = None
    if klass == "machine" and not ctx.opts.read_only and _keep_download(ctx):
        old = (method, "sssb", (remote, local or "", ctx.opts.verify, ctx.opts.force))
    state = TransferState(0, "", type=f"pull-{kind}", local=local or "", remote=remote, image_class=klass)
    return await _start_transfer(ctx, ex, old, state)


def _input_size(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
    except OSError:
        return None


async def import_file(ctx: Context, args: list[str], kind: str) -> int:
    path = args[0] if args and args[0] not in ("", "-") else None
    local: str | None
    if len(args) >= 2:
        local = None if args[1] in ("", "-") else args[1]
    elif path:
        if path.endswith("/"):
            return ctx.error(f"Path '{path}' refers to directory, but we need a regular file.")
        local = names.local_name_from_path(path)
    else:
        local = None
    if not local:
        return ctx.error("Need either path or local name.")
    local = names.tar_strip_suffixes(local) if kind == "tar" else names.raw_strip_suffixes(local)
    if not names.image_name_is_valid(local):
        return ctx.error(f"Local name {local} is not a suitable image name.")
    fd = 0
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            return ctx.error(f"Failed to open {path}: {e.strerror}")
    try:
        state = TransferState(0, "", type=f"import-{kind}", local=local, image_class=_class(ctx),
                              input_size=_input_size(fd))
        if state.input_size is not None:
            state.total, state.total_exact = state.input_size, True
        return await _start_import(ctx, "ImportTar" if kind == "tar" else "ImportRaw", fd, state)
    finally:
        if fd != 0:
            os.close(fd)


async def _start_import(ctx: Context, method: str, fd: int, state: TransferState) -> int:
    """METHOD's Ex form (class and flags), or the old form for the machine class (importd 252)."""
    flags = (FLAG_FORCE if ctx.opts.force else 0) | (FLAG_READ_ONLY if ctx.opts.read_only else 0)
    ex = (f"{method}Ex", "hsst", (fd, state.local, state.image_class, flags))
    old = (method, "hsbb", (fd, state.local, ctx.opts.force, ctx.opts.read_only)) \
        if state.image_class == "machine" else None
    return await _start_transfer(ctx, ex, old, state)


async def import_fs(ctx: Context, args: list[str]) -> int:
    path = args[0] if args and args[0] not in ("", "-") else None
    local: str | None
    if len(args) >= 2:
        local = None if args[1] in ("", "-") else args[1]
    else:
        local = names.local_name_from_path(path) if path else None
    if not local:
        return ctx.error("Need either path or local name.")
    if not names.image_name_is_valid(local):
        return ctx.error(f"Local name {local} is not a suitable image name.")
    fd = 0
    if path:
        try:
            fd = os.open(path, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return ctx.error(f"Failed to open directory '{path}': {e.strerror}")
    try:
        state = TransferState(0, "", type="import-fs", local=local, image_class=_class(ctx))
        return await _start_import(ctx, "ImportFileSystem", fd, state)
    finally:
        if fd != 0:
            os.close(fd)


async def export(ctx: Context, args: list[str], kind: str) -> int:
    local = args[0]
    if not names.image_name_is_valid(local):
        return ctx.error(f"Image name {local} is not valid.")
    path = args[1] if len(args) >= 2 and args[1] not in ("", "-") else None
    fmt = ctx.opts.format or (names.format_from_suffix(path) if path else None) or ""
    fd = 1
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY, 0o666)
        except OSError as e:
            return ctx.error(f"Failed to open {path}: {e.strerror}")
    try:
        method = "ExportTar" if kind == "tar" else "ExportRaw"
        klass = _class(ctx)
        ex = (f"{method}Ex", "sshst", (local, klass, fd, fmt, 0))
        old = (method, "shs", (local, fd, fmt)) if klass == "machine" else None
        state = TransferState(0, "", type=f"export-{kind}", local=local, image_class=klass, output_fd=fd)
        if fd == 1 and not _is_regular(fd):
            state.output_fd = None
        return await _start_transfer(ctx, ex, old, state)
    finally:
        if fd != 1:
            os.close(fd)


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
