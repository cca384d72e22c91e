"""Command line: options (anywhere on the line, as getopt_long permutes
them; for ``shell`` only before the machine name), verbs, exit status."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from machinedpy_cli import __version__, images, machines, names, shell, transfers
from machinedpy_cli.bus import Bus, BusError
from machinedpy_cli.context import Context, Options

PROGRAM = "machined-py"

HELP = f"""\
{PROGRAM} [OPTIONS...] COMMAND ...

Query and control machines, images and image transfers (machinectl and
importctl, with live progress bars), over D-Bus.

Machine Commands:
  list                        List running VMs and containers
  status NAME...              Show VM/container details
  show [NAME...]              Show properties of one or more VMs/containers
  shell [[USER@]NAME [COMMAND...]]
                              Invoke a shell (or other command) in a container
                              or on the local host
  terminate NAME...           Terminate one or more VMs/containers
  kill NAME...                Send signal to processes of a VM/container

Image Commands:
  list-images                 Show available container and VM images
  image-status [NAME...]      Show image details
  show-image [NAME...]        Show properties of image
  clone NAME NAME             Clone an image
  rename NAME NAME            Rename an image
  read-only NAME [BOOL]       Mark or unmark image read-only
  remove NAME...              Remove an image
  set-limit [NAME] BYTES      Set image or pool size limit (disk quota)
  clean                       Remove hidden (or all) images

Image Transfer Commands:
  pull-tar URL [NAME]         Download a TAR container image
  pull-raw URL [NAME]         Download a RAW container or VM image
  import-tar FILE [NAME]      Import a local TAR container image
  import-raw FILE [NAME]      Import a local RAW container or VM image
  import-fs DIRECTORY [NAME]  Import a local directory container image
  export-tar NAME [FILE]      Export a TAR container image locally
  export-raw NAME [FILE]      Export a RAW container or VM image locally
  list-transfers              Show list of transfers in progress
  cancel-transfer ID...       Cancel a transfer
  watch [ID...]               Show bars for running transfers (all, and those
                              that start meanwhile, or the given ones)

A transfer shows a live bar on a terminal (plain log lines otherwise);
Ctrl-C cancels it, --detach leaves it running and prints its id.

Options:
  -h --help                   Show this help
     --version                Show package version
     --no-pager               Do not pipe output into a pager
     --no-legend              Do not show the headers and footers
     --no-ask-password        Do not ask for system passwords (accepted; no
                              agent is ever started)
  -p --property=NAME          Show only properties by this name
  -P NAME                     Equivalent to --value --property=NAME
  -q --quiet                  Suppress output
  -a --all                    Show all properties, including empty ones, and
                              hidden images and machines
     --value                  When showing properties, only print the value
  -l --full                   Do not ellipsize output
     --json=MODE              Output JSON (pretty, short, or off)
  -j                          Same as --json=pretty on a terminal, else short
     --kill-whom=WHOM         Whom to send signal to (leader, all)
  -s --signal=SIGNAL          Which signal to send
     --uid=USER               Specify user ID to invoke shell as
  -E --setenv=VAR[=VALUE]     Add an environment variable for shell
     --read-only              Create read-only clone or image
     --force                  Replace an existing image
     --verify=MODE            Verification mode for downloaded images (no,
                              checksum, signature)
     --format=FORMAT          Compression of exports (uncompressed, xz, gzip,
                              bzip2, zstd); by default from the file's suffix
     --class=CLASS            Image class (machine, portable, sysext, confext);
                              default machine
     --keep-download=BOOL     Keep a pristine copy of a download (default: yes
                              for machine images)
  -N                          Same as --keep-download=no
     --max-addresses=N        Number of internet addresses to show at most
     --detach                 Start the transfer, print its id and return
     --follow                 With list-transfers: the same as watch
"""


class UsageError(Exception):
    pass


# long name -> (short letter or "", takes an argument)
LONG = {
    "help": ("h", False), "version": ("", False), "property": ("p", True), "all": ("a", False),
    "value": ("", False), "full": ("l", False), "no-pager": ("", False), "no-legend": ("", False),
    "no-ask-password": ("", False), "kill-whom": ("", True), "signal": ("s", True), "quiet": ("q", False),
    "read-only": ("", False), "force": ("", False), "verify": ("", True), "format": ("", True),
    "uid": ("", True), "setenv": ("E", True), "class": ("", True), "keep-download": ("", True),
    "json": ("", True), "detach": ("", False), "follow": ("", False), "max-addresses": ("", True),
}
SHORT = {short: long for long, (short, _arg) in LONG.items() if short}
SHORT.update({"P": "P", "N": "N", "j": "j"})
SHORT_ARG = {"P": True, "N": False, "j": False}


def parse_signal(text: str) -> int:
    if text.isdigit():
        value = int(text)
        if 0 < value < signal.NSIG:
            return value
        raise UsageError(f"Failed to parse signal string \"{text}\".")
    upper = text.upper()
    name = upper if upper.startswith("SIG") else "SIG" + upper
    for base, start in (("SIGRTMIN", signal.SIGRTMIN), ("SIGRTMAX", signal.SIGRTMAX)):
        if name == base:
            return int(start)
        if name.startswith(base + "+") or name.startswith(base + "-"):
            try:
                offset = int(name[len(base):])
            except ValueError:
                break
            value = int(start) + offset
            if signal.SIGRTMIN <= value <= signal.SIGRTMAX:
                return value
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"Failed to parse signal string \"{text}\".") from None


def _apply(opts: Options, name: str, value: str | None) -> str | None:
    """Apply one option; returns "help" or "version" for those."""
    if name == "help":
        return "help"
    if name == "version":
        return "version"
    if name == "property":
        assert value is not None
        opts.properties.extend(p for p in value.split(",") if p)
    elif name == "P":
        assert value is not None
        opts.properties.append(value)
        opts.value = True
    elif name == "all":
        opts.all = True
    elif name == "value":
        opts.value = True
    elif name == "full":
        opts.full = True
    elif name == "no-pager":
        opts.pager = False
    elif name == "no-legend":
        opts.legend = False
    elif name == "no-ask-password":
        opts.ask_password = False
    elif name == "kill-whom":
        opts.kill_whom = value
    elif name == "signal":
        assert value is not None
        opts.signal = parse_signal(value)
    elif name == "quiet":
        opts.quiet = True
    elif name == "read-only":
        opts.read_only = True
    elif name == "force":
        opts.force = True
    elif name == "verify":
        if value not in ("no", "checksum", "signature"):
            raise UsageError(f"Failed to parse --verify= setting: {value}")
        opts.verify = value
    elif name == "format":
        if value not in names.FORMATS:
            raise UsageError(f"Unknown format: {value}")
        opts.format = value
    elif name == "uid":
        opts.uid = value
    elif name == "setenv":
        assert value is not None
        if "=" not in value:
            if value not in os.environ:
                return None
            value = f"{value}={os.environ[value]}"
        key = value.split("=", 1)[0]
        opts.setenv = [e for e in opts.setenv if e.split("=", 1)[0] != key] + [value]
    elif name == "class":
        if value not in names.CLASSES:
            raise UsageError(f"Failed to parse --class= parameter: {value}")
        opts.image_class = value
    elif name == "keep-download":
        assert value is not None
        parsed = images.parse_boolean(value)
        if parsed is None:
            raise UsageError(f"Failed to parse --keep-download= value: {value}")
        opts.keep_download = parsed
    elif name == "N":
        opts.keep_download = False
    elif name == "json":
        if value not in ("pretty", "short", "off"):
            raise UsageError(f"Unknown argument to --json= switch: {value}")
        opts.json = None if value == "off" else value
        if opts.json:
            opts.legend = False
    elif name == "j":
        opts.json = "pretty" if sys.stdout.isatty() else "short"
        opts.legend = False
    elif name == "detach":
        opts.detach = True
    elif name == "follow":
        opts.follow = True
    elif name == "max-addresses":
        assert value is not None
        if value == "all":
            opts.max_addresses = 2**32 - 1
        elif value.isdigit():
            opts.max_addresses = int(value)
        else:
            raise UsageError(f"Invalid number of addresses: {value}")
    return None


def parse_args(argv: list[str]) -> tuple[Options, list[str], str | None]:
    """(options, positional arguments, "help"/"version"/None)."""
    opts = Options()
    positional: list[str] = []
    special: str | None = None
    shell_verb = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in LONG:
                raise UsageError(f"{PROGRAM}: unrecognized option '--{name}'")
            takes = LONG[name][1]
            if takes and not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{PROGRAM}: option '--{name}' requires an argument")
                i += 1
                value = argv[i]
            elif not takes and eq:
                raise UsageError(f"{PROGRAM}: option '--{name}' doesn't allow an argument")
            special = _apply(opts, name, value if takes else None) or special
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                if letter not in SHORT:
                    raise UsageError(f"{PROGRAM}: invalid option -- '{letter}'")
                long = SHORT[letter]
                takes = SHORT_ARG[long] if long in SHORT_ARG else LONG[long][1]
                value = None
                if takes:
                    if j + 1 < len(arg):
                        value = arg[j + 1:]
                    elif i + 1 < len(argv):
                        i += 1
                        value = argv[i]
                    else:
                        raise UsageError(f"{PROGRAM}: option requires an argument -- '{letter}'")
                    j = len(arg)
                else:
                    j += 1
                special = _apply(opts, long, value) or special
        else:
            positional.append(arg)
            if len(positional) == 1 and arg == "shell":
                shell_verb = True
            elif shell_verb and len(positional) == 2:
                # Everything after the machine is the command to run there.
                positional.extend(argv[i + 1:])
                break
        i += 1
    return opts, positional, special


Verb = Callable[[Context, list[str]], Awaitable[int]]


@dataclass
class VerbSpec:
    min_args: int
    max_args: int | None
    run: Verb
    needs_bus: bool = True


def _kind(func: Callable[[Context, list[str], str], Awaitable[int]], kind: str) -> Verb:
    async def run(ctx: Context, args: list[str]) -> int:
        return await func(ctx, args, kind)

    return run


VERBS: dict[str, VerbSpec] = {
    "list": VerbSpec(0, 0, machines.list_machines),
    "status": VerbSpec(1, None, machines.status),
    "show": VerbSpec(0, None, machines.show),
    "shell": VerbSpec(0, None, shell.shell),
    "terminate": VerbSpec(1, None, machines.terminate),
    "kill": VerbSpec(1, None, machines.kill),
    "list-images": VerbSpec(0, 0, images.list_images),
    "image-status": VerbSpec(0, None, images.image_status),
    "show-image": VerbSpec(0, None, images.show_image),
    "clone": VerbSpec(2, 2, images.clone),
    "rename": VerbSpec(2, 2, images.rename),
    "read-only": VerbSpec(1, 2, images.read_only),
    "remove": VerbSpec(1, None, images.remove),
    "set-limit": VerbSpec(1, 2, images.set_limit),
    "clean": VerbSpec(0, 0, images.clean),
    "pull-tar": VerbSpec(1, 2, _kind(transfers.pull, "tar")),
    "pull-raw": VerbSpec(1, 2, _kind(transfers.pull, "raw")),
    "import-tar": VerbSpec(1, 2, _kind(transfers.import_file, "tar")),
    "import-raw": VerbSpec(1, 2, _kind(transfers.import_file, "raw")),
    "import-fs": VerbSpec(1, 2, transfers.import_fs),
    "export-tar": VerbSpec(1, 2, _kind(transfers.export, "tar")),
    "export-raw": VerbSpec(1, 2, _kind(transfers.export, "raw")),
    "list-transfers": VerbSpec(0, 0, transfers.list_transfers),
    "cancel-transfer": VerbSpec(1, None, transfers.cancel_transfer),
    "watch": VerbSpec(0, None, transfers.watch),
}


async def _run(spec: VerbSpec, opts: Options, args: list[str]) -> int:
    try:
        bus = Bus()
    except BusError as e:
        print(f"Failed to connect to bus: {e}", file=sys.stderr)
        return 1
    ctx = Context(opts, bus)
    try:
        rc = await spec.run(ctx, args)
        ctx.flush()
        return rc
    except BusError as e:
        ctx.flush()
        return ctx.error(f"Failed: {e}")
    finally:
        bus.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, positional, special = parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    if special == "help":
        sys.stdout.write(HELP)
        return 0
    if special == "version":
        print(f"{PROGRAM} {__version__}")
        return 0
    verb = positional[0] if positional else "list"
    args = positional[1:]
    if verb == "help":
        sys.stdout.write(HELP)
        return 0
    spec = VERBS.get(verb)
    if spec is None:
        print(f"Unknown command verb '{verb}'.", file=sys.stderr)
        return 1
    if len(args) < spec.min_args:
        print("Too few arguments.", file=sys.stderr)
        return 1
    if spec.max_args is not None and len(args) > spec.max_args:
        print("Too many arguments.", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(spec, opts, args))
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        # Output closed early (a pager that quit, "| head"): not an error of ours.
        try:
            sys.stdout.close()
        except BrokenPipeError:
            pass
        return 0
