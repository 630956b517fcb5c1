"""The fixed cost of a whole `luaprobe run`, A/B alternating between two checkouts (issue 10 "honest accounting").

    python tools/bench/fixed_cost.py BEFORE_REPO AFTER_REPO CAPTURE [CAPTURE ...] [--rounds 8] [--shape empty]

Each round runs ``REPO/.venv/bin/luaprobe run PLUGIN --pcap CAPTURE --out DIR -q --stats-json FILE`` once per
checkout (the side that goes first alternates), as a user types it, and records per run:

* ``wall``: seconds from fork to the command's exit (Python start-up, imports, the run, interpreter exit);
* ``closed``: the summary's ``closed_s`` (FastPath.run start to the SQLite database closed);
* ``loop``: the summary's ``packet_loop_s`` (first batch to last batch walked);
* ``cpu``: user + system CPU seconds of the whole process tree (the CLI, capture process, store writer, workers:
  ``RUSAGE_CHILDREN`` of this process across the run; every descendant is waited for by its parent).

Prints each run and min / median / max per checkout and capture.  The plug-in is a shape of tools/bench/shapes.py
(default ``empty``: one empty TCP ``onpacket``).  Each repo needs its own ``.venv`` with luaprobe installed
(``pip install -e .``).  Compare medians of the same window only: the machine's load moves all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

KEYS = ("wall", "closed", "loop", "cpu")


def run_once(repo: str, capture: str, plugin: str, work: str) -> dict:
    """One run of ``repo``'s luaprobe; the four measures above (seconds)."""
    out, stats = os.path.join(work, "out"), os.path.join(work, "stats.json")
    subprocess.run(["rm", "-rf", out], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([os.path.join(repo, ".venv", "bin", "luaprobe"), "run", plugin, "--pcap", capture,
                        "--out", out, "--stats-json", stats, "-q"], cwd=repo, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"{repo}: exit {p.returncode}: {p.stderr.strip()}")
    s = json.load(open(stats))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "closed": s["closed_s"], "loop": s.get("packet_loop_s") or 0.0, "cpu": cpu}


def spread(xs: list) -> str:
    """``min / median / max`` of ``xs`` (seconds, 3 decimals)."""
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("captures", nargs="+")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--shape", default="empty", help="a plug-in shape of tools/bench/shapes.py")
    a = ap.parse_args(argv)
    from tools.bench import shapes
    sides = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
    with tempfile.TemporaryDirectory() as work:
        plugin = shapes.write(a.shape, os.path.join(work, "plugins"))
        for capture in a.captures:
            capture = os.path.abspath(capture)
            res = {k: [] for k in sides}
            for r in range(a.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for side in order:
                    m = run_once(sides[side], capture, plugin, work)
                    res[side].append(m)
                    print(f"{os.path.basename(capture)} round {r} {side:6s} " +
                          " ".join(f"{k} {m[k]:.3f}" for k in KEYS), flush=True)
            for side in sides:
                print(f"== {os.path.basename(capture)} {side} ({a.rounds} runs, min / median / max s): " +
                      "; ".join(f"{k} {spread([m[k] for m in res[side]])}" for k in KEYS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
