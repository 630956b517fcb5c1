"""Flow-sharded fast paths: packets/s and CPU time per packet for 1, 2, 4 shards (docs/benchmarks.md).

    .venv/bin/python tools/bench/shards.py [--packets 400000] [--iters 2000] [--repeat 3] [--shards 1,2,4]

A CPU-heavy simplecounter (every Ethernet packet runs a loop of --iters xor/rotate steps in Lua:
several µs per packet) over a generated capture file (`luaprobe gen`, 2 000 flows between many hosts,
so the shard hash has addresses to spread; written once, read from the page cache).  Each configuration runs `luaprobe run --shards N` as a
subprocess; wall time is measured around it and CPU time is the RUSAGE_CHILDREN difference (the CLI,
the coordinator, capture, shards, store writers: every process is waited for by its parent).
The plug-in's own cost is measured as (CPU with it - CPU without it) / packets at one shard.
Prints a Markdown table with min / median / max of --repeat runs.
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
G_ETH = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}"

HEAVY = """
local bit = require 'bit'
local bxor, rol = bit.bxor, bit.rol
TrisulPlugin = {
  id = { name = "cpu heavy" },
  simplecounter = {
    protocol_guid = "%s",
    onpacket = function(engine, layer)
      local x = layer:getbyte(12)
      for i = 1, %d do x = bxor(rol(x, 5), i) end
      engine:update_counter("{AAAAAAAA-0000-4000-8000-00000000BE01}", x %% 16, 0, 1)
    end,
  },
}
"""

LIGHT = """
TrisulPlugin = {
  id = { name = "light" },
  simplecounter = {
    protocol_guid = "%s",
    onpacket = function(engine, layer)
      engine:update_counter("{AAAAAAAA-0000-4000-8000-00000000BE01}", "p", 0, 1)
    end,
  },
}
"""


def run_once(plugin_dir: str, pcap: str, shards: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin_dir, "--pcap", pcap, "--out", out,
                            "--shards", str(shards), "--json"], cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"luaprobe run failed ({r.returncode}): {r.stderr}")
    s = json.loads(r.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"packets": s["packets"], "wall_s": wall, "engine_s": s["elapsed_s"], "cpu_s": cpu,
            "per_shard": [x["packets"] for x in s.get("shards", [])] or [s["packets"]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=5000, help="Lua loop steps per packet in the heavy plug-in")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shards", default="1,2,4")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-shards-")
    spec = os.path.join(tmp, "traffic.pcap")
    subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", spec, "--packets", str(args.packets),
                    "--flows", "2000", "--mix", "tcp=60,udp=40", "--seed", "7"], cwd=REPO, check=True,
                   capture_output=True)
    heavy, light = os.path.join(tmp, "heavy"), os.path.join(tmp, "light")
    for d, text in ((heavy, HEAVY % (G_ETH, args.iters)), (light, LIGHT % G_ETH)):
        os.makedirs(d)
        with open(os.path.join(d, "p.lua"), "w") as f:
            f.write(text)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()} (shared with other work)")
    base = [run_once(light, spec, 1) for _ in range(args.repeat)]
    rows = {}
    for n in [int(x) for x in args.shards.split(",")]:
        rows[n] = [run_once(heavy, spec, n) for _ in range(args.repeat)]
    pk = rows[min(rows)][0]["packets"]
    lua_us = (statistics.median(r["cpu_s"] for r in rows[min(rows)]) -
              statistics.median(r["cpu_s"] for r in base)) / pk * 1e6
    print(f"\n{pk:,} packets; heavy plug-in: {lua_us:.2f} µs of CPU per packet over the light one (1 shard)\n")
    print("| shards | packets/s (engine) min / median / max | speed-up (median) | CPU µs per packet min / median / max"
          " | packets per shard |")
    print("|---:|---|---:|---|---|")
    ref = statistics.median(pk / r["engine_s"] for r in rows[min(rows)])
    for n, rs in rows.items():
        pps = sorted(pk / r["engine_s"] for r in rs)
        cpu = sorted(r["cpu_s"] / pk * 1e6 for r in rs)
        print(f"| {n} | {pps[0]:,.0f} / {statistics.median(pps):,.0f} / {pps[-1]:,.0f} | "
              f"{statistics.median(pps) / ref:.2f}x | {cpu[0]:.2f} / {statistics.median(cpu):.2f} / {cpu[-1]:.2f} | "
              f"{rs[0]['per_shard']} |")
    bcpu = sorted(r["cpu_s"] / pk * 1e6 for r in base)
    bpps = sorted(pk / r["engine_s"] for r in base)
    print(f"| 1, light plug-in | {bpps[0]:,.0f} / {statistics.median(bpps):,.0f} / {bpps[-1]:,.0f} | - | "
          f"{bcpu[0]:.2f} / {statistics.median(bcpu):.2f} / {bcpu[-1]:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
