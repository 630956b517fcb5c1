"""A capture record longer than the packet ring's record limit (half the ring: 512 KiB with --packet-ring-mb 1).

Found by the operator's chaos pass: pcap allows records up to 1 MiB here (capture.lua's caplen cap), but one longer
than half the packet ring raised inside the capture process: `input error: FILE: byte offset 0:
/.../engine/capture/capture.lua:130: record of 1000032 bytes exceeds the ring's limit of 524280`, exit 3, and none
of the file's other packets was processed.  Now the record is cut to the limit (as a smaller snaplen would: the
wire length is kept), the run goes on, and one warning line names the file, the count and the setting to raise.

Independent truth: the pcap's own records walked with struct (count, sum of original lengths).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")


def _jumbo_pcap(path) -> tuple[int, int]:
    """sample.pcap with a 600 000-byte UDP frame in front (snaplen raised); returns (records, sum of wire lengths)."""
    d = open(SAMPLE, "rb").read()
    hdr = bytearray(d[:24])
    hdr[16:20] = struct.pack("<I", 1 << 20)
    payload = bytes(600_000 - 42)
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 65535, 1, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1234, 5678, 65535, 0)
    frame = eth + ip + udp + payload
    rec = struct.pack("<IIII", 1300000000, 0, len(frame), len(frame)) + frame
    data = bytes(hdr) + rec + d[24:]
    open(path, "wb").write(data)
    n, wire, off = 0, 0, 24
    while off < len(data):
        caplen, orig = struct.unpack("<II", data[off + 8:off + 16])
        n, wire, off = n + 1, wire + orig, off + 16 + caplen
    return n, wire


@pytest.mark.parametrize("ring_mb, cut", [(1, True), (2, False)])
def test_record_longer_than_half_the_packet_ring_is_cut_not_fatal(tmp_path, ring_mb, cut):
    cap = tmp_path / "jumbo.pcap"
    records, wire = _jumbo_pcap(cap)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run",
                        os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua"), "--pcap", str(cap),
                        "--out", str(tmp_path / "out"), "--json", "--packet-ring-mb", str(ring_mb)],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["input_errors"] == [] and s["files_done"] == [str(cap)]
    assert (s["packets"], s["bytes"]) == (records, wire)          # every record walked, wire lengths kept
    warn = [x for x in r.stderr.splitlines() if "longer than the packet ring's record limit" in x]
    if cut:
        (line,) = warn
        assert f"{cap}: 1 packet record(s)" in line and "--packet-ring-mb" in line, line
    else:
        assert warn == [], r.stderr
    assert "capture.lua" not in r.stderr and "Traceback" not in r.stderr
