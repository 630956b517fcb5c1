"""A/B benchmark of two checkouts of luaprobe on one capture: the same plug-in (the fast-path benchmark's
TCP dport counter) run alternately by each checkout's own venv, N rounds; prints each run and
min/median/max of the engine's elapsed time, of its packet loop (first batch .. last batch walked) and of the
loop's CPU time per packet (the summary's packet_loop_cpu_s: the fast path thread's CPU, less sensitive to load), and
that plus the prefault helper thread's CPU (the summary's flow_prefault.cpu_s, 0 without one), the loop's spread
(max / min of packet_loop_s) and the fast path thread's voluntary context switches in the loop (the summary's
packet_loop_rusage.nvcsw: mostly its sleeps on an empty packet ring, waiting for the capture process), and the CPU
time of the run's whole process tree (run CPU s: the CLI, the capture process, the store writer, start-up included).

    python tools/bench/ab_checkouts.py BEFORE_REPO AFTER_REPO CAPTURE [--rounds 6] [--shape empty] [--layer udp]

``--shape NAME`` runs a plug-in shape of tools/bench/shapes.py (e.g. ``empty``: the corpus benchmark's empty TCP
hook) instead of the dport counter; ``--layer udp`` hooks its light shapes on UDP (the corpus's ``dns``, which
carries no TCP: corpus_bench.py does the same).  The side that runs first alternates from round to round.

Each repo needs its own `.venv` with luaprobe installed (`pip install -e .`).  Alternating the two sides
spreads a busy machine's noise over both; compare medians, not single runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def plugin_text() -> str:
    src = open(os.path.join(HERE, "fastpath.py")).read()
    return re.search(r'PLUGIN = r"""(.*?)"""', src, re.S).group(1)


def run_once(repo: str, capture: str, plugin: str, work: str) -> dict:
    """One run's summary, with ``run_cpu_s``: the CPU time (user + system) of the run's whole process tree (the CLI,
    its capture process, store writer and workers: every descendant reaped), start-up and export included."""
    out, stats = os.path.join(work, "out"), os.path.join(work, "stats.json")
    subprocess.run(["rm", "-rf", out], check=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([os.path.join(repo, ".venv", "bin", "python"), "-m", "luaprobe.engine.daemon.cli", "run",
                        plugin, "--pcap", capture, "--out", out, "--stats-json", stats, "-q"],
                       cwd=repo, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{repo}: exit {p.returncode}: {p.stderr.strip()}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**json.load(open(stats)), "run_cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("capture")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shape", help="a plug-in shape of tools/bench/shapes.py instead of the dport counter")
    ap.add_argument("--layer", default="tcp", choices=("tcp", "udp"), help="transport of --shape's light hooks")
    a = ap.parse_args(argv)
    res = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as work:
        if a.shape:
            from tools.bench import shapes
            plugin = shapes.write(a.shape, os.path.join(work, "plugins"), layer=a.layer)
        else:
            plugin = os.path.join(work, "dport.lua")
            open(plugin, "w").write(plugin_text())
        for r in range(a.rounds):
            sides = (("before", a.before), ("after", a.after))
            for side, repo in sides if r % 2 == 0 else sides[::-1]:
                s = run_once(repo, a.capture, plugin, work)
                cpu = s.get("packet_loop_cpu_s")
                ns = cpu / s["packets"] * 1e9 if cpu else None
                helper = (s.get("flow_prefault") or {}).get("cpu_s", 0.0)     # the prefault helper thread's CPU
                both = (cpu + helper) / s["packets"] * 1e9 if cpu else None
                nvcsw = (s.get("packet_loop_rusage") or {}).get("nvcsw")
                res[side].append((s["elapsed_s"], s.get("packet_loop_s"), s["packets"], ns, both, nvcsw, s["run_cpu_s"]))
                print(side, r, "elapsed_s", s["elapsed_s"], "packet_loop_s", s.get("packet_loop_s"),
                      "loop CPU ns/packet", ns and round(ns), "loop + prefault helper CPU", both and round(both),
                      "loop nvcsw", nvcsw, "run CPU s", round(s["run_cpu_s"], 3), flush=True)
    for side, v in res.items():
        el = [x[0] for x in v]
        pl = [x[1] for x in v if x[1]]
        ns = [x[3] for x in v if x[3]]
        both = [x[4] for x in v if x[4]]
        cs = [x[5] for x in v if x[5] is not None]
        rc = [x[6] for x in v]
        print(f"{side}: {v[0][2]} packets  elapsed_s min/median/max {min(el)}/{round(statistics.median(el), 3)}/{max(el)}"
              + (f"  packet_loop_s {min(pl)}/{round(statistics.median(pl), 4)}/{max(pl)} (spread {max(pl) / min(pl):.2f})"
                 if pl else "")
              + (f"  loop CPU ns/packet {min(ns):.0f}/{statistics.median(ns):.0f}/{max(ns):.0f}" if ns else "")
              + (f"  loop + helper CPU {min(both):.0f}/{statistics.median(both):.0f}/{max(both):.0f}" if both else "")
              + (f"  loop nvcsw {min(cs)}/{statistics.median(cs):g}/{max(cs)}" if cs else "")
              + f"  run CPU s {min(rc):.3f}/{statistics.median(rc):.3f}/{max(rc):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
