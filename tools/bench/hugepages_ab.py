"""Benchmark: the flow table's huge_pages setting (or another `luaprobe run` flag's values), sides alternating
(docs/benchmarks.md "The flow table's huge_pages setting", "Fresh pages off the packet loop's thread").

    python tools/bench/hugepages_ab.py [--corpus flows-1m,flows-100k,dns,mixed-zipf,small-few] [--shape empty]
        [--runs 8] [--sides on,off] [--flag=--huge-pages]
    python tools/bench/hugepages_ab.py --flag=--prefault-ahead --sides 16384,0 ...

For each --quick corpus capture (tools/bench/corpus.py) and one plug-in shape (tools/bench/shapes.py; its light hooks
on the capture's transport, as tools/bench/corpus_bench.py puts them), --runs rounds
of one fresh ``luaprobe run --huge-pages SIDE`` per side (tools/bench/corpus_bench.py's run), the order of the sides
flipped every round so that a drifting load falls on both (``--flag``: the flag the sides are values of).  Per run: loop CPU (the summary's ``packet_loop_cpu_s``
per packet, ns: the fast-path thread's CPU, what tools/bench/corpus_bench.py reports as "loop CPU"), the same after
the first 64 batches, the loop's minor page faults, and the huge pages the kernel gave during the run
(``thp_fault_alloc`` of /proc/vmstat: system-wide, so another program's show too), the loop's wall time per packet
(``packet_loop_s``), the run's peak RSS (corpus_bench.py's) and the loop CPU plus the prefault helper thread's CPU (the summary's ``flow_prefault.cpu_s``: the
process's CPU for the same work, wherever it ran).  Then per cell and side: loop CPU min / median / max and max/min,
and the medians of loop wall and of loop + helper CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, corpus_bench, shapes  # noqa: E402


def thp_allocs() -> int:
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("thp_fault_alloc "))


def one(path: str, n: int | None, plugdir: str, work: str, side: str, flag: str = "--huge-pages") -> dict:
    """One run with `flag side`: loop CPU ns/packet, after warm-up, minor faults, THP given, loop wall, loop + helper."""
    corpus_bench.RUN_ARGS[:] = [flag, side]
    t0 = thp_allocs()
    res = corpus_bench.luaprobe_run(path, plugdir, work)
    s = res["summary"]
    thp = thp_allocs() - t0
    if n is not None and s["packets"] != n:
        raise SystemExit(f"{path}: luaprobe saw {s['packets']} packets, an earlier run {n}")
    n = s["packets"]
    w = s.get("packet_loop_warmup") or {}
    steady = (s["packet_loop_cpu_s"] - w["cpu_s"]) / (n - w["packets"]) * 1e9 if w else float("nan")
    helper = (s.get("flow_prefault") or {}).get("cpu_s", 0.0)
    return {"packets": n, "cpu": s["packet_loop_cpu_s"] / n * 1e9, "steady": steady,
            "wall": s["packet_loop_s"] / n * 1e9, "rss": res["rss_mb"], "total": (s["packet_loop_cpu_s"] + helper) / n * 1e9,
            "minflt": (s.get("packet_loop_rusage") or {}).get("minflt"), "thp": thp,
            "huge": s["flow_table_pages"]["huge_pages"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="flows-1m,flows-100k,dns,mixed-zipf,small-few")
    ap.add_argument("--shape", default="empty")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--sides", default="on,off", help="the flag's values to alternate (--huge-pages: auto, on, off)")
    ap.add_argument("--flag", default="--huge-pages", help="the luaprobe run flag the sides are values of")
    a = ap.parse_args(argv)
    sides = a.sides.split(",")
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="hugepages-ab-") as work:
        for c in a.corpus.split(","):
            layer = corpus.SHAPES[c].get("layer", "tcp")          # as corpus_bench.py: dns's hooks on UDP
            plugdir = shapes.write(a.shape, os.path.join(work, f"plugins-{layer}"), layer)
            path = corpus.make(c, True)
            n = None                # the packets of the cell's first run; every other run must see as many
            for r in range(a.runs):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    x = one(path, n, plugdir, work, side, a.flag)
                    n = x["packets"]
                    res.setdefault((c, side), []).append(x)
                    print(f"{c} {side:4} round {r}: loop CPU {x['cpu']:.0f} ns/packet, after warm-up {x['steady']:.0f}, "
                          f"minflt {x['minflt']}, THP given {x['thp']} (huge_pages {x['huge']}), loop wall {x['wall']:.0f}, "
                          f"loop + helper CPU {x['total']:.0f}, peak RSS {x['rss']:.0f} MB", flush=True)
    print("\n| cell | " + " | ".join(f"{s}: min / median / max" for s in sides) + " | "
          + " | ".join(f"{s} max/min" for s in sides) + " | "
          + " | ".join(f"{s} wall / loop + helper CPU (medians)" for s in sides) + " |")
    print("|---|" + "---:|" * (3 * len(sides)))
    for c in a.corpus.split(","):
        row = [res[(c, s)] for s in sides]
        cpu = [[x["cpu"] for x in r] for r in row]
        print(f"| {c} {a.shape} | " + " | ".join(f"{min(v):.0f} / {statistics.median(v):.0f} / {max(v):.0f}" for v in cpu)
              + " | " + " | ".join(f"{max(v) / min(v):.2f}" for v in cpu) + " | "
              + " | ".join(f"{statistics.median(x['wall'] for x in r):.0f} / "
                           f"{statistics.median(x['total'] for x in r):.0f}" for r in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
