"""Benchmark: the run-to-run spread of one corpus cell, and what each run differed in (issue 10).

    python tools/bench/spread.py [--corpus vlan-mpls] [--shape empty] [--runs 10] [--run-args "--pin-cpus off"]
        [--fixed-seed off|on|alternate]

Runs ``luaprobe run`` --runs times (fresh processes, as tools/bench/corpus_bench.py does) on one --quick corpus
capture (tools/bench/corpus.py) with one plug-in shape (tools/bench/shapes.py), each with LuaJIT's trace log
(``LUAPROBE_JIT_TRACES``, engine/plugins/jitprof.lua) and the system's THP counters read around it, and prints per
run:

* **loop CPU** — the summary's ``packet_loop_cpu_s`` per packet (ns), the same after the loop's first 64 batches
  (``packet_loop_warmup``: LuaJIT's warm-up, a cost per run) and their CPU, and the loop's wall time per packet;
* **preempted** — involuntary context switches of the fast-path thread during the loop (the summary's
  ``packet_loop_rusage``: another task took its CPU), and its minor page faults;
* **CPUs** — where ``--pin-cpus`` put the capture process and the fast path (the summary's ``cpus_pinned``);
* **traces** — traces LuaJIT completed and aborted in the driver VM and in the plug-in VM (the whole run: the
  end-of-input flow export included), and a digest of the driver's trace tree (start places and parents in order:
  equal digests = the same tree);
* **THP** — transparent huge pages the kernel gave (``thp_fault_alloc``) and refused (``thp_fault_fallback``)
  during the run (/proc/vmstat, system-wide).

--fixed-seed on runs each process with LuaJIT's per-VM seed and the address layout fixed (tools/bench/jitseed.py, a
diagnostic: the plug-in VM then builds the same trace tree in every run; the driver's still follows where the capture
process ended each batch); ``alternate`` does every other run so, an A/B in one window.

Then the runs sorted by loop CPU, and min / median / max and max/min of loop CPU per driver trace-tree digest
and per CPU placement (and fixed seed or not), so a spread that follows one of them shows.  Thread CPU time: the machine's load
inflates it far less than wall time, not at all its counts.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, jitseed, shapes  # noqa: E402


def vmstat() -> dict:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def tree(path: str) -> tuple[int, int, str]:
    """(traces completed, aborts, digest of the tree's start places and parents) from a LUAPROBE_JIT_TRACES file."""
    stops = aborts = 0
    h = hashlib.sha1()
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "start":
                h.update(" ".join(w[2:]).encode() + b"\n")     # place, parent and exit (trace numbers shift)
            elif w[0] == "stop":
                stops += 1
            elif w[0] == "abort":
                aborts += 1
    return stops, aborts, h.hexdigest()[:8]


def one_run(cap: str, plugdir: str, work: str, run_args: list, wrap: list = (), fixed: bool = False) -> dict:
    out, stats, prefix = os.path.join(work, "out"), os.path.join(work, "stats.json"), os.path.join(work, "jit")
    shutil.rmtree(out, ignore_errors=True)
    for f in glob.glob(prefix + ".*"):
        os.unlink(f)
    env = dict(os.environ, LUAPROBE_JIT_TRACES=prefix)
    if fixed:                                   # LuaJIT's seed and the address layout fixed (tools/bench/jitseed.py)
        pre, env = jitseed.wrap(env)
        wrap = [*pre, *wrap]
    v0 = vmstat()
    p = subprocess.run([*wrap, sys.executable, "-m", "luaprobe.engine", "run", plugdir, "--pcap", cap, "--out", out,
                        "--stats-json", stats, "-q", *run_args], cwd=REPO, env=env, capture_output=True, text=True)
    v1 = vmstat()
    if p.returncode:
        raise SystemExit(f"luaprobe run failed ({p.returncode}): {p.stderr.strip()}")
    s = json.load(open(stats))
    n = s["packets"]
    ru = s.get("packet_loop_rusage") or {}
    files = glob.glob(prefix + ".*.traces.txt")
    drv = tree(next(f for f in files if ".driver." in f))
    plug = [tree(f) for f in files if ".driver." not in f]
    pin = s.get("cpus_pinned")
    w = s.get("packet_loop_warmup") or {}
    steady = (s["packet_loop_cpu_s"] - w["cpu_s"]) * 1e9 / (n - w["packets"]) if w else float("nan")
    return {"cpu": s["packet_loop_cpu_s"] * 1e9 / n, "wall": s["packet_loop_s"] * 1e9 / n, "steady": steady,
            "warm_ms": w.get("cpu_s", float("nan")) * 1e3, "fixed": fixed,
            "nivcsw": ru.get("nivcsw"), "minflt": ru.get("minflt"),
            "cpus": f"capture {pin['capture']} fastpath {pin['fastpath']}" if pin else "not pinned",
            # the plug-in VM that walks the packets: the one with the most traces (a shape's file may load more than one
            # VM: the counter shapes' countergroup is a VM of its own, whose one-trace log the glob listed first)
            "driver": drv, "plugin": max(plug) if plug else (0, 0, "-"),
            "thp": (v1.get("thp_fault_alloc", 0) - v0.get("thp_fault_alloc", 0),
                    v1.get("thp_fault_fallback", 0) - v0.get("thp_fault_fallback", 0))}


def summary(label: str, runs: list) -> str:
    c, st, w = [r["cpu"] for r in runs], [r["steady"] for r in runs], [r["wall"] for r in runs]
    return (f"{label}: {len(c)} runs, loop CPU {min(c):.0f} / {statistics.median(c):.0f} / {max(c):.0f} ns/packet, "
            f"max/min {max(c) / min(c):.2f}; after warm-up {min(st):.0f} / {statistics.median(st):.0f} / "
            f"{max(st):.0f}, max/min {max(st) / min(st):.2f}; loop wall {min(w):.0f} / {statistics.median(w):.0f} / "
            f"{max(w):.0f}, max/min {max(w) / min(w):.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="vlan-mpls", help="one traffic shape (--quick capture)")
    ap.add_argument("--shape", default="empty", help="one plug-in shape (tools/bench/shapes.py)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--run-args", default="", help="extra `luaprobe run` arguments, e.g. \"--pin-cpus off\"")
    ap.add_argument("--wrap", default="", help="a command prefix, e.g. \"setarch -R env PYTHONHASHSEED=0\" "
                    "(no address randomisation: LuaJIT's hot counters are indexed by bytecode address)")
    ap.add_argument("--fixed-seed", choices=("off", "on", "alternate"), default="off",
                    help="run with LuaJIT's seed and the address layout fixed (tools/bench/jitseed.py: the same trace "
                    "tree in every run), or alternate fixed and not, run by run (an A/B in one window)")
    a = ap.parse_args(argv)
    cap = corpus.make(a.corpus, True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lp-spread-") as work:
        plugdir = os.path.join(work, "plugins")
        shapes.write(a.shape, plugdir)
        print("| run | fixed seed | loop CPU ns/packet | after warm-up | warm-up CPU ms | loop wall ns/packet | preempted | minor faults | CPUs | driver traces / "
              "aborts / tree | plug-in traces / aborts / tree | THP given / refused |\n"
              "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
        for k in range(a.runs):
            fixed = a.fixed_seed == "on" or (a.fixed_seed == "alternate" and k % 2 == 1)
            r = one_run(cap, plugdir, work, shlex.split(a.run_args), shlex.split(a.wrap), fixed)
            runs.append(r)
            print(f"| {k} | {'yes' if fixed else 'no'} | {r['cpu']:.0f} | {r['steady']:.0f} | {r['warm_ms']:.1f} | {r['wall']:.0f} | {r['nivcsw']} | {r['minflt']} | {r['cpus']} | "
                  f"{' / '.join(map(str, r['driver']))} | {' / '.join(map(str, r['plugin']))} | "
                  f"{r['thp'][0]} / {r['thp'][1]} |", flush=True)
    print()
    print(summary(f"{a.corpus} / {a.shape}", runs))
    for key, name in (("fixed", "fixed seed"), ("cpus", "CPUs"), ("driver", "driver tree")):
        groups = {}
        for r in runs:
            groups.setdefault(str(r[key] if key in ("cpus", "fixed") else r[key][2]), []).append(r)
        if len(groups) > 1:
            for g, rs in sorted(groups.items()):
                print("  " + summary(f"{name} {g}", rs))
    by_cpu = sorted(runs, key=lambda r: r["cpu"])
    print("  preempted, fastest half: %s; slowest half: %s" % (
        [r["nivcsw"] for r in by_cpu[:len(runs) // 2]], [r["nivcsw"] for r in by_cpu[len(runs) // 2:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
