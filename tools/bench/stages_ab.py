"""Benchmark: A/B of the fast path's fill and flow-table stages (tools/bench/stages.lua) between copies of the Lua
modules, alternating, one fresh process per run (issue 10).

    python tools/bench/stages_ab.py [--corpus small-few,dns] [--rounds 6] [--runs 3] NAME=DIR [NAME=DIR ...]

DIR is a folder holding ``engine/`` and ``shm/`` (e.g. ``git archive main engine shm | tar -x -C DIR``) whose Lua
modules the run loads (``-``: this checkout's); the compiled _lpsync is this checkout's.  Each run is
``stages.measure`` (thread CPU ns per packet, the minimum of --runs passes) with the producer one batch ahead
("near") and a full ring ahead ("far"), in a new Python process; the variants run in turn, the order reversed
every other round.  Prints per variant and column min / median / max over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the start of a child run by :func:`alternate`: argv[1] the repository (on sys.path), argv[2] the variant's folder
#: (``-``: this checkout) whose engine/ and shm/ Lua modules the child's LuaJIT runtimes load from then on
PRELUDE = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
src = sys.argv[2]
if src != "-":
    import luaprobe.shm.luajit as lj
    orig = lj.package_dirs
    def dirs():
        d = orig()
        d["engine"], d["shm"] = os.path.join(src, "engine"), os.path.join(src, "shm")
        return d
    lj.package_dirs = dirs
'''

CHILD = PRELUDE + r'''
path, runs = sys.argv[3], int(sys.argv[4])
from tools.bench import stages
near = stages.measure(path, runs, 64 * 1024)
far = stages.measure(path, runs, 0)
print(json.dumps({"walk": near["walk"], "fill near": near["fill"], "flows near": near["flows"],
                  "fill far": far["fill"], "flows far": far["flows"]}))
'''



def alternate(var: list, rounds: int, child: str, args: list) -> dict:
    """Run ``python -c child REPO SRC *args`` for each variant (NAME, SRC: a source tree, or "-" for this one)
    ``rounds`` times, the side that runs first alternating from round to round (a busy machine's noise spread over
    both): {NAME: [the JSON of each run's last stdout line]}.  capture_ab.py uses it too."""
    res: dict = {name: [] for name, _ in var}
    for r in range(rounds):
        for name, src in (var if r % 2 == 0 else var[::-1]):
            out = subprocess.run([sys.executable, "-c", child, REPO, os.path.abspath(src) if src != "-" else "-",
                                  *args], check=True, capture_output=True, text=True).stdout
            res[name].append(json.loads(out.strip().splitlines()[-1]))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("variants", nargs="+", help="NAME=DIR")
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    from tools.bench import corpus
    var = [v.split("=", 1) for v in a.variants]
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        res = alternate(var, a.rounds, CHILD, [path, str(a.runs)])
        print(f"{c}: CPU ns/packet min / median / max over {a.rounds} rounds")
        cols = list(res[var[0][0]][0])
        print("| variant | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name, _ in var:
            cells = []
            for k in cols:
                xs = [x[k] for x in res[name]]
                cells.append(f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
