"""Benchmark: the capture process's file loop on a fresh mapping against a mapped-before one (issue 10).

    python tools/bench/capture_cold.py [--corpus http,mixed-zipf,small-few] [--rounds 3] [--mb 40]

Each run is a fresh process that maps the corpus shape's --quick capture (engine/capture/pcapfile.py
``open_capture``, as the capture process does), compiles the loop's traces on its first MiB, then times
``capture.file`` (engine/capture/capture.lua: the pcap walk and the copy of each record into a 64 MiB packet ring
nobody reads) over the first --mb MiB: ``cold`` on pages this process has not touched yet (the kernel maps the
page cache's pages into it as the loop reads: a minor fault per 64 KiB, fault-around), ``warm`` after one pass over
them (what a loop over a file mapped earlier pays, as corpus_bench.py's walk after its warm-up walk).  Prints
thread CPU ns per packet and minor faults, min / median / max over --rounds processes per mode, alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
path, mode, limit = sys.argv[2], sys.argv[3], int(sys.argv[4])
from luaprobe.engine.capture.pcapfile import open_capture
from luaprobe.shm.luajit import new_runtime
run = new_runtime().eval("""function(addr, size, fd)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  BUF = BUF or ffi.new("uint8_t[?]", ring.region_size(64 * 1048576, true))
  local r = ring.format(BUF, 64 * 1048576, true)
  return (require("luaprobe.engine.capture.capture").file(r, addr, size, function() return false end, fd))
end""")
with open_capture(path) as c:
    size = min(c.size, limit)
    run(c.address, min(size, 1 << 20), c.fd)              # the traces, on the first MiB
    if mode == "warm":
        run(c.address, size, c.fd)
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.thread_time_ns()
    n = run(c.address, size, c.fd)
    dt, r1 = time.thread_time_ns() - t, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"packets": int(n), "ns": dt / n, "minflt": r1.ru_minflt - r0.ru_minflt}))
'''


def mmm(xs: list) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="http,mixed-zipf,small-few")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=40, help="MiB of the capture walked per run (the ring holds 64)")
    a = ap.parse_args(argv)
    from tools.bench import corpus
    print("| capture | packets | cold ns/packet | warm ns/packet | cold - warm | minor faults cold / warm |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        got: dict = {"cold": [], "warm": []}
        for _ in range(a.rounds):
            for mode in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", CHILD, REPO, path, mode, str(a.mb << 20)], check=True,
                                     capture_output=True, text=True).stdout
                got[mode].append(json.loads(out))
        cold, warm = ([r["ns"] for r in got[m]] for m in ("cold", "warm"))
        print(f"| {c} | {got['cold'][0]['packets']:,} | {mmm(cold)} | {mmm(warm)} | "
              f"{statistics.median(cold) - statistics.median(warm):.1f} | "
              f"{statistics.median(r['minflt'] for r in got['cold']):.0f} / "
              f"{statistics.median(r['minflt'] for r in got['warm']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
