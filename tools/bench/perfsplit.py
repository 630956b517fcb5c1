"""Benchmark: where the fast path's packet loop spends its CPU, by LuaJIT trace, with Linux perf (issue 10).

    python tools/bench/perfsplit.py [--corpus small-few,dns] [--shapes empty] [--repeat 8] [--freq 10000]

Runs the fast path in a child process (``FastPath``, as ``luaprobe run`` does: capture process, driver, plug-in
VMs, SQLite writer) over a --quick corpus capture (tools/bench/corpus.py) given ``--repeat`` times (a longer
loop: the warm-up's share shrinks), under ``perf record -k CLOCK_MONOTONIC`` (cpu-clock samples at --freq Hz).
The child dumps the machine-code range of every LuaJIT trace of its driver VM and plug-in VMs at the end
(``jit.util.tracemc``) and where each trace starts (``LUAPROBE_JIT_TRACES``, engine/plugins/jitprof.lua).
The samples of the fast path's thread between the packet loop's first batch and its last
(``FastPath.loop_start`` .. ``loop_end``, the interval of the summary's ``packet_loop_cpu_s``) are then put in

* the trace whose code holds the sampled address, shown as its VM and the source line it starts at (a side
  trace: where it leaves its parent), e.g. ``driver fill driver.lua:107`` (ring pop + decode), ``driver
  flowtable.lua:NNN`` (the flow table's loops), ``simplecounter host.lua:NNN`` (the plug-in walk);
* ``Python`` (libpython: the loop between batches and lupa's Python side), ``lupa + LuaJIT runtime`` (the
  lupa extension: its C glue, LuaJIT's interpreter, C API and collector), ``kernel``, ``libc`` and any other
  library by name; ``JIT, no trace`` is code in the JIT's area not in any trace alive at the end.

and printed as a share of those samples and as ns per packet (the share times the summary's loop CPU per
packet).  Shares of one thread's samples hold on a busy machine far better than rates do.  Needs ``perf``
and a perf_event_paranoid setting that lets this user sample its own processes.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, shapes  # noqa: E402

# every trace of this VM: tag, number, machine-code address, size (one line each)
DUMP = """
function(tag)
  local ju, out = require('jit.util'), {}
  for i = 1, 65535 do
    if ju.traceinfo(i) then
      local mc, addr = ju.tracemc(i)
      if mc then out[#out + 1] = string.format('%s\\t%d\\t%.0f\\t%d', tag, i, addr, #mc) end
    elseif i > 4000 then
      break
    end
  end
  return table.concat(out, '\\n')
end
"""


def child(path: str, shape: str, repeat: int, work: str) -> None:
    """The measured run (under perf): FastPath in this process; writes work/run.json and work/traces.tsv."""
    from luaprobe.engine.fastpath import run as runmod
    plugdir = os.path.join(work, "plugins")
    shapes.write(shape, plugdir)
    fp = runmod.FastPath(runmod.RunConfig(plugins=[plugdir], files=[path] * repeat, out_dir=os.path.join(work, "out")))
    s = fp.run()
    rows = [_text(fp.driver_lua.eval(DUMP)("driver"))]
    names = {"driver": "driver"}
    for inst in fp.instances:       # the VM's tag in engine/plugins/host.lua (jitprof.start): file-instance
        tag = f"{os.path.basename(inst.vm.path)}-{inst.vm.instance}"
        names[tag] = f"{inst.kind} ({os.path.basename(inst.vm.path)})"
        rows.append(_text(inst.vm.lua.eval(DUMP)(tag)))
    with open(os.path.join(work, "traces.tsv"), "w") as f:
        f.write("\n".join(r for r in rows if r) + "\n")
    with open(os.path.join(work, "run.json"), "w") as f:
        json.dump({"tid": os.getpid(), "loop_start": fp.loop_start, "loop_end": fp.loop_end,
                   "packets": s["packets"], "loop_cpu_s": s["packet_loop_cpu_s"], "names": names}, f)


def _text(b) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


def trace_starts(work: str) -> dict:
    """{(VM tag, trace number): 'file:line'} from the LUAPROBE_JIT_TRACES logs (the last start of each stop)."""
    out = {}
    for fn in glob.glob(os.path.join(work, "jt.*.traces.txt")):
        tag = os.path.basename(fn)[len("jt."):-len(".traces.txt")]
        cur = {}
        with open(fn) as f:
            for line in f:
                p = line.split()
                if len(p) >= 3 and p[0] == "start":
                    cur[int(p[1])] = p[2]
                elif len(p) >= 2 and p[0] == "stop" and p[1].isdigit():
                    out[(tag, int(p[1]))] = cur.get(int(p[1]), "?")
    return out


def trace_ranges(work: str) -> list:
    """Every trace the child dumped in work/traces.tsv (DUMP): sorted [(start address, end address, VM tag, trace)]."""
    traces = []
    with open(os.path.join(work, "traces.tsv")) as f:
        for line in f:
            if line.strip():
                tag, n, addr, size = line.rstrip("\n").split("\t")
                traces.append((int(addr), int(addr) + int(size), tag, int(n)))
    return sorted(traces)


def split(path: str, shape: str, repeat: int, freq: int) -> tuple[dict, dict]:
    """Run the child under perf; returns ({category: samples}, run info)."""
    work = tempfile.mkdtemp(prefix="lp-perfsplit-")
    try:
        env = dict(os.environ, LUAPROBE_JIT_TRACES=os.path.join(work, "jt"))
        data = os.path.join(work, "perf.data")
        subprocess.run(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", str(freq), "-o", data, "--",
                        sys.executable, os.path.abspath(__file__), "--child", path, shape, str(repeat), work],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(work, "run.json")) as f:
            info = json.load(f)
        traces = trace_ranges(work)
        starts = trace_starts(work)
        script = subprocess.run(["perf", "script", "-i", data, "--tid", str(info["tid"]), "-G", "-F", "time,ip,dso"],
                                capture_output=True, text=True, check=True).stdout
        cats = collections.Counter()
        starts_addr = [t[0] for t in traces]
        import bisect
        for line in script.splitlines():
            m = re.match(r"\s*([\d.]+):\s+([0-9a-f]+)\s+\((.*)\)", line)
            if not m:
                continue
            t = float(m.group(1))
            if not info["loop_start"] <= t <= info["loop_end"]:
                continue
            ip, dso = int(m.group(2), 16), m.group(3)
            k = bisect.bisect_right(starts_addr, ip) - 1
            if k >= 0 and traces[k][0] <= ip < traces[k][1]:
                _, _, tag, n = traces[k]
                cats[f"{info['names'].get(tag, tag)} {starts.get((tag, n), '?')}"] += 1
            elif "perf-" in dso or "[JIT]" in dso:
                cats["JIT, no trace"] += 1
            elif "libpython" in dso:
                cats["Python"] += 1
            elif "lupa" in dso:
                cats["lupa + LuaJIT runtime"] += 1
            elif "kernel" in dso:
                cats["kernel"] += 1
            elif "libc.so" in dso:
                cats["libc"] += 1
            else:
                cats[os.path.basename(dso) or "?"] += 1
        return cats, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], int(argv[3]), argv[4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,dns", help="traffic shapes (--quick captures)")
    ap.add_argument("--shapes", default="empty", help="plug-in shapes, one run each")
    ap.add_argument("--repeat", type=int, default=8, help="the capture given this many times (one longer loop)")
    ap.add_argument("--freq", type=int, default=10000, help="perf samples per second")
    ap.add_argument("--top", type=int, default=12, help="rows per run")
    a = ap.parse_args(argv)
    if shutil.which("perf") is None:
        print("perfsplit.py: perf is not installed (linux-perf)", file=sys.stderr)
        return 2
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        for shape in a.shapes.split(","):
            cats, info = split(path, shape, a.repeat, a.freq)
            total = sum(cats.values())
            ns = info["loop_cpu_s"] * 1e9 / info["packets"]
            print(f"\n{c} x{a.repeat} ({info['packets']:,} packets), {shape}: loop CPU {ns:.1f} ns per packet, "
                  f"{total} samples of the fast-path thread in the loop\n")
            print("| where | share | ns/packet |\n|---|---:|---:|")
            rows = cats.most_common()
            shown, rest = rows[:a.top], rows[a.top:]
            for k, v in shown:
                print(f"| {k} | {100 * v / total:.1f} % | {ns * v / total:.1f} |")
            if rest:
                v = sum(x for _, x in rest)
                print(f"| {len(rest)} others | {100 * v / total:.1f} % | {ns * v / total:.1f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
