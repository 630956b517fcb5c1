"""`luaprobe query`: read the output database of a run.

    luaprobe query alerts|resources|fts|counters|flows|keyinfo|groups|decls|edges|toppers|run
                   [--db PATH | --out DIR] [--json] [--group G] [--key K] [--meter M] [--limit N]

Text output is an aligned table (long cells are shortened; use --json for full values); --json prints
one JSON object per line.  Exit codes: 0 ok, 2 usage error, 3 database missing or unreadable.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

from luaprobe.engine.store import writer as _w
from luaprobe.engine.store.writer import DB_NAME, Store, StoreError, db_path, meter_id
from luaprobe.engine.daemon.usage import Parser, int_in, nonempty

from luaprobe.shm.exits import EXIT_INPUT, EXIT_OK, EXIT_USAGE
WHAT = ("alerts", "resources", "fts", "counters", "flows", "keyinfo", "groups", "decls", "edges", "toppers", "run")
MAX_CELL = 60
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}
_CONTROL |= {c: f"\\u{c:04x}" for c in [*range(0x80, 0xA0), 0x2028, 0x2029]}   # C1, line separators (shm/logs.py)


def json_value(v):
    """--json: a BLOB (bytes: a script's string that is not UTF-8) is {"hex": "<its bytes, lower-case hex>"},
    so it never reads like a TEXT value (docs/schema.md "luaprobe query"); anything else not JSON: its str()."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"hex": bytes(v).hex()}
    return str(v)


def iso(sec, usec=None) -> str:
    """ISO-8601 UTC time of an epoch value (``usec`` adds microseconds)."""
    if sec is None:
        return ""
    try:
        t = _dt.datetime.fromtimestamp(float(sec), tz=_dt.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return str(sec)
    if usec:
        t = t.replace(microsecond=int(usec) % 1_000_000)
    elif float(sec) == int(float(sec)):
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).translate(_CONTROL)
    return s if len(s) <= MAX_CELL else s[:MAX_CELL - 3] + "..."


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """An aligned text table: header, dashes, rows (numeric columns right-aligned)."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals):
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _with_name(name, guid) -> str:
    return f"{name} {guid}" if name else (guid or "")


def render(what: str, rows, store: Store) -> tuple[list[str], list[list], set[int]]:
    """Headers, display rows and numeric column indexes for one query kind."""
    if what == "counters":
        return (["group", "bucket (UTC)", "key", "meter", "value"],
                [[r["group_name"] or r["group_guid"], iso(r["bucket_ts"]),
                  f"{r['key']} ({r['label']})" if r["label"] else r["key"],
                  f"{r['meter']} {r['meter_name']}" if r["meter_name"] else r["meter"], r["value"]] for r in rows],
                {4})
    if what == "keyinfo":
        return (["group", "key", "label", "description"],
                [[r["group_name"] or r["group_guid"], r["key"], r["label"], r["description"]] for r in rows], set())
    if what == "alerts":
        return (["time (UTC)", "alert group", "priority", "sigid", "classification", "flowkey", "message", "status",
                 "plugin"],
                [[iso(r["ts_sec"], r["ts_usec"]), r["alert_guid"], r["priority"], r["sigid"], r["classification"],
                  r["flowkey"], r["message"], r["status"], r["plugin"]] for r in rows], {2})
    if what == "resources":
        return (["time (UTC)", "resource group", "flowkey", "uri", "contents", "plugin"],
                [[iso(r["ts_sec"], r["ts_usec"]), r["resource_guid"], r["flowkey"], r["uri"], r["contents"],
                  r["plugin"]] for r in rows], set())
    if what == "fts":
        return (["time (UTC)", "fts group", "flowkey", "text", "plugin"],
                [[iso(r["ts_sec"], r["ts_usec"]), r["fts_guid"], r["flowkey"], r["text"], r["plugin"]] for r in rows],
                set())
    if what == "flows":
        return (["id", "flowkey", "proto", "A", "Z", "first (UTC)", "last (UTC)", "pkts a>z", "pkts z>a", "bytes a>z",
                 "bytes z>a", "state", "tags", "setup rtt us", "retrans a>z", "retrans z>a"],
                [[r["id"], r["flowkey"], r["proto"], f"{r['ipa']}:{r['porta']}", f"{r['ipz']}:{r['portz']}", iso(r["first_ts"]),
                  iso(r["last_ts"]), r["packets_az"], r["packets_za"], r["bytes_az"], r["bytes_za"], r["state"],
                  r["tags"], r["setup_rtt_us"], r["retrans_az"], r["retrans_za"]] for r in rows], {0, 7, 8, 9, 10, 13, 14, 15})
    if what == "groups":
        return (["guid", "name", "bucketsize", "meters", "description"],
                [[r["guid"], r["name"], r["bucketsize"],
                  ", ".join(f"{m.get('id')}:{m.get('name')}" for m in r["meters"] if isinstance(m, dict)),
                  r["description"]] for r in rows], {2})
    if what == "decls":
        return (["kind", "guid", "name", "description"],
                [[r["kind"], r["guid"], r["name"], r["description"]] for r in rows], set())
    if what == "edges":
        return (["time (UTC)", "source", "target", "flowkey", "plugin"],
                [[iso(r["ts_sec"]), f"{r['s_guid']} {r['s_key']}", f"{r['t_guid']} {r['t_key']}", r["flowkey"],
                  r["plugin"]] for r in rows], set())
    if what == "toppers":
        return (["tracker", "bucket (UTC)", "rank", "flowkey", "metric"],
                [[r["tracker"], iso(r["bucket_ts"]), r["rank"], r["flowkey"], r["metric"]] for r in rows], {2, 4})
    if what == "run":
        return (["key", "value"], [[r["key"], json.dumps(r["value"])] for r in rows], set())
    raise ValueError(what)


def fetch(store: Store, a) -> list[dict]:
    """Rows for the requested kind with the filters applied."""
    if a.what == "counters":
        return store.counters(group=a.group, key=a.key, meter=a.meter, limit=a.limit)
    if a.what == "keyinfo":
        return store.key_info(group=a.group, key=a.key, limit=a.limit)
    if a.what == "alerts":
        return store.alerts(guid=a.group, flowkey=a.key, limit=a.limit)
    if a.what == "resources":
        return store.resources(guid=a.group, flowkey=a.key, limit=a.limit)
    if a.what == "fts":
        return store.fts(guid=a.group, flowkey=a.key, limit=a.limit)
    if a.what == "flows":
        return store.flows(flowkey=a.key, limit=a.limit)
    if a.what == "groups":
        rows = store.counter_groups()
        for r in rows:
            r.pop("meters_json", None)
        return rows[:a.limit] if a.limit is not None else rows
    if a.what == "decls":
        return store.decl_groups()[:a.limit] if a.limit is not None else store.decl_groups()
    if a.what == "edges":
        return store.edges(flowkey=a.key, limit=a.limit)
    if a.what == "toppers":
        return store.flow_toppers(tracker=a.group, limit=a.limit)
    rows = [{"key": k, "value": v} for k, v in store.run_info().items()]
    return rows[:a.limit] if a.limit is not None else rows


#: which kinds each filter applies to (any other: a usage error, not a filter silently ignored)
FILTERS = {"group": ("counters", "keyinfo", "alerts", "resources", "fts", "toppers"),
           "key": ("counters", "keyinfo", "alerts", "resources", "fts", "flows", "edges"),
           "meter": ("counters",)}
GUID = _w.GUID_TEXT


def group_problem(store: Store, a) -> str | None:
    """Why ``--group`` names no group of ``a.what`` (a GUID is always taken: a group with no rows yet), or None."""
    if a.group is None or a.what == "toppers" or GUID.match(a.group.strip()):
        return None
    if a.what in ("counters", "keyinfo"):
        names = [g["name"] for g in store.counter_groups()] + list(_w.WELL_KNOWN_GROUPS.values())
    else:
        kind = {"alerts": "alert", "resources": "resource", "fts": "fts"}[a.what]
        known = {"alerts": _w.WELL_KNOWN_ALERT_GROUPS, "resources": _w.WELL_KNOWN_RESOURCE_GROUPS,
                 "fts": _w.WELL_KNOWN_FTS_GROUPS}[a.what]
        names = [g["name"] for g in store.decl_groups(kind)] + list(known.values())
    names = sorted({n for n in names if n}, key=str.lower)
    if _w.name_key(a.group) in {_w.name_key(n) for n in names}:
        return None
    return f"--group {a.group!r}: no {a.what} group of that name (names: {', '.join(names) or 'none'}; or give a GUID)"


def meter_problem(store: Store, a) -> str | None:
    """Why ``--meter`` names no meter (of ``--group`` when given), or None.  A meter id is always taken; a name is
    looked up in the meters of the stored counter groups (``counter_groups.meters_json``), the only place a counter
    row's meter gets its name (Store.counters filters by name there)."""
    if a.meter is None or meter_id(a.meter) is not None:
        return None
    guid = store.resolve_group(a.group) if a.group is not None else None
    names = sorted({m["name"] for g in store.counter_groups() if guid is None or g["guid"] == guid
                    for m in g.get("meters", ()) if isinstance(m, dict) and isinstance(m.get("name"), str)},
                   key=str.lower)
    if _w.name_key(a.meter) in {_w.name_key(n) for n in names}:
        return None
    where = f" of group {a.group!r}" if a.group is not None else ""
    return f"--meter {a.meter!r}: no meter{where} of that name (names: {', '.join(names) or 'none'}; or give a meter id)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="luaprobe query", description="Query the output database of a luaprobe run.")
    p.add_argument("what", choices=WHAT, help="what to list")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", metavar="PATH", type=nonempty("a file name"), help="database file")
    src.add_argument("--out", metavar="DIR", default="out", type=nonempty("a directory"),
                     help=f"output directory holding {DB_NAME} (default ./out, the same as luaprobe run's)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    # the kinds each filter applies to, from FILTERS (the help listed fewer: not toppers for --group, nor fts and
    # edges for --key)
    p.add_argument("--group", metavar="G", help="group name or GUID; the flowtracker's name for toppers "
                   f"({', '.join(FILTERS['group'])})")
    p.add_argument("--key", metavar="K", help="key or its label (counters, keyinfo); flowkey (" +
                   ", ".join(k for k in FILTERS["key"] if k not in ("counters", "keyinfo")) + ")")
    p.add_argument("--meter", metavar="M", help=f"meter id or name ({', '.join(FILTERS['meter'])})")
    # at most SQLite's largest integer (its LIMIT; a larger one was a traceback, "datatype mismatch", exit 1)
    p.add_argument("--limit", metavar="N", type=int_in(0, 2**63 - 1), help="at most N rows")
    return p


def main(argv=None) -> int:
    """Entry point (`luaprobe query ...`); returns the exit code."""
    p = build_parser()
    a = p.parse_args(argv)
    for f, kinds in FILTERS.items():
        if getattr(a, f) is not None and a.what not in kinds:
            p.error(f"--{f} does not filter {a.what} (it filters {', '.join(kinds)})")
    path = a.db if a.db else db_path(a.out)
    try:
        with Store(path, blobs="bytes" if a.json else "text") as store:
            problem = group_problem(store, a) or meter_problem(store, a)
            if problem:
                print(f"luaprobe query: {problem}", file=sys.stderr)
                return EXIT_USAGE
            rows = fetch(store, a)
            if a.json:
                text = "\n".join(json.dumps(r, ensure_ascii=False, default=json_value) for r in rows)
            else:
                headers, cells, numeric = render(a.what, rows, store)
                text = table(headers, cells, numeric) + f"\n({len(rows)} row{'s' if len(rows) != 1 else ''})"
    except StoreError as e:  # includes StoreNotFound
        print(f"luaprobe query: {e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        if text:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `luaprobe query ... | head`: quiet, and no error at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
