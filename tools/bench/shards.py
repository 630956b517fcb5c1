"""Flow-sharded fast paths: packets/s and CPU time per packet for 1, 2, 4 shards (docs/benchmarks.md).

    .venv/bin/python tools/bench/shards.py [--packets 400000] [--iters 2000] [--repeat 3] [--shards 1,2,4]

A CPU-heavy simplecounter (every Ethernet packet runs a loop of --iters xor/rotate steps in Lua:
several µs per packet) over a generated capture file (`luaprobe gen`, 2 000 flows between many hosts,
so the shard hash has addresses to spread; written once, read from the page cache).  Each configuration runs `luaprobe run --shards N` as a
subprocess; wall time is measured around it and CPU time is the RUSAGE_CHILDREN difference (the CLI,
the coordinator, capture, shards, store writers: every process is waited for by its parent).
The plug-in's own cost is measured as (CPU with it - CPU without it) / packets at one shard.
Per-process CPU seconds (every thread's scheduler run time, sampled every 0.1 s over the run's process tree
(TreeCPU); the last sample of each thread, so its final < 0.1 s is missed) are summed per role: cli (the CLI = coordinator), capture,
shard k, store writers, workers.  They show which process is the ceiling: with N shards on N free cores the
packets/s can reach at most  packets / max(role CPU seconds),  whatever the machine's load.
Prints Markdown tables with min / median / max of --repeat runs.
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
import threading
import time

import psutil

CORES = os.cpu_count() or 1
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


def role(cmdline: list) -> str:
    """Which part of a run a process is, from its command line."""
    text = " ".join(cmdline)
    if "luaprobe.engine.capture.process" in text:
        return "capture"
    if "luaprobe.engine.fastpath.shards" in text:
        return "shard " + os.path.basename(cmdline[-1]).removeprefix("shard").removesuffix(".json")
    if "luaprobe.engine.store.writer" in text:
        return "store writers"
    if "luaprobe.workers" in text:
        return "workers"
    return "cli"


class TreeCPU:
    """CPU seconds of every process under `pid`, sampled every `every` s until stop(), summed per role (``role``).

    Each sample reads the scheduler's run time of every thread (/proc/PID/task/TID/schedstat: ns, not psutil's
    10 ms clock ticks) and the process's role again: a child between fork and exec still shows its parent's command
    line (a shard or the capture process was counted as the CLI for its whole life when the role was read once).  A
    thread that ended between two samples keeps the time it had at the last one."""

    def __init__(self, pid: int, every: float = 0.1):
        self.root, self.every, self.last, self.roles = pid, every, {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root)]
                procs += procs[0].children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    key = (p.pid, p.create_time())
                    cmd = p.cmdline()           # empty once the process is a zombie: keep the role it had
                    if cmd or key not in self.roles:
                        self.roles[key] = role(cmd)
                    for tid in os.listdir(f"/proc/{p.pid}/task"):
                        with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                            self.last[key, tid] = int(f.read().split()[0]) / 1e9
                except (OSError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self._stop.wait(self.every)

    def stop(self) -> dict:
        """{role: CPU seconds}."""
        self._stop.set()
        self._t.join()
        out: dict = {}
        for (key, _), cpu in self.last.items():
            out[self.roles[key]] = out.get(self.roles[key], 0.0) + cpu
        return out


def run_once(plugin_dir: str, pcap: str, shards: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin_dir, "--pcap", pcap,
                                 "--out", out, "--shards", str(shards), "--json"], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sampler = TreeCPU(proc.pid)
        so, se = proc.communicate()
        wall = time.monotonic() - t0
        roles = sampler.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"luaprobe run failed ({proc.returncode}): {se}")
    s = json.loads(so)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"packets": s["packets"], "wall_s": wall, "engine_s": s["elapsed_s"], "cpu_s": cpu, "roles": roles,
            "loop_s": s.get("packet_loop_s"),
            "per_shard": [x["packets"] for x in s.get("shards", [])] or [s["packets"]]}


def role_table(rows: dict) -> None:
    """Per-process CPU seconds (median over the repeats) and the ceiling each role sets."""
    print("\nCPU seconds per process (median of the runs; psutil samples):\n")
    print("| shards | cli (coordinator; 1 shard: the fast path) | capture | fast path per shard | store writers |"
          " busiest process | ceiling packets/s = packets / its CPU s | ceiling speed-up |"
          f" bound on {CORES} cores: packets / max(busiest, all CPU / {CORES}) | bound speed-up |")
    print("|---:|---:|---:|---|---:|---|---:|---:|---:|---:|")
    ref_bound = None
    ref = None
    for n, rs in rows.items():
        names = sorted({k for r in rs for k in r["roles"]})
        med = {k: statistics.median(r["roles"].get(k, 0.0) for r in rs) for k in names}
        shards = [med[k] for k in names if k.startswith("shard ")] or [med.get("cli", 0.0)]
        busiest = max(med, key=med.get)
        pk = rs[0]["packets"]
        ceiling = pk / med[busiest]
        bound = pk / max(med[busiest], sum(med.values()) / CORES)
        ref, ref_bound = ref or ceiling, ref_bound or bound
        print(f"| {n} | {med.get('cli', 0):.2f} | {med.get('capture', 0):.2f} | "
              f"{' / '.join(f'{x:.2f}' for x in shards)} | {med.get('store writers', 0):.2f} | "
              f"{busiest} | {ceiling:,.0f} | {ceiling / ref:.2f}x | {bound:,.0f} | {bound / ref_bound:.2f}x |")


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
    role_table({**rows, "1, light": base})
    bcpu = sorted(r["cpu_s"] / pk * 1e6 for r in base)
    bpps = sorted(pk / r["engine_s"] for r in base)
    print(f"| 1, light plug-in | {bpps[0]:,.0f} / {statistics.median(bpps):,.0f} / {bpps[-1]:,.0f} | - | "
          f"{bcpu[0]:.2f} / {statistics.median(bcpu):.2f} / {bcpu[-1]:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
