"""The run summary reconciles exactly also when IP fragments never become a datagram: every packet read is in a
flow, counted as non-IP, or counted in ``ip_reassembly.in_no_flow`` (fragment packets that reach no flow: not
used -- malformed, over the cap -- or of a datagram dropped for its timeout, the cap, or incomplete at the end).
Before, such fragments were in no flow and in no packet count (docs/filex.md says so), so ``packets`` exceeded
the flows' packets plus ``non_ip`` by a number the summary did not hold (2 of 28 for two duplicate fragments
that came after their datagram completed).  Truth: the frames built here (which fragment lands where, by
construction) and tshark's frame count of the file."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers
from tests import pktbuild as pb

TSHARK = shutil.which("tshark")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
A, B = "10.1.1.1", "10.2.2.2"


def datagram(k: int) -> bytes:
    return pb.ipv4(A, B, 17, pb.udp(A, B, 6000 + k, 7000, bytes(range(256)) * 8), ident=100 + k)


def frames() -> tuple[list, int]:
    """(timestamped Ethernet frames, fragment frames that reach no flow by construction)."""
    out, t, orphans = [], 1_700_000_000.0, 0

    def put(ip, dt=0.001):
        nonlocal t
        t += dt
        out.append((t, pb.ether(ip)))
    for p in pb.frag4(datagram(0), 512):                    # complete, in order: 5 frames in its flow
        put(p)
    pieces = pb.frag4(datagram(1), 512)                     # complete reversed, then 2 duplicates after it
    for p in pieces[::-1] + pieces[1:3]:                    # completed: a new datagram, incomplete at the end
        put(p)
    orphans += 2
    for p in pb.frag4(datagram(2), 512)[:-1]:               # its last fragment never comes: 4 frames
        put(p)
    orphans += 4
    put(pb.frag4_piece(datagram(3), 0, b"x" * 13, True))    # MF with a length not a multiple of 8: malformed
    orphans += 1
    late = pb.frag4(datagram(4), 512)                       # the first fragment, then the rest 40 s later: the
    put(late[0])                                            # first is dropped at the 30 s timeout (1), the rest
    put(late[1], dt=40.0)                                   # wait for a first fragment that never comes (4)
    for p in late[2:]:
        put(p)
    orphans += len(late)
    c = pb.Conv(cip=A, sip=B, t0=t + 1)                     # and a TCP connection, no fragment
    c.handshake()
    c.send(True, b"q" * 300)
    c.close()
    return out + c.frames, orphans


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("shards", ["1", "2"])
def test_every_packet_is_in_a_flow_non_ip_or_in_no_flow(tmp_path, shards):
    fr, orphans = frames()
    pcap = str(tmp_path / "f.pcap")
    pb.write_pcap(pcap, fr)
    read = len(subprocess.run([TSHARK, "-r", pcap, "-o", "ip.defragment:FALSE", "-T", "fields", "-e",
                               "frame.number"], capture_output=True, text=True, check=True).stdout.split())
    assert read == len(fr)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", pcap,
                        "--out", str(out), "-q", "--json", "--shards", shards], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        in_flows = db.execute("SELECT sum(packets_az + packets_za) FROM flows").fetchone()[0]
    finally:
        db.close()
    ipr = s["ip_reassembly"]
    assert ipr["in_no_flow"] == orphans == 12
    assert s["packets"] == read == in_flows + s["non_ip"] + ipr["in_no_flow"]
    # dropped datagrams: the duplicates' one, datagram 2 and the late first fragment's one at the 40 s jump
    # (timeouts), the late rest at the end (incomplete); one malformed fragment
    assert (ipr["timeouts"], ipr["incomplete"], ipr["malformed"]) == (3, 1, 1)
