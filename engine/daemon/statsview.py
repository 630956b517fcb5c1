"""`luaprobe stats [--json]`: a top-like view of a supervised run, refreshed every second.

Reads the fast path's snapshot (``<run>/stats.json``, via the supervisor when it answers) and adds, per
process (supervisor, fast path, capture, store, async workers), psutil's CPU %, RSS, threads, context
switches and I/O.  Packets/s and bits/s come from consecutive snapshots.  Uses rich when installed,
else plain text.  ``--json`` prints one snapshot: the fast path's counters unchanged at the top level,
plus ``rates``, ``status`` and ``process_info``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import psutil

from luaprobe.engine.daemon import control
from luaprobe.shm.exits import EXIT_NOT_RUNNING, EXIT_OK

_PS: dict[int, psutil.Process] = {}      # kept between refreshes so cpu_percent() measures an interval


def process_info(pids: dict, prime_s: float = 0.2) -> list[dict]:
    """psutil facts for {role: pid or [pids]}.  CPU % is measured over the time since the previous call; a
    process seen for the first time is measured over ``prime_s`` seconds first (psutil says 0.0 otherwise)."""
    rows = []
    new = []
    for v in pids.values():
        for pid in (v if isinstance(v, list) else [v]):
            if pid and pid not in _PS:
                try:
                    _PS[pid] = psutil.Process(pid)
                    _PS[pid].cpu_percent()
                    new.append(pid)
                except psutil.Error:
                    pass
    if new and prime_s > 0:
        time.sleep(prime_s)
    for role, v in pids.items():
        for pid in (v if isinstance(v, list) else [v]):
            if not pid:
                continue
            try:
                p = _PS.get(pid) or _PS.setdefault(pid, psutil.Process(pid))
                with p.oneshot():
                    cs, ct = p.num_ctx_switches(), p.cpu_times()
                    cpu = p.cpu_percent() if pid not in new or prime_s > 0 else None   # None: not measured yet
                    row = {"role": role, "pid": pid, "cpu_percent": cpu, "rss": p.memory_info().rss,
                           "cpu_user_s": ct.user, "cpu_system_s": ct.system,
                           "threads": p.num_threads(), "ctx_voluntary": cs.voluntary,
                           "ctx_involuntary": cs.involuntary}
                    try:
                        io = p.io_counters()
                        row.update(read_bytes=io.read_bytes, write_bytes=io.write_bytes)
                    except (psutil.AccessDenied, AttributeError):
                        pass
            except psutil.Error:
                continue
            rows.append(row)
    return rows


def snapshot_file(run_dir: str) -> dict | None:
    """The fast path's last snapshot as the supervisor wrote it (``run_dir``/stats.json, rewritten whole every [stats]
    interval), or None when it is missing or unreadable, or not what a supervisor writes: not a JSON object, a
    ``time`` that is not a number, ``processes`` that is not an object (a hand-edited file).  A damaged file is passed
    over as a missing one (the supervisor's next write replaces it); `stats` gave a traceback on it."""
    snap = control.read_json(control.path(run_dir, control.STATS))
    if not isinstance(snap, dict) or isinstance(snap.get("time", 0), bool) \
            or not isinstance(snap.get("time", 0), (int, float)) or not isinstance(snap.get("processes", {}), dict):
        return None
    return snap


def collect(run_dir: str, prime_s: float = 0.2) -> dict:
    """One snapshot: the fast path's counters, rates, supervisor status, per-process psutil facts."""
    try:
        r = control.request(run_dir, "stats")      # 10 s, as status: a busy supervisor (killing a tree) answers late
        snap, rates, status = r.get("snapshot"), r.get("rates") or {}, r.get("status") or {}
        live = True
    except control.NotRunning:
        snap, rates, live = None, {}, False
        status = control.read_state(run_dir) or {"state": "stopped"}
    fresh = snapshot_file(run_dir)
    if fresh is not None and (snap is None or fresh.get("time", 0) >= snap.get("time", 0)):
        if snap is None or fresh.get("processes", {}).get("fastpath") == snap.get("processes", {}).get("fastpath"):
            snap = fresh                         # the file may be newer than the supervisor's last poll
    out = dict(snap or {})
    pids = dict(status.get("processes", {})) if live else {}
    out.update(rates=rates, status={k: status.get(k) for k in ("state", "restarts", "reloads", "last_exit",
                                                               "source", "supervisor_pid", "fastpath_pid")},
               process_info=process_info(pids, prime_s), live=live)
    return out


def _rate(prev: dict | None, cur: dict, key: str, mult: float = 1.0):
    if not prev or not cur.get("time") or cur.get("processes", {}).get("fastpath") != \
            prev.get("processes", {}).get("fastpath"):
        return None
    dt = cur["time"] - prev["time"]
    if dt <= 0:
        return None
    return (cur.get(key, 0) - prev.get(key, 0)) * mult / dt


def _h(n, unit="") -> str:
    if n is None:
        return "-"
    for s in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{s}{unit}" if s or isinstance(n, float) else f"{n}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def _mb(n) -> str:
    return f"{n / 1048576:.1f} MiB" if n is not None else "-"


def instance_name(p: dict) -> str:
    """The "instance" cell of a plug-in row: ``<file name>#<instance>`` (``@<shard>`` in a sharded run), whole.
    Never cut to fit a width: two instances whose names share a prefix (``window_report.lua#0`` and ``#1``,
    two long file names) would read the same.  Control characters are escaped as in the log tags (tag_text)."""
    from luaprobe.shm.logs import tag_text
    return f"{tag_text(os.path.basename(str(p['plugin'])))}#{tag_text(str(p['instance']))}" + \
        (f"@{p['shard']}" if "shard" in p else "")


def tables(cur: dict, prev: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each section; rendered by rich or as text."""
    st = cur.get("status", {})
    rates = cur.get("rates") or {}
    pps = _rate(prev, cur, "packets")
    pps = rates.get("packets_per_s") if pps is None else pps
    bps = _rate(prev, cur, "bytes", 8)
    bps = rates.get("bits_per_s") if bps is None else bps
    ring = cur.get("rings", {}).get("packet", {})
    fill = f"{100 * ring['bytes'] / ring['capacity']:.0f}%" if ring.get("capacity") else "-"
    if ring.get("capacity") and cur.get("source_kind") != "live":
        fill += " (file source: waits, no loss)"
    d = cur.get("drops", {})
    out = [("source", ["state", "source", "restarts"],
            [[str(st.get("state")), str(st.get("source")), str(st.get("restarts", 0))]]),
           ("traffic", ["packets", "packets/s", "bits/s", "flows live", "packet ring fill"],
            [[_h(cur.get("packets")), _h(pps), _h(bps, "b/s"), _h(cur.get("flows_live")), fill]]),
           ("drops", [k.replace("_", " ") for k in d] or ["drops"], [[_h(v) for v in d.values()] or ["-"]])]
    if cur.get("shards"):                  # a sharded probe: the row above is the total
        out.append(("shards", ["shard", "pid", "restarts", "packets", "bytes", "flows", "flows live", "ring",
                               "drops"],
                    [[str(s["shard"]), str(s.get("pid")), str(s.get("restarts", 0)), _h(s.get("packets")),
                      _h(s.get("bytes"), "B"), _h(s.get("flows")), _h(s.get("flows_live")),
                      _h(s.get("rings", {}).get("packet", {}).get("bytes"), "B"),
                      _h(sum(v or 0 for v in s.get("drops", {}).values()))] for s in cur["shards"]]))
    out.append(("processes", ["role", "pid", "cpu %", "rss", "thr", "ctx vol/inv", "read", "written"],
                [[r["role"], str(r["pid"]), "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.1f}", _mb(r["rss"]), str(r["threads"]),
                  f"{r['ctx_voluntary']}/{r['ctx_involuntary']}", _h(r.get("read_bytes"), "B"),
                  _h(r.get("write_bytes"), "B")] for r in cur.get("process_info", [])]))
    hooks, tasks = [], []
    for p in cur.get("plugins", []):
        a = p.get("async", {})
        name = instance_name(p)
        hooks.append([name, p["type"], _h(sum(p.get("hook_calls", {}).values())),
                      _h(sum(p.get("hook_errors", {}).values())), _h(a.get("worker_deaths", 0))])
        if a.get("scheduled"):
            tasks.append([name, *(_h(a.get(k, 0)) for k in ("scheduled", "pending", "ok", "nil_result", "error",
                                                            "timeout", "dropped")),
                          _h(round(a.get("latency_p99_ns", 0) / 1e6))])
    out.append(("plug-ins", ["instance", "type", "hook calls", "errors", "worker deaths"], hooks))
    if tasks:
        out.append(("T.async", ["instance", "sched", "pend", "ok", "nil", "err", "t/o", "drop", "p99 ms"], tasks))
    return out


def render_text(cur: dict, prev: dict | None) -> str:
    lines = [time.strftime("luaprobe stats  %H:%M:%S", time.localtime(cur.get("time") or time.time()))]
    for title, head, rows in tables(cur, prev):
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines += ["", f"== {title}", "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render_rich(cur: dict, prev: dict | None):
    from rich.console import Group
    from rich.table import Table
    parts = []
    for title, head, rows in tables(cur, prev):
        t = Table(title=title, title_justify="left", expand=False)
        for h in head:               # a narrow terminal folds an instance name onto more lines, never cuts it
            t.add_column(h, justify="left" if h in ("role", "instance", "state", "source", "drops") else "right",
                         overflow="fold" if h == "instance" else "ellipsis")
        for r in rows:
            t.add_row(*r)
        parts.append(t)
    return Group(*parts)


def cmd_stats(args) -> int:
    """`luaprobe stats [--json] [--run-dir DIR] [--plain] [--count N]`."""
    run_dir, how = control.find_run_dir(args.run_dir)
    try:
        first = collect(run_dir, prime_s=0 if args.json else 0.2)   # --json: one quick snapshot (cpu_percent null)
    except control.DamagedState as e:   # read only when no supervisor answers
        print(f"luaprobe stats: no daemon is running (looked in {run_dir}, found as {how}); {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if args.json:                       # after the end: the run's final counters, and exit 3 (not running)
        print(json.dumps(first, indent=2, default=str))
        return EXIT_OK if first["live"] else EXIT_NOT_RUNNING
    if not first["live"]:
        print(f"luaprobe stats: no daemon is running (looked in {run_dir}, found as {how}; last state: "
              f"{first['status'].get('state') or 'never started'})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    use_rich = not args.plain and sys.stdout.isatty()
    if use_rich:
        try:
            import rich  # noqa: F401
        except ImportError:
            use_rich = False
    prev, n = None, 0
    try:
        if use_rich:
            from rich.live import Live
            with Live(render_rich(first, None), refresh_per_second=4, screen=False) as live:
                while not args.count or n < args.count:
                    time.sleep(1.0)
                    cur = collect(run_dir)
                    live.update(render_rich(cur, prev))
                    prev, n = cur, n + 1
        else:
            while not args.count or n < args.count:
                cur = first if n == 0 else collect(run_dir)
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(render_text(cur, prev), flush=True)
                prev, n = cur, n + 1
                if not args.count or n < args.count:
                    time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    return 0
