"""Transfers this command did not start: list-transfers (importctl's
table), cancel-transfer, and watch (one bar per running transfer, and one
more for each that starts meanwhile; Ctrl-C stops watching and leaves them
running; 0 if every transfer it saw end ended "done")."""

from __future__ import annotations

from machinedpy_cli.bus import UNKNOWN_METHOD, BusError
from machinedpy_cli.context import Context
from machinedpy_cli.display import make_display
from machinedpy_cli.fmt import Column, Table
from machinedpy_cli.monitor import Monitor, follow
from machinedpy_cli.progress import TransferState


async def list_rows(ctx: Context) -> list[tuple[int, str, str, str, str, float, str]]:
    """(id, type, remote, local, class, progress, path) of every transfer of
    the class asked for (all without --class)."""
    klass = ctx.opts.image_class or ""
    try:
        (rows,) = await ctx.bus.import1("ListTransfersEx", "st", klass, 0)
        return [tuple(r) for r in rows]
    except BusError as e:
        if e.name != UNKNOWN_METHOD:
            raise
    (rows,) = await ctx.bus.import1("ListTransfers")
    return [(i, t, r, loc, "machine", p, path) for i, t, r, loc, p, path in rows if klass in ("", "machine")]


async def list_transfers(ctx: Context, args: list[str]) -> int:
    if ctx.opts.follow:
        return await watch(ctx, [])
    try:
        rows = await list_rows(ctx)
    except BusError as e:
        return ctx.error(f"Could not get transfers: {e}")
    # importctl's: the numbers right-aligned under headers on the left; by local name, then id.
    table = Table([Column("id", right=True, header_right=False), Column("progress", right=True, header_right=False),
                   Column("type"), Column("class"), Column("local"), Column("remote")], ersatz="-",
                  sort_key=lambda row, shown: ((shown[4] or "").encode(), row[0]))
    for transfer_id, kind, remote, local, klass, progress, _path in rows:
        percent = None if progress < 0 else int(progress * 100)
        table.add([transfer_id, percent, kind, klass, local or None, remote or None],
                  [str(transfer_id), None if percent is None else f"{percent}%", kind, klass, local, remote])
    return ctx.show_table(table, "transfers", empty_json=False)


async def cancel_transfer(ctx: Context, args: list[str]) -> int:
    for text in args:
        try:
            transfer_id = int(text)
            if not 0 <= transfer_id < 2**32:
                raise ValueError(text)
        except ValueError:
            return ctx.error(f"Failed to parse transfer id: {text}")
        try:
            await ctx.bus.import1("CancelTransfer", "u", transfer_id)
        except BusError as e:
            return ctx.error(f"Could not cancel transfer: {e}")
    return 0


async def watch(ctx: Context, args: list[str]) -> int:
    wanted: set[int] = set()
    for text in args:
        try:
            wanted.add(int(text))
        except ValueError:
            return ctx.error(f"Failed to parse transfer id: {text}")
    display = make_display(ctx, prefix=True)
    monitor = Monitor(ctx, display)
    await monitor.subscribe()
    try:
        rows = await list_rows(ctx)
    except BusError as e:
        return ctx.error(f"Could not get transfers: {e}")
    found = {r[0] for r in rows}
    for transfer_id in sorted(wanted - found):
        return ctx.error(f"No transfer by id {transfer_id}")
    rows = [r for r in rows if not wanted or r[0] in wanted]
    if not rows:
        ctx.info("No transfers.")
        return 0
    monitor.follow_new = not wanted
    display.start()
    for transfer_id, kind, remote, local, klass, progress, path in sorted(rows):
        state = TransferState(int(transfer_id), str(path), type=kind, local=local, remote=remote, image_class=klass)
        state.on_progress(float(progress))
        monitor.track(state)
    return await follow(ctx, monitor, display, watching=True)
