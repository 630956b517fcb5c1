"""The flow export (issue 10): the driver's binary flow records (engine/fastpath/driver.lua lp_flowrow) read with
numpy (engine/fastpath/flowrows.py) land in the flows table with the values an independent model of the capture
gives.

The capture is built here (seeded): 9,000 TCP and UDP flows over IPv4 and IPv6 in both directions, frames of
varied sizes, packets in every second of 60 s of packet time; half of the flows end early (idle expiry), half
are still open at the end of input (end-of-input export): each path exports more than one 4,096-record chunk;
a quarter of the flows pause for far longer than the idle timeout and then resume (two rows each).  The model reads the written pcap
back with struct (not luaprobe's decoder) and applies Trisul's flow-key rule (the A end has the higher port; on
a tie the higher address) and the idle rule (a flow silent for more than idle_timeout seconds of packet time
ends; packets arrive in every second, so it ends before it resumes).  tshark's conversation table is the second,
external count of packets and bytes per conversation.
"""
from __future__ import annotations

import random
import shutil
import sqlite3
import struct
import subprocess

import numpy as np
import pytest

from luaprobe.engine.fastpath import flowrows
from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.shm.luajit import new_runtime

IDLE = 10           #: --idle-timeout of the run (s)
SPAN = 60           #: seconds of packet time
T0 = 1_700_000_000  #: first second


def _pcap(path, seed=20261130, nflows=9000):
    """Write the capture; returns its packet count."""
    rng = random.Random(seed)
    pkts = []                                     # (ts_us, frame)
    for f in range(nflows):
        v6 = f % 5 == 0
        proto = 6 if f % 3 else 17
        if v6:
            src = bytes([0x20, 0x01, 0x0d, 0xb8] + [rng.randrange(256) for _ in range(12)])
            dst = bytes([0x20, 0x01, 0x0d, 0xb8] + [rng.randrange(256) for _ in range(12)])
        else:
            src = bytes([10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)])
            dst = bytes([192, 168, rng.randrange(256), rng.randrange(1, 255)])
        sport = rng.randrange(1024, 65536)
        dport = sport if f % 97 == 0 else rng.choice((53, 80, 443, 8080, rng.randrange(1, 65536)))   # some port ties
        start = rng.uniform(0, SPAN / 3) if f % 2 == 0 else rng.uniform(SPAN * 0.7, SPAN - 2)   # late: open at the end
        times = [start]
        for _ in range(rng.randrange(1, 8)):
            times.append(times[-1] + rng.uniform(0.01, IDLE / 3))
        if f % 4 == 0:                                         # silent for > 2 x idle, then resumes
            times.append(times[-1] + 2 * IDLE + 3 + rng.uniform(0, 5))
            times.append(times[-1] + rng.uniform(0.01, 1))
        seq = [rng.randrange(1 << 32), rng.randrange(1 << 32)]
        for t in times:
            if t >= SPAN - 1:
                break
            rev = rng.random() < 0.4
            s, d, sp, dp = (dst, src, dport, sport) if rev else (src, dst, sport, dport)
            pay = bytes(rng.randrange(0, 1200) if rng.random() < 0.7 else rng.randrange(0, 40))
            if proto == 6:
                l4 = struct.pack("!HHIIBBHHH", sp, dp, seq[rev], 0, 5 << 4, 0x18, 65535, 0, 0) + pay
                seq[rev] = (seq[rev] + len(pay)) & 0xFFFFFFFF
            else:
                l4 = struct.pack("!HHHH", sp, dp, 8 + len(pay), 0) + pay
            if v6:
                ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + s + d
                eth_type = 0x86DD
            else:
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, s, d)
                eth_type = 0x0800
            frame = bytes(6) + b"\x02" + bytes(5) + struct.pack("!H", eth_type) + ip + l4
            pkts.append((int(T0 * 1e6 + t * 1e6), frame))
    # a packet in every second, so each idle flow ends at its first tick past the timeout
    for s in range(SPAN):
        pkts.append((int((T0 + s) * 1e6) + 999_999, bytes(6) + b"\x02" + bytes(5) + b"\x08\x06" + bytes(28)))
    pkts.sort(key=lambda p: p[0])
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts, frame in pkts:
            out.write(struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame)) + frame)
    return len(pkts)


def _ip_text(a: bytes) -> str:
    return "".join("%02X" % b for b in a) if len(a) == 16 else ".".join("%02X" % b for b in a)


def _model(path) -> dict:
    """{(flowkey, first_us): [packets_az, packets_za, bytes_az, bytes_za, first_us, last_us]} from the pcap
    bytes (struct only)."""
    data = open(path, "rb").read()
    off, live, rows = 24, {}, {}
    sec_now = None
    while off < len(data):
        ts_s, ts_u, incl, orig = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16: off + 16 + incl]
        off += 16 + incl
        us = ts_s * 1_000_000 + ts_u
        if sec_now is None or ts_s > sec_now:     # the engine's tick: expire before later seconds' packets
            sec_now = ts_s
            for k in [k for k, r in live.items() if ts_s - r[5] / 1e6 > IDLE]:
                r = live.pop(k)
                rows[(k, r[4])] = r
        etype = struct.unpack_from("!H", frame, 12)[0]
        if etype == 0x0800:
            proto, src, dst, l4 = frame[23], frame[26:30], frame[30:34], frame[34:]
        elif etype == 0x86DD:
            proto, src, dst, l4 = frame[20], frame[22:38], frame[38:54], frame[54:]
        else:
            continue
        sp, dp = struct.unpack_from("!HH", l4, 0)
        src_a = sp > dp if sp != dp else src >= dst           # Trisul: A = higher port, tie: higher address
        a, pa, z, pz = (src, sp, dst, dp) if src_a else (dst, dp, src, sp)
        key = "%02X%s:%s:p-%04X_%s:p-%04X" % (proto, "B" if len(a) == 16 else "A", _ip_text(a), pa, _ip_text(z), pz)
        r = live.get(key)
        if r is None:
            r = live[key] = [0, 0, 0, 0, us, us]
        d = 0 if src_a else 1
        r[d] += 1
        r[2 + d] += orig
        r[5] = us
    for k, r in live.items():
        rows[(k, r[4])] = r
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    pcap = tmp / "many-flows.pcap"
    npk = _pcap(pcap)
    plug = tmp / "plugins"
    plug.mkdir()
    (plug / "empty.lua").write_text('TrisulPlugin = { id = { name = "empty" }, simplecounter = {\n'
                                    '  protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",\n'
                                    '  onpacket = function(engine, layer) end } }\n')
    summary = FastPath(RunConfig(plugins=[str(plug)], files=[str(pcap)], out_dir=str(tmp / "out"),
                                 idle_timeout=IDLE)).run()
    with sqlite3.connect(tmp / "out" / "luaprobe.sqlite") as c:
        rows = c.execute("SELECT flowkey, proto, ipa, porta, ipz, portz, first_ts, last_ts, packets_az, packets_za, "
                         "bytes_az, bytes_za, state FROM flows").fetchall()
    return pcap, npk, summary, rows


def test_flows_table_matches_a_model_of_the_capture(exported):
    pcap, npk, summary, rows = exported
    model = _model(pcap)
    assert summary["packets"] == npk
    assert len(model) > 2 * 4096 and sum(1 for k, _ in model if k[2] == "B") > 1000   # chunks, IPv6
    got = {}
    for key, proto, ipa, porta, ipz, portz, t0, t1, paz, pza, baz, bza, state in rows:
        first_us, last_us = round(t0 * 1e6), round(t1 * 1e6)
        assert (key, first_us) not in got
        got[(key, first_us)] = [paz, pza, baz, bza, first_us, last_us]
        l = 11 if key[2] == "A" else 32                        # the key's parts are the row's columns
        assert (proto, ipa, porta, ipz, portz) == (int(key[:2], 16), key[4:4 + l], int(key[7 + l:11 + l], 16),
                                                   key[12 + l:12 + 2 * l], int(key[-4:], 16))
        assert state in ("OPEN", "TIMEOUT"), state
    assert got == model
    timeouts = sum(1 for r in rows if r[12] == "TIMEOUT")
    assert timeouts > 4096 and len(rows) - timeouts > 4096   # both export paths crossed a chunk
    assert summary["rows_written"]["flows"] == len(rows) == summary["flows"]


def test_flows_table_matches_tshark(exported):
    """tshark's own decode of every packet (frame length, addresses, ports): packets and bytes per conversation
    (both directions, the whole capture) equal the sums of the rows of that 5-tuple.  (tshark -z conv scales
    bytes to kB, so the fields are summed here.)"""
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    pcap, _, _, rows = exported
    out = subprocess.run(["tshark", "-r", str(pcap), "-n", "-T", "fields", "-E", "separator=,", "-e", "frame.len",
                          "-e", "ip.src", "-e", "ipv6.src", "-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.srcport",
                          "-e", "udp.srcport", "-e", "tcp.dstport", "-e", "udp.dstport", "tcp or udp"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    want = {}
    for line in out.splitlines():
        n, s4, s6, d4, d6, ts, us, td, ud = line.split(",")
        k = ("tcp" if ts else "udp", frozenset(((s4 or s6, int(ts or us)), (d4 or d6, int(td or ud)))))
        p, b = want.get(k, (0, 0))
        want[k] = (p + 1, b + int(n))
    got = {}
    for key, proto, ipa, porta, ipz, portz, _t0, _t1, paz, pza, baz, bza, _s in rows:
        k = ("tcp" if proto == 6 else "udp", frozenset(((_addr(ipa), porta), (_addr(ipz), portz))))
        p, b = got.get(k, (0, 0))
        got[k] = (p + paz + pza, b + baz + bza)
    assert got == want


def _addr(text: str) -> str:
    """Key-format address ("0A.01.02.03" or 32 hex digits) as tshark prints it."""
    if "." in text:
        return ".".join(str(int(b, 16)) for b in text.split("."))
    import ipaddress
    return str(ipaddress.IPv6Address(bytes.fromhex(text)))


def test_row_layout_matches_the_driver():
    """flowrows.ROW_DTYPE is lp_flowrow field for field (offsets and size as LuaJIT lays the struct out)."""
    lua = new_runtime()
    lua.execute('require "luaprobe.engine.fastpath.driver"')
    off = lua.eval('function(f) return require("ffi").offsetof("lp_flowrow", tostring(f)) end')
    assert lua.eval('require("ffi").sizeof("lp_flowrow")') == flowrows.ROW_DTYPE.itemsize
    for name in flowrows.ROW_DTYPE.names:
        if not name.endswith("_"):
            assert off(name.encode()) == flowrows.ROW_DTYPE.fields[name][1], name


def test_columns_from_records():
    """Values as the flows table and the sg_monitor Flow object take them: str, int, float, None for an
    unmeasured setup RTT, tags from the driver's list."""
    recs = np.zeros(2, flowrows.ROW_DTYPE)
    recs["key"] = [b"06A:0A.00.00.01:p-C350_0A.00.00.02:p-0050", b"11A:0A.00.00.03:p-0035_0A.00.00.04:p-0035"]
    recs["ipa"], recs["ipz"] = [b"0A.00.00.01", b"0A.00.00.03"], [b"0A.00.00.02", b"0A.00.00.04"]
    recs["proto"], recs["porta"], recs["portz"] = [6, 17], [50000, 53], [80, 53]
    recs["first_ts"], recs["last_ts"] = [1.5, 0.1 + 0.2], [2.25, 7.0]
    recs["packets_az"], recs["bytes_za"], recs["payload_az"] = [3, 1], [2 ** 40, 0], [5, 6]
    recs["setup_rtt_us"], recs["retrans_za"] = [1234, -1], [2, 0]
    recs["state"], recs["flags"], recs["tags"] = [2, 1], [0x851, 0x901], [0, 1]
    rows = flowrows.full_rows(flowrows.columns(recs, ["NAT RST"]))
    assert rows[0] == ["06A:0A.00.00.01:p-C350_0A.00.00.02:p-0050", 6, "0A.00.00.01", 50000, "0A.00.00.02", 80,
                       1.5, 2.25, 3, 0, 0, 2 ** 40, "CLOSED", "", 0x851, 5, 0, 1234, 0, 2]
    assert rows[1][6] == 0.1 + 0.2 and rows[1][12:14] == ["TIMEOUT", "NAT RST"] and rows[1][17] is None
    assert [type(v) for v in rows[0]] == [str, int, str, int, str, int, float, float] + [int] * 4 + [str, str] \
        + [int] * 6
    assert flowrows.stored_rows(flowrows.columns(recs, ["NAT RST"]))[1] == tuple(rows[1][:14]) + (None, 0, 0)
