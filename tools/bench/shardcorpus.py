"""One fast path against N flow-sharded fast paths on the benchmark corpus, light and heavy hooks (docs/benchmarks.md,
"Flow-sharded fast paths").

    .venv/bin/python tools/bench/shardcorpus.py [--corpus small-few,dns,mixed-zipf] [--plugins empty,heavy]
        [--shards 1,2] [--runs 3] [--exe LABEL=PATH/TO/luaprobe ...]

For every corpus capture (tools/bench/corpus.py, the 500 000-packet files, which must exist) and plug-in
(``empty``: the empty shape of tools/bench/shapes.py on the corpus's transport, the engine's own cost; ``heavy``:
tools/bench/shards.py's CPU-heavy simplecounter, 5 000 xor/rotate steps of Lua per Ethernet packet), each round
runs ``luaprobe run --pcap FILE --stats-json`` once per shard count and per ``--exe`` (a luaprobe of another
checkout: before/after), alternating, so that every configuration sees the same load.  Per run:

* ``elapsed_s`` and ``packet_loop_s`` (the summary's: the engine's wall time and its packet loop's, the longest
  shard's when sharded), the packet loops' thread CPU (``packet_loop_cpu_s``, summed over the shards) and their
  voluntary context switches (``packet_loop_rusage.nvcsw``: a shard's sleeps on an empty ring);
* CPU seconds per process (the run's process tree sampled every 10 ms, /proc/PID/schedstat, the last sample of
  each process: one that ends misses < 10 ms): the CLI (sharded: the coordinator; one shard: the fast path), the
  capture process, the shards, the store writers; and all of them (RUSAGE_CHILDREN around the run).

Prints one Markdown table per plug-in: min / median / max over the runs.  Wall times are meaningful only on an
otherwise idle machine; the CPU columns hold under load.
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
from tools.bench import corpus, shapes  # noqa: E402
from tools.bench.shards import G_ETH, HEAVY, TreeCPU  # noqa: E402


def plugin_dir(name: str, layer: str, root: str) -> str:
    """The plug-in directory of `name` (empty / heavy) for a corpus whose light hooks go on `layer`."""
    d = os.path.join(root, f"{name}-{layer}")
    if not os.path.isdir(d):
        if name == "heavy":
            os.makedirs(d)
            with open(os.path.join(d, "p.lua"), "w") as f:
                f.write(HEAVY % (G_ETH, 5000))
        else:
            shapes.write(name, d, layer)
    return d


def run_once(exe: str, plugins: str, pcap: str, shards: int) -> dict:
    """One ``luaprobe run``; raises SystemExit when it fails."""
    with tempfile.TemporaryDirectory() as out:
        stats = os.path.join(out, "s.json")
        cmd = [exe, "run", plugins, "--pcap", pcap, "--out", os.path.join(out, "o"), "-q", "--stats-json", stats]
        if shards > 1:
            cmd += ["--shards", str(shards)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        sampler = TreeCPU(proc.pid, every=0.01)
        _, err = proc.communicate()
        wall = time.monotonic() - t0
        roles = sampler.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {err}")
        with open(stats) as f:
            s = json.load(f)
    shard_cpu = sum(v for k, v in roles.items() if k.startswith("shard "))
    return {"packets": s["packets"], "wall": wall, "elapsed": s["elapsed_s"], "loop": s["packet_loop_s"],
            "loop_cpu": s["packet_loop_cpu_s"], "nvcsw": s["packet_loop_rusage"]["nvcsw"],
            "cli": roles.get("cli", 0.0), "capture": roles.get("capture", 0.0),
            "shards": shard_cpu if shards > 1 else roles.get("cli", 0.0),
            "writers": roles.get("store writers", 0.0),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def mmm(xs: list, fmt: str) -> str:
    """min / median / max of xs."""
    xs = sorted(xs)
    return " / ".join(format(x, fmt) for x in (xs[0], statistics.median(xs), xs[-1]))


COLUMNS = [("elapsed", "elapsed_s", ".3f"), ("loop", "packet_loop_s", ".3f"), ("loop_cpu", "loop CPU s", ".3f"),
           ("nvcsw", "loop voluntary switches", ".0f"), ("capture", "capture CPU s", ".3f"),
           ("shards", "fast path(s) CPU s", ".3f"), ("cli", "coordinator CPU s", ".3f"),
           ("cpu", "all CPU s", ".3f")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,dns,mixed-zipf")
    ap.add_argument("--plugins", default="empty,heavy")
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--exe", action="append", default=[],
                    help="LABEL=PATH of a luaprobe executable (repeatable); default: this checkout's .venv")
    args = ap.parse_args(argv)
    exes = [tuple(e.split("=", 1)) for e in args.exe] or [("", os.path.join(REPO_VENV, "luaprobe"))]
    counts = [int(x) for x in args.shards.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-shardcorpus-")
    print(f"machine: {os.cpu_count()} CPUs, load average at the start {os.getloadavg()}")
    for plugin in args.plugins.split(","):
        rows: dict = {}
        for name in args.corpus.split(","):
            pcap = corpus.path_for(name, quick=True)
            if not os.path.exists(pcap):
                raise SystemExit(f"{pcap}: missing (python tools/bench/corpus.py makes it)")
            d = plugin_dir(plugin, corpus.SHAPES[name].get("layer", "tcp"), tmp)
            for _ in range(args.runs):
                for label, exe in exes:
                    for n in counts:
                        rows.setdefault((name, label, n), []).append(run_once(exe, d, pcap, n))
        print(f"\n{plugin} plug-in, load average at the end {os.getloadavg()}\n")
        print("| capture | " + ("build | " if len(exes) > 1 else "") + "shards | " +
              " | ".join(c[1] for c in COLUMNS) + " |")
        print("|---|" + ("---|" if len(exes) > 1 else "") + "---:|" + "---|" * len(COLUMNS))
        for (name, label, n), rs in rows.items():
            print(f"| {name} ({rs[0]['packets']:,}) | " + (f"{label} | " if len(exes) > 1 else "") + f"{n} | " +
                  " | ".join(mmm([r[k] for r in rs], f) for k, _, f in COLUMNS) + " |")
    return 0


REPO_VENV = os.path.join(os.path.dirname(os.path.dirname(HERE)), ".venv", "bin")

if __name__ == "__main__":
    sys.exit(main())
