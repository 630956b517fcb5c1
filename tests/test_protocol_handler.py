"""protocol_handler (docs.trisul.org/docs/lua/protocol_handler): a Lua dissector adds its layer and simplecounter scripts attach to it
by GUID, as the NAT-syslog pair of trisul-scripts does (issue 14.5).  Truth: tshark's UDP fields of the same
capture, filtered in Python the way the handler's parselayer decides."""
from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys

import pytest

SYSLOG = "{4323003E-D060-440B-CA26-E146C0C7DB4E}"
UDP = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"
IPV4 = "{0A2C724B-5B9F-4BA6-9C97-B05080558574}"
CG = "{2314BB8E-2BCC-4B86-8AA2-677E5554C0FE}"

HANDLER = """
TrisulPlugin = { id = { name = "SYSLOG" },
  protocol_handler = {
    control = { guid = "%(syslog)s", name = "SYSLOG", host_protocol_guid = '%(udp)s', host_protocol_ports = { 514 } },
    parselayer = function(layer)
      if layer:layer_bytes() == 0 or layer:getbyte(0) ~= 60 then return nil end   -- '<PRI>' or not syslog
      return layer:layer_bytes(), nil
    end } }
"""

COUNTER = """
TrisulPlugin = { id = { name = "syslog per device" },
  countergroup = { control = { guid = "%(cg)s", name = "Syslog devices", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "messages", "Messages", "msgs" },
                              { 1, T.K.vartype.COUNTER, 10, "bytes", "Bytes", "B" } } },
  simplecounter = { protocol_guid = "%(syslog)s",
    onpacket = function(engine, layer)
      local ip = layer:packet():find_layer("%(ipv4)s")
      local key = string.format("%%d.%%d.%%d.%%d", ip:getbyte(12), ip:getbyte(13), ip:getbyte(14), ip:getbyte(15))
      if layer:protocol_id() ~= "%(syslog)s" or layer:packet():find_layer("%(syslog)s") == nil
         or layer:rawbytes():tostring():sub(1, 1) ~= "<" then key = "bad" end
      engine:update_counter("%(cg)s", key, 0, 1)
      engine:update_counter("%(cg)s", key, 1, layer:layer_bytes())
    end } }
"""


def _frame(src: str, sport: int, dport: int, payload: bytes) -> bytes:
    ip_src, ip_dst = bytes(map(int, src.split("."))), bytes([10, 0, 0, 1])
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, ip_src, ip_dst)
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + udp


def _capture(path):
    frames = []
    for i in range(60):
        dev = f"192.0.2.{1 + i % 3}"
        if i % 5 == 4:
            frames.append(_frame(dev, 40000 + i, 514, b"\x00\x01binary on 514, not syslog"))
        elif i % 7 == 6:
            frames.append(_frame(dev, 40000 + i, 53, b"<134>looks like syslog but port 53"))
        else:
            msg = f"<141>Nov 29 10:{i:02d}:00 nat{i % 3} NAT_ACCT: Created session {i} " + "x" * (i * 7)
            frames.append(_frame(dev, 40000 + i, 514, msg.encode()) if i % 2 else _frame("10.0.0.1", 514, 40000 + i,
                                                                                          msg.encode()))
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for k, fr in enumerate(frames):
            f.write(struct.pack("<IIII", 1_700_000_000 + k, 0, len(fr), len(fr)) + fr)


# the same handler creating a closure per call: the batch walker calls it through its stitch point
# (engine/plugins/host.lua), with the same layers as a result
HANDLER_CLOSURE = HANDLER.replace("      if layer:layer_bytes() == 0", "      local n = function() return layer end\n"
                                                                   "      if layer:layer_bytes() == 0")


def _run_syslog(tmp_path, handler: str, extra: dict):
    """`luaprobe run --json` of the syslog capture with `handler` (a template over the layer GUIDs and `extra`)
    and the syslog counter; returns (pcap path, out dir, the finished process), after checking exit 0."""
    pcap = tmp_path / "syslog.pcap"
    _capture(pcap)
    plugs = tmp_path / "plugins"
    plugs.mkdir()
    names = {"syslog": SYSLOG, "udp": UDP, "ipv4": IPV4, "cg": CG, **extra}
    (plugs / "syslog-protocol.lua").write_text(handler % names)
    (plugs / "syslogctr.lua").write_text(COUNTER % names)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plugs), "--pcap", str(pcap),
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return pcap, out, r


@pytest.mark.parametrize("handler,walk", [(HANDLER, "inline"), (HANDLER_CLOSURE, "stitched")],
                         ids=["inline", "stitched"])
def test_syslog_protocol_handler_feeds_a_simplecounter(tmp_path, handler, walk):
    pcap, out, r = _run_syslog(tmp_path, handler, {})
    (ph,) = [p for p in json.loads(r.stdout)["plugins"] if p["type"] == "protocol_handler"]
    assert ph["walk"] == walk
    fields = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=,", "-e", "ip.src",
                             "-e", "udp.srcport", "-e", "udp.dstport", "-e", "udp.length"],
                            capture_output=True, text=True, check=True).stdout.split()
    raw = [bytes.fromhex(x) for x in subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "udp.payload"], capture_output=True, text=True,
        check=True).stdout.split()]
    want: dict[str, list[int]] = {}
    for line, payload in zip(fields, raw):
        src, sport, dport, ulen = line.split(",")
        if 514 in (int(sport), int(dport)) and payload[:1] == b"<":
            w = want.setdefault(src, [0, 0])
            w[0] += 1
            w[1] += int(ulen) - 8
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        got: dict[str, list[int]] = {}
        for key, meter, value in db.execute("SELECT key, meter, sum(value) FROM counters WHERE group_guid = ? "
                                            "GROUP BY key, meter", (CG,)):
            got.setdefault(key, [0, 0])[meter] = value
    finally:
        db.close()
    assert want and got == want


def test_check_reports_a_handler_without_host_protocol(tmp_path):
    p = tmp_path / "flow_director.lua"
    p.write_text("""TrisulPlugin = { id = { name = "fd" }, protocol_handler = {
        control = { guid = "{0CED6B98-0D90-475C-D2D7-06A8E9E64B7C}", name = "FLOWDIRECT" },
        parselayer = function(layer) return 0, nil end } }""")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "check", str(p)], capture_output=True, text=True)
    assert "access points" in r.stdout + r.stderr


BAD_ANSWER = """
TrisulPlugin = { id = { name = "SYSLOG" },
  protocol_handler = {
    control = { guid = "%(syslog)s", name = "SYSLOG", host_protocol_guid = '%(udp)s', host_protocol_ports = { 514 } },
    parselayer = function(layer)
      if layer:layer_bytes() == 0 or layer:getbyte(0) ~= 60 then return nil end
      local ip = layer:packet():find_layer("%(ipv4)s")
      if ip:getbyte(12) == 192 and ip:getbyte(15) == 2 then return %(bad)s end   -- 192.0.2.2: a wrong answer
      return layer:layer_bytes(), nil
    end } }
"""


@pytest.mark.parametrize("bad,said", [("true", "a boolean"), ("{}", "a table"), ('"abc"', 'the string "abc"'),
                                      ("0/0", "NaN")])
def test_a_parselayer_answer_that_is_not_a_number_adds_no_layer_and_is_a_hook_error(tmp_path, bad, said):
    """parselayer must answer nil or a number of bytes (docs/plugins.md). Any other answer adds no layer, counts
    as a hook error and is logged naming the hook's file and line. Before, `true`, a table or "abc" added a layer
    of 0 bytes and NaN one of every captured byte, with no sign. Truth: tshark's fields of the capture, filtered
    in Python the way the handler decides (the syslog packets of 192.0.2.2 are the wrong answers)."""
    pcap, out, r = _run_syslog(tmp_path, BAD_ANSWER, {"bad": bad})
    fields = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=,", "-e", "ip.src",
                             "-e", "udp.srcport", "-e", "udp.dstport", "-e", "udp.payload"],
                            capture_output=True, text=True, check=True).stdout.split()
    want: dict[str, int] = {}
    wrong = 0
    for line in fields:
        src, sport, dport, payload = line.split(",")
        if 514 in (int(sport), int(dport)) and bytes.fromhex(payload)[:1] == b"<":
            if src == "192.0.2.2":
                wrong += 1
            else:
                want[src] = want.get(src, 0) + 1
    (ph,) = [p for p in json.loads(r.stdout)["plugins"] if p["type"] == "protocol_handler"]
    assert wrong > 0 and ph["hook_errors"] == {"protocol_handler.parselayer": wrong}, ph
    handler = tmp_path / "plugins" / "syslog-protocol.lua"
    errors = [t for t in r.stderr.splitlines() if "parselayer error" in t]
    assert len(errors) == 1 and errors[0].endswith(
        f"parselayer ({handler}:5) returned {said}; expected a number of bytes or nil"), r.stderr
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        got = dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? AND meter = 0 GROUP BY key",
                              (CG,)).fetchall())
    finally:
        db.close()
    assert want and got == want
