"""Benchmark: what each part of a light hook costs per packet, and what the LuaJIT walk's own count costs (issue 10).

    python tools/bench/hookparts.py [--corpus small-few] [--rounds 5] [--engine-dir DIR]

The corpus goal compares each light hook's run with the LuaJIT walk of the same file (tools/bench/corpus_bench.py
WALK: decode, and a Lua table counting TCP destination ports).  This splits both sides into steps:

* **the hooks** (tools/bench/shapes.py): each light shape's body cut into a ladder, each step a TCP simplecounter
  walked over the whole --quick capture by tools/bench/hookwalk.py ``measure`` (the plug-in VM's real walk, flows
  from the real flow table, each batch staged in one hot batch array; thread CPU ns per packet of the capture).  The
  steps: the empty hook; the shape's bindings alone (``layer:rawbytes():hval_16(2)``, two ``layer:getbyte``,
  ``layer:packet():flowid():id()``: their result kept in a local); the whole body (the bindings and the script's own
  Lua table, or ``engine:update_counter`` into a declared countergroup).  A step's increment over the one before is
  what that part costs inside the walk.
* **the walk** (corpus_bench.py WALK in this process, one fresh LuaJIT state per run, one untimed warm-up walk):
  as the benchmark runs it; with its count replaced by ``counts[1] = (counts[1] or 0) + k`` (the destination port
  still read, one table slot written per packet, no lookup by port): the difference is what its table count costs;
  and as benchmarked but with ``jit.flush()`` after the warm-up walk, so that the timed walk's loop trace is recorded
  on packets whose port the table already holds.  The warm-up walk records it on the capture's first packets, where
  most ports are new (a miss, then NEWREF); every later packet then leaves the loop there for a side trace that
  re-enters the loop trace from its start (docs/benchmarks.md, "small-few: where a light hook's time goes").

Steps and walks run in turn, --rounds times; prints min / median / max per step and the increments of the medians.
CPU time, not elapsed: on the shared machine compare medians.  --engine-dir runs luaprobe.engine's Lua modules from
DIR for the hook steps (an A/B of a binding change: tools/bench/hookwalk.py ``use_engine_dir``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, corpus_bench, hookwalk, shapes  # noqa: E402

#: (shape, step, module-level prelude, onpacket body, countergroup GUID or "")
STEPS = [
    ("empty", "hook", "", "", ""),
    ("hval", "bindings", "", "      local k = layer:rawbytes():hval_16(2)", ""),
    ("hval", "whole body", "local seen = {}", "      local k = layer:rawbytes():hval_16(2)\n"
     "      seen[k] = (seen[k] or 0) + 1", ""),
    ("counter", "bindings", "", "      local k = layer:getbyte(2) * 256 + layer:getbyte(3)", ""),
    ("counter", "whole body", "", f'      engine:update_counter("{shapes.GROUP}", '
     "layer:getbyte(2) * 256 + layer:getbyte(3), 0, 1)", shapes.GROUP),
    ("flowstate", "bindings", "", "      local id = layer:packet():flowid():id()", ""),
    ("flowstate", "whole body", "local state = {}", "      local id = layer:packet():flowid():id()\n"
     "      state[id] = (state[id] or 0) + 1", ""),
]

#: the walk without its lookup by port: the port is still read, one fixed table slot written per packet
WALK_NO_COUNT = corpus_bench.WALK.replace("counts[k] = (counts[k] or 0) + 1", "counts[1] = (counts[1] or 0) + k")
assert WALK_NO_COUNT != corpus_bench.WALK, "corpus_bench.WALK no longer counts with counts[k]"


def step_ns(capture: str, step: tuple) -> float:
    """One walk of `capture` by a TCP simplecounter running the step's body: thread CPU ns per packet."""
    _, _, prelude, body, group = step
    with tempfile.TemporaryDirectory(prefix="lp-hookparts-") as d:
        with open(os.path.join(d, "step.lua"), "w") as f:
            f.write(shapes._simple("step", "tcp", body, prelude=prelude, group=group))
        return hookwalk.measure(capture, d, 1, False)[0]


def walk_ns(capture: str, src: str, flush: bool = False) -> float:
    """One timed walk of `capture` by the Lua chunk `src` (corpus_bench.WALK's interface) after an untimed one, in a
    fresh LuaJIT state (`flush`: its traces dropped between the two): thread CPU ns per packet."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    walk = lua.execute(src)
    with open_capture(capture) as cap:
        n = int(walk(cap.address, cap.size))
        if flush:
            lua.execute("jit.flush()")
        t = time.thread_time_ns()
        walk(cap.address, cap.size)
        return (time.thread_time_ns() - t) / n


def mmm(xs: list) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few", help="a traffic shape (--quick capture) with TCP")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine-dir", help="luaprobe.engine's Lua modules from this folder (the hook steps)")
    a = ap.parse_args(argv)
    if a.engine_dir:
        hookwalk.use_engine_dir(a.engine_dir)
    capture = corpus.make(a.corpus, True)
    walks = [("walk", "as benchmarked", corpus_bench.WALK, False), ("walk", "without its count", WALK_NO_COUNT, False),
             ("walk", "its trace recorded on known ports", corpus_bench.WALK, True)]
    res: dict = {}
    for r in range(a.rounds):
        order = [("s", s) for s in STEPS] + [("w", w) for w in walks]
        for kind, x in (order if r % 2 == 0 else order[::-1]):
            v = step_ns(capture, x) if kind == "s" else walk_ns(capture, x[2], x[3])
            res.setdefault(x[:2], []).append(v)
        print(f"round {r + 1} of {a.rounds} done", file=sys.stderr, flush=True)
    print(f"{a.corpus}, {a.rounds} rounds: thread CPU ns per packet of the capture\n"
          "| shape | step | min / median / max | increment of the median |\n|---|---|---:|---:|")
    empty = statistics.median(res[("empty", "hook")])
    prev: dict = {}
    for key in [s[:2] for s in STEPS] + [w[:2] for w in walks]:
        med = statistics.median(res[key])
        base = prev.get(key[0], empty) if key[0] != "walk" else None
        inc = "" if base is None or key == ("empty", "hook") else f"{med - base:+.1f}"
        print(f"| {key[0]} | {key[1]} | {mmm(res[key])} | {inc} |")
        prev[key[0]] = med
    wc, wn, wk = (statistics.median(res[w[:2]]) for w in walks)
    print(f"\nthe walk's count by port: {wc - wn:.1f} of its {wc:.1f} ns per packet as benchmarked, {wk - wn:.1f} of "
          f"{wk:.1f} with its loop trace recorded on known ports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
