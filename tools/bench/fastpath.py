"""Benchmark: the packet fast path against its peers, in one run.

    python tools/bench/fastpath.py [--packets 2000000] [--peer-packets 200000]

Workload: a simplecounter plug-in counting TCP packets per destination port with
engine:update_counter.  Contenders, on a capture of real packets
(tcp-echo-many-flows.pcap repeated with shifted timestamps, kept in tools/bench/data/,
out of git):

* luaprobe end to end: `luaprobe run` (capture process, packet ring, decode, flow table,
  the hook, counters into SQLite), wall time including start-up;
* a plain LuaJIT ffi walk of the same file calling a per-packet Lua hook (the practical limit);
* tshark with a Lua tap counting tcp.dstport;
* nfstream without plug-ins.

tshark and nfstream read the first --peer-packets packets only (they are slow); rates are
per packet either way.  Prints packets/s and ratios to luaprobe.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
DATA = os.path.join(REPO, "tools", "bench", "data")
SOURCE = os.path.join(REPO, "tests", "data", "tcp-echo-many-flows.pcap")

PLUGIN = r"""
TrisulPlugin = { id = { name = "dport counter" },
  countergroup = { control = { guid = "{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}", name = "TCP dports", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      engine:update_counter("{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}", layer:getbyte(2) * 256 + layer:getbyte(3), 0, 1)
    end } }
"""

WALK = r"""
local ffi = require("ffi")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local decode = require("luaprobe.engine.fastpath.decode")
local TCP = decode.PROTO.TCP
-- the same walk, but every packet decoded with luaprobe's decoder before the hook
local function walk_decoded(addr, size)
  local counts, n, d = {}, 0, decode.new()
  local function hook(dport) counts[dport] = (counts[dport] or 0) + 1 end
  local r = pcapfile.open(addr, size)
  while true do
    local p, caplen, _, _, _, linktype = r:next()
    if p == nil then break end
    n = n + 1
    decode.decode(d, p, caplen, linktype)
    if decode.find(d, TCP) >= 0 then hook(d.dport) end
  end
  return n
end
return function(addr, size, decoded)
  if decoded then return walk_decoded(addr, size) end
  local counts, n = {}, 0
  local function hook(dport) counts[dport] = (counts[dport] or 0) + 1 end
  local r = pcapfile.open(addr, size)
  while true do
    local p, caplen = r:next()
    if p == nil then break end
    n = n + 1
    if caplen >= 54 and p[12] == 8 and p[13] == 0 and p[23] == 6 then     -- Ethernet, IPv4, TCP
      local ihl = (p[14] % 16) * 4
      local t = 14 + ihl
      if caplen >= t + 4 then hook(p[t + 2] * 256 + p[t + 3]) end
    end
  end
  return n
end
"""

TAP = r"""
local f = Field.new("tcp.dstport")
local counts = {}
local tap = Listener.new("tcp")
function tap.packet(pinfo, tvb)
  local d = f()
  if d then local k = d.value; counts[k] = (counts[k] or 0) + 1 end
end
"""


def make_capture(n: int) -> str:
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, f"bench{n}.pcap")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "gen_capture.py"), SOURCE, path,
                        "--packets", str(n)], check=True)
    return path


def head(src: str, n: int) -> str:
    path = os.path.join(DATA, f"head{n}.pcap")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "gen_capture.py"), SOURCE, path,
                        "--packets", str(n)], check=True)
    return path


def bench_luaprobe(path: str, n: int, workdir: str) -> tuple[float, float]:
    """(packets/s over the process's wall time, packets/s over the engine's own elapsed time: the summary's
    closed_s, FastPath.run's start until the SQLite database is closed)."""
    plugin = os.path.join(workdir, "dport.lua")
    with open(plugin, "w") as f:
        f.write(PLUGIN)
    t = time.perf_counter()
    stats = os.path.join(workdir, "stats.json")
    out = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", path, "--out",
                          os.path.join(workdir, "out"), "--overwrite", "--stats-json", stats], cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    import json
    summary = json.load(open(stats))
    assert summary["packets"] == n, summary
    counted = summary["plugins"][-1]["hook_calls"].get("simplecounter.onpacket", 0)
    assert counted == n, f"hook ran {counted} times for {n} packets"
    return n / dt, n / summary["closed_s"]


def bench_walk(path: str, decoded: bool) -> float:
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    walk = new_runtime().execute(WALK)
    with open_capture(path) as cap:
        walk(cap.address, cap.size, decoded)          # warm page cache and traces
        t = time.perf_counter()
        n = walk(cap.address, cap.size, decoded)
        return int(n) / (time.perf_counter() - t)


def bench_tshark(path: str, n: int, workdir: str) -> float | None:
    if not shutil_which("tshark"):
        return None
    tap = os.path.join(workdir, "tap.lua")
    with open(tap, "w") as f:
        f.write(TAP)
    t = time.perf_counter()
    subprocess.run(["tshark", "-q", "-n", "-r", path, "-X", f"lua_script:{tap}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return n / (time.perf_counter() - t)


def bench_nfstream(path: str) -> float | None:
    try:
        from nfstream import NFStreamer
    except ImportError:
        return None
    t = time.perf_counter()
    pkts = sum(f.bidirectional_packets for f in NFStreamer(source=path, n_dissections=0, statistical_analysis=False))
    return pkts / (time.perf_counter() - t)


def shutil_which(x):
    import shutil
    return shutil.which(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument("--peer-packets", type=int, default=200_000)
    a = ap.parse_args(argv)
    big = make_capture(a.packets)
    small = head(SOURCE, a.peer_packets)
    with tempfile.TemporaryDirectory() as d:
        wall, engine = bench_luaprobe(big, a.packets, d)
        ours = engine        # like the in-process peers (walk, nfstream): no interpreter start-up
        rows = [("luaprobe run, wall time incl. process start-up", wall),
                ("luaprobe run, engine elapsed (load plug-ins .. SQLite closed)", engine),
                ("LuaJIT ffi walk + hook, no decoding", bench_walk(big, False)),
                ("LuaJIT ffi walk + luaprobe decode + hook (the practical limit)", bench_walk(big, True)),
                ("tshark + Lua tap (tcp.dstport)", bench_tshark(small, a.peer_packets, d)),
                ("nfstream, no plug-ins", bench_nfstream(small))]
    print(f"machine: {os.cpu_count()} cpus; {a.packets:,} packets for luaprobe and the walk, "
          f"{a.peer_packets:,} for tshark and nfstream\n")
    print("ratios use luaprobe's engine-elapsed rate (the second row): the walk and nfstream are timed\n"
          "in-process too, without an interpreter start-up; tshark includes its own start-up\n")
    print("| contender | packets/s | luaprobe / contender |")
    print("|---|---:|---:|")
    for name, rate in rows:
        if rate is None:
            print(f"| {name} | not installed | |")
        else:
            print(f"| {name} | {rate:,.0f} | {ours / rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
