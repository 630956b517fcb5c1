"""Benchmark: the fast path over the benchmark corpus x plug-in shapes (issue 10).

    python tools/bench/corpus_bench.py [--quick] [--runs 5] [--corpus a,b] [--shapes x,y] [--doc docs/benchmarks.md]

Every cell (traffic shape from tools/bench/corpus.py x plug-in shape from tools/bench/shapes.py)
runs ``luaprobe run`` --runs times as a separate process and reports packets/s as
min / median / max, the spread (max / min), and the ratio of the median to the LuaJIT walk of
the same file measured in the same run.  Captures are made on first use (seeded, kept in
tools/bench/data/corpus/, out of git); --quick uses the small variants.

What is timed (the same for every cell):

* **loop** — the run summary's ``packet_loop_s``: from the first batch of packets until the
  plug-ins have walked the last one (capture process filling the packet ring, decoding, flow
  table, every plug-in hook, counters and expired flows shipped to the SQLite writer, T.async
  service).  Start-up and the end-of-run work are not in it.
* **loop CPU** — the run summary's ``packet_loop_cpu_s`` over the packets: CPU time of the fast
  path's thread (decode, flow table, every plug-in VM's walk, the Python loop around them) during
  the loop, ns per packet.  CPU time, not elapsed time: on a busy machine it grows much less than
  the rates shrink.  The capture process's copy runs in parallel on the other core and is not in it.
* **after warm-up** — the same without the loop's first 64 batches (the summary's ``packet_loop_warmup``):
  LuaJIT records and compiles most traces there, a cost per run (5-15 ms) that a 250 000-packet
  capture spreads as 20-60 ns over each packet; this column is the per-packet cost.
* **engine** — the run summary's ``closed_s``: FastPath.run from its start (store writer and
  capture process started, plug-ins loaded) until the SQLite database is closed, so it includes
  the capture process reading the file into the packet ring, decoding, the flow table, every
  plug-in hook, counters and every flow row written to SQLite and committed.  Not included: the
  Python interpreter's start-up and imports (~0.3 s), which the wall column shows.  (The
  summary's ``elapsed_s`` stops earlier, before the writer's last rows and the close.)
* **wall** — the whole ``luaprobe run`` process, start-up included.
* **walk** — a LuaJIT loop over the same file, mapped in memory: each packet is
  decoded with luaprobe's decoder and a Lua hook counts the destination ports of the transport the
  light plug-ins hook on that traffic (TCP; UDP on ``dns``, the shape's ``layer`` in tools/bench/corpus.py) in
  a table (``hval``-like work).  Until 2026-12-03 it counted TCP ports on every shape, so on ``dns`` (no TCP) it
  decoded and counted nothing while luaprobe's plug-ins were called on every UDP packet.  No ring, no flow
  table, no second process, no database: the practical upper bound of a per-packet Lua loop on this machine.  In each of :data:`WALK_PROCESSES` fresh processes,
  the median of --runs walks after one warm-up walk (the file is in the page cache for all); the column is the
  median of those processes' medians.  One process is not enough: which trace tree LuaJIT builds for the walk
  depends on where its bytecode lands (hot counters are a 64-slot hash of bytecode addresses), which changes
  from process to process, not between VMs of one process; on small-few about one process in 16 compiles the
  port count for a known port and walks at ~66M packets/s against ~39M for the others, and a single-process gauge
  moved a cell's ratio by 1.7x from one table to the next (docs/benchmarks.md, 2026-12-01 session 17).
* **walk spread** — max / min of the walk gauge's processes: the same LuaJIT loop from one fresh process to the
  next in the same run, the yardstick for a cell's spread.
* **walk + flows** — :func:`flow_walk_rates` in :data:`WALK_PROCESSES` fresh processes, the median: the walk with
  the fast path's flow work (luaprobe's flow table over each batch of 1 024 decoded packets), one walk per process,
  warm-up included as in a run.  Context for the flow-heavy shapes (the plain walk tracks no flow); the goal lines
  judge against the plain walk.
* **RSS** — the largest peak resident set of the ``luaprobe run`` process and the processes it
  waited for (``wait4``'s ``ru_maxrss``: a maximum over the processes, not a sum), MB; the capture
  process's count includes the pages of the mapped capture file it has read.  The run is started by a
  small launcher process (:data:`LAUNCH`) that forks it and reports its ``wait4``: Linux carries the
  spawning process's own peak into a child's ``ru_maxrss`` across fork and exec, and this process holds
  the captures it generates and walks (hundreds of MB), which the column showed for every run before.

Every run must report all packets of the file; a run that does not fails the benchmark.

``--run-args "--shards N"`` reads the sharded summary the same way (docs/scale.md "The run summary"): loop is the
longest shard loop, loop CPU and the warm-up summed over the shards (CPU per packet of all N fast paths together),
engine the coordinator's start until the database is closed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, shapes  # noqa: E402

WALK = r"""
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local decode = require("luaprobe.engine.fastpath.decode")
local TCP = decode.PROTO.TCP
return function(addr, size, layer)
  local proto = layer == "udp" and decode.PROTO.UDP or TCP      -- the transport the light plug-ins hook
  local counts, n, d = {}, 0, decode.new()
  local r = pcapfile.open(addr, size)
  while true do
    local p, caplen, _, _, _, linktype = r:next()
    if p == nil then break end
    n = n + 1
    decode.decode(d, p, caplen, linktype)
    if decode.find(d, proto) >= 0 then
      local k = d.dport
      counts[k] = (counts[k] or 0) + 1
    end
  end
  return n
end
"""

FLOWWALK = r"""
local ffi = require("ffi")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local decode = require("luaprobe.engine.fastpath.decode")
local flowtable = require("luaprobe.engine.fastpath.flowtable")
local packet = require("luaprobe.engine.plugins.packet")
local BATCH = 1024
local b = packet.new_batch(BATCH + 1)
local M = {}
-- a flow table as the fast path's driver makes it (engine/fastpath/driver.lua M.new), its prefault helper started
function M.table(capacity, huge_pages, ahead)
  local ft = flowtable.new({ capacity = capacity, idle_timeout = 120, active_timeout = 1800, huge_pages = huge_pages })
  if ahead > 0 then ft:start_prefaulter(ahead) end
  return ft
end
function M.done(ft) ft:stop_prefaulter() end
-- one batch: up to 1 024 packets of reader r decoded into lp_pkt records; returns how many
local function fill(r)
  local m = 0
  while m < BATCH do
    local p, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
    if p == nil then break end
    local e = b[m]
    e.data, e.caplen, e.wirelen, e.ts_sec, e.ts_nsec, e.linktype, e.ifindex = p, caplen, wirelen, ts_sec, ts_nsec,
      linktype, ifindex
    decode.decode(e.d, p, caplen, linktype)
    m = m + 1
  end
  return m
end
-- the port count of a batch
local function count(counts, m, proto)
  for i = 0, m - 1 do
    local d = b[i].d
    if decode.find(d, proto) >= 0 then
      local k = d.dport
      counts[k] = (counts[k] or 0) + 1
    end
  end
end
-- the walk: each batch decoded, put through the flow table (flow, dir, flow_uid set as in a run), then counted
function M.walk(ft, addr, size, layer)
  local proto = layer == "udp" and decode.PROTO.UDP or decode.PROTO.TCP
  local counts, n = {}, 0
  local r = pcapfile.open(addr, size)
  while true do
    local m = fill(r)
    if m == 0 then break end
    ft:update_batch(b, m)
    count(counts, m, proto)
    n = n + m
  end
  return n
end
return M
"""

#: traffic shapes whose captures are too big for every plug-in shape in a --quick run
HEAVY = {"flows-1m": ("empty",)}


#: fresh processes the walk gauge runs in (see the module doc, "walk")
WALK_PROCESSES = 5


def walk_gauge(path: str, runs: int, processes: int = WALK_PROCESSES, layer: str = "tcp",
               flows: bool = False) -> tuple[int, list[float]]:
    """(packets, [packets/s of each process: the median of its --runs walks]) of :func:`walk_rates` (`flows`:
    :func:`flow_walk_rates`) run in `processes` fresh Python processes, one after the other, counting ports of
    `layer` ("tcp" or "udp")."""
    fn = "flow_walk_rates" if flows else "walk_rates"
    code = (f"import json, statistics, sys; from tools.bench.corpus_bench import {fn}; "
            f"n, r = {fn}(sys.argv[1], int(sys.argv[2]), sys.argv[3]); "
            "print(json.dumps([n, statistics.median(r)]))")
    n, medians = 0, []
    for _ in range(processes):
        out = subprocess.run([sys.executable, "-c", code, path, str(runs), layer], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        n, med = json.loads(out)
        medians.append(med)
    return n, medians


def walk_rates(path: str, runs: int, layer: str = "tcp") -> tuple[int, list[float]]:
    """(packets, [packets/s of each of `runs` walks]) in this process, after one warm-up walk; the walk counts the
    destination ports of `layer` ("tcp" or "udp")."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    walk = new_runtime().execute(WALK)
    rates = []
    with open_capture(path) as cap:
        n = int(walk(cap.address, cap.size, layer))      # warm-up: page cache and traces
        for _ in range(runs):
            t = time.perf_counter()
            walk(cap.address, cap.size, layer)
            rates.append(n / (time.perf_counter() - t))
    return n, rates


def flow_walk_rates(path: str, runs: int, layer: str = "tcp") -> tuple[int, list[float]]:
    """(packets, [packets/s of one walk]): :func:`walk_rates`'s walk with the fast path's flow work (:data:`FLOWWALK`:
    each batch of 1 024 decoded packets through a luaprobe flow table made as the run makes it: 2^20 flows, its
    huge-page choice, the prefault helper), then the same port count.  One walk, no warm-up walk, whatever `runs`
    says: as in a ``luaprobe run``, the process, its flow table and its memory are fresh and LuaJIT's warm-up is in
    the time (a second walk in the same process would find every flow known, or, with a new table, memory the
    first one gave back, which this machine's balloon may have handed to the host: 1-6x slower, docs/benchmarks.md).
    The table is made before the clock starts, as the run's is before its loop."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.engine.fastpath import hugepages
    from luaprobe.engine.fastpath.run import RunConfig
    from luaprobe.shm.luajit import new_runtime
    cfg = RunConfig(plugins=[], files=[])
    fw = new_runtime().execute(FLOWWALK)
    with open_capture(path) as cap:
        ft = fw.table(cfg.flow_capacity, hugepages.decide(cfg.huge_pages)["huge_pages"], cfg.prefault_ahead)
        t = time.perf_counter()
        n = int(fw.walk(ft, cap.address, cap.size, layer))
        rate = n / (time.perf_counter() - t)
        fw.done(ft)
    return n, [rate]


RUN_ARGS: list = []     #: extra `luaprobe run` flags (--run-args), e.g. ["--pin-cpus", "off"]


#: python -c LAUNCH RSSFILE CMD...: runs CMD as its own child and writes CMD's ru_maxrss (KiB) into RSSFILE;
#: exits with CMD's exit code
LAUNCH = ("import os, sys\n"
          "pid = os.fork()\n"
          "if pid == 0:\n"
          "    os.execv(sys.argv[2], sys.argv[2:])\n"
          "_, status, ru = os.wait4(pid, 0)\n"
          "open(sys.argv[1], 'w').write(str(ru.ru_maxrss))\n"
          "sys.exit(os.waitstatus_to_exitcode(status))\n")


def luaprobe_run(path: str, plugdir: str, workdir: str) -> dict:
    """One ``luaprobe run`` (with RUN_ARGS): its summary plus wall seconds and peak RSS (MB)."""
    out = os.path.join(workdir, "out")
    shutil.rmtree(out, ignore_errors=True)
    stats = os.path.join(workdir, "stats.json")
    cmd = [sys.executable, "-m", "luaprobe.engine", "run", plugdir, "--pcap", path, "--out", out,
           "--stats-json", stats, "-q", *RUN_ARGS]
    rssfile = os.path.join(workdir, "maxrss")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, rssfile, *cmd], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"luaprobe run failed ({proc.returncode}): {' '.join(cmd)}\n"
                         + proc.stderr.decode(errors="replace"))
    with open(stats) as f:
        summary = json.load(f)
    with open(rssfile) as f:
        rss_kb = int(f.read())
    return {"summary": summary, "wall": wall, "rss_mb": rss_kb / 1024}


def cell(path: str, n: int, shape: str, runs: int, workdir: str, layer: str = "tcp") -> dict:
    plugdir = shapes.write(shape, os.path.join(workdir, f"plugins-{shape}-{layer}"), layer)
    loop, cpu, steady, engine, wall, rss, calls = [], [], [], [], [], 0.0, 0
    for _ in range(runs):
        r = luaprobe_run(path, plugdir, workdir)
        s = r["summary"]
        if s["packets"] != n:
            raise SystemExit(f"{path} / {shape}: luaprobe saw {s['packets']} packets, the file has {n}")
        loop.append(n / s["packet_loop_s"])
        cpu.append(s["packet_loop_cpu_s"] / n * 1e9)
        w = s.get("packet_loop_warmup") or {}
        if w:       # the loop after its first batches (LuaJIT's warm-up: a cost per run): engine/fastpath/run.py
            steady.append((s["packet_loop_cpu_s"] - w["cpu_s"]) / (n - w["packets"]) * 1e9)
        engine.append(n / s["closed_s"])
        wall.append(n / r["wall"])
        rss = max(rss, r["rss_mb"])
        calls = hook_calls(s) / n
    return {"loop": loop, "cpu": cpu, "steady": steady or [float("nan")], "engine": engine, "wall": wall, "rss_mb": rss,
            "calls": calls}


def hook_calls(summary: dict) -> int:
    """Hook calls of a run: every plug-in's ``hook_calls`` of the summary (``onload`` and other
    once-per-run hooks are counted too, a handful against the capture's packets)."""
    return sum(sum(p.get("hook_calls", {}).values()) for p in summary.get("plugins", []))


def fmt(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller captures (300k-1M packets)")
    ap.add_argument("--runs", type=int, default=5, help="runs per cell (default 5)")
    ap.add_argument("--corpus", default=",".join(corpus.ORDER), help="traffic shapes, comma-separated")
    ap.add_argument("--shapes", default=",".join(shapes.ORDER), help="plug-in shapes, comma-separated")
    ap.add_argument("--doc", help="also write the table into this Markdown file, between the corpus_bench markers")
    ap.add_argument("--block", default="table", help="the Markdown block --doc replaces (default \"table\": "
                    "<!-- corpus_bench table: begin --> ... end; \"full\" holds the full-corpus table)")
    ap.add_argument("--run-args", default="", help="extra flags for every `luaprobe run`, one string "
                    "(e.g. \"--pin-cpus off\" for an A/B run against the default)")
    a = ap.parse_args(argv)
    RUN_ARGS[:] = shlex.split(a.run_args)
    traffic = [c for c in a.corpus.split(",") if c]
    plugins = [s for s in a.shapes.split(",") if s]
    for c in traffic:
        if c not in corpus.SHAPES:
            ap.error(f"unknown traffic shape {c!r}")
    for s in plugins:
        if s not in shapes.SHAPES:
            ap.error(f"unknown plug-in shape {s!r}")
    out = []

    def emit(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    emit("| traffic | packets | plug-in | loop packets/s min / median / max | spread | loop CPU ns/packet min / median / max "
         "| after warm-up | engine median | wall median | walk median | walk spread | loop / walk | engine / walk "
         "| walk + flows median | loop / walk + flows | RSS MB |")
    emit("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    res = {}                                  # (traffic, plug-in) -> cell() result + walk median
    walks = []                                # the walk gauge's processes, per traffic shape
    fwalks = []                               # the walk + flow table gauge's, per traffic shape
    with tempfile.TemporaryDirectory(prefix="lp-bench-") as work:
        for c in traffic:
            path = corpus.make(c, a.quick)
            n, walk = walk_gauge(path, a.runs, layer=corpus.SHAPES[c].get("layer", "tcp"))
            wmed = statistics.median(walk)
            walks.append(f"{c} {fmt(min(walk))} / {fmt(wmed)} / {fmt(max(walk))}")
            _, fwalk = walk_gauge(path, 1, layer=corpus.SHAPES[c].get("layer", "tcp"), flows=True)
            fmed = statistics.median(fwalk)
            fwalks.append(f"{c} {fmt(min(fwalk))} / {fmt(fmed)} / {fmt(max(fwalk))}")
            for s in plugins:
                if a.quick and c in HEAVY and s not in HEAVY[c]:
                    continue
                r = cell(path, n, s, a.runs, work, corpus.SHAPES[c].get("layer", "tcp"))
                res[c, s] = dict(r, walk=wmed, walk_spread=max(walk) / min(walk), fwalk=fmed)
                lp, emed = r["loop"], statistics.median(r["engine"])
                med = statistics.median(lp)
                emit(f"| {c} | {n:,} | {s} | {fmt(min(lp))} / {fmt(med)} / {fmt(max(lp))} | "
                     f"{max(lp) / min(lp):.2f} | {min(r['cpu']):.0f} / {statistics.median(r['cpu']):.0f} / {max(r['cpu']):.0f} | "
                     f"{min(r['steady']):.0f} / {statistics.median(r['steady']):.0f} / {max(r['steady']):.0f} | "
                     f"{fmt(emed)} | "
                     f"{fmt(statistics.median(r['wall']))} | {fmt(wmed)} | {max(walk) / min(walk):.2f} | "
                     f"{med / wmed:.0%} | {emed / wmed:.0%} | {fmt(fmed)} | {med / fmed:.0%} | {r['rss_mb']:.0f} |")
    cmd = "tools/bench/corpus_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"Measured {start} by `{cmd.strip()}`: {os.cpu_count()} CPUs, load average {load0:.1f} at the "
            f"start and {os.getloadavg()[0]:.1f} at the end; {a.runs} runs per cell; "
            f"{'--quick' if a.quick else 'full'} corpus.")
    print("\n" + note)
    goals = goal_lines(res) + [f"* walk gauge, {WALK_PROCESSES} processes' medians, min / median / max: "
                               + ", ".join(walks),
                               f"* walk + flows gauge, {WALK_PROCESSES} processes' single walks, min / median / max: "
                               + ", ".join(fwalks)]
    print("\n".join(["", *goals]))
    if a.doc:
        write_doc(a.doc, note, out + [""] + goals, a.block)
    return 0


LIGHT = ("empty", "hval", "counter", "flowstate")   #: the light hooks of the issue's first goal


def goal_lines(res: dict) -> list:
    """Issue 10's goals checked against this run's cells (loop medians), one Markdown bullet each."""
    med = statistics.median
    lines = ["Goals (issue 10) on this run, from the loop columns:"]
    light = [(k, r) for k, r in res.items() if k[1] in LIGHT]
    if light:
        bad = [f"{t}/{s}" for (t, s), r in light
               if not (med(r["loop"]) >= 4e6 and med(r["loop"]) >= 0.5 * r["walk"]
                       and max(r["loop"]) / min(r["loop"]) <= 1.3)]
        lines.append(f"* light hooks ({', '.join(LIGHT)}): >= 4M packets/s, >= 50 % of the walk and spread <= 1.3 "
                     f"in {len(light) - len(bad)} of {len(light)} cells"
                     + (f"; not met: {', '.join(bad)}" if bad else ""))
        # context, not the goal: the same loop medians against the walk that also keeps the flow table, and the
        # spread against the walk gauge's own spread over its fresh processes on the same file
        fbad = [f"{t}/{s}" for (t, s), r in light if "fwalk" in r and not med(r["loop"]) >= 0.5 * r["fwalk"]]
        if all("fwalk" in r for _, r in light):
            lines.append(f"* (context) the same cells >= 50 % of the walk + flows gauge (the same decode and flow table "
                         f"in one LuaJIT loop): {len(light) - len(fbad)} of {len(light)}"
                         + (f"; not: {', '.join(fbad)}" if fbad else ""))
        sbad = [f"{t}/{s}" for (t, s), r in light if "walk_spread" in r
                and max(r["loop"]) / min(r["loop"]) > max(1.3, r["walk_spread"])]
        if all("walk_spread" in r for _, r in light):
            lines.append(f"* (context) the same cells' spread <= 1.3 or <= the walk gauge's own spread on that file: "
                         f"{len(light) - len(sbad)} of {len(light)}" + (f"; not: {', '.join(sbad)}" if sbad else ""))
    # the counter shape hooks TCP: on traffic without TCP (dns) it is called on no packet, while the five make a
    # call per layer the traffic has (3 on UDP over IPv4): the calls per packet say what the ratio compares
    five = [(t, med(r["loop"]) / med(res[t, "counter"]["loop"]), r.get("calls"), res[t, "counter"].get("calls"))
            for (t, s), r in res.items() if s == "five-layers" and (t, "counter") in res]
    if five:
        cells = [f"{t} {x:.0%}" + ("" if c5 is None or c1 is None else f" ({c5:.1f} / {c1:.1f})")
                 for t, x, c5, c1 in five]
        lines.append("* five simplecounters >= 60 % of one (five-layers / counter; in brackets hook calls per packet, "
                     "five against one): " + ", ".join(cells))
    fx = [(t, med(r["loop"]) / med(res[t, "empty"]["loop"])) for (t, s), r in res.items()
          if s == "filex" and t != "http" and (t, "empty") in res]
    if fx:
        lines.append("* filex_monitor on non-HTTP traffic >= 80 % of the empty hook: "
                     + ", ".join(f"{t} {x:.0%}" for t, x in fx))
    if ("flows-1m", "empty") in res:
        lines.append(f"* 1M concurrent flows: peak RSS {res['flows-1m', 'empty']['rss_mb']:.0f} MB "
                     "(largest process; flow table bounded by its capacity, see below)")
    return lines


def markers(block: str = "table") -> tuple:
    """The BEGIN and END comment lines of the Markdown block named `block` ("table": the --quick table)."""
    return f"<!-- corpus_bench {block}: begin -->", f"<!-- corpus_bench {block}: end -->"


def write_doc(path: str, note: str, lines: list, block: str = "table") -> None:
    """Replace the text between the BEGIN and END markers of block `block` of `path` with `note` and the table;
    SystemExit naming the file when it has no such block."""
    BEGIN, END = markers(block)
    with open(path) as f:
        text = f.read()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
    block = "\n".join([BEGIN, note, "", *lines, END])
    with open(path, "w") as f:
        f.write(text[:i] + block + text[j + len(END):])


if __name__ == "__main__":
    sys.exit(main())
