"""Where systemd 262 answers differently from 252, we answer as 262 does
(tests/test_clients_262.py and tests/test_varlink_*.py compare those answers
with 262's own daemons).  The differential tests against 252 turn 252's
answers into 262's with the functions here, one per documented change, so
that they still catch every other difference:

- hidden images are read-only;
- .host is read-only (and has the birth time of "/" as its creation time:
  0 on this host, which 252 reports too);
- a subvolume has a modification time (its root item's last change);
- a failed rename says "Failed to rename image: ..." after machinectl's words;
- PullTar and PullRaw (the methods of machinectl 252) keep no copy of the
  download: importctl asks for that with PullTarEx/PullRawEx;
- when polkit wants an authentication the caller did not allow, the message
  is no longer "Interactive authentication required." but 262's longer one.
"""

from __future__ import annotations

import re

_TABLE_HEADER = re.compile(r"^NAME\s+TYPE\s+RO\s+USAGE\s+CREATED\s+MODIFIED\s*$")


def _collapse(line: str) -> str:
    return re.sub(r" {2,}", " ", line).rstrip()


def machinectl_output(text: str, *, ours: bool) -> str:
    """A normalized ``$ machinectl ...`` block (tests.imagetree.normalize) as
    262 would print it (for 252's output), and with table columns reduced to
    single spaces (their widths follow the values)."""
    lines = text.splitlines()
    out: list[str] = []
    in_table = bool(lines) and "--no-legend" in lines[0] and "list-images" in lines[0]
    status_name = None
    status_type = None
    for i, line in enumerate(lines):
        if _TABLE_HEADER.match(line):
            in_table = True
            out.append(_collapse(line))
            continue
        if in_table and line.strip() and not line.startswith(("rc=", "$ ")) and "images listed" not in line:
            cells = _collapse(line).split(" ")
            if not ours and len(cells) >= 4:
                if cells[0].startswith("."):
                    cells[2] = "yes"
                if cells[1] == "subvolume" and cells[-1] == "-":
                    cells[-1] = "TIME"
            out.append(" ".join(cells))
            continue
        if not line.strip():
            in_table = False
        if not ours:
            line = _as_262(line, lines, i)
            if i == 1 and lines[0].startswith("$ machinectl image-status") and line and not line.startswith("\t"):
                status_name = line.strip()
            if line.strip().startswith("Type: "):
                status_type = line.split(":", 1)[1].strip()
            if status_name is not None and status_name.startswith(".") and line.strip() == "RO: writable":
                line = line.replace("writable", "read-only")
            if line.startswith("ReadOnly=") and _show_name(lines).startswith("."):
                line = "ReadOnly=yes"
        out.append(line)
        if not ours and line.strip().startswith("Created: ") and status_type == "subvolume":
            out.append("\tModified: TIME; AGO")
        if not ours and line.startswith("CreationTimestamp=") and _show_type(lines) == "subvolume":
            out.append("ModificationTimestamp=TIME")
    return "\n".join(out)


def _show_name(lines: list[str]) -> str:
    return next((line[5:] for line in lines if line.startswith("Name=")), "")


def _show_type(lines: list[str]) -> str:
    return next((line[5:] for line in lines if line.startswith("Type=")), "")


def _as_262(line: str, lines: list[str], i: int) -> str:
    if line.startswith("Could not rename image: ") and not line.startswith("Could not rename image: Failed"):
        reason = line[len("Could not rename image: "):]
        refusals = ("Access denied", INTERACTIVE_252, INTERACTIVE_262)  # polkit's, before the rename
        if reason and reason[0].isupper() and "'" not in reason and reason not in refusals:  # an errno
            return f"Could not rename image: Failed to rename image: {reason}"
    return line


# --- D-Bus --------------------------------------------------------------------------

_PROPERTIES = ["Name", "Path", "Type", "ReadOnly", "CreationTimestamp", "ModificationTimestamp"]


def image_rows(listing: dict[str, list], *, ours: bool) -> dict[str, list]:
    """ListImages rows (name, type, read-only, crtime, mtime, usage, path) as
    262 has them (for 252's), with the modification time of subvolumes left
    out (it moves with every transaction of the subvolume)."""
    rows = {}
    for name, row in listing.items():
        row = list(row)
        if not ours and name.startswith("."):
            row[2] = True
        if row[1] == "subvolume":
            row[4] = "changes"
        rows[name] = row
    return rows


def image_properties(properties: dict[str, list], *, ours: bool) -> dict[str, list]:
    """The Image properties (tests.test_discovery.IMAGE_PROPERTIES) likewise."""
    result = {}
    for name, values in properties.items():
        values = list(values)
        if not ours and name.startswith("."):
            values[_PROPERTIES.index("ReadOnly")] = True
        if values[_PROPERTIES.index("Type")] == "subvolume":
            values[_PROPERTIES.index("ModificationTimestamp")] = "changes"
        result[name] = values
    return result


# --- transfers ------------------------------------------------------------------------

_SIZE_DOT_ZERO = re.compile(r"\b(\d+)\.0([KMGTPE])\b")


def transfer_output(text: str, *, ours: bool) -> str:
    """The log lines of a transfer (machinectl's or importctl's output) as
    systemd 262's importd writes them, for 252's:

    - sizes without a ".0" below the point ("Wrote 64M.");
    - "Operating on image directory '<pool>'." after "Pulling"/"Importing";
    - "Failed to retrieve image file. (Wrong URL?)";
    - no "Pulling ..." line before "Image 'NAME' already exists." (262
      checks that first);
    - with machinectl's PullTar/PullRaw, no "Image already downloaded": 262
      keeps no copy of those downloads, so there is no cache to hit.
    """
    if ours:
        return text
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        line = _SIZE_DOT_ZERO.sub(r"\1\2", line)
        if line.startswith("Image already downloaded. Skipping download."):
            continue
        if line == "Failed to retrieve image file.":
            line = "Failed to retrieve image file. (Wrong URL?)"
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("Pulling '") and following.startswith("Image '") and following.endswith("already exists."):
            continue
        out.append(line)
        if line.startswith(("Pulling '", "Importing '")) and " saving as '" in line:
            out.append("Operating on image directory '/var/lib/machines'.")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


INTERACTIVE_252 = "Interactive authentication required."
INTERACTIVE_262 = ("Access denied as the requested operation requires interactive authentication. However, "
                   "interactive authentication has not been enabled by the calling program.")


def interactive_auth_message(text: str) -> str:
    """252's answer to a caller polkit wants to authenticate, as 262 words it."""
    return text.replace(INTERACTIVE_252, INTERACTIVE_262)
