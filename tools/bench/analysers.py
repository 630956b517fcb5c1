"""Benchmark: what the built-in analysers cost the fast path.

    python tools/bench/analysers.py [--repeat 5] [--copies 10]

Input: tcp-echo-many-flows.pcap (82 k real TCP packets, 500 flows) and trisul-16minutes.pcap (7000
packets of mixed traffic: HTTP, DNS, SMTP, FTP), each given `--copies` times on the command line.
Workload: the fastpath benchmark's simplecounter (TCP packets per destination port).  Configurations:
no analysers (the default: no analysers VM exists), each analyser alone, all of them.  Reports the
engine's own elapsed time (the summary's closed_s: FastPath.run start .. SQLite closed) as packets/s, min / median / max over
`--repeat` runs, and the loss against "none".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
PCAPS = [os.path.join(REPO, "tests", "data", n) if os.path.exists(os.path.join(REPO, "tests", "data", n))
         else os.path.join(REPO, "..", "shared", "pcaps", n) for n in ("tcp-echo-many-flows.pcap", "trisul-16minutes.pcap")]

from tools.bench.fastpath import PLUGIN  # noqa: E402


def once(files, analysers: str) -> tuple[int, float]:
    from luaprobe.engine.fastpath.run import FastPath, RunConfig
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "plugins")
        os.mkdir(p)
        with open(os.path.join(p, "dport.lua"), "w") as f:
            f.write(PLUGIN)
        s = FastPath(RunConfig(plugins=[p], files=files, out_dir=os.path.join(tmp, "out"), analysers=analysers)).run()
        return s["packets"], s["closed_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--copies", type=int, default=10)
    a = ap.parse_args(argv)
    files = PCAPS * a.copies
    base = None
    print("| analysers | packets | packets/s min | median | max | median vs none |")
    print("|---|---:|---:|---:|---:|---:|")
    for cfg in ("none", "counters", "dns", "http", "tls", "all"):
        rates = []
        for _ in range(a.repeat):
            n, el = once(files, "" if cfg == "none" else cfg)
            rates.append(n / el)
        med = statistics.median(rates)
        base = base or med
        print(f"| {cfg} | {n:,} | {min(rates):,.0f} | {med:,.0f} | {max(rates):,.0f} | {100 * (med / base - 1):+.1f} % |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
