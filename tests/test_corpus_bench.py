"""tools/bench/corpus_bench.py's walk + flows gauge does the fast path's flow work (docs/benchmarks.md, "walk +
flows"): every packet of the capture walked, and its flow table holds the capture's conversations.  Truth: the
capture's record count walked in Python (helpers.pcap_records) and tshark's TCP and UDP conversation tables."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests import helpers


def tshark_conversations(path: str) -> int:
    """TCP + UDP conversations of `path` (tshark -q -z conv,tcp -z conv,udp: one "<->" line each)."""
    out = subprocess.run(["tshark", "-r", path, "-q", "-z", "conv,tcp", "-z", "conv,udp"], capture_output=True,
                         text=True, check=True).stdout
    return sum("<->" in line for line in out.splitlines())


@pytest.mark.parametrize("name", ["vlan-mpls-mixed.pcap", "mix-eth-tls-http-dns.pcap"])
def test_the_flow_walk_walks_every_packet_into_the_captures_flows(name):
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    from tools.bench.corpus_bench import FLOWWALK, flow_walk_rates
    path = os.path.join(helpers.PCAPS, name)
    packets = helpers.pcap_records(path)
    fw = new_runtime().execute(FLOWWALK)
    with open_capture(path) as cap:
        ft = fw.table(1 << 12, False, 0)
        assert fw.walk(ft, cap.address, cap.size, "tcp") == packets
        assert ft.created == ft.live == tshark_conversations(path)
    n, rates = flow_walk_rates(path, 3)          # the gauge's own call: one walk, a rate
    assert n == packets and len(rates) == 1 and rates[0] > 0
