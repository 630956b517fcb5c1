"""Benchmark: what the per-plug-in-VM memory limit (--plugin-memory-mb, default 4096 MiB) costs T.async tasks.

    .venv/bin/python tools/bench/memlimit_ab.py [RUNS [PACKETS]]      (default 5 runs, 300 000 packets)

`luaprobe run` with the end-to-end plug-in of tools/bench/async_roundtrip.py (one task per TCP packet: no task,
fresh 1-upvalue closure, hoisted 0-upvalue), the default limit against --plugin-memory-mb 0, the two modes
alternating (order flipped every run: load drifts alike).  Prints packet-loop CPU (the summary's
packet_loop_cpu_s, CPU of the fast-path thread) per task minus the same mode's no-task run, min / median / max
µs, and the raw seconds.  docs/benchmarks.md (issue 11).
"""
import os, sys, tempfile
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
import async_roundtrip as ar
from fastpath import make_capture
pcap = make_capture(n)
def one(hook, d, extra):
    """(packet-loop CPU s, hook calls) of one run (async_roundtrip.e2e_run, the end-to-end benchmark's own run)."""
    m, plug = ar.e2e_run(pcap, n, hook, d, extra)
    return m["loop_cpu"], plug["hook_calls"].get("simplecounter.onpacket", 0)
modes = {"limit": [], "nolimit": ["--plugin-memory-mb", "0"]}
hooks = ["nil", "fresh[1]", "hoisted[0]"]
res = {(m, h): [] for m in modes for h in hooks}
with tempfile.TemporaryDirectory() as d:
    one("nil", tempfile.mkdtemp(dir=d), [])
    for r in range(runs):
        for m in (modes if r % 2 == 0 else list(modes)[::-1]):
            for h in hooks:
                res[(m, h)].append(one(h, tempfile.mkdtemp(dir=d), modes[m]))
for m in modes:
    for h in hooks[1:]:
        per = sorted((c - b[0]) / t * 1e6 for (c, t), b in zip(res[(m, h)], res[(m, "nil")]))
        print(m, h, "us/task min/med/max", round(per[0], 2), round(per[len(per)//2], 2), round(per[-1], 2),
              "raw", [round(c, 3) for c, _ in res[(m, h)]], "base", [round(c, 3) for c, _ in res[(m, "nil")]], flush=True)
