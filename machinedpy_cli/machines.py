"""Machine verbs: list, status, show, terminate, kill (machinectl 262's calls
and output; ``status`` leaves out the unit's cgroup tree and journal, which
come from systemd, not from machined)."""

from __future__ import annotations

import socket
from typing import Any

from machinedpy_cli import fmt
from machinedpy_cli.bus import MACHINE1_PATH, BusError
from machinedpy_cli.context import Context
from machinedpy_cli.fmt import Column, Table, format_timestamp, format_timestamp_relative
from machinedpy_cli.images import show_properties

NO_SUCH_MACHINE = "org.freedesktop.machine1.NoSuchMachine"


async def _os_release(ctx: Context, name: str) -> dict[str, str]:
    try:
        (release,) = await ctx.bus.machine1("GetMachineOSRelease", "s", name)
    except BusError:
        return {}
    return dict(release)


def _address_text(family: int, raw: bytes, ifindex: int = 0) -> str:
    fam = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
    text = socket.inet_ntop(fam, bytes(raw))
    if fam == socket.AF_INET6 and ifindex > 0:
        text += f"%{ifindex}"
    return text


async def _addresses(ctx: Context, name: str, ifindex: int = 0) -> list[str]:
    try:
        (addresses,) = await ctx.bus.machine1("GetMachineAddresses", "s", name)
    except BusError:
        return []
    return [_address_text(family, raw, ifindex) for family, raw in addresses]


async def list_machines(ctx: Context, args: list[str]) -> int:
    try:
        (machines,) = await ctx.bus.machine1("ListMachines")
    except BusError as e:
        return ctx.error(f"Could not get machines: {e}")
    columns = [Column("machine"), Column("class"), Column("service"), Column("os"), Column("version")]
    with_addresses = ctx.opts.max_addresses > 0
    if with_addresses:
        columns.append(Column("addresses"))
    table = Table(columns, ersatz="-", sort_by=(0,))
    if not ctx.opts.full and 0 < ctx.opts.max_addresses < 2**32 - 1:
        table.cell_height_max = ctx.opts.max_addresses
    for name, klass, service, _path in machines:
        if name.startswith(".") and not ctx.opts.all:
            continue
        release = await _os_release(ctx, name)
        values: list[Any] = [name or None, klass or None, service or None, release.get("ID") or None,
                             release.get("VERSION_ID") or None]
        if with_addresses:
            values.append("\n".join(await _addresses(ctx, name)) or None)
        table.add(values, values)
    return ctx.show_table(table, "machines")


async def _machine_path(ctx: Context, name: str) -> str | None:
    try:
        (path,) = await ctx.bus.machine1("GetMachine", "s", name)
    except BusError as e:
        ctx.error(f"Could not get path to machine: {e}")
        return None
    return str(path)


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _ifname(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


def _process_line(label: str, pid: int) -> str | None:
    if pid <= 0:
        return None
    comm = _comm(pid)
    return f"{label}: {pid}" + (f" ({comm})" if comm else "")


async def _status_text(ctx: Context, props: dict[str, tuple[str, Any]]) -> str:
    """machinectl 262's status of a machine (without the unit's processes
    and journal, which come from systemd)."""
    def p(key: str, default: Any = None) -> Any:
        return props[key][1] if key in props else default

    name = p("Name", "")
    machine_id = bytes(p("Id", b""))
    out = [f"{name or 'n/a'}({machine_id.hex()})" if len(machine_id) == 16 and any(machine_id) else name or "n/a"]
    ts = p("Timestamp", 0)
    if fmt.timestamp_is_set(ts):
        out.append(f"\t   Since: {format_timestamp(ts)}; {format_timestamp_relative(ts)}")
    for label, key in (("\t  Leader", "Leader"), ("\t Superv.", "Supervisor")):
        line = _process_line(label, int(p(key, 0)))
        if line:
            out.append(line)
    service, klass = p("Service", ""), p("Class", "")
    if service:
        out.append(f"\t Service: {service}" + (f"; class {klass}" if klass else ""))
    elif klass:
        out.append(f"\t   Class: {klass}")
    if p("UID", 0) != 0:
        out.append(f"\t     UID: {p('UID')}")
    if p("RootDirectory"):
        out.append(f"\t    Root: {p('RootDirectory')}")
    ifindex = -1
    interfaces = list(p("NetworkInterfaces", []))
    if interfaces:
        names = []
        for i in interfaces:
            ifname = _ifname(i)
            if ifname:
                names.append(ifname)
                ifindex = i if ifindex < 0 else 0
            else:
                names.append(str(i))
        out.append("\t   Iface: " + " ".join(names))
    addresses = await _addresses(ctx, name, max(ifindex, 0))
    if addresses:
        out.append("\t Address: " + "\n\t          ".join(addresses))
    pretty = (await _os_release(ctx, name)).get("PRETTY_NAME")
    if pretty:
        out.append(f"\t      OS: {pretty}")
    try:
        (shift,) = await ctx.bus.machine1("GetMachineUIDShift", "s", name)
        if shift:
            out.append(f"\tID Shift: {shift}")
    except BusError:
        pass
    if p("Unit"):
        out.append(f"\t    Unit: {p('Unit')}")
        if p("Subgroup", "") not in ("", "/"):
            out.append(f"\tSubgroup: {p('Subgroup')}")
    return "".join(line + "\n" for line in out)


async def status(ctx: Context, args: list[str]) -> int:
    documents = []
    for i, name in enumerate(args):
        path = await _machine_path(ctx, name)
        if path is None:
            return 1
        try:
            props = await ctx.bus.get_all("org.freedesktop.machine1", path, "")
        except BusError as e:
            return ctx.error(f"Could not get properties: {e}")
        if ctx.opts.json:
            doc = {k: fmt.property_json(sig, v) for k, (sig, v) in props.items()}
            doc["Addresses"] = await _addresses(ctx, name)
            doc["OSRelease"] = await _os_release(ctx, name)
            try:
                (doc["UIDShift"],) = await ctx.bus.machine1("GetMachineUIDShift", "s", name)
            except BusError:
                doc["UIDShift"] = None
            documents.append(doc)
            continue
        if i:
            ctx.emit("\n")
        ctx.emit(await _status_text(ctx, props))
    if ctx.opts.json:
        ctx.emit_json(documents[0] if len(documents) == 1 else documents)
    return 0


async def show(ctx: Context, args: list[str]) -> int:
    if not args:
        return await show_properties(ctx, [MACHINE1_PATH])
    paths = []
    for name in args:
        path = await _machine_path(ctx, name)
        if path is None:
            return 1
        paths.append(path)
    return await show_properties(ctx, paths)


async def terminate(ctx: Context, args: list[str]) -> int:
    for name in args:
        try:
            await ctx.bus.machine1("TerminateMachine", "s", name)
        except BusError as e:
            if e.name == NO_SUCH_MACHINE:
                # machinectl 262 looks the machine up over Varlink first (for a VM's control socket), and
                # says so with Varlink's error name.
                return ctx.error(f"Failed to look up machine '{name}': io.systemd.Machine.NoSuchMachine")
            return ctx.error(f"Could not terminate machine: {e}")
    return 0


async def kill(ctx: Context, args: list[str]) -> int:
    whom = ctx.opts.kill_whom or "all"
    for name in args:
        try:
            await ctx.bus.machine1("KillMachine", "ssi", name, whom, ctx.opts.signal)
        except BusError as e:
            return ctx.error(f"Could not kill machine: {e}")
    return 0
