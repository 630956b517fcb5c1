"""Benchmark: T.async round trips against what a user would pick instead, and the cost per task of
both ways scripts write tasks, in one run.

    python tools/bench/async_roundtrip.py [--tasks 2000000] [--peer-tasks 100000] [--latency-tasks 3000]
                                          [--runs 5] [--style-tasks 200000] [--style-window 1024]
                                          [--style-pollute-kb 0] [--e2e-packets 500000]
                                          [--only roundtrip,styles,e2e]

Every contender runs tiny tasks (64-byte data; the worker echoes it; the
caller counts results) with one worker process:

* luaprobe: T.async:schedule from a plug-in VM, the worker's LuaJIT VM, onresult back in the plug-in VM;
* multiprocessing.Pool.apply_async, concurrent.futures.ProcessPoolExecutor, a multiprocessing.Queue pair,
  faster-fifo (put_many/get_many) and pyzmq PAIR over ipc://.

It prints round trips/s (at most WINDOW tasks in flight), p50/p99 round-trip latency at a steady
1 000 tasks/s, the ratio of each to luaprobe, and the CPU an idle luaprobe worker uses.

Styles (issue 11): a *hoisted* task (one task table and onexecute function defined once, as in this
benchmark's round trips) against a *fresh* one (the table and both closures created in the hook on
every call, as Trisul's documentation and real scripts write it), each with 0, 1 and 4 plain
upvalues:

* in-process: fast-path CPU per task (thread CPU time of the hook calls, the flush and the result
  delivery with onresult; the wait for the worker is not counted) and worker CPU per task (the worker
  process's CPU time with worker_spin_us = 0, so it does not spin while idle);
* end to end: `luaprobe run` on a capture with a simplecounter on TCP scheduling one task per packet,
  minus the same run whose hook only counts (an overflow queue large enough that a slow worker never
  makes the fast path drop): marginal µs per task on the engine's elapsed time; on the packet loop's CPU
  time (`packet_loop_cpu_s` of the summary: the main thread from the first batch to the last, the fast
  path's time per task); on the CPU time of the main thread during main() (the drain of results after the
  last packet included); on the CPU time of its child processes (worker, capture, store writer; the worker
  spins up to worker_spin_us while idle); and on all of them together.  On a machine with C cores the
  elapsed time is at least all processes' CPU / C.

*limit* rows: the same hooks with `T.async:schedule(task)` replaced by a store of the task into a table (the
script's own work: the task table, the closures, their garbage; for fresh closures also the interpreter, since
LuaJIT does not compile closure creation, and end to end the walker's stitch point); `limit_interp` is a hook that
creates one empty closure and does nothing else (end to end: the stitch point and the interpreted `onpacket` and hook
alone, the part of `limit_fresh` that any closure-creating hook pays); each style row shows its
median minus its limit's (and the ratio): what T.async itself costs.  In-process the fast path is split into the
hook calls, the flush and the delivery; end to end the packet loop's CPU has the T.async service's share
(the plug-in VM's Async:poll, timed by the bench plug-in while packets come) and the result latency p50 (how
far the worker is behind).

Each figure is min / median / max over --runs runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

DATA = b"x" * 64
WINDOW = 1024
RATE = 1000.0

PLUGIN = r"""
TrisulPlugin = { id = { name = "bench" } }
local ring = require("luaprobe.shm.ring")
local now = ring.now_ns
done = 0
local function echo(d) return d end
local function count(engine, d, r) done = done + 1 end
local lat = {}
local t0
local function record(engine, d, r) lat[#lat + 1] = now() - t0; done = done + 1 end

-- round trips: keep at most `window` tasks in flight; poll like the fast path does between batches
function throughput(n, a, window)
  done = 0
  local task = { data = string.rep("x", 64), onexecute = echo, onresult = count }
  local sent = 0
  while done < n do
    while sent < n and sent - done < window do T.async:schedule(task); sent = sent + 1 end
    a:poll(4096)
  end
end

-- latency at a steady rate: one task every 1/rate s; the fast path polls while it waits
function latency(n, a, rate)
  done, lat = 0, {}
  local task = { data = string.rep("x", 64), onexecute = echo, onresult = record }
  local period, next_t = 1e9 / rate, now()
  for i = 1, n do
    while now() < next_t do a:poll(64) end
    next_t = next_t + period
    t0 = now()
    T.async:schedule(task)
    while done < i do a:poll(64) end
  end
  table.sort(lat)
  return lat[math.floor(#lat * 0.5) + 1], lat[math.floor(#lat * 0.99) + 1]
end
"""


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


def paced(n, one_roundtrip):
    """Latency samples (ns) of n round trips issued at RATE per second."""
    period = 1e9 / RATE
    nxt = time.perf_counter_ns()
    out = []
    for _ in range(n):
        while time.perf_counter_ns() < nxt:
            pass
        nxt += period
        t0 = time.perf_counter_ns()
        one_roundtrip()
        out.append(time.perf_counter_ns() - t0)
    return pct(out, 0.5), pct(out, 0.99)


def windowed(n, send, recv) -> float:
    """Round trips/s of n send/recv pairs with at most WINDOW in flight."""
    t = time.perf_counter()
    sent = got = 0
    while got < n:
        while sent < n and sent - got < WINDOW:
            send()
            sent += 1
        recv()
        got += 1
    return n / (time.perf_counter() - t)


# ---------------------------------------------------------------- luaprobe
def bench_luaprobe(n, nlat, spin_us):
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    from luaprobe.workers.pool import AsyncConfig
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.lua")
        with open(path, "w") as f:
            f.write(PLUGIN)
        rt = AsyncRuntime(AsyncConfig(workers=1, worker_spin_us=spin_us))
        try:
            vm = rt.load(path)
            thr = vm.lua.eval("function(n, a, w) return throughput(n, a, w) end")
            lat = vm.lua.eval("function(n, a, r) return latency(n, a, r) end")
            thr(min(n, 100_000), vm.async_obj, WINDOW)          # warm-up: JIT traces, page faults
            t = time.perf_counter()
            thr(n, vm.async_obj, WINDOW)
            rate = n / (time.perf_counter() - t)
            p50, p99 = lat(nlat, vm.async_obj, RATE)
            stats = vm.async_stats()
            assert stats["scheduled"] == stats["ok"] + stats["pending"], stats
            worker = psutil.Process(vm.pool.pids()[0])
            c0 = sum(worker.cpu_times()[:2])
            time.sleep(3.0)
            idle = (sum(worker.cpu_times()[:2]) - c0) / 3.0 * 100
        finally:
            rt.shutdown()
    return rate, p50, p99, idle


# ---------------------------------------------------------------- peers
def echo(x):
    return x


def bench_pool(n, nlat):
    with mp.Pool(1) as pool:
        pool.apply(echo, (DATA,))
        t = time.perf_counter()
        inflight = []
        for _ in range(n):
            inflight.append(pool.apply_async(echo, (DATA,)))
            if len(inflight) >= WINDOW:
                for r in inflight:
                    r.get()
                inflight = []
        for r in inflight:
            r.get()
        rate = n / (time.perf_counter() - t)
        p50, p99 = paced(nlat, lambda: pool.apply_async(echo, (DATA,)).get())
    return rate, p50, p99


def bench_executor(n, nlat):
    with concurrent.futures.ProcessPoolExecutor(1) as ex:
        ex.submit(echo, DATA).result()
        t = time.perf_counter()
        inflight = []
        for _ in range(n):
            inflight.append(ex.submit(echo, DATA))
            if len(inflight) >= WINDOW:
                for f in inflight:
                    f.result()
                inflight = []
        for f in inflight:
            f.result()
        rate = n / (time.perf_counter() - t)
        p50, p99 = paced(nlat, lambda: ex.submit(echo, DATA).result())
    return rate, p50, p99


def _queue_worker(q_in, q_out):
    while True:
        x = q_in.get()
        if x is None:
            return
        q_out.put(x)


def bench_mpqueue(n, nlat):
    q_in, q_out = mp.Queue(), mp.Queue()
    p = mp.Process(target=_queue_worker, args=(q_in, q_out))
    p.start()
    try:
        rate = windowed(n, lambda: q_in.put(DATA), q_out.get)
        p50, p99 = paced(nlat, lambda: (q_in.put(DATA), q_out.get()))
    finally:
        q_in.put(None)
        p.join()
    return rate, p50, p99


def _ff_worker(q_in, q_out):
    from faster_fifo import Queue  # noqa: F401
    while True:
        items = q_in.get_many(timeout=60)
        if items and items[-1] is None:
            q_out.put_many(items[:-1])
            return
        q_out.put_many(items)


def bench_faster_fifo(n, nlat):
    from faster_fifo import Queue
    q_in, q_out = Queue(1 << 26), Queue(1 << 26)
    p = mp.Process(target=_ff_worker, args=(q_in, q_out))
    p.start()
    try:
        t = time.perf_counter()
        sent = got = 0
        while got < n:
            k = min(WINDOW - (sent - got), n - sent)
            if k > 0:
                q_in.put_many([DATA] * k)
                sent += k
            got += len(q_out.get_many(timeout=60))
        rate = n / (time.perf_counter() - t)
        p50, p99 = paced(nlat, lambda: (q_in.put(DATA), q_out.get(timeout=60)))
    finally:
        q_in.put(None)
        p.join()
    return rate, p50, p99


def _zmq_worker(addr):
    import zmq
    s = zmq.Context().socket(zmq.PAIR)
    s.connect(addr)
    while True:
        m = s.recv()
        if m == b"":
            return
        s.send(m)


def bench_zmq(n, nlat):
    import zmq
    d = tempfile.mkdtemp()
    addr = f"ipc://{d}/bench.sock"
    s = zmq.Context().socket(zmq.PAIR)
    s.bind(addr)
    os.chmod(os.path.join(d, "bench.sock"), 0o600)
    p = mp.Process(target=_zmq_worker, args=(addr,))
    p.start()
    try:
        rate = windowed(n, lambda: s.send(DATA), s.recv)
        p50, p99 = paced(nlat, lambda: (s.send(DATA), s.recv()))
    finally:
        s.send(b"")
        p.join()
        s.close()
    return rate, p50, p99


# ---------------------------------------------------------------- styles: hoisted vs fresh closures
STYLE_UPS = (0, 1, 4)
EX = {0: "return d", 1: "return U1 and d", 4: "if U1 and U2 and U3 and U4 then return d end"}


def style_lua() -> str:
    """Hook functions for every style: hoisted[k] / fresh[k] schedule one task with k upvalues; limit_hoisted[k] /
    limit_fresh[k] are the same hooks with `T.async:schedule(task)` replaced by a store of the task into a table of
    the last 1 024 tasks (what the script's own code costs, and LuaJIT's limit for it: the same table, closures and
    garbage, no T.async); limit_interp[0] creates one empty closure and nothing else: end to end, what any hook that
    creates a closure costs for being one (the walker calls it through its stitch point, and it and `onpacket` run
    interpreted), without the task table, the task's closures or T.async."""
    out = ['local U1, U2, U3, U4 = "abc", 42, true, "xyz"',
           "local function count(e, d, r) done = done + 1 end",
           "local KEEP, kept = {}, 0",
           "local function keep(task) kept = kept + 1; KEEP[bit.band(kept, 1023) + 1] = task end",
           "hoisted, fresh, limit_hoisted, limit_fresh = {}, {}, {}, {}",
           "limit_interp = { [0] = function(data) local f = function() end end }"]
    for k in STYLE_UPS:
        out.append(f"do local task = {{ data = '', onexecute = function(d) {EX[k]} end, onresult = count }}\n"
                   f"  hoisted[{k}] = function(data) task.data = data; T.async:schedule(task) end\n"
                   f"  limit_hoisted[{k}] = function(data) task.data = data; keep(task) end end")
        for name, call in (("fresh", "T.async:schedule"), ("limit_fresh", "keep")):
            out.append(f"{name}[{k}] = function(data) {call}({{ data = data, onexecute = function(d) {EX[k]} end, "
                       f"onresult = function(e, d, r) done = done + 1 end }}) end")
    return "\n".join(out)


STYLE_PLUGIN = r"""
TrisulPlugin = { id = { name = "bench styles" } }
local ffi = require("ffi")
local C = require("luaprobe.shm.ring").lib
pcall(ffi.cdef, "struct lp_bench_ts { long s; long ns; }; int clock_gettime(int, struct lp_bench_ts *);")
local tsb = ffi.new("struct lp_bench_ts")
local function cpu_ns() ffi.C.clock_gettime(3, tsb); return tonumber(tsb.s) * 1e9 + tonumber(tsb.ns) end  -- thread CPU
done = 0
STYLES
-- fast-path CPU ns per task: B hook calls, the flush, then (not counted) the wait for the worker, then the
-- delivery; returned apart (hooks, flush, delivery).  A limit_* style schedules nothing (no flush, no results).
-- pollute_kb (optional): KiB of memory written (one byte per 64-byte line, not counted) after the hooks and before
-- each delivery, as the packet path end to end evicts the queue, the tasks and the rings from the caches between them.
local POLLUTE, npollute = nil, 0
local function pollute(kb)
  if kb * 1024 > npollute then npollute = kb * 1024; POLLUTE = ffi.new("uint8_t[?]", npollute) end
  for j = 0, kb * 1024 - 1, 64 do POLLUTE[j] = POLLUTE[j] + 1 end
end
function fastpath_cost(style, nup, n, a, B, pollute_kb)
  local hook = _G[style][nup]
  local limit = style:sub(1, 5) == "limit"
  local data = string.rep("x", 64)
  local w = a.workers[1]
  local kb = pollute_kb or 0
  done = 0
  local th, tf, td, k = 0, 0, 0, 0
  while k < n do
    local t0 = cpu_ns()
    for i = 1, B do hook(data) end
    local t1 = cpu_ns()
    th = th + (t1 - t0)
    if kb > 0 then pollute(kb); t1 = cpu_ns() end
    a:flush()
    tf = tf + (cpu_ns() - t1)
    k = k + B
    while not limit and done < k do
      while C.lp_load(w.ret.pushed_p) - w.ret.popped_local < k - done do end
      if kb > 0 then pollute(kb) end
      local t3 = cpu_ns()
      a:poll(1e9)
      td = td + (cpu_ns() - t3)
    end
  end
  return th / k, tf / k, td / k                 -- k: the tasks run (n rounded up to whole windows)
end
"""


def limit_of(style: str, k: int):
    """The limit row a style row is compared with: the same hook with schedule replaced by a table store; for the
    limit_fresh rows, limit_interp (so their difference is the idiom's task table and closures alone)."""
    if style == "fresh":
        return ("limit_fresh", k)
    if style == "limit_fresh":
        return ("limit_interp", 0)
    return ("limit_hoisted", 0) if style == "hoisted" else None


def vs_limit(x: float, limit: float) -> str:
    """"+d (r x)": a median minus its limit row's median, and their ratio when the limit is not ~0."""
    return f"{x - limit:+.2f}" + (f" ({x / limit:.1f}x)" if limit >= 0.05 else "")


def mmm(xs) -> str:
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"


STYLES_INPROC = [(s, k) for s in ("hoisted", "fresh") for k in STYLE_UPS] + [("limit_hoisted", 0)] + \
    [("limit_fresh", k) for k in STYLE_UPS] + [("limit_interp", 0)]


def bench_styles(n: int, runs: int, window: int = WINDOW, pollute_kb: int = 0) -> list:
    """[(style, upvalues, fast-path µs list, worker µs list, (hook, flush, delivery) µs lists)] measured in-process
    (limit_* rows: the same hooks with schedule replaced by a table store), each style and upvalue count in a
    plug-in VM (and worker) of its own: LuaJIT specialises the traces of schedule and of result delivery to the first
    onexecute / onresult prototypes they see, and in one shared VM the styles measured later ran through side traces
    (80-200 ns more per task), which made the figures depend on the order of the styles.  `window`: tasks scheduled
    (and so in flight) before the flush and the delivery; end to end the worker runs behind and tens of thousands of
    tasks are in flight (their onresult closures and data live: a larger heap for the collector to mark, colder
    caches for the delivery), which a window of that size reproduces in-process.  `pollute_kb`: KiB of memory written
    after the hooks and before each delivery (not counted), as the packet path evicts the caches end to end."""
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    from luaprobe.workers.pool import AsyncConfig
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "styles.lua")
        with open(path, "w") as f:
            f.write(STYLE_PLUGIN.replace("STYLES", style_lua()))
        for style, k in STYLES_INPROC:
            rt = AsyncRuntime(AsyncConfig(workers=1, worker_spin_us=0, ring_size=max(1 << 24, window * 512)))
            try:
                vm = rt.load(path)
                if style.startswith("limit"):                        # the worker exists, as for the others
                    vm.lua.execute("T.async:schedule{ data = 'x', onexecute = function(d) return d end }")
                cost = vm.lua.eval("function(s, u, n, a, b, kb) return fastpath_cost(s, u, n, a, b, kb) end")
                worker = psutil.Process(vm.pool.pids()[0])
                cost(style.encode(), k, min(n, 50_000), vm.async_obj, window, pollute_kb)          # warm-up
                fp, wk, parts = [], [], ([], [], [])
                for _ in range(runs):
                    c0 = sum(worker.cpu_times()[:2])
                    split = cost(style.encode(), k, n, vm.async_obj, window, pollute_kb)
                    fp.append(sum(split) / 1e3)
                    for lst, x in zip(parts, split):
                        lst.append(x / 1e3)
                    wk.append((sum(worker.cpu_times()[:2]) - c0) / n * 1e6)
                rows.append((style, k, fp, wk, parts))
                st = vm.async_stats()
                assert st["scheduled"] == st["ok"] + st["pending"] and st["error"] == 0, st
            finally:
                rt.shutdown()
    return rows


E2E_PLUGIN = r"""
local DATA = string.rep("x", 64)
counted = 0
STYLES
local hook = HOOK
-- The T.async service's share of the packet loop: the CPU time of the plug-in VM's Async:poll (flush of the staged
-- tasks into the request ring, result delivery with onresult), timed while packets still come (the drain after
-- the last packet is not the packet loop).  The Async object is the upvalue self_ of T.async.pending_items.
local ffi = require("ffi")
pcall(ffi.cdef, "struct lp_bench_ts { long s; long ns; }; int clock_gettime(int, struct lp_bench_ts *);")
local tsb = ffi.new("struct lp_bench_ts")
local function cpu_ns() ffi.C.clock_gettime(3, tsb); return tonumber(tsb.s) * 1e9 + tonumber(tsb.ns) end
local service_ns, NPKT = 0, NPACKETS
do
  local i, name, a = 1, debug.getupvalue(T.async.pending_items, 1)
  while name and name ~= "self_" do i = i + 1; name, a = debug.getupvalue(T.async.pending_items, i) end
  local poll = a.poll
  a.poll = function(self, ...)
    if counted >= NPKT then return poll(self, ...) end
    local t = cpu_ns()
    local r = poll(self, ...)
    service_ns = service_ns + (cpu_ns() - t)
    return r
  end
end
TrisulPlugin = { id = { name = "bench e2e" },
  onunload = function()
    local f = assert(io.open(os.getenv("LUAPROBE_BENCH_SERVICE"), "w"))
    f:write(string.format("%d", service_ns))
    f:close()
  end,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) counted = counted + 1; if hook then hook(DATA) end end } }
"""


# `luaprobe run` in this process's child, reporting the CPU time of its main thread during main() (the fast path:
# plug-in hooks, flush, result delivery; without the interpreter's start-up and imports, whose cost on a loaded
# machine varies by more than the tasks cost) next to the summary; os.wait4 adds the children it waited for
# (workers, capture, store writer)
RUN_WRAPPER = r"""
import json, sys, time
from luaprobe.engine.daemon.cli import main
report = sys.argv.pop(1)
t0 = time.thread_time()
rc = main(sys.argv[1:])
cpu = time.thread_time() - t0
with open(report, "w") as f:
    json.dump({"cpu_s": cpu, "process_cpu_s": time.process_time()}, f)
sys.exit(rc)
"""


E2E_KEYS = ("elapsed", "loop_cpu", "service_cpu", "fastpath_cpu", "children_cpu", "all_cpu")
#: e2e configurations: (style, upvalues); ("none", None) is the run whose hook only counts
E2E_CONFIGS = [("none", None)] + [(s, k) for s in ("hoisted", "fresh") for k in STYLE_UPS] + \
    [("limit_hoisted", 0)] + [("limit_fresh", k) for k in STYLE_UPS] + [("limit_interp", 0)]


def e2e_run(pcap: str, npackets: int, hook: str, d: str, extra=()) -> tuple[dict, dict]:
    """One `luaprobe run` of E2E_PLUGIN with `hook` ("nil", "fresh[1]", "hoisted[0]", a limit style) on `pcap`
    (npackets TCP packets) in directory d, `extra` CLI arguments added: ({"elapsed", "loop_cpu", "service_cpu",
    "fastpath_cpu", "children_cpu", "all_cpu"} in seconds, the summary's last plug-in entry)."""
    path = os.path.join(d, "e2e.lua")
    with open(path, "w") as f:
        f.write(E2E_PLUGIN.replace("STYLES", "done = 0\n" + style_lua()).replace("HOOK", hook)
                .replace("NPACKETS", str(npackets)))
    stats, report = os.path.join(d, "stats.json"), os.path.join(d, "cpu.json")
    service = os.path.join(d, "service.txt")
    proc = subprocess.Popen([sys.executable, "-c", RUN_WRAPPER, report, "run", path, "--pcap", pcap,
                             "--out", os.path.join(d, "out"), "--stats-json", stats, "--workers", "1",
                             "--overflow-limit", str(2 * npackets), "--quiet", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, LUAPROBE_BENCH_SERVICE=service))
    output = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(output.decode(errors="replace"))
    with open(stats) as f:
        summary = json.load(f)
    with open(report) as f:
        cpu = json.load(f)
    with open(service) as f:
        service_s = int(f.read()) / 1e9
    all_cpu = ru.ru_utime + ru.ru_stime
    return {"elapsed": summary["elapsed_s"], "loop_cpu": summary["packet_loop_cpu_s"], "service_cpu": service_s,
            "fastpath_cpu": cpu["cpu_s"], "children_cpu": all_cpu - cpu["process_cpu_s"],
            "all_cpu": all_cpu}, summary["plugins"][-1]


def bench_e2e(npackets: int, runs: int) -> tuple[list, list]:
    """Marginal cost per task through `luaprobe run` against the same run without tasks:
    ([(style, upvalues, {"elapsed": [µs], "fastpath_cpu": [µs], "all_cpu": [µs]})], baseline seconds)."""
    sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
    from fastpath import make_capture
    pcap = make_capture(npackets)

    def one(hook: str, d: str) -> tuple[dict, dict]:
        return e2e_run(pcap, npackets, hook, d)

    configs = E2E_CONFIGS
    times = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as d:
        one("nil", tempfile.mkdtemp(dir=d))                              # warm page cache
        for _ in range(runs):                                            # interleaved: load drifts alike
            for style, k in configs:
                hook = "nil" if style == "none" else f"{style}[{k}]"
                m, plug = one(hook, tempfile.mkdtemp(dir=d))             # a fresh --out every run
                tasks = plug["hook_calls"].get("simplecounter.onpacket", 0)
                if style in ("hoisted", "fresh"):
                    st = plug["async"]
                    assert st["ok"] == tasks == st["scheduled"], st
                    m["latency_p50"] = st["latency_p50_ns"] / 1e6
                times[(style, k)].append((m, tasks))
    base = times[("none", None)]
    rows = []
    for style, k in configs[1:]:
        per = {key: [(m[key] - b[key]) / t * 1e6 for (m, t), (b, _) in zip(times[(style, k)], base)]
               for key in E2E_KEYS}
        per["latency_p50"] = [m.get("latency_p50", 0.0) for m, _ in times[(style, k)]]
        rows.append((style, k, per))
    return rows, [b["elapsed"] for b, _ in base]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2_000_000, help="luaprobe round trips")
    ap.add_argument("--peer-tasks", type=int, default=100_000, help="round trips for each peer")
    ap.add_argument("--latency-tasks", type=int, default=3000, help="paced round trips for latency")
    ap.add_argument("--spin-us", type=float, nargs="+", default=[1500.0, 0.0],
                    help="luaprobe worker spin windows to measure (AsyncConfig.worker_spin_us)")
    ap.add_argument("--runs", type=int, default=5, help="runs per style figure (min / median / max)")
    ap.add_argument("--style-tasks", type=int, default=200_000, help="tasks per in-process style run")
    ap.add_argument("--style-window", type=int, default=WINDOW,
                    help="in-process styles: tasks in flight per round (65536 reproduces the end-to-end backlog)")
    ap.add_argument("--style-pollute-kb", type=int, default=0,
                    help="in-process styles: KiB of memory written after the hooks and before each delivery (4096 "
                         "reproduces the end-to-end flush and delivery cost: the packet path evicts the caches)")
    ap.add_argument("--e2e-packets", type=int, default=500_000, help="packets (= tasks) per luaprobe run")
    ap.add_argument("--only", default="roundtrip,styles,e2e", help="comma-separated parts to run")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}, 1 worker, 64-byte tasks")
    if "styles" in parts:
        print(f"\nin-process, {args.style_tasks:,} tasks per run, {args.style_window:,} in flight per round, "
              f"{args.style_pollute_kb:,} KiB written between rounds, min / median / max of {args.runs} runs:\n")
        print("| style | upvalues | fast path µs/task | of which hooks / flush / delivery (medians) | minus its limit "
              "| worker µs/task |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = bench_styles(args.style_tasks, args.runs, args.style_window, args.style_pollute_kb)
        med = {(style, k): statistics.median(fp) for style, k, fp, _, _ in rows}
        for style, k, fp, wk, split_parts in rows:
            split = " / ".join(f"{statistics.median(x):.2f}" for x in split_parts)
            lim = med.get(limit_of(style, k))
            ratio = vs_limit(statistics.median(fp), lim) if lim is not None else "—"
            print(f"| {style} | {k} | {mmm(fp)} | {split} | {ratio} | {mmm(wk) if not style.startswith('limit') else '—'} |",
                  flush=True)
    if "e2e" in parts:
        rows, base = bench_e2e(args.e2e_packets, args.runs)
        print(f"\nend to end, `luaprobe run` on {args.e2e_packets:,} TCP packets, one task per packet, "
              f"minus the run without tasks ({mmm(base)} s); min / median / max of {args.runs} runs:\n")
        print("| style | upvalues | elapsed µs/task | packet-loop CPU µs/task | of which T.async service (flush, "
              "results) | fast-path CPU µs/task (main thread in main(), drain included) | worker + capture + writer "
              "CPU µs/task | CPU of all processes µs/task | result latency p50 ms | minus its limit (loop CPU; elapsed) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        med = {(style, k): per for style, k, per in rows}
        for style, k, per in rows:
            lim = med.get(limit_of(style, k))
            ratio = "—"
            if lim:
                ratio = "; ".join(vs_limit(statistics.median(per[key]), statistics.median(lim[key]))
                                  for key in ("loop_cpu", "elapsed"))
            lat = mmm(per["latency_p50"]) if not style.startswith("limit") else "—"
            print(f"| {style} | {k} | " + " | ".join(mmm(per[key]) for key in E2E_KEYS) + f" | {lat} | {ratio} |",
                  flush=True)
    if "roundtrip" not in parts:
        return 0
    rows, idle = [], []
    for spin in args.spin_us:
        ours = bench_luaprobe(args.tasks, args.latency_tasks, spin)
        rows.append((f"luaprobe T.async (worker spin {spin:g} µs)", *ours[:3]))
        idle.append((spin, ours[3]))
    for name, fn in [("multiprocessing.Pool.apply_async", bench_pool),
                     ("ProcessPoolExecutor", bench_executor),
                     ("multiprocessing.Queue pair", bench_mpqueue),
                     ("faster-fifo put_many/get_many", bench_faster_fifo),
                     ("pyzmq PAIR ipc://", bench_zmq)]:
        try:
            rows.append((name, *fn(args.peer_tasks, args.latency_tasks)))
        except ImportError as e:
            print(f"skipping {name}: {e}")
    base = rows[0][1]
    print(f"\n| contender | round trips/s | luaprobe is x faster | p50 µs @1k/s | p99 µs @1k/s |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, p50, p99 in rows:
        print(f"| {name} | {rate:,.0f} | {base / rate:.1f} | {p50 / 1e3:.1f} | {p99 / 1e3:.1f} |")
    for spin, pct_idle in idle:
        print(f"idle luaprobe worker (spin {spin:g} µs): {pct_idle:.2f} % of a core over 3 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
