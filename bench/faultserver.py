"""The fault-injecting HTTP server of the tests (tests/httpserver.py) as a
process of its own, for the load test of bench/pull.py:

    python bench/faultserver.py ROOT FAULTS.json

serves the files below ROOT on 127.0.0.1 at a free port, with the faults of
FAULTS.json ({"path": {"drop_after": N, "drop_times": 1}, ...}: the
connection reset once after N bytes of the body), prints the port on a line
of its own, and serves until its stdin is closed (or SIGTERM).  Then it
prints one line of JSON, {"path": {"gets": n, "drops": n}} for every path
asked for, and stops every connection thread.  In a process of its own so
that its threads do not compete for the GIL with the benchmark's prober.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.httpserver import Fault, TestServer  # noqa: E402


def main() -> int:
    root, faults = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    def on_term(*_):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    srv = TestServer(root).start()
    try:
        for path, f in faults.items():
            srv.faults[path] = Fault(**f)
        print(srv.port, flush=True)
        try:
            sys.stdin.read()
        except (OSError, ValueError):
            pass
    finally:
        srv.stop()
    paths = sorted({r.path.lstrip("/") for r in srv.requests})
    print(json.dumps({p: {"gets": srv.count(p), "drops": srv.faults[p].drops if p in srv.faults else 0}
                      for p in paths}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
