"""Layer:rawbytes() ends where the IP datagram ends: an Ethernet trailer (F5, VSS and Arista boxes append one on
SPAN ports) or the padding of a frame shorter than 60 bytes is not TCP, UDP or ICMP payload.  Scripts parse the
payload from a layer's rawbytes (trisul-scripts' icmp-echo-check.lua hashes it, segmentsmack and syslog-protocol.lua
read it; a protocol_handler's layer is made of it).  Truth: tshark's tcp.len / ip.len / udp.payload of the same
frames (eth.trailer and eth.padding are outside them)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers, pktbuild

TCP_PLUGIN = """TrisulPlugin = { id = { name = "rawbytes" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      local hl = math.floor(layer:getbyte(12) / 16) * 4
      local ip = layer:packet():find_layer("{0A2C724B-5B9F-4ba6-9C97-B05080558574}")
      print("TCP " .. (layer:rawbytes():size() - hl) .. " " .. ip:rawbytes():size())
    end } }
"""

UDP_HANDLER = """TrisulPlugin = { id = { name = "udp 5140" },
  protocol_handler = { control = { guid = "{4C5000F1-0000-4000-8000-4C5054455354}", name = "T5140",
      host_protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}", host_protocol_ports = { 5140 } },
    parselayer = function(layer)
      local s = layer:rawbytes():tostring()
      print("MSG " .. (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) .. " " .. layer:layer_bytes())
      return layer:layer_bytes(), nil
    end } }
"""


def _run(tmp_path, body, cap):
    plugin = helpers.write_plugin(tmp_path, body)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", cap, "--out",
                        str(tmp_path / "out")], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[")]


def _tshark(cap, *fields):
    out = subprocess.run(["tshark", "-r", cap, "-T", "fields", *sum((["-e", f] for f in fields), [])],
                         capture_output=True, text=True, check=True).stdout
    return [ln.split("\t") for ln in out.splitlines()]


def test_tcp_and_ip_rawbytes_exclude_the_ethernet_trailer(tmp_path):
    cap = os.path.join(helpers.PCAPS, "vlan-mpls-mixed.pcap")      # VLAN frames carry an F5 Ethernet trailer
    got = _run(tmp_path, TCP_PLUGIN, cap)
    want = [f"TCP {tlen} {iplen}" for tlen, iplen in _tshark(cap, "tcp.len", "ip.len") if tlen]
    assert len(want) > 20 and got == want


def test_protocol_handler_layer_excludes_padding_and_trailer(tmp_path):
    """A 5-byte UDP payload in a frame padded to 60 bytes and followed by a 4-byte trailer."""
    frames = []
    for i, msg in enumerate((b"<13>a", b"<14>hello syslog over udp")):
        ip = pktbuild.ipv4("192.0.2.1", "192.0.2.2", 17, pktbuild.udp("192.0.2.1", "192.0.2.2", 40000 + i, 5140, msg))
        fr = pktbuild.ether(ip)
        fr += b"\0" * max(0, 60 - len(fr)) + b"\xde\xad\xbe\xef"
        frames.append((1700000000.0 + i, fr))
    cap = str(tmp_path / "udp.pcap")
    pktbuild.write_pcap(cap, frames)
    got = _run(tmp_path, UDP_HANDLER, cap)
    want = [f"MSG {payload} {len(payload) // 2}" for (payload,) in _tshark(cap, "udp.payload")]
    assert want[0] == "MSG 3c31333e61 5" and got == want


NAN_ARGS = """local n = 0
TrisulPlugin = { id = { name = "nan offsets" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer)
      n = n + 1
      if n > 1 then return end
      for _, a in ipairs({ 0/0, 1/0, -1/0, -1, 12, 1e9 }) do
        local ok1, r1 = pcall(layer.getbyte, layer, a)
        local ok2, r2 = pcall(layer.testbit, layer, a)
        local ok3, r3 = pcall(layer:packet().get_layer, layer:packet(), a)
        print(("ARG %s getbyte %s %s testbit %s %s get_layer %s %s"):format(tostring(a), tostring(ok1), tostring(r1),
          tostring(ok2), tostring(r2), tostring(ok3), r3 == nil and "nil" or r3:protocol_id()))
      end
    end } }
"""


def test_layer_offsets_that_are_nan_are_out_of_range_not_a_segfault(tmp_path):
    """Found by a hostile pass (2026-12-02): `layer:getbyte(0/0)` and `layer:testbit(0/0)` passed the range test
    (every comparison with NaN is false) and indexed the packet's bytes at NaN: SIGSEGV of the fast path, exit 139,
    "crashed: SIGSEGV in plug-in ... (hook simplecounter.onpacket)" for a script with no FFI code of its own.  Now NaN
    is out of range as +-inf is: getbyte raises its error, testbit is false, get_layer nil (it raised "table index
    is NaN" from packet.lua).  Truth: the first frame's bytes and layers from tshark (frame.protocols,
    eth.type: byte 12 of the Ethernet layer)."""
    cap = os.path.join(helpers.PCAPS, "http-get-text.pcap")
    got = [g for g in _run(tmp_path, NAN_ARGS, cap) if g.startswith("ARG ")]
    eth_type, eth_dst = _tshark(cap, "eth.type", "eth.dst")[0]
    protos = _tshark(cap, "frame.protocols")[0][0].split(":")
    assert protos[:4] == ["eth", "ethertype", "ip", "tcp"]
    want_12 = int(eth_type, 16) >> 8                               # 0x0800: byte 12 is 0x08
    assert got[:3] == [f"ARG {a} getbyte false Layer:getbyte({a}): out of range testbit true false get_layer true nil"
                       for a in ("nan", "inf", "-inf")], got
    assert got[3] == "ARG -1 getbyte false Layer:getbyte(-1): out of range testbit true false get_layer true nil"
    # in range: byte 12 (the EtherType's first byte); bit 12 is bit 4 of byte 1 (the destination MAC's second
    # byte, 0x80 >> 4); layer 12 is past the 4 layers (nil)
    bit_12 = "true" if int(eth_dst.split(":")[1], 16) & 0x08 else "false"
    assert got[4] == f"ARG 12 getbyte true {want_12} testbit true {bit_12} get_layer true nil", got
    assert got[5] == "ARG 1000000000 getbyte false Layer:getbyte(1000000000): out of range testbit true false " \
                     "get_layer true nil", got
