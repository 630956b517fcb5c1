"""Benchmark: CPU time per packet of each fast-path stage, per traffic shape (issue 10).

    python tools/bench/stages.py [--quick] [--corpus a,b] [--runs 5]

Runs tools/bench/stages.lua in this process over each corpus capture (tools/bench/corpus.py) and
prints ns/packet of thread CPU time (not wall time: the figures hold on a busy machine) for

* **walk**  — pcap walker + luaprobe's decoder, nothing else (the corpus benchmark's walk, no hook);
* **copy**  — the capture process's work: walker + copy of every record into the packet ring;
* **fill**  — the driver's ring pop + decode + batch accounting (Driver:fill without the flow table);
* **flows** — the flow table (update_batch: lookup, insertion, counters);

twice: with the producer one batch ahead of the driver ("near": records still in this core's
cache) and with the producer a full ring ahead ("far": what the driver meets when the capture
process on the other core keeps the 32 MiB packet ring full).  The difference between the two
fill columns is the cost of reading records that are no longer in the core's cache.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus  # noqa: E402


def measure(path: str, runs: int, ahead: int, no_hints: bool = False) -> dict:
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    stages = lua.execute(f"return dofile({os.path.join(REPO, 'tools', 'bench', 'stages.lua')!r})")
    with open_capture(path) as cap:
        r = stages.run(cap.address, cap.size, lua.table_from({b"runs": runs, b"ahead": ahead, b"no_hints": no_hints}))
        return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in r.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small captures")
    ap.add_argument("--runs", type=int, default=5, help="passes per measurement; the minimum is kept")
    ap.add_argument("--corpus", default=",".join(c for c in corpus.ORDER if c != "flows-1m"))
    ap.add_argument("--no-hints", action="store_true",
                    help="the packet ring without prefetch hints (shm/ring.lua), as before 2026-11-30 11:30 (A/B)")
    a = ap.parse_args(argv)
    print("CPU ns/packet (thread CPU time, minimum of %d passes); near = producer one batch ahead, "
          "far = a full 32 MiB ring ahead\n" % a.runs)
    print("| traffic | packets | mean frame B | walk | copy | fill near | flows near | fill far | flows far |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, a.quick)
        near = measure(path, a.runs, 64 * 1024, a.no_hints)
        far = measure(path, a.runs, 0, a.no_hints)
        n = int(near["packets"])
        frame = (os.path.getsize(path) - 24) / n - 16
        print(f"| {c} | {n:,} | {frame:.0f} | {near['walk']:.0f} | {near['copy']:.0f} | {near['fill']:.0f} | "
              f"{near['flows']:.0f} | {far['fill']:.0f} | {far['flows']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
