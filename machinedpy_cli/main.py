"""Command line: the help, the verbs and their numbers of arguments, exit
status (the options are in ``options``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from machinedpy_cli import __version__, images, machines, shell, transfer_views, transfers
from machinedpy_cli.bus import Bus, BusError
from machinedpy_cli.context import PROGRAM, Context, Options
from machinedpy_cli.options import JSON_MODES, OUTPUT_MODES, UsageError, parse_args

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
  -o --output=MODE            json, json-pretty, json-sse, json-seq: JSON
                              output, as --json (other journal modes are
                              accepted, as machinectl has them)
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
                              default machine; list-images with it lists
                              that class as importctl does
  -m -S -C                    Same as --class=machine, sysext, confext
     --keep-download=BOOL     Keep a pristine copy of a download (default: yes
                              for machine images)
  -N                          Same as --keep-download=no
     --max-addresses=N        Number of internet addresses to show at most
     --detach                 Start the transfer, print its id and return
     --follow                 With list-transfers: the same as watch
"""



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
    "list-transfers": VerbSpec(0, 0, transfer_views.list_transfers),
    "cancel-transfer": VerbSpec(1, None, transfer_views.cancel_transfer),
    "watch": VerbSpec(0, None, transfer_views.watch),
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
    if special in ("output-help", "json-help"):
        sys.stdout.write("".join(m + "\n" for m in (OUTPUT_MODES if special == "output-help" else JSON_MODES)))
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
