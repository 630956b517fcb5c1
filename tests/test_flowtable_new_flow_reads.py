"""What the flow table reads and compiles for a packet of a new flow (flowtable.lua update_batch, issue 10: flows-1m,
every packet a new flow).

* The insertion loop goes on from the empty slot the probe found (probe_on) instead of probing again from the home
  slot: LuaJIT's IR of that loop (jit.util.traceir through tools/bench/fillir.py) on a capture where every packet
  starts a flow has no key comparison (BXOR) and at most 24 loads per packet.  Before: 6 BXOR, 31 loads (the
  hash, the home slot's hash and the ten key words of two keys again).
"""
from __future__ import annotations

import collections
import os
import struct

from tools.bench import fillir

def _all_new_capture(path: str, n: int) -> None:
    """n Ethernet/IPv4/TCP (ACK) frames of 60 bytes, each of a flow of its own, 10 us apart."""
    out = [struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1)]
    for i in range(n):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([10, (i >> 16) & 255, (i >> 8) & 255,
                                                                            i & 255]), bytes([192, 0, 0, 1]))
        tcp = struct.pack("!HHIIBBHHH", 1024 + (i % 60000), 80, 1, 1, 0x50, 0x10, 8192, 0, 0)
        frame = b"\x00\x01\x02\x03\x04\x05\x00\x01\x02\x03\x04\x06\x08\x00" + ip + tcp
        frame += b"\x00" * (60 - len(frame))
        ts = 1_000_000 + i * 10
        out.append(struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame)) + frame)
    with open(path, "wb") as f:
        f.write(b"".join(out))


def test_insertion_loop_compares_no_key(tmp_path):
    cap = os.path.join(tmp_path, "new-flows.pcap")
    _all_new_capture(cap, 60000)
    ir = fillir.fill_ir(cap)
    from luaprobe.shm.luajit import package_dirs
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, line in enumerate(src) if line.startswith("function FT:update_batch"))
    line = next(i for i in range(start, len(src)) if src[i].strip().startswith("for m = 0, nmiss - 1 do")) + 1
    where = f"flowtable.lua:{line}"
    assert where in ir, f"the insertion loop ({where}) did not compile: {sorted(ir)}"
    ops = collections.Counter(fillir.per_packet(ir[where]))
    assert ops["BXOR"] == 0, f"the insertion loop compares keys: {ops}"
    assert ops["XLOAD"] <= 24, f"{ops['XLOAD']} loads per new flow: {ops}"
