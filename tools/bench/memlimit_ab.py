"""Benchmark: what the per-plug-in-VM memory limit (--plugin-memory-mb, default 4096 MiB) costs T.async tasks.

    .venv/bin/python tools/bench/memlimit_ab.py [RUNS [PACKETS]]      (default 5 runs, 300 000 packets)

`luaprobe run` with the end-to-end plug-in of tools/bench/async_roundtrip.py (one task per TCP packet: no task,
fresh 1-upvalue closure, hoisted 0-upvalue), the default limit against --plugin-memory-mb 0, the two modes
alternating (order flipped every run: load drifts alike).  Prints packet-loop CPU (the summary's
packet_loop_cpu_s, CPU of the fast-path thread) per task minus the same mode's no-task run, min / median / max
µs, and the raw seconds.  docs/benchmarks.md (issue 11).
"""
import json, os, subprocess, sys, tempfile
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
import async_roundtrip as ar
from fastpath import make_capture
pcap = make_capture(n)
def one(hook, d, extra):
    path = os.path.join(d, "e2e.lua")
    with open(path, "w") as f:
        f.write(ar.E2E_PLUGIN.replace("STYLES", "done = 0\n" + ar.style_lua()).replace("HOOK", hook))
    stats = os.path.join(d, "stats.json")
    p = subprocess.run([sys.executable, "-c", ar.RUN_WRAPPER, os.path.join(d, "cpu.json"), "run", path, "--pcap", pcap,
                        "--out", os.path.join(d, "out"), "--stats-json", stats, "--workers", "1",
                        "--overflow-limit", str(2 * n), "--quiet"] + extra, cwd=REPO, capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.load(open(stats))
    return s["packet_loop_cpu_s"], s["plugins"][-1]["hook_calls"].get("simplecounter.onpacket", 0)
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
