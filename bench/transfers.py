"""What bench/import.py and bench/pull.py share: one timed machinectl
transfer against one daemon, the rows that compare the runs of ours with
each reference and with the machine's limit, their tables and goals.

``run_transfer(ctx, who, args, warm_path, timeout, label)``: start WHO's
importd (``Daemons.start``; ``ensure`` again right before the command, as
importd 262 exits after 30 s idle), ``cat`` the input into the page cache,
time ``machinectl ARGS`` as a whole command (it returns once the transfer
has finished) while ``Daemons.measure()`` samples the daemon and its
children, syncfs() the pool (how long the written data takes to reach the
disk after machinectl returned: "ratio+sync"), stop the daemon.

``summarize(results, who, out_bytes)``: per participant the stats of the
successful runs' seconds (and seconds + sync), MB/s of output, median CPU
seconds, peak VmHWM of the daemon, peak VmHWM of its children per command
name; per reference the ratios ours/reference (median, min, with sync,
CPU); and the limit: its median and ours as a percentage of it.
"""

from __future__ import annotations

import os
import sys

from common import (
    MB,
    POOL,
    fmt,
    goal,
    machinectl,
    median,
    merge_max,
    note,
    print_table,
    ratio,
    stats,
    syncfs,
    verdict,
    warm,
)
from daemons import LABELS, OURS, REF252, REF262, block_order
from limits import describe

LIMIT = "limit"
LIMIT_GOAL_PCT = 85.0
PREFIX = {REF252: "reference", REF262: "reference_262"}
SUFFIX = {REF252: "", REF262: "_262"}


def add_transfer_args(ap, what: str) -> None:
    """The options bench/import.py and bench/pull.py share (WHAT: "imports" or "pulls")."""
    from daemons import SidRoot
    from inputs import RAW_SIZE

    ap.add_argument("--cache", help="where the inputs are kept (default: /var/tmp/importd-bench, or "
                                    "/var/tmp/importd-bench-<raw>m-<tar>t for other sizes)")
    ap.add_argument("--regen", action="store_true", help="generate the inputs again")
    ap.add_argument("--raw-mib", type=int, default=RAW_SIZE >> 20,
                    help="size of the raw disk image in MiB, a multiple of 8 (default %(default)s)")
    ap.add_argument("--tar-mib", type=int, help="about this many MiB of the rootfs tar (default: all, ~200 MB)")
    ap.add_argument("--gen-wait", type=float, default=2400,
                    help="how long to wait for another process generating into the cache (s, default %(default)s)")
    ap.add_argument("--no-limit", action="store_true", help="do not measure the machine's limit")
    ap.add_argument("--sid-root", default=str(SidRoot().link),
                    help="the sid root of systemd 262 (default %(default)s)")
    ap.add_argument("--profile", metavar="DIR",
                    help=f"py-spy our importd during its {what} (stacks, flame graph, top list in DIR)")


def run_transfer(ctx: dict, who: str, args: list[str], warm_path, timeout: float, label: str | None
                 ) -> tuple[dict, object, list[dict]]:
    """(result, CompletedProcess or None if it timed out, process snapshot if it did)."""
    daemons = ctx["daemons"]
    daemons.start(who)
    warm(warm_path)
    pid = daemons.ensure(who)
    usage = daemons.measure()
    load = os.getloadavg()[0]
    profiler = ctx["profiler"]
    profiling = who == OURS and profiler.binary is not None and label is not None
    if profiling:
        profiler.start(pid, label)
    snap: list[dict] = []
    try:
        dt, p = machinectl(ctx["env"], *args, timeout=timeout)
        if p is None:
            snap = daemons.snapshot()
    finally:
        u = usage.finish()
        profiler.stop()
    res: dict = {"who": who, "seconds": round(dt, 3), "rc": None if p is None else p.returncode,
                 "loadavg_1m": round(load, 2), "profiled": profiling, "hung": p is None}
    if p is not None:
        res["sync_after_s"] = round(syncfs(POOL), 3)
    res.update({k: u[k] for k in ("daemon_hwm_mb", "children_hwm_mb", "children_rss_peak_mb")})
    if "cpu_seconds" in u:
        res["cpu_seconds"] = u["cpu_seconds"]
    res["daemon_alive"] = u["alive"]
    return res, p, snap


def alternate(tag: str, spec: dict, who_all: list[str], runs: int, with_limit: bool, limit_fn, daemon_fn,
              extra=lambda res: "") -> tuple[list[dict], list[str]]:
    """RUNS rounds of the participants (WHO_ALL that can do SPEC, and the
    limit), the order reversed every round; LIMIT_FN(r) and DAEMON_FN(who, r,
    results so far) measure one turn.  Returns (results, participants)."""
    who = [w for w in who_all if w != REF252 or spec["ref252"]] + ([LIMIT] if with_limit else [])
    results: list[dict] = []
    for r in range(runs):
        for w in block_order(r, who):
            if w == LIMIT:
                res = limit_fn(r)
                note(f"{tag} run {r + 1} limit: {fmt(res['seconds'])} s {res['parts']}")
            else:
                res = daemon_fn(w, r, results)
                ch = ", ".join(f"{k} {v:.0f}" for k, v in sorted(res["children_hwm_mb"].items()))
                note(f"{tag} run {r + 1} {LABELS[w]}: {res['seconds']:.2f} s"
                     f"{' HUNG' if res.get('hung') else '' if res['ok'] else ' FAILED'}, "
                     f"cpu {res.get('cpu_seconds', '-')} s, daemon HWM {res['daemon_hwm_mb']:.0f} MB"
                     f"{', children ' + ch + ' MB' if ch else ''}, load {res['loadavg_1m']}{extra(res)}")
            results.append(res)
    return results, who


def row_note(tag: str, row: dict) -> None:
    lim = row.get("limit") or {}
    note(f"{tag}: ours {fmt(row['ours'].get('median'))} s, 252 {fmt(row['reference'].get('median'))} s "
         f"(ratio {fmt(row['ratio'])}), 262 {fmt(row['reference_262'].get('median'))} s (ratio "
         f"{fmt(row['ratio_262'])}), limit {fmt((lim.get('stats') or {}).get('median'))} s "
         f"({fmt(lim.get('ours_pct_of_limit'), '.0f')}%), {verdict(row['pass'])}")


def summarize(results: list[dict], who: list[str], out_bytes: int) -> dict:
    """The comparison of ours with each reference in WHO and with the limit (see the module docstring)."""
    def of(w: str) -> list[dict]:
        return [x for x in results if x["who"] == w]

    def cpu(xs: list[dict]) -> float | None:
        return median([x["cpu_seconds"] for x in xs if "cpu_seconds" in x and x["ok"]])

    per: dict[str, dict] = {}
    for w in who:
        xs = of(w)
        s = stats([x["seconds"] for x in xs if x["ok"]])
        s_sync = stats([x["seconds"] + x.get("sync_after_s", 0) for x in xs if x["ok"]])
        per[w] = {"stats": s, "with_sync": s_sync, "mbps": out_bytes / MB / s["median"] if s.get("median") else None,
                  "cpu_s": cpu(xs), "daemon_hwm_mb": max((x["daemon_hwm_mb"] for x in xs), default=None),
                  "children_hwm_mb": merge_max([x["children_hwm_mb"] for x in xs])}
    o = per[OURS]
    row: dict = {"ours": o["stats"], "ours_with_sync": o["with_sync"], "ours_mbps": o["mbps"],
                 "ours_cpu_s": o["cpu_s"], "ours_daemon_hwm_mb": o["daemon_hwm_mb"],
                 "ours_children_hwm_mb": o["children_hwm_mb"], "against": {}}
    for ref in (REF252, REF262):
        r = per.get(ref, {"stats": {"n": 0}, "with_sync": {"n": 0}, "mbps": None, "cpu_s": None,
                          "daemon_hwm_mb": None, "children_hwm_mb": {}})
        a = {"reference": r["stats"], "reference_with_sync": r["with_sync"],
             "ratio": ratio(o["stats"].get("median"), r["stats"].get("median")),
             "ratio_min": ratio(o["stats"].get("min"), r["stats"].get("min")),
             "ratio_with_sync": ratio(o["with_sync"].get("median"), r["with_sync"].get("median")),
             "reference_mbps": r["mbps"], "reference_cpu_s": r["cpu_s"],
             "ratio_cpu": ratio(o["cpu_s"], r["cpu_s"]),
             "reference_daemon_hwm_mb": r["daemon_hwm_mb"], "reference_children_hwm_mb": r["children_hwm_mb"]}
        row["against"][ref] = a
        p = PREFIX[ref]
        row.update({p: a["reference"], f"{p}_with_sync": a["reference_with_sync"], f"ratio{SUFFIX[ref]}": a["ratio"],
                    f"ratio_min{SUFFIX[ref]}": a["ratio_min"], f"ratio_with_sync{SUFFIX[ref]}": a["ratio_with_sync"],
                    f"{p}_mbps": a["reference_mbps"], f"{p}_cpu_s": a["reference_cpu_s"],
                    f"ratio_cpu{SUFFIX[ref]}": a["ratio_cpu"], f"{p}_daemon_hwm_mb": a["reference_daemon_hwm_mb"],
                    f"{p}_children_hwm_mb": a["reference_children_hwm_mb"]})
    lim = [x for x in results if x["who"] == LIMIT]
    if lim:
        ls = stats([x["seconds"] for x in lim if x["ok"]])
        parts: dict[str, float] = {}
        for name in {n for x in lim for n in x.get("parts", {})}:
            parts[name] = median([x["parts"][name] for x in lim if name in x.get("parts", {})])
        # Each limit ends with a sync: ours with the sync after machinectl returned.
        ours = o["with_sync"].get("median")
        pct = 100 * ls["median"] / ours if ls.get("median") and ours else None
        row["limit"] = {"stats": ls, "parts_median_s": parts, "mbps": out_bytes / MB / ls["median"]
                        if ls.get("median") else None, "ours_pct_of_limit": pct,
                        "pass": None if pct is None else pct >= LIMIT_GOAL_PCT}
    row["profiled"] = any(x.get("profiled") for x in of(OURS))
    return row


def judge(row: dict, limit_ratio: float, refs: list[str], mbps: float | None = None) -> None:
    """Sets row["pass"] (and per reference row["against"][ref]["pass"]): the
    ratio to every reference that ran <= LIMIT_RATIO; and MBPS if given."""
    verdicts = []
    for ref in (REF252, REF262):
        a = row["against"][ref]
        a["pass"] = None if (ref not in refs or a["ratio"] is None) else a["ratio"] <= limit_ratio
        if ref in refs:
            verdicts.append(a["pass"])
    row["target"] = {"kind": "ratio", "limit": limit_ratio, "mbps": mbps}
    row["target_text"] = f"ratio <= {limit_ratio:.1f}"
    if mbps is not None:
        ok = row["ours_mbps"] is not None and row["ours_mbps"] >= mbps
        row["mbps_pass"] = ok
        verdicts.append(ok)
        row["target_text"] += f", >= {mbps:.0f} MB/s"
    row["refs"] = [r for r in refs]
    ran = [v for v in verdicts if v is not None]
    row["pass"] = all(ran) if ran else None


def print_against(rows: list[dict], ref: str, lead: list[tuple[str, str]], tail: list[tuple[str, object]],
                  out=sys.stdout) -> None:
    """The table of ROWS against REF; LEAD: (header, row key) columns first;
    TAIL: (header, fn(row)) columns before the target."""
    head = (*[h for h, _ in lead], "ours s", "ref s", "ratio", "ours MB/s", "ref MB/s", "ratio+sync", "ratio min",
            "ours CPU s", "ref CPU s", "CPU ratio", "ours RSS MB", "ours children MB", "ref children MB",
            *[h for h, _ in tail], "target", "result")
    lines = []
    for r in rows:
        a = r["against"][ref]
        lines.append((
            *[r[k] for _, k in lead],
            fmt(r["ours"].get("median")), fmt(a["reference"].get("median")), fmt(a["ratio"], ".2f", "x"),
            fmt(r["ours_mbps"], ".0f"), fmt(a["reference_mbps"], ".0f"), fmt(a["ratio_with_sync"], ".2f", "x"),
            fmt(a["ratio_min"], ".2f", "x"), fmt(r["ours_cpu_s"], ".1f"), fmt(a["reference_cpu_s"], ".1f"),
            fmt(a["ratio_cpu"], ".2f", "x"), fmt(r["ours_daemon_hwm_mb"], ".0f"),
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(r["ours_children_hwm_mb"].items())) or "-",
            ",".join(f"{k}:{v:.0f}" for k, v in sorted(a["reference_children_hwm_mb"].items())) or "-",
            *[fn(r) for _, fn in tail],
            r["target_text"] if a["reference"].get("n") else "-",
            (verdict(a.get("pass")) if a["reference"].get("n") else "n/a")
            + (" (profiled)" if r["profiled"] else ""),
        ))
    n = len(lead)
    left = (*range(n), n + 11, n + 12, len(head) - 2, len(head) - 1)
    print_table(head, lines, left=left, out=out)


def print_tables(rows: list[dict], refs: list[str], titles: dict[str, str], lead: list[tuple[str, str]],
                 tail=lambda ref: [], out=sys.stdout) -> None:
    """One table per reference in REFS (titled TITLES[ref]), then the limits."""
    for ref in refs:
        print(file=out)
        print(f"against {LABELS[ref]} ({titles[ref]}):", file=out)
        print_against([r for r in rows if ref in r["refs"]], ref, lead, tail(ref), out)
    if any(r.get("limit") for r in rows):
        print(file=out)
        print("the machine's limit (standard tools doing the same work here, median; ours % = limit / ours):",
              file=out)
        print_limits(rows, lead[:1] if lead and lead[-1][0] == "verify" else lead, out)


def print_limits(rows: list[dict], lead: list[tuple[str, str]], out=sys.stdout) -> None:
    """Our time as a percentage of the machine's limit (100% = as fast as the tools)."""
    head = (*[h for h, _ in lead], "limit tools", "parts (median s)", "limit s", "limit MB/s",
            "ours+sync s", "ours % of limit", "goal", "result")
    lines = []
    for r in rows:
        lim = r.get("limit")
        if not lim:
            continue
        parts = sorted(lim["parts_median_s"].items())
        lines.append((*[r[k] for _, k in lead], describe(r["input"]),
                      ", ".join(f"{k} {v:.2f}" for k, v in parts if v is not None) or "-",
                      fmt(lim["stats"].get("median")), fmt(lim["mbps"], ".0f"),
                      fmt(r["ours_with_sync"].get("median")), fmt(lim["ours_pct_of_limit"], ".0f", "%"),
                      f">= {LIMIT_GOAL_PCT:.0f}%", verdict(lim["pass"])))
    if lines:
        n = len(lead)
        print_table(head, lines, left=(*range(n), n, n + 1, len(head) - 2, len(head) - 1), out=out)


def transfer_goals(rows: list[dict], what: str, lead: list[str]) -> list[dict]:
    """Goal rows: each input against each reference, against the limit, and the MB/s target."""
    goals = []
    for r in rows:
        name = f"{what} {' '.join(str(r[k]) for k in lead)}"
        lim_ratio = r["target"]["limit"]
        for ref in r.get("refs", []):
            a = r["against"][ref]
            if a["ratio"] is None:
                goals.append(goal(f"{name} <= {lim_ratio:.1f}x {LABELS[ref]}", "no successful run",
                                  f"<= {lim_ratio:.1f}x", None))
                continue
            goals.append(goal(f"{name} <= {lim_ratio:.1f}x {LABELS[ref]}", fmt(a["ratio"], ".2f", "x"),
                              f"<= {lim_ratio:.1f}x", a["pass"]))
        lim = r.get("limit")
        if lim:
            goals.append(goal(f"{name} >= {LIMIT_GOAL_PCT:.0f}% of the limit ({describe(r['input'])})",
                              fmt(lim["ours_pct_of_limit"], ".0f", "%"), f">= {LIMIT_GOAL_PCT:.0f}%", lim["pass"]))
        if r["target"].get("mbps") is not None:
            goals.append(goal(f"{name} output rate", fmt(r["ours_mbps"], ".0f", " MB/s"),
                              f">= {r['target']['mbps']:.0f} MB/s", r.get("mbps_pass")))
    return goals
