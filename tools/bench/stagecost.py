"""Benchmark: the shared TCP reassembly stage's CPU per packet (engine/streams/stage.lua ``S:run``) over a --quick corpus
capture, with a filex_monitor attached and the real flow table, in this process (issue 10).

    python tools/bench/stagecost.py [--corpus flows-100k] [--runs 9] [--engine-dir DIR ...] [--no-helper]
    python tools/bench/stagecost.py --search [--engine-dir DIR ...]

Decodes every packet of the capture once into an lp_pkt array (engine/plugins/packet.lua), then per run builds a
fresh flow table (engine/fastpath/flowtable.lua, the driver's default capacity 2^20 and, unless --no-helper, its
prefault helper as ``luaprobe run`` starts it) and a fresh stage with one filex VM's worth of votes (``nfilex = 1``,
no plug-in VM: the stage's events are not delivered), and for each batch of 1 024 packets runs ``update_batch`` then
times ``stage:run`` alone with the thread CPU clock.  Prints ns per packet of the capture (min / median / max of
--runs) and the stage's flows_not_http / filex_flows counts.  On `flows-100k` (70 000 TCP flows of ~3 packets, none
with a handshake, none HTTP) that is the filex_monitor's whole cost per packet in the engine's loop CPU over the
empty hook's, less the empty hook's walk (tools/bench/loopsplit.py: "rest" against "walk").

--engine-dir DIR (repeatable): luaprobe.engine's Lua modules from DIR (e.g. another worktree's engine/), one Lua
runtime each, runs alternated between them (A/B in one process; the stage's `ft` option is given to every side, an
older stage ignores it).  Default: this checkout's.

--search: instead, the first-payload HTTP vote's "HTTP/1." search (http.looks_http of a payload picked up mid-stream
that does not start like a request: http.lua has_status_line), ns per call on 2 000 payloads of 40-1 460 bytes of
each kind: zero-filled, random (encrypted), English text, Lua source, 'H'-dense, all 'H', a status line at the end;
the results checked against Python's bytes.find.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus  # noqa: E402
from tools.bench.hookwalk import BUILD as HOOKWALK_BUILD  # noqa: E402

CLOCK = """
local ffi = require("ffi")
pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } lp_sc_ts; int clock_gettime(int, lp_sc_ts *);")
local ts = ffi.new("lp_sc_ts")
local function now() ffi.C.clock_gettime(3, ts); return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec) end
"""

BUILD = CLOCK + r"""
return function(addr, size, capacity)
  local flowtable = require("luaprobe.engine.fastpath.flowtable")
  local stage = require("luaprobe.engine.streams.stage")
  -- every packet decoded into one batch as the driver leaves it: tools/bench/hookwalk.py's BUILD (its own flow
  -- table's pass over them is not used here; each run below makes a fresh one)
  local keep, _, n = (""" + HOOKWALK_BUILD + r""")(addr, size, capacity)
  local b = keep[1]
  -- one run: CPU ns per packet of stage:run, flows_not_http, filex_flows
  return function(helper)
    local ft = flowtable.new({ capacity = capacity })
    if helper then assert(ft:start_prefaulter(16384)) end
    local st = stage.new({ capacity = capacity, records = ft.flows, cold = ft.cold, ft = ft })
    st.nfilex = 1
    local total = 0
    for k = 0, n - 1, 1024 do
      local m = math.min(1024, n - k)
      ft:update_batch(b + k, m)
      local t0 = now()
      st:run(tonumber(ffi.cast("intptr_t", b + k)), m)
      total = total + now() - t0
    end
    local s = st:stats_table()
    st:free()
    if ft.pf ~= nil then ft:stop_prefaulter() end
    ft, st = nil, nil
    collectgarbage(); collectgarbage()
    return total / n, s.flows_not_http, s.filex_flows
  end
end
"""

SEARCH = CLOCK + r"""
return function(bufs, iters)
  local looks_http = require("luaprobe.engine.streams.http").looks_http
  local total = 0
  for i = 1, #bufs do total = total + #bufs[i] end
  local arena = ffi.new("uint8_t[?]", total)
  local ps, ns, o = {}, {}, 0
  for i = 1, #bufs do ffi.copy(arena + o, bufs[i], #bufs[i]); ps[i] = arena + o; ns[i] = #bufs[i]; o = o + #bufs[i] end
  local got = {}
  for i = 1, #ps do got[i] = looks_http(ps[i], ns[i], false) end
  local t = now()
  for _ = 1, iters do for i = 1, #ps do looks_http(ps[i], ns[i], false) end end
  return (now() - t) / (iters * #ps), got
end
"""


def runtime(engine_dir: str | None):
    """A Lua runtime whose luaprobe.engine modules come from engine_dir (None: this checkout's)."""
    import luaprobe.shm.luajit as lj
    orig = lj.package_dirs
    if engine_dir:
        def dirs():
            d = orig()
            d["engine"] = os.path.abspath(engine_dir)
            return d
        lj.package_dirs = dirs
    try:
        return lj.new_runtime()
    finally:
        lj.package_dirs = orig


def payloads(kind: str, rnd: random.Random) -> list[bytes]:
    """2 000 payloads of one kind, each starting with a zero byte (not a request line: the search runs)."""
    sizes = [rnd.choice([40, 100, 200, 536, 700, 1000, 1460]) for _ in range(2000)]
    text = open(os.path.join(REPO, "README.md"), "rb").read()
    src = open(os.path.join(REPO, "engine", "streams", "stage.lua"), "rb").read()

    def one(n: int) -> bytes:
        if kind == "zeros":
            return bytes(n)
        if kind == "random":
            return rnd.randbytes(n)
        if kind in ("english", "lua-source"):
            t = text if kind == "english" else src
            o = rnd.randrange(0, max(1, len(t) - n))
            return t[o:o + n]
        if kind == "H-dense":
            return (b"HTTP/ Has Hidden THE HTML. HELLO " * 60)[:n]
        if kind == "all-H":
            return b"H" * n
        return (rnd.randbytes(max(0, n - 20)) + b"HTTP/1.1 200 OK\r\n\r\n")[:n]     # status-late
    return [b"\x00" + one(n) for n in sizes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="flows-100k", help="traffic shapes (--quick captures), comma-separated")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--engine-dir", action="append", help="luaprobe.engine's Lua modules from this folder (repeat: A/B)")
    ap.add_argument("--no-helper", action="store_true", help="no prefault helper thread (luaprobe run --prefault-ahead 0)")
    ap.add_argument("--capacity", type=int, default=1 << 20, help="flow-table capacity (the driver's default 2^20)")
    ap.add_argument("--search", action="store_true", help="time the first-payload \"HTTP/1.\" search instead")
    a = ap.parse_args(argv)
    dirs = a.engine_dir or [None]
    names = [d or "this checkout" for d in dirs]
    if a.search:
        kinds = ("zeros", "random", "english", "lua-source", "H-dense", "all-H", "status-late")
        rts = [runtime(d) for d in dirs]          # one runtime per side (the payload table is made in it)
        fns = [rt.execute(SEARCH) for rt in rts]
        print("| payloads | " + " | ".join(f"{n}: ns/call min / median" for n in names) + " |")
        print("|---|" + "---:|" * len(dirs))
        for kind in kinds:
            bufs = payloads(kind, random.Random(10))
            truth = [b"HTTP/1." in p[:2048] for p in bufs]
            tabs = [rt.table_from(bufs) for rt in rts]
            xs = [[] for _ in dirs]
            for r in range(max(3, a.runs)):
                for k in (range(len(dirs)) if r % 2 == 0 else reversed(range(len(dirs)))):
                    ns, got = fns[k](tabs[k], 20)
                    assert [got[i + 1] for i in range(len(bufs))] == truth, f"{names[k]}: wrong vote on {kind}"
                    xs[k].append(ns)
            print(f"| {kind} | " + " | ".join(f"{min(x):.0f} / {statistics.median(x):.0f}" for x in xs) + " |",
                  flush=True)
        return 0
    from luaprobe.engine.capture.pcapfile import open_capture
    print("| traffic | engine | stage:run CPU ns/packet min / median / max | flows_not_http | filex_flows |")
    print("|---|---|---:|---:|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        with open_capture(path) as cap:
            runs = [runtime(d).execute(BUILD)(cap.address, cap.size, a.capacity) for d in dirs]
            xs, counts = [[] for _ in dirs], [None] * len(dirs)
            for r in range(a.runs):
                for k in (range(len(dirs)) if r % 2 == 0 else reversed(range(len(dirs)))):
                    ns, nh, fx = runs[k](not a.no_helper)
                    xs[k].append(ns)
                    counts[k] = (int(nh), int(fx))
            for k in range(len(dirs)):
                x = xs[k]
                print(f"| {c} | {names[k]} | {min(x):.1f} / {statistics.median(x):.1f} / {max(x):.1f} | "
                      f"{counts[k][0]} | {counts[k][1]} |", flush=True)
            del runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
