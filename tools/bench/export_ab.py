"""A/B of the end-of-run flow export (issue 10): one corpus capture through ``luaprobe run`` with the empty TCP hook
of tools/bench/shapes.py, alternating two checkouts (each with its own ``.venv``), N rounds.

    .venv/bin/python tools/bench/export_ab.py BEFORE_REPO AFTER_REPO CAPTURE [--rounds 5]

Per run: ``closed_s`` (start to the SQLite database closed, the summary's figure: what a user waits for),
``elapsed_s`` (the fast path's own end, its share of the export included), ``closed_s - elapsed_s`` (the wait
for the store writer's last rows), ``packet_loop_s``, and the CPU seconds (user + sys) of the whole process tree
(fast path, capture process, store writer: ``wait4`` of the run, whose children are waited for).  The packet loop
is the same code on both sides, so the differences are the export's.  Prints each run, then min / median / max
per side.  On a shared machine compare the CPU columns first; wall times move with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import shapes  # noqa: E402  (tools/bench/shapes.py: the plug-in shapes)

COLS = ("closed_s", "elapsed_s", "tail_s", "loop_s", "cpu_s", "user_s", "sys_s")


def run_once(repo: str, capture: str, plugins: str, work: str) -> dict:
    """One ``luaprobe run`` of ``repo``'s venv; returns the COLS figures.  Raises SystemExit on a failed run."""
    out, stats = os.path.join(work, "out"), os.path.join(work, "stats.json")
    subprocess.run(["rm", "-rf", out, stats], check=True)
    t0 = time.monotonic()
    p = subprocess.Popen([os.path.join(repo, ".venv", "bin", "python"), "-m", "luaprobe.engine", "run", plugins,
                          "--pcap", capture, "--out", out, "--stats-json", stats, "-q"],
                         cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode:
        raise SystemExit(f"{repo}: exit {p.returncode}: {err.strip()}")
    s = json.load(open(stats))
    flows = s["store"]["rows"].get("flows", 0)
    return {"closed_s": s["closed_s"], "elapsed_s": s["elapsed_s"], "tail_s": s["closed_s"] - s["elapsed_s"],
            "loop_s": s["packet_loop_s"], "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime,
            "sys_s": ru.ru_stime, "flows": flows, "wall_s": time.monotonic() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("capture")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="empty", help="plug-in shape of tools/bench/shapes.py (default empty)")
    a = ap.parse_args(argv)
    capture = os.path.abspath(a.capture)
    res = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="lp-export-ab-") as work:
        plugins = os.path.join(work, "plugins")
        os.makedirs(plugins)
        for name, text in shapes.SHAPES[a.shape].items():
            with open(os.path.join(plugins, name), "w") as f:
                f.write(text)
        for r in range(a.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                d = run_once(getattr(a, side), capture, plugins, work)
                res[side].append(d)
                load = os.getloadavg()[0]
                print(f"round {r + 1} {side:6s} " + " ".join(f"{k} {d[k]:.2f}" for k in COLS)
                      + f" flows {d['flows']} load {load:.1f}", flush=True)
    print(f"\n{os.path.basename(capture)}, {a.rounds} rounds, min / median / max")
    for k in COLS:
        print(f"{k:10s} " + "   ".join(
            f"{side} " + " / ".join(f"{f(x[k] for x in res[side]):.2f}" for f in (min, statistics.median, max))
            for side in ("before", "after")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
