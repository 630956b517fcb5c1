"""packet_storage (docs.trisul.org/docs/lua/packet_storage): votes per flow, the most permissive wins, and the per-run pcapng holds
exactly the packets (and bytes) the policies let through (issue 14.5).  Truth: tshark's reading of the input,
with the policy applied by a model here, against tshark's reading of the output."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

CAP = os.path.join(helpers.PCAPS, "mix-eth-tls-http-dns.pcap")
CG = "{9F1C2D3E-4A5B-4C6D-8E7F-901A2B3C4D5E}"

SCRIPTS = {
    "skip_tls.lua": """TrisulPlugin = { id = { name = "skip tls" }, packet_storage = {
        filter = function(engine, ts, flow) if flow:portz_readable() == "443" then return 0 end return -1 end } }""",
    "keep_big.lua": """TrisulPlugin = { id = { name = "first 10 KB of one flow" }, packet_storage = {
        filter = function(engine, ts, flow)
          if flow:porta_readable() == "49368" or flow:portz_readable() == "49368" then return 5 end
          return 99        -- not a policy code: counts as no opinion
        end } }""",
    "dns_headers.lua": """TrisulPlugin = { id = { name = "dns headers only" }, packet_storage = {
        filter = function(engine, ts, flow) if flow:portz_readable() == "53" then return 2 end return -1 end } }""",
    "payload_probe.lua": """TrisulPlugin = { id = { name = "payload probe" },
      countergroup = { control = { guid = "%s", name = "fp", bucketsize = 3600 },
                       meters = { { 0, T.K.vartype.COUNTER, 10, "calls", "Calls", "n" } } },
      packet_storage = {
        filter_payload = function(engine, ts, flow, dir, seekpos, buffer)
          local id = flow:id()
          if id:sub(1, 2) == "06" or id:sub(1, 2) == "11" then
            engine:update_counter("%s", (seekpos == 0 and buffer:size() > 0) and "ok" or "bad", 0, 1)
          end
          return -1
        end } }""" % (CG, CG),
}


def _tshark(path, *fields):
    out = subprocess.run(["tshark", "-r", path, "-T", "fields", "-E", "separator=|", *sum((["-e", f] for f in fields),
                          [])], capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


# with closures made in the hooks, the batch walker calls them through its stitch point (engine/plugins/host.lua):
# the same votes, the same calls
CLOSURE = "local keep = function() return flow end\n"


@pytest.mark.parametrize("walk", ["inline", "stitched"])
def test_votes_policies_and_the_pcapng(tmp_path, walk):
    plugs = tmp_path / "plugins"
    plugs.mkdir()
    for name, body in SCRIPTS.items():
        if walk == "stitched":
            body = body.replace("function(engine, ts, flow)", "function(engine, ts, flow) " + CLOSURE).replace(
                "function(engine, ts, flow, dir, seekpos, buffer)", "function(engine, ts, flow, dir, seekpos, buffer) "
                + CLOSURE)
        (plugs / name).write_text(body)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plugs), "--pcap", CAP, "--out", str(out),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    modes = [p["walk"] for p in json.loads(r.stdout)["plugins"] if p["type"] == "packet_storage"]
    assert modes == [walk] * 4
    rows = _tshark(CAP, "frame.time_epoch", "frame.cap_len", "frame.len", "ip.src", "ip.dst", "ip.proto",
                   "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "tcp.len", "udp.length", "ipv6.src",
                   "ipv6.dst", "ipv6.nxt")
    want, stored, dirs = [], {}, set()
    for ts, cap, wire, src, dst, proto, ts_, td, us, ud, tlen, ulen, src6, dst6, nxt in rows:
        cap, src, dst, proto = int(cap), src or src6, dst or dst6, proto or nxt
        sport, dport = (ts_ or us), (td or ud)
        if not src or not sport:                       # no flow (non-IP, or ICMP): stored in full
            want.append((ts, cap, wire))
            continue
        conv = (proto, *sorted([(src, sport), (dst, dport)]))
        ports = {sport, dport}
        policy = 5 if "49368" in ports else 0 if "443" in ports else 2 if (proto == "17" and "53" in ports) else 1
        payload = int(tlen) if tlen else int(ulen) - 8
        if payload > 0:
            dirs.add((proto, src, sport, dst, dport))
        if policy == 0 or (policy == 5 and stored.get(conv, 0) >= 10240):
            continue
        if policy == 2 and payload > 0:
            cap -= payload                             # headers only: up to the start of the payload
        stored[conv] = stored.get(conv, 0) + cap
        want.append((ts, cap, wire))
    got = [tuple(x) for x in _tshark(str(out / "packets.pcapng"), "frame.time_epoch", "frame.cap_len", "frame.len")]
    assert [(t, int(c), w) for t, c, w in got] == want
    assert any(c < 10240 for _, c, _ in want)
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        calls = dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key", (CG,)))
    finally:
        db.close()
    assert calls == {"ok": len(dirs)}                  # once per direction that carries payload, seekpos 0


# ============================================================================ votes apply from their packet on

# A vote cast on packet k of a batch reaches packet k and the later ones, never the packets before k in the same
# batch (they were decided before it): the pcapng must not depend on --batch.  Shapes of trisul-scripts'
# packetstore/skip-ssh.lua (`filter`) and nopcap_tls.lua (`filter_payload` on a TLS handshake record), with two
# scripts voting at different packets of the same flow: "skip" on the flow's first packet, "full" on its first
# TLS payload (the most permissive vote wins from there on).
ORDER_SCRIPTS = {
    "skip_443.lua": """TrisulPlugin = { id = { name = "skip 443" }, packet_storage = {
        filter = function(engine, ts, flow) if flow:portz_readable() == "443" then return 0 end return -1 end } }""",
    "keep_tls.lua": """TrisulPlugin = { id = { name = "keep from the TLS handshake on" }, packet_storage = {
        filter_payload = function(engine, ts, flow, dir, seekpos, buff)
          if flow:id():find("p-01BB") and buff:hval_8(0) == 22 and buff:hval_8(1) == 3 then return 1 end
          return -1
        end } }""",
}
TUTORIAL = os.path.join(helpers.PCAPS, "trisul-tutorial.pcap")


@pytest.mark.parametrize("batch", [1, 5, 1024])
def test_vote_applies_from_its_packet_on(tmp_path, batch):
    plugs = tmp_path / "plugins"
    plugs.mkdir()
    for name, body in ORDER_SCRIPTS.items():
        (plugs / name).write_text(body)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plugs), "--pcap", TUTORIAL, "--out",
                        str(out), "--batch", str(batch)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the model, on tshark's reading: a TCP flow with port 443 is skipped from its first packet (the flow's first
    # packet in the capture) up to its first TLS handshake payload, which is stored with everything after it
    want, kept, skipped = [], set(), set()
    for ts, cap, stream, sport, dport, tlen, payload in _tshark(TUTORIAL, "frame.time_epoch", "frame.cap_len",
                                                                "tcp.stream", "tcp.srcport", "tcp.dstport",
                                                                "tcp.len", "tcp.payload"):
        if stream and "443" in (sport, dport) and stream not in kept:
            head = bytes.fromhex(payload[:4]) if payload else b""
            if int(tlen or 0) > 0 and head[:1] == b"\x16" and head[1:2] == b"\x03":
                kept.add(stream)
            else:
                skipped.add(stream)
                continue
        want.append((ts, int(cap)))
    assert len(kept) >= 10 and skipped >= kept           # the capture has TLS flows with a handshake before it
    got = [(t, int(c)) for t, c in _tshark(str(out / "packets.pcapng"), "frame.time_epoch", "frame.cap_len")]
    assert got == want
