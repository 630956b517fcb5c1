"""Benchmark / diagnosis: where each process of a `luaprobe run` spends its CPU while a plug-in schedules one
T.async task per packet, and how many tasks are in flight over time (issue 11: why the worker falls behind).

    python tools/bench/async_e2e_trace.py [--hook fresh[1]] [--packets 300000] [--runs 3] [--every 0.005]
                                          [--pin-cpus auto] [--timeline]

The run is tools/bench/async_roundtrip.py's end-to-end plug-in (a simplecounter on TCP calling `hook` per packet,
one worker, an overflow queue of 2 x packets) on its seeded capture (tools/bench/fastpath.py make_capture).  While
it runs, a sampler in this process reads every `--every` seconds, with psutil, for the run process (its threads)
and each child (capture, worker, SQLite writer, named from their command lines): user+system CPU seconds, the CPU
it last ran on, voluntary context switches (it slept: futex, pipe, poll) and involuntary ones (it was preempted).
The plug-in records (clock, tasks in flight = T.async pending_items) every 1 000 packets.

Per run it prints, per process, CPU seconds during the packet loop (from the first to the last in-flight record)
and after it, the context switches in the loop, the CPUs it ran on (share of samples); then tasks in flight
(max, median) and, with --timeline, the samples.  Figures are measured; on a shared machine they vary with load.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import async_roundtrip as ar  # noqa: E402
from fastpath import make_capture  # noqa: E402

TRACE_LUA = r"""
local C = require("luaprobe.shm.ring").lib
local TR, ntr = {}, 0
local on = TrisulPlugin.simplecounter.onpacket
TrisulPlugin.simplecounter.onpacket = function(e, l)
  on(e, l)
  if counted % 1000 == 0 then
    ntr = ntr + 1
    TR[ntr] = string.format("%.0f %d %d", C.lp_now_ns(), T.async.pending_items(), done)
  end
end
local unload = TrisulPlugin.onunload
TrisulPlugin.onunload = function()
  unload()
  local f = assert(io.open(os.getenv("LUAPROBE_BENCH_TRACE"), "w"))
  f:write(table.concat(TR, "\n"))
  f:close()
end
"""


def role(p: psutil.Process, root: int) -> str:
    """capture / worker / writer / run / other, from the command line."""
    if p.pid == root:
        return "run"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    for key, name in (("capture.process", "capture"), ("workers.worker", "worker"), ("store", "writer")):
        if key in cmd:
            return name
    return "other:" + cmd[:40]


def sample(proc: psutil.Process, root: int) -> dict:
    """{role: (t, cpu_s, cpu_num, vol, invol)} for the run process and its children now (CLOCK_MONOTONIC)."""
    out = {}
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return out
    t = time.monotonic()
    for p in procs:
        try:
            with p.oneshot():
                ct = p.cpu_times()
                cs = p.num_ctx_switches()
                out[role(p, root) + ("" if p.pid != root else "")] = (t, ct.user + ct.system, p.cpu_num(),
                                                                       cs.voluntary, cs.involuntary)
        except psutil.Error:
            pass
    return out


def one(pcap: str, packets: int, hook: str, every: float, extra: list, d: str):
    path = os.path.join(d, "e2e.lua")
    with open(path, "w") as f:
        f.write(ar.E2E_PLUGIN.replace("STYLES", "done = 0\n" + ar.style_lua()).replace("HOOK", hook)
                .replace("NPACKETS", str(packets)) + TRACE_LUA)
    stats, report, service, trace = (os.path.join(d, n) for n in ("stats.json", "cpu.json", "svc", "trace"))
    proc = subprocess.Popen([sys.executable, "-c", ar.RUN_WRAPPER, report, "run", path, "--pcap", pcap,
                             "--out", os.path.join(d, "out"), "--stats-json", stats, "--workers", "1",
                             "--overflow-limit", str(2 * packets), "--quiet", *extra],
                            cwd=ar.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, LUAPROBE_BENCH_SERVICE=service, LUAPROBE_BENCH_TRACE=trace))
    ps = psutil.Process(proc.pid)
    samples = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            samples.append(sample(ps, proc.pid))
            time.sleep(every)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    out = proc.stdout.read()
    proc.wait()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(out.decode(errors="replace"))
    with open(trace) as f:
        tr = [(float(a) / 1e9, int(b), int(c)) for a, b, c in (line.split() for line in f.read().split("\n") if line)]
    with open(stats) as f:
        summary = json.load(f)
    return samples, tr, summary


def report(samples, tr, summary, timeline: bool) -> dict:
    t_first, t_last = tr[0][0], tr[-1][0]
    first = next((t for t, _, k in tr if k > 0), None)
    print(f"  first result delivered {first - t_first if first else float('nan'):.3f} s after the first trace point")
    roles = sorted({r for s in samples for r in s})
    res = {}
    print(f"  loop {t_last - t_first:.3f} s (trace), summary elapsed {summary['elapsed_s']:.3f} s, "
          f"packet_loop_cpu {summary['packet_loop_cpu_s']:.3f} s; in flight max {max(x[1] for x in tr):,}, "
          f"median {statistics.median(x[1] for x in tr):,.0f}")
    for r in roles:
        if r == "gone" or r.startswith("other:"):   # exited between listing and reading, or short-lived helpers
            continue
        pts = [s[r] for s in samples if r in s]

        def at(t):                       # the last sample at or before t (or the first)
            best = pts[0]
            for p in pts:
                if p[0] <= t:
                    best = p
            return best
        a, b, z = at(t_first), at(t_last), pts[-1]
        cpus = collections.Counter(p[2] for p in pts if t_first <= p[0] <= t_last)
        tot = sum(cpus.values()) or 1
        where = ", ".join(f"cpu{c} {100 * k / tot:.0f}%" for c, k in sorted(cpus.items()))
        res[r] = (b[1] - a[1], z[1] - b[1])
        print(f"  {r:8s} loop CPU {b[1] - a[1]:6.3f} s ({100 * (b[1] - a[1]) / max(1e-9, t_last - t_first):3.0f}% "
              f"of a core), after {z[1] - b[1]:6.3f} s; ctx sw in loop vol {b[3] - a[3]:7d} invol {b[4] - a[4]:6d}; "
              f"on {where}")
    if timeline:
        print("  t(s)  in-flight  results")
        for t, n, k in tr[:: max(1, len(tr) // 30)]:
            print(f"  {t - t_first:6.3f} {n:8d} {k:8d}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hook", default="fresh[1]")
    ap.add_argument("--packets", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--every", type=float, default=0.005)
    ap.add_argument("--pin-cpus", default=None)
    ap.add_argument("--timeline", action="store_true")
    args = ap.parse_args(argv)
    pcap = make_capture(args.packets)
    extra = ["--pin-cpus", args.pin_cpus] if args.pin_cpus else []
    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; hook {args.hook}, "
          f"{args.packets:,} packets {' '.join(extra)}")
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):
            samples, tr, summary = one(pcap, args.packets, args.hook, args.every, extra, tempfile.mkdtemp(dir=d))
            print(f"run {i + 1}:")
            report(samples, tr, summary, args.timeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
