"""Options, anywhere on the line (as getopt_long permutes them; for
``shell`` only before the machine name), as machinectl and importctl 262
parse them, with their messages."""

from __future__ import annotations

import os
import signal
import sys

from machinedpy_cli import names
from machinedpy_cli.context import PROGRAM, Options
from machinedpy_cli.images import parse_boolean

# -o/--output: machinectl's journal output modes; the JSON ones also format its tables.
OUTPUT_MODES = ("short", "short-full", "short-iso", "short-iso-precise", "short-precise", "short-monotonic",
                "short-delta", "short-unix", "verbose", "export", "json", "json-pretty", "json-sse", "json-seq", "cat",
                "with-unit")
JSON_MODES = ("pretty", "short", "off")
JSON_OUTPUT = {"json": "short", "json-pretty": "pretty", "json-sse": "sse", "json-seq": "seq"}


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
    "output": ("o", True),
}
SHORT = {short: long for long, (short, _arg) in LONG.items() if short}
SHORT.update({"P": "P", "N": "N", "j": "j", "m": "m", "S": "S", "C": "C"})
SHORT_ARG = {"P": True, "N": False, "j": False, "m": False, "S": False, "C": False}


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


# Options that set an attribute of Options to a constant, or to their argument (None).
SWITCHES: dict[str, tuple[str, object]] = {
    "all": ("all", True), "value": ("value", True), "full": ("full", True), "no-pager": ("pager", False),
    "no-legend": ("legend", False), "no-ask-password": ("ask_password", False), "quiet": ("quiet", True),
    "read-only": ("read_only", True), "force": ("force", True), "N": ("keep_download", False),
    "detach": ("detach", True), "follow": ("follow", True), "kill-whom": ("kill_whom", None), "uid": ("uid", None),
    # importctl's -m, -S, -C (its -P, --class=portable, is machinectl's -P here).
    "m": ("image_class", "machine"), "S": ("image_class", "sysext"), "C": ("image_class", "confext"),
}
# Options whose argument is one of a few words: (attribute, the words, the message for another).
CHOICES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "verify": ("verify", ("no", "checksum", "signature"), "Failed to parse --verify= setting: {}"),
    "format": ("format", names.FORMATS, "Unknown format: {}"),
    "class": ("image_class", names.CLASSES, "Failed to parse --class= parameter: {}"),
}


def _apply(opts: Options, name: str, value: str | None) -> str | None:
    """Apply one option; returns "help", "version", "output-help" or
    "json-help" for those."""
    if name in ("help", "version"):
        return name
    if name in SWITCHES:
        attr, constant = SWITCHES[name]
        setattr(opts, attr, value if constant is None else constant)
    elif name in CHOICES:
        attr, words, message = CHOICES[name]
        if value not in words:
            raise UsageError(message.format(value))
        setattr(opts, attr, value)
    elif name == "property":
        assert value is not None
        opts.properties.extend(p for p in value.split(",") if p)
    elif name == "P":
        assert value is not None
        opts.properties.append(value)
        opts.value = True
    elif name == "signal":
        assert value is not None
        opts.signal = parse_signal(value)
    elif name == "setenv":
        assert value is not None
        if "=" not in value:
            if value not in os.environ:
                return None
            value = f"{value}={os.environ[value]}"
        key = value.split("=", 1)[0]
        opts.setenv = [e for e in opts.setenv if e.split("=", 1)[0] != key] + [value]
    elif name == "keep-download":
        assert value is not None
        parsed = parse_boolean(value)
        if parsed is None:
            raise UsageError(f"Failed to parse --keep-download= value: {value}")
        opts.keep_download = parsed
    elif name == "json":
        if value == "help":
            return "json-help"
        if value not in JSON_MODES:
            raise UsageError(f"Unknown argument to --json= switch: {value}")
        opts.json = None if value == "off" else value
        opts.legend = False                     # importctl's: with --json=off too
    elif name == "j":
        opts.json = "pretty" if sys.stdout.isatty() else "short"
        opts.legend = False
    elif name == "output":
        if value == "help":
            return "output-help"
        if value not in OUTPUT_MODES:
            raise UsageError(f"Unknown output '{value}'.")
        if value in JSON_OUTPUT:
            opts.json = JSON_OUTPUT[value]
            opts.legend = False
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

