"""Benchmark: one plug-in VM's simplecounter walk over pre-decoded batches, no driver and no ring (issue 10).

    python tools/bench/walkcost.py [--corpus small-few,mixed-zipf] [--shape empty] [--packets 2048] [--rep 100] [--runs 5]

Decodes the first --packets packets of each --quick corpus capture (tools/bench/corpus.py) into one batch array
(lp_pkt, engine/plugins/packet.lua; flow fields set as if 3 000 flows), loads each plug-in file of the shape
(tools/bench/shapes.py) in a PluginVM of its own and calls its ``Host:run_batch`` over the array 1 024 packets at
a time, --rep times per run (the VMs of a shape one after the other; five-layers also prints their sum).  Prints the thread CPU time per packet walked (min / median of --runs).  2 048 packets
(768 KiB) stay in the core's L2 cache: the walk's own cost; 16 384 (6 MiB) do not.  The fast path's walk in the
real pipeline (tools/bench/hookcost.py) also pays for whatever the driver evicted.
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

BUILD = """function(addr, size, max)
  local ffi = require("ffi")
  local pcapfile = require("luaprobe.engine.capture.pcapfile")
  local decode = require("luaprobe.engine.fastpath.decode")
  local packet = require("luaprobe.engine.plugins.packet")
  local b, r, n = packet.new_batch(max), pcapfile.open(addr, size), 0
  while n < max do
    local p, caplen, wirelen, _, ts_nsec, linktype, ifindex = r:next()
    if p == nil then break end
    local e = b[n]
    e.data, e.caplen, e.wirelen, e.ts_sec, e.ts_nsec, e.linktype, e.ifindex = p, caplen, wirelen, 1000, ts_nsec,
      linktype, ifindex
    decode.decode(e.d, p, caplen, linktype)
    e.flow, e.dir, e.flow_uid = n % 3000, 0, n % 3000 + 1
    n = n + 1
  end
  return b, tonumber(ffi.cast("intptr_t", b)), n, ffi.sizeof("lp_pkt")
end"""


def measure(path: str, shape: str, packets: int, rep: int, runs: int) -> dict:
    """Walk CPU ns per packet of each run, per plug-in file of the shape (five-layers: five VMs, each walked on
    its own, in turn, within every run)."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.engine.plugins.vm import PluginVM
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    with open_capture(path) as cap, tempfile.TemporaryDirectory(prefix="lp-walkcost-") as d:
        keep, addr, n, size = lua.eval(BUILD)(cap.address, cap.size, packets)
        n = n // 1024 * 1024
        shapes.write(shape, d)
        vms = []
        try:
            for f in sorted(os.listdir(d)):
                vm = PluginVM(os.path.join(d, f), start_workers=False, enginetype="frontend", pipeline="frontend",
                              groups={})
                vms.append((f, vm))
                assert vm.lua.eval("function(h) return h:setup_simplecounter() end")(vm.host) is None
            walks = [(f, vm, vm.lua.eval("function(h, a, n) return h:run_batch(a, n) end")) for f, vm in vms]
            out: dict = {f: [] for f, _ in vms}
            for _ in range(runs):
                for f, vm, walk in walks:
                    t = time.thread_time_ns()
                    for _ in range(rep):
                        for k in range(0, n, 1024):
                            walk(vm.host, addr + k * size, 1024)
                    out[f].append((time.thread_time_ns() - t) / (n * rep))
            del keep
            return out
        finally:
            for _, vm in vms:
                vm.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,mixed-zipf")
    ap.add_argument("--shape", default="empty", help="one simplecounter shape of tools/bench/shapes.py")
    ap.add_argument("--packets", type=int, default=2048, help="packets decoded (a multiple of 1024)")
    ap.add_argument("--rep", type=int, default=100, help="walks over them per run")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    print("| traffic | shape | VM | packets | walk CPU ns/packet min / median |\n|---|---|---|---:|---:|")
    for c in a.corpus.split(","):
        per_vm = measure(corpus.make(c, True), a.shape, a.packets, a.rep, a.runs)
        for f, xs in per_vm.items():
            print(f"| {c} | {a.shape} | {f} | {a.packets} | {min(xs):.1f} / {statistics.median(xs):.1f} |", flush=True)
        if len(per_vm) > 1:                  # the shape's whole cost per packet: the sum over its VMs, run by run
            tot = [sum(xs) for xs in zip(*per_vm.values())]
            print(f"| {c} | {a.shape} | all {len(per_vm)} | {a.packets} | {min(tot):.1f} / "
                  f"{statistics.median(tot):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
