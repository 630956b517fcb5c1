"""Benchmark: one plug-in shape's simplecounter walk over a whole --quick corpus capture, flows from the real flow
table, each batch staged in one hot batch array as the driver leaves it (issue 10).

    python tools/bench/hookwalk.py [--corpus flows-100k] [--shapes empty,flowstate] [--runs 5]
        [--body 'PRELUDE|BODY'] [--warm] [--engine-dir DIR] [--layer udp]

Decodes every packet of the capture (tools/bench/corpus.py) into an lp_pkt array (engine/plugins/packet.lua) and
runs the real flow table over it (engine/fastpath/flowtable.lua: flow, dir, flow_uid as the fast path sets them).
Each run loads the shape's plug-ins (tools/bench/shapes.py) in fresh PluginVMs, then for each batch of 1 024
packets copies it into one batch array and reads each packet's first header bytes (the driver's decode leaves
them in cache), and times only the VMs' ``Host:run_batch`` with the thread CPU clock.  Prints walk CPU ns per
packet of the capture, min / median / max of --runs.  Unlike walkcost.py (2 048 packets walked again and again,
3 000 made-up flows) every flow is new once, as in a run: a hook's per-flow work (packet:flowid() formatting a
key, a script's table growing) is in the figure.  Unlike hookcost.py there is no driver, ring or store: less
noise, and a cachegrind run of it is mostly the walk.

--body 'PRELUDE|BODY' walks a TCP simplecounter with that Lua instead of --shapes (e.g.
``--body 'local t = {}|t[layer:packet():flowid()] = true'``); --warm walks the capture once, untimed, first (the
steady state of known flows); --engine-dir runs the Lua modules of luaprobe.engine from DIR (a copy of engine/
with other versions of some files: an A/B of Lua changes in one checkout).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, shapes  # noqa: E402

BUILD = """function(addr, size, capacity)
  local ffi = require("ffi")
  local pcapfile = require("luaprobe.engine.capture.pcapfile")
  local decode = require("luaprobe.engine.fastpath.decode")
  local packet = require("luaprobe.engine.plugins.packet")
  local ft = require("luaprobe.engine.fastpath.flowtable").new({ capacity = capacity })
  local r, n = pcapfile.open(addr, size), 0
  while r:next() ~= nil do n = n + 1 end
  local b = packet.new_batch(n)
  r = pcapfile.open(addr, size)
  for k = 0, n - 1 do
    local p, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
    local e = b[k]
    e.data, e.caplen, e.wirelen, e.ts_sec, e.ts_nsec, e.linktype, e.ifindex = p, caplen, wirelen, ts_sec, ts_nsec,
      linktype, ifindex
    decode.decode(e.d, p, caplen, linktype)
  end
  for k = 0, n - 1, 1024 do ft:update_batch(b + k, math.min(1024, n - k)) end
  local hot, sz = packet.new_batch(1024), ffi.sizeof("lp_pkt")
  -- packets k .. k+m-1 into the hot batch, the first bytes of their frame and of their payload read
  local function stage(k, m)
    ffi.copy(hot, b + k, m * sz)
    local s = 0
    for i = 0, m - 1 do
      local e = hot[i]
      s = s + e.data[0] + e.data[e.d.payload_offset > 0 and e.d.payload_offset - 1 or 0]
    end
    return s
  end
  return { b, hot }, tonumber(ffi.cast("intptr_t", b)), n, sz, tonumber(ffi.cast("intptr_t", hot)), stage
end"""


def use_engine_dir(path: str) -> None:
    """Load luaprobe.engine's Lua modules from `path` in every VM made from now on."""
    import luaprobe.shm.luajit as lj
    orig = lj.package_dirs

    def dirs():
        d = orig()
        d["engine"] = os.path.abspath(path)
        return d
    lj.package_dirs = dirs


def load_walks(plugdir: str, vms: list) -> list:
    """Load every plug-in file of ``plugdir`` (sorted by name) into its own frontend VM, appended to ``vms`` as it
    is made (the caller closes them, also after an error); returns [(host, run_batch(host, addr, n))] per VM."""
    from luaprobe.engine.plugins.vm import PluginVM
    for f in sorted(os.listdir(plugdir)):
        vm = PluginVM(os.path.join(plugdir, f), start_workers=False, enginetype="frontend",
                      pipeline="frontend", groups={})
        vms.append(vm)
        assert vm.lua.eval("function(h) return h:setup_simplecounter() end")(vm.host) is None
    return [(vm.host, vm.lua.eval("function(h, a, n) return h:run_batch(a, n) end")) for vm in vms]


def measure(capture: str, plugdir: str, runs: int, warm: bool) -> list:
    """Walk CPU ns per packet of the capture, one value per run (fresh VMs each run)."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    out = []
    with open_capture(capture) as cap:
        keep, addr, n, size, hot, stage = lua.eval(BUILD)(cap.address, cap.size, 262144)
        for _ in range(runs):
            vms = []
            try:
                walks = load_walks(plugdir, vms)
                if warm:
                    for host, walk in walks:
                        for k in range(0, n, 1024):
                            walk(host, addr + k * size, min(1024, n - k))
                total = 0
                for k in range(0, n, 1024):
                    m = min(1024, n - k)
                    stage(k, m)
                    for host, walk in walks:
                        t = time.thread_time_ns()
                        walk(host, hot, m)
                        total += time.thread_time_ns() - t
                out.append(total / n)
            finally:
                for vm in vms:
                    vm.close()
        del keep
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="flows-100k", help="traffic shapes (--quick captures), comma-separated")
    ap.add_argument("--shapes", default="empty,flowstate", help="plug-in shapes, each walked on its own")
    ap.add_argument("--body", help="'PRELUDE|BODY': a TCP simplecounter with this Lua instead of --shapes")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warm", action="store_true", help="walk the capture once, untimed, before each timed walk")
    ap.add_argument("--engine-dir", help="luaprobe.engine's Lua modules from this folder")
    ap.add_argument("--layer", choices=("tcp", "udp"), default="tcp",
                    help="transport the shapes and --body hook (udp for the dns corpus, which has no TCP)")
    a = ap.parse_args(argv)
    if a.engine_dir:
        use_engine_dir(a.engine_dir)
    print("| traffic | shape | walk CPU ns/packet min / median / max |\n|---|---|---:|")
    for c in a.corpus.split(","):
        capture = corpus.make(c, True)
        for s in ([a.body] if a.body else a.shapes.split(",")):
            with tempfile.TemporaryDirectory(prefix="lp-hookwalk-") as d:
                if a.body:
                    pre, _, body = a.body.partition("|")
                    with open(os.path.join(d, "body.lua"), "w") as f:
                        f.write(shapes._simple("body", a.layer, body, prelude=pre))
                    s = "body"
                else:
                    shapes.write(s, d, layer=a.layer)
                xs = measure(capture, d, a.runs, a.warm)
            print(f"| {c} | {s} | {min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
