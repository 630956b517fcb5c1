"""Benchmark: T.async round trips against what a user would pick instead, in one run.

    python tools/bench/async_roundtrip.py [--tasks 2000000] [--peer-tasks 100000] [--latency-tasks 3000]

Every contender runs tiny tasks (64-byte data; the worker echoes it; the
caller counts results) with one worker process:

* luaprobe: T.async:schedule from a plug-in VM, the worker's LuaJIT VM, onresult back in the plug-in VM;
* multiprocessing.Pool.apply_async, concurrent.futures.ProcessPoolExecutor, a multiprocessing.Queue pair,
  faster-fifo (put_many/get_many) and pyzmq PAIR over ipc://.

It prints round trips/s (at most WINDOW tasks in flight), p50/p99 round-trip latency at a steady
1 000 tasks/s, the ratio of each to luaprobe, and the CPU an idle luaprobe worker uses.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2_000_000, help="luaprobe round trips")
    ap.add_argument("--peer-tasks", type=int, default=100_000, help="round trips for each peer")
    ap.add_argument("--latency-tasks", type=int, default=3000, help="paced round trips for latency")
    ap.add_argument("--spin-us", type=float, nargs="+", default=[1500.0, 0.0],
                    help="luaprobe worker spin windows to measure (AsyncConfig.worker_spin_us)")
    args = ap.parse_args(argv)
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}, 1 worker, 64-byte tasks")
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
