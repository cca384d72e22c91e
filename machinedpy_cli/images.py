"""Image verbs: list-images, image-status, show-image, clone, rename,
read-only, remove, set-limit, clean (machinectl's calls and output)."""

from __future__ import annotations

from typing import Any

from machinedpy_cli import fmt
from machinedpy_cli.bus import EXTRAS_INTERFACE, EXTRAS_PATH, INFINITE_USEC, MACHINE1, MACHINE1_PATH, BusError
from machinedpy_cli.context import Context
from machinedpy_cli.fmt import UINT64_MAX, Column, Table, format_bytes, format_timestamp, format_timestamp_relative


async def list_images(ctx: Context, args: list[str]) -> int:
    """machinectl's list-images; with --class, importctl's."""
    if ctx.opts.image_class is not None:
        return await _list_images_import1(ctx, ctx.opts.image_class)
    try:
        (images,) = await ctx.bus.machine1("ListImages")
    except BusError as e:
        return ctx.error(f"Could not get images: {e}")
    table = Table([Column("name"), Column("type"), Column("ro"), Column("usage", right=True), Column("created"),
                   Column("modified")], sort_by=(0,))
    for name, kind, ro, crtime, mtime, usage, _path in images:
        if name.startswith(".") and not ctx.opts.all:
            continue
        table.add([name, kind, ro, _known(usage), _known(crtime), _known(mtime)],
                  [name, kind, "yes" if ro else "no", format_bytes(usage) or "", format_timestamp(crtime) or "-",
                   format_timestamp(mtime) or "-"])
    return ctx.show_table(table, "images")


def _known(value: int) -> int | None:
    """A size or time for JSON: null when unknown (UINT64_MAX)."""
    return None if value == UINT64_MAX else value


async def _list_images_import1(ctx: Context, image_class: str) -> int:
    """importd's ListImages of one class, as importctl shows them: hidden
    images too, sizes and times left-aligned, "-" for what is unknown."""
    try:
        (images,) = await ctx.bus.import1("ListImages", "st", image_class, 0)
    except BusError as e:
        return ctx.error(f"Could not list images: {e}")
    table = Table([Column(c) for c in ("class", "name", "type", "path", "ro", "crtime", "mtime", "usage", "limit")],
                  ersatz="-", sort_by=(0, 1))
    for klass, name, kind, path, ro, crtime, mtime, usage, _ue, limit, _le in images:
        table.add([klass, name, kind, path, ro, _known(crtime), _known(mtime), _known(usage), _known(limit)],
                  [klass, name, kind, path, "ro" if ro else "rw", format_timestamp(crtime), format_timestamp(mtime),
                   format_bytes(usage), format_bytes(limit)])
    return ctx.show_table(table, "images", empty_json=False)


async def _image_path(ctx: Context, name: str) -> str | None:
    try:
        (path,) = await ctx.bus.machine1("GetImage", "s", name)
    except BusError as e:
        ctx.error(f"Could not get path to image: {e}")
        return None
    return str(path)


async def _optional(ctx: Context, member: str, name: str) -> Any:
    try:
        (value,) = await ctx.bus.machine1(member, "s", name)
    except BusError:
        return None
    return value


async def _usage_status(ctx: Context, name: str) -> str | None:
    """Why the usage is unknown or which limit was reached: machined-py's own
    UsageStatus (None from a daemon without it, such as systemd's)."""
    try:
        (value,) = await ctx.bus.call(MACHINE1, EXTRAS_PATH, EXTRAS_INTERFACE, "UsageStatus", "s", name)
    except BusError:
        return None
    return str(value)


async def _image_extras(ctx: Context, name: str) -> dict[str, Any]:
    return {
        "Hostname": await _optional(ctx, "GetImageHostname", name),
        "MachineID": await _optional(ctx, "GetImageMachineID", name),
        "MachineInfo": await _optional(ctx, "GetImageMachineInfo", name),
        "OSRelease": await _optional(ctx, "GetImageOSRelease", name),
        "UsageStatus": await _usage_status(ctx, name),
    }


def _image_status_text(props: dict[str, tuple[str, Any]], extra: dict[str, Any]) -> str:
    def p(key: str, default: Any = None) -> Any:
        return props[key][1] if key in props else default

    out = []
    if p("Name"):
        out.append(f"{p('Name')}")
    if p("Type"):
        out.append(f"\t    Type: {p('Type')}")
    if p("Path"):
        out.append(f"\t    Path: {p('Path')}")
    if extra["Hostname"]:
        out.append(f"\tHostname: {extra['Hostname']}")
    machine_id = extra["MachineID"]
    if machine_id and len(machine_id) == 16 and any(machine_id):
        out.append(f"      Machine ID: {bytes(machine_id).hex()}")
    info = extra["MachineInfo"] or {}
    if "DEPLOYMENT" in info:
        out.append(f"      Deployment: {info['DEPLOYMENT']}")
    pretty = (extra["OSRelease"] or {}).get("PRETTY_NAME")
    if pretty:
        out.append(f"\t      OS: {pretty}")
    out.append(f"\t      RO: {'read-only' if p('ReadOnly') else 'writable'}")
    for key, label in (("CreationTimestamp", "\t Created"), ("ModificationTimestamp", "\tModified")):
        ts = p(key, 0)
        if fmt.timestamp_is_set(ts):
            out.append(f"{label}: {format_timestamp(ts)}; {format_timestamp_relative(ts)}")
    status = extra.get("UsageStatus")
    for key, label in (("Usage", "Usage"), ("Limit", "Limit")):
        total, exclusive = p(key, UINT64_MAX), p(f"{key}Exclusive", UINT64_MAX)
        if total != UINT64_MAX:
            line = f"\t   {label}: {format_bytes(total)}"
            if exclusive not in (total, UINT64_MAX):
                line += f" (exclusive: {format_bytes(exclusive)})"
            if key == "Limit" and status and status.startswith("reached "):
                line += f" ({status})"
            out.append(line)
        elif key == "Usage" and status and not status.startswith("reached "):
            out.append(f"\t   Usage: unknown ({status})")
    return "".join(line + "\n" for line in out)


def _props_json(props: dict[str, tuple[str, Any]], only: list[str] | None = None) -> dict[str, Any]:
    return {k: fmt.property_json(sig, v) for k, (sig, v) in props.items() if not only or k in only}


async def image_status(ctx: Context, args: list[str]) -> int:
    if not args:
        try:
            props = await ctx.bus.get_all(MACHINE1, MACHINE1_PATH, "")
        except BusError as e:
            return ctx.error(f"Could not get properties: {e}")
        if ctx.opts.json:
            ctx.emit_json(_props_json({k: v for k, v in props.items() if k.startswith("Pool")}))
            return 0
        out = []
        if "PoolPath" in props:
            out.append(f"\t    Path: {props['PoolPath'][1]}")
        for key, label in (("PoolUsage", "Usage"), ("PoolLimit", "Limit")):
            if key in props and props[key][1] != UINT64_MAX:
                out.append(f"\t   {label}: {format_bytes(props[key][1])}")
        ctx.emit("".join(line + "\n" for line in out))
        return 0
    documents = []
    for i, name in enumerate(args):
        path = await _image_path(ctx, name)
        if path is None:
            return 1
        try:
            props = await ctx.bus.get_all(MACHINE1, path, "")
        except BusError as e:
            return ctx.error(f"Could not get properties: {e}")
        extra = await _image_extras(ctx, name)
        if ctx.opts.json:
            doc = _props_json(props)
            doc.update({k: fmt.property_json("ay" if k == "MachineID" else "", v) for k, v in extra.items()})
            if not doc.get("MachineID") or not any(bytes(extra["MachineID"] or b"")):
                doc["MachineID"] = None
            documents.append(doc)
            continue
        if i:
            ctx.emit("\n")
        ctx.emit(_image_status_text(props, extra))
    if ctx.opts.json:
        ctx.emit_json(documents[0] if len(documents) == 1 else documents)
    return 0


async def show_properties(ctx: Context, paths: list[str]) -> int:
    """``show``/``show-image``: GetAll of each object, printed as NAME=VALUE."""
    documents = []
    for i, path in enumerate(paths):
        try:
            props = await ctx.bus.get_all(MACHINE1, path, "")
        except BusError as e:
            return ctx.error(f"Could not get properties: {e}")
        if ctx.opts.json:
            documents.append(_props_json(props, ctx.opts.properties or None))
            continue
        if i:
            ctx.emit("\n")
        ctx.emit(fmt.print_properties(props, ctx.opts.properties, ctx.opts.all, ctx.opts.value))
    if ctx.opts.json:
        ctx.emit_json(documents[0] if len(documents) == 1 else documents)
    return 0


async def show_image(ctx: Context, args: list[str]) -> int:
    if not args:
        return await show_properties(ctx, [MACHINE1_PATH])
    paths = []
    for name in args:
        path = await _image_path(ctx, name)
        if path is None:
            return 1
        paths.append(path)
    return await show_properties(ctx, paths)


async def clone(ctx: Context, args: list[str]) -> int:
    try:
        await ctx.bus.machine1("CloneImage", "ssb", args[0], args[1], ctx.opts.read_only,
                               timeout_usec=INFINITE_USEC)
    except BusError as e:
        return ctx.error(f"Could not clone image: {e}")
    return 0


async def rename(ctx: Context, args: list[str]) -> int:
    try:
        await ctx.bus.machine1("RenameImage", "ss", args[0], args[1])
    except BusError as e:
        return ctx.error(f"Could not rename image: {e}")
    return 0


def parse_boolean(text: str) -> bool | None:
    low = text.lower()
    if low in ("1", "yes", "y", "true", "t", "on"):
        return True
    if low in ("0", "no", "n", "false", "f", "off"):
        return False
    return None


async def read_only(ctx: Context, args: list[str]) -> int:
    value = True
    if len(args) > 1:
        parsed = parse_boolean(args[1])
        if parsed is None:
            return ctx.error(f"Failed to parse boolean argument: {args[1]}")
        value = parsed
    try:
        await ctx.bus.machine1("MarkImageReadOnly", "sb", args[0], value)
    except BusError as e:
        return ctx.error(f"Could not mark image read-only: {e}")
    return 0


async def remove(ctx: Context, args: list[str]) -> int:
    for name in args:
        try:
            await ctx.bus.machine1("RemoveImage", "s", name, timeout_usec=INFINITE_USEC)
        except BusError as e:
            return ctx.error(f"Could not remove image: {e}")
    return 0


async def set_limit(ctx: Context, args: list[str]) -> int:
    text = args[-1]
    if text in ("-", "none", "infinity"):
        limit = UINT64_MAX
    else:
        try:
            limit = fmt.parse_size(text)
        except ValueError:
            return ctx.error(f"Failed to parse size: {text}")
    try:
        if len(args) > 1:
            await ctx.bus.machine1("SetImageLimit", "st", args[0], limit)
        else:
            await ctx.bus.machine1("SetPoolLimit", "t", limit)
    except BusError as e:
        return ctx.error(f"Could not set limit: {e}")
    return 0


async def clean(ctx: Context, args: list[str]) -> int:
    try:
        (removed,) = await ctx.bus.machine1("CleanPool", "s", "all" if ctx.opts.all else "hidden",
                                            timeout_usec=INFINITE_USEC)
    except BusError as e:
        return ctx.error(f"Could not clean pool: {e}")
    if ctx.opts.json:
        ctx.emit_json([{"name": name, "freed": None if usage == UINT64_MAX else usage} for name, usage in removed])
        return 0
    total: int | None = 0
    for name, usage in removed:
        if usage == UINT64_MAX:
            ctx.info(f"Removed image '{name}'")
            total = None
        else:
            ctx.info(f"Removed image '{name}'. Freed exclusive disk space: {format_bytes(usage)}")
            if total is not None:
                total += usage
    if total is None:
        ctx.info(f"Removed {len(removed)} images in total.")
    else:
        ctx.info(f"Removed {len(removed)} images in total. Total freed exclusive disk space: {format_bytes(total)}.")
    return 0
