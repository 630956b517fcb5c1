"""A/B of when T.async workers start: a plug-in asking for N workers (``TrisulPlugin.request_async_workers``)
schedules one task per 100 TCP packets; each checkout's own venv runs it on the same capture, the side that runs
first alternating from round to round.  Prints, per run and as min/median/max, the engine's packet loop (first
batch .. last batch walked, summary ``packet_loop_s``) and the loop thread's CPU in it (``packet_loop_cpu_s``):
a loop much longer than its CPU waited (for the CPU, on worker start-ups), it did not work.

    python tools/bench/async_start_ab.py BEFORE_REPO AFTER_REPO CAPTURE --workers 1 8 64 [--rounds 3] \\
        [--run-arg=--worker-spin-us --run-arg=0]

Before docs/async.md "When workers start" (engine/plugins/vm.py ``_start_at_load``): the first task started the
whole pool inside its hook (N segments and N Popen), then the N start-ups (~60 ms of CPU each) competed with the
loop for the cores.  Each repo needs its own `.venv` with luaprobe installed (`pip install -e .`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PLUGIN = r"""
TrisulPlugin = { id = { name = "async start bench" },
  request_async_workers = %d,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      N = (N or 0) + 1
      if N %% 100 == 0 then
        T.async:schedule { data = tostring(N), onexecute = function(d) return d end }
      end
    end } }
"""


def run_once(repo: str, capture: str, plugin: str, work: str, extra=()) -> dict:
    out, stats = os.path.join(work, "out"), os.path.join(work, "stats.json")
    subprocess.run(["rm", "-rf", out], check=True)
    p = subprocess.run([os.path.join(repo, ".venv", "bin", "python"), "-m", "luaprobe.engine.daemon.cli", "run",
                        plugin, "--pcap", capture, "--out", out, "--stats-json", stats, "-q", *extra],
                       cwd=repo, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{repo}: exit {p.returncode}: {p.stderr.strip()}")
    return json.load(open(stats))


def spread(v) -> str:
    return f"{min(v):.3f}/{statistics.median(v):.3f}/{max(v):.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("capture")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run-arg", action="append", default=[], help="an extra `luaprobe run` argument (repeat)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        for n in a.workers:
            plugin = os.path.join(work, f"start{n}.lua")
            with open(plugin, "w") as f:
                f.write(PLUGIN % n)
            res = {"before": [], "after": []}
            for r in range(a.rounds):
                sides = (("before", a.before), ("after", a.after))
                for side, repo in sides if r % 2 == 0 else sides[::-1]:
                    s = run_once(repo, a.capture, plugin, work, a.run_arg)
                    res[side].append((s["packet_loop_s"], s["packet_loop_cpu_s"], s["elapsed_s"]))
                    print(f"N={n} {side} round {r}: packet_loop_s {s['packet_loop_s']} packet_loop_cpu_s "
                          f"{s['packet_loop_cpu_s']} elapsed_s {s['elapsed_s']} load {os.getloadavg()[0]:.1f}",
                          flush=True)
            for side, v in res.items():
                print(f"N={n} {side}: packet_loop_s {spread([x[0] for x in v])}  packet_loop_cpu_s "
                      f"{spread([x[1] for x in v])}  elapsed_s {spread([x[2] for x in v])}  (min/median/max)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
