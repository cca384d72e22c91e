"""Metadata of raw disk images (``.raw``) and block devices.

systemd dissects such an image: a GPT with a root partition (or, failing
that, a single generic Linux partition), an MBR with a single Linux
partition, or a bare file system.  It mounts the root file system read-only
in a private mount namespace and reads hostname, machine-id, machine-info and
os-release from it.

``read_raw_metadata()`` does the same in a child process started through
``unshare --mount --propagation private``: the child (``rawmeta.dissect``,
which also detaches its own mount namespace first) opens
the image read-only, parses the partition table itself, attaches read-only
loop devices (with autoclear, so a killed child leaks none), mounts them
``ro,nodev,nosuid,noexec``, reads the metadata, unmounts, detaches and prints
one JSON object on stdout.  Nothing is ever mounted in the caller's mount
namespace.  The image is untrusted input: every size, count and offset read
from it is bounded and checked before use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile

from imagepool import spawn
from imagepool.errors import MetadataError
from imagepool.metadata import ImageMetadata
from imagepool.rawmeta.dissect import metadata_from_json

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_raw_metadata(path: str, timeout: float = 60) -> ImageMetadata:
    """The metadata of the raw image or block device at PATH.

    Blocking: run it in a thread.  Raises MetadataError ("Failed to dissect
    image 'PATH': reason") when the image cannot be dissected or mounted, or
    the helper does not finish within TIMEOUT seconds (it is then killed)."""

    def fail(reason: str, code: int = errno.EIO) -> MetadataError:
        reason = " ".join(reason.split()) or "unknown error"
        return MetadataError(f"Failed to dissect image '{path}': {reason}", code)

    try:
        st = os.stat(path)
    except OSError as e:
        raise fail(e.strerror or str(e), e.errno or errno.EIO) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise fail("Not a regular file or block device", errno.EBADFD)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    mountpoint = tempfile.mkdtemp(prefix="machined-rawmeta-")
    argv = [
        shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "--",
        sys.executable, "-m", "imagepool.rawmeta",
        "--mountpoint", mountpoint, "--timeout", f"{timeout:g}", "--", path,
    ]
    try:
        try:
            with spawn.Child(argv, stdout=spawn.PIPE, env=env, name="rawmeta", timeout=timeout if math.isfinite(
                    timeout) else None, stderr_log=lambda line: None) as child:
                out = child.communicate()
                returncode = child.returncode
                errlines = child.tail
        except spawn.Timeout:
            raise fail(f"Timed out after {timeout:g} s", errno.ETIMEDOUT) from None
        except OSError as e:
            raise fail(f"Failed to start helper: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)
    assert returncode is not None

    result = None
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            break
    if returncode == 0 and isinstance(result, dict) and "error" not in result:
        try:
            return metadata_from_json(result)
        except ValueError as e:
            raise fail(f"Malformed helper output: {e}") from None
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        code = result.get("errno")
        raise fail(result["error"], code if isinstance(code, int) and 0 < code < 4096 else errno.EIO)
    if errlines:
        raise fail(errlines[-1])
    if returncode < 0:
        raise fail(f"Helper killed by signal {signal.Signals(-returncode).name}")
    raise fail(f"Helper failed with exit status {returncode}")
