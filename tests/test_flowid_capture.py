"""packet:flowid():id() on every packet of a capture with many concurrent flows, through the real fast path
(issue 10: the flowstate shape, `state[flowid():id()]`, on 20 000 flows).

The capture is the benchmark corpus's concurrent-flows shape (tools/bench/corpus.py ``flows-100k``, smaller, a
third of the flows over IPv6): 20 000 TCP and UDP flows whose packets interleave, more than the 16 384 FlowIDs
from which the plug-in VM prefetches its cached FlowIDs before each walk (engine/plugins/packet.lua
``touch_flowids``).  Two plug-ins count each packet under its ``layer:packet():flowid():id()`` with
``engine:update_counter`` (TCP in one, UDP in the other), as scripts keyed by the flow id do.  The truth is tshark's
decode of every frame (addresses and ports) with Trisul's key rule written independently in
tests/test_decode.py (``_py_flowkey``): the counts per key must be exactly the packets per key.  Nothing here is
timed.
"""
from __future__ import annotations

import collections
import os
import shutil
import sqlite3
import subprocess

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests.test_decode import _py_flowkey
from tools.bench import corpus

GROUP = "{AAAAAAAA-0000-4000-8000-0000000000F1}"
GUIDS = {"tcp": "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", "udp": "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"}


def _plugin(layer: str, group: bool) -> str:
    cg = (f'  countergroup = {{ control = {{ guid = "{GROUP}", name = "flow ids", bucketsize = 60 }},\n'
          '    meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },\n' if group else "")
    return (f'TrisulPlugin = {{ id = {{ name = "ids {layer}" }},\n{cg}'
            f'  simplecounter = {{ protocol_guid = "{GUIDS[layer]}",\n'
            '    onpacket = function(engine, layer)\n'
            f'      engine:update_counter("{GROUP}", layer:packet():flowid():id(), 0, 1)\n'
            '    end } }\n')


def _tshark_keys(pcap: str) -> collections.Counter:
    """Packets per flow key, from tshark's fields of every TCP or UDP frame (no IP fragments in this capture)."""
    out = subprocess.run(["tshark", "-r", pcap, "-n", "-T", "fields", "-E", "separator=,", "-e", "ip.proto",
                          "-e", "ipv6.nxt", "-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst",
                          "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "udp.srcport", "-e", "udp.dstport"],
                         capture_output=True, text=True, check=True).stdout
    keys: collections.Counter = collections.Counter()
    for line in out.splitlines():
        p4, p6, s4, d4, s6, d6, ts, td, us, ud = line.split(",")
        proto = int(p4 or p6)
        if proto not in (6, 17):
            continue
        sp, dp = (ts, td) if proto == 6 else (us, ud)
        v, s, d = (4, s4, d4) if s4 else (6, s6, d6)
        keys[_py_flowkey(proto, v, s, d, int(sp), int(dp))] += 1
    return keys


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ids") / "concurrent.pcap")
    corpus.write(path, dict(corpus.SHAPES["flows-100k"], flows=20_000, v6=0.33), 60_000, 12)
    return path


def test_every_packets_flowid_is_its_own_flows_key(capture, tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    want = _tshark_keys(capture)
    assert len(want) > 16384                                   # past touch_flowids' threshold
    assert {k[2] for k in want} == {"A", "B"}                  # IPv4 and IPv6 keys
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    (plugdir / "tcp.lua").write_text(_plugin("tcp", True))
    (plugdir / "udp.lua").write_text(_plugin("udp", False))
    out = str(tmp_path / "out")
    FastPath(RunConfig(plugins=[str(plugdir)], files=[capture], out_dir=out)).run()
    with sqlite3.connect(f"file:{os.path.join(out, 'luaprobe.sqlite')}?mode=ro", uri=True) as c:
        got = collections.Counter({k: int(v) for k, v in c.execute(
            "SELECT key, sum(value) FROM counters WHERE group_guid = ? AND meter = 0 GROUP BY key", (GROUP.upper(),))})
    assert got == want
