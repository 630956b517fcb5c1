"""Benchmark: A/B of engine copies and hook bodies in the real fast path, alternating, one fresh process per run
(issue 10).

    python tools/bench/hookab.py --corpus flows-100k --rounds 6 [--layer udp] NAME=SPEC [NAME=SPEC ...]

SPEC is ``ENGINE_DIR`` or ``ENGINE_DIR|PRELUDE|BODY``: ENGINE_DIR a copy of ``engine/`` whose Lua modules the
run loads (``-``: this checkout's; tools/bench/hookwalk.py ``use_engine_dir``), and a TCP (``--layer udp``: UDP)
simplecounter with that prelude and ``onpacket`` body (tools/bench/shapes.py ``_simple``; ``-||`` is the empty hook),
or without them the ``flowstate`` shape.  Each run is ``hookcost.one_run`` (``FastPath`` in-process over the --quick corpus capture:
capture process, driver, the plug-in VM, SQLite writer) in a new Python process, so no run inherits another's
heap, traces or page cache of the VM; the variants run in turn, the order reversed every other round.  Prints each
run, then per variant min / median / max of the packet loop's CPU per packet (``packet_loop_cpu_s``, the corpus
benchmark's column), of the plug-in VM's walk CPU per packet and the median of the loop's minor page faults
(``packet_loop_rusage.minflt``).  CPU time, not elapsed: on a shared machine compare medians of alternated runs.

Example (docs/benchmarks.md, "Where flowstate's time goes on flows-100k"): the engine of ``main`` against this
checkout's, and the flowstate hook with the collector stopped:

    python tools/bench/hookab.py --corpus flows-100k --rounds 8 main=/tmp/main-engine new=- \\
        "gcstop=-|collectgarbage('stop') local state = {}|local id = layer:packet():flowid():id(); \\
state[id] = (state[id] or 0) + 1"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r'''
import json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
from tools.bench import corpus, hookcost, shapes
eng, kind, pre, body, corp, layer = sys.argv[2:8]
if eng != "-":
    from tools.bench.hookwalk import use_engine_dir
    use_engine_dir(eng)
from luaprobe.engine.fastpath import run as runmod
ru = {}
orig = runmod.FastPath.run
def run(self):
    s = orig(self)
    ru.update(s["packet_loop_rusage"])
    return s
runmod.FastPath.run = run
with tempfile.TemporaryDirectory(prefix="lp-hookab-") as d:
    pd = os.path.join(d, "plugins")
    os.makedirs(pd)
    if kind == "body":
        with open(os.path.join(pd, "body.lua"), "w") as f:
            f.write(shapes._simple("body", layer, body, prelude=pre))
    else:
        shapes.write("flowstate", pd, layer=layer)
    r = hookcost.one_run(corpus.make(corp, True), pd, d)
r["minflt"] = ru.get("minflt", 0)
print(json.dumps(r))
'''


def parse(spec: str) -> tuple:
    """'ENGINE_DIR[|PRELUDE|BODY]' -> (engine_dir, "body" or "flowstate", prelude, body); raises SystemExit on a bad
    spec.  A spec with a prelude and body runs that hook even when the body is empty (``-||``: an empty hook)."""
    parts = spec.split("|", 2)
    if len(parts) == 2:
        raise SystemExit(f"hookab: {spec!r}: want ENGINE_DIR or ENGINE_DIR|PRELUDE|BODY")
    eng = parts[0]
    if eng != "-" and not os.path.isdir(eng):
        raise SystemExit(f"hookab: {eng}: not a directory")
    return (eng, "body", parts[1], parts[2]) if len(parts) == 3 else (eng, "flowstate", "", "")


def one(name: str, spec: tuple, corp: str, layer: str) -> dict:
    """One run in a fresh process: {"loop": ns/packet, "<vm>.lua": walk ns/packet, "minflt": faults}."""
    p = subprocess.run([sys.executable, "-c", CHILD, REPO, *spec, corp, layer], capture_output=True, text=True,
                       cwd=REPO)
    if p.returncode:
        raise SystemExit(f"hookab: {name}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def walk_of(d: dict) -> float:
    return next(v for k, v in d.items() if k.endswith(".lua"))


def mmm(xs: list) -> str:
    return f"{min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=ENGINE_DIR or NAME=ENGINE_DIR|PRELUDE|BODY")
    ap.add_argument("--corpus", default="flows-100k", help="a corpus traffic shape (tools/bench/corpus.py)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--layer", choices=("tcp", "udp"), default="tcp")
    a = ap.parse_args(argv)
    vs = []
    for v in a.variants:
        name, sep, spec = v.partition("=")
        if not sep:
            raise SystemExit(f"hookab: {v!r}: want NAME=SPEC")
        vs.append((name, parse(spec)))
    res: dict = {name: [] for name, _ in vs}
    for r in range(a.rounds):
        for name, spec in (vs if r % 2 == 0 else vs[::-1]):
            d = one(name, spec, a.corpus, a.layer)
            res[name].append(d)
            print(f"round {r} {name}: loop {d['loop']:.0f} walk {walk_of(d):.0f} minflt {d['minflt']}", flush=True)
    print(f"\n{a.corpus}, {a.rounds} rounds\n| variant | loop CPU ns/packet min / median / max "
          "| walk CPU ns/packet min / median / max | loop minflt median |\n|---|---:|---:|---:|")
    for name, ds in res.items():
        print(f"| {name} | {mmm([d['loop'] for d in ds])} | {mmm([walk_of(d) for d in ds])} "
              f"| {statistics.median(d['minflt'] for d in ds):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
