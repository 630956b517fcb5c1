"""A pcapng packet time outside what the packet records hold (32-bit seconds: 1970-01-01 .. 2106-02-07) is one
input-error line at its block, not a time stored modulo 2^32: an interface's if_tsoffset of -2e9 s put 1906's
packets in 2042, one of 9e9 s put 2255's in 1983, every bucket and row wrong, exit 0 (engine/capture/pcapfile.lua
time_range).  Truth: tshark's frame.time_epoch of the same files (it shows the times as they are) and the block
offsets from the file built here."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from tests import helpers
from tests import pktbuild as pb

TSHARK = shutil.which("tshark")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")


def block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))


def idb(tsoffset: int | None) -> bytes:
    opts = b"" if tsoffset is None else struct.pack("<HHq", 14, 8, tsoffset) + struct.pack("<HH", 0, 0)
    return block(1, struct.pack("<HHI", 1, 0, 0) + opts)


def epb(ifid: int, usec: int, frame: bytes) -> bytes:
    return block(6, struct.pack("<IIIII", ifid, usec >> 32, usec & 0xFFFFFFFF, len(frame), len(frame)) + frame)


def capture(path, tsoffset: int) -> int:
    """Three packets on interface 0 (no offset), interface 1's description (if_tsoffset) and one packet on it, two
    more on 0; returns the byte offset of interface 1's packet block (not of its description block before it)."""
    c = pb.Conv()
    c.handshake()
    c.send(True, b"x" * 100)
    c.close()
    frames = [f for _t, f in c.frames]
    blocks = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)), idb(None)]
    blocks += [epb(0, (1_700_000_000 + k) * 10**6, frames[k]) for k in range(3)]
    blocks += [idb(tsoffset)]
    at = sum(len(b) for b in blocks)
    blocks += [epb(1, 1000 * 10**6, frames[3])]
    blocks += [epb(0, (1_700_000_010 + k) * 10**6, frames[4 + k]) for k in range(2)]
    with open(path, "wb") as f:
        f.write(b"".join(blocks))
    return at


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("tsoffset", [-2_000_000_000, 9_000_000_000, -1001])
def test_packet_time_outside_32_bit_seconds_is_an_input_error(tmp_path, tsoffset):
    pcap = str(tmp_path / "t.pcapng")
    at = capture(pcap, tsoffset)
    times = [float(x) for x in subprocess.run([TSHARK, "-r", pcap, "-T", "fields", "-e", "frame.time_epoch"],
                                              capture_output=True, text=True, check=True).stdout.split()]
    assert len(times) == 6 and not 0 <= times[3] < 2**32            # tshark: the 4th packet is outside
    before = sum(1 for t in times[:3] if 0 <= t < 2**32)
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", pcap,
                        "--out", str(tmp_path / "o"), "-q", "--json"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.splitlines()
    assert lines == [f"luaprobe run: input error: {pcap}: byte offset {at}: packet time {1000 + tsoffset} s "
                     f"{lines[0].split(' s ', 1)[1]}"]
    assert "is outside 1970-01-01 00:00:00 .. 2106-02-07 06:28:15 UTC" in lines[0]
    assert json.loads(r.stdout)["packets"] == before == 3
