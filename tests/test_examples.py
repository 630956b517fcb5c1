"""The shipped examples teach safe patterns: a crafted DNS name cannot move dns_watch.lua's result to another
flow or invent an alert (its T.async data is length-prefixed, not joined with '|').

The capture is built here byte by byte (Ethernet/IPv4/UDP/DNS, RFC 1035 section 4.1); the expected flow key
is derived independently from the addresses and ports (Trisul flow-key format, docs/plugins.md).
"""
from __future__ import annotations

import os
import socket
import sqlite3
import struct
import subprocess
import sys

from tests import helpers

EX = os.path.join(helpers.REPO, "engine", "examples")
DNS_RESOURCES = "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}"


def dns_query(labels: list[bytes], sport: int, txid: int) -> bytes:
    qname = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    dns = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    udp = struct.pack("!HHHH", sport, 53, 8 + len(dns), 0) + dns
    src, dst = socket.inet_aton("10.1.2.3"), socket.inet_aton("10.9.9.9")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), txid, 0, 64, 17, 0, src, dst)
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF) + ip[12:]
    return b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\x08\x00" + ip + udp


def flowkey(sport: int) -> str:
    """Trisul flow key of UDP 10.1.2.3:sport -> 10.9.9.9:53 (Z end = the lower port)."""
    return f"11A:0A.01.02.03:p-{sport:04X}_0A.09.09.09:p-0035"


def test_dns_watch_keeps_crafted_names_on_their_flow(tmp_path):
    decoy = flowkey(9999)                                         # a flow that never sends anything
    names = [[b"upload", b"wikimedia", b"org"],                    # on the blocklist: a real alert
             [b"upload", b"wikimedia", b"org|" + decoy.encode()],  # a '|' split would alert on the decoy flow
             [b"a:b", b"c|d", b"x\nnl"]]
    recs = [dns_query(n, 40000 + i, 7 + i) for i, n in enumerate(names)]
    pcap = tmp_path / "crafted.pcap"
    with open(pcap, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, r in enumerate(recs):
            f.write(struct.pack("<IIII", 1700000000 + i, 0, len(r), len(r)) + r)
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    for name in ("dns_watch.lua", "blocklist.txt"):
        (plugdir / name).write_bytes(open(os.path.join(EX, name), "rb").read())
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plugdir), "--pcap", str(pcap),
                        "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite") as db:
        res = sorted(db.execute("SELECT flowkey, uri, contents FROM resources WHERE resource_guid = ?",
                                (DNS_RESOURCES,)).fetchall())
        alerts = db.execute("SELECT flowkey, message FROM alerts").fetchall()
    want = sorted((flowkey(40000 + i), ".".join(x.decode() for x in n), "listed" if i == 0 else "clean")
                  for i, n in enumerate(names))
    assert res == want
    assert alerts == [(flowkey(40000), "query for listed name upload.wikimedia.org")]


def test_reference_lists_every_engine_method_and_protocol_guid():
    """docs/reference.md is complete: every public engine method (engine/plugins/engine.lua), every Layer, Packet,
    Buffer, FlowID and HTTPHeader method, and every protocol GUID of the decoder (engine/fastpath/decode.lua)."""
    import re
    doc = open(os.path.join(helpers.REPO, "docs", "reference.md")).read()
    internal = {"set_packet", "set_time", "take_counters", "take_outputs", "take_open_flows", "expire_script_flows",
                "apply_flow_counters",
                "flow_counter_batch", "take_messages", "flows_ended"}
    src = {f: open(os.path.join(helpers.REPO, "engine", f)).read() for f in
           ("plugins/engine.lua", "plugins/packet.lua", "plugins/buffer.lua", "plugins/httpheader.lua",
            "fastpath/decode.lua")}
    methods = set()
    for cls, f in (("Engine", "plugins/engine.lua"), ("Layer", "plugins/packet.lua"), ("Packet", "plugins/packet.lua"),
                   ("FlowID", "plugins/packet.lua"), ("Buffer", "plugins/buffer.lua"),
                   ("HTTPHeader", "plugins/httpheader.lua")):
        methods |= {m for m in re.findall(rf"^(?:function {cls}[:.](\w+)|{cls}\.(\w+) = )", src[f], re.M)
                    for m in m if m}
    methods -= internal | {"__index", "__len", "__tostring", "bytes_ptr", "key"}
    missing = sorted(m for m in methods if not re.search(rf"\b{m}\b", doc))
    assert not missing, missing
    guids = re.findall(r'"(\{[0-9A-Fa-f-]{36}\})"', src["fastpath/decode.lua"])
    assert len(guids) == 14 and all(g in doc for g in guids)
    from luaprobe.engine.plugins.discovery import SUPPORTED
    plugins_md = open(os.path.join(helpers.REPO, "docs", "plugins.md")).read()
    table = plugins_md[plugins_md.index("## Script types"):].split("\n\n")[0]
    rows = {line.split("|")[1] for line in table.splitlines() if line.startswith("| `")}
    undocumented = sorted(t for t in SUPPORTED if not any(f"`{t}`" in r for r in rows))
    assert not undocumented, undocumented                     # every type luaprobe runs has its row
    inputfilter_row = next(line for line in table.splitlines() if line.startswith("| `inputfilter`"))
    assert "step_alert" in inputfilter_row and "not supported" in inputfilter_row     # its step is not, and says so


def test_docs_stand_alone():
    """The docs cite no section number of a document the repository does not ship (Trisul's API working note):
    every "§" is an RFC's or a standard's, named on the same line."""
    import re
    for name in sorted(os.listdir(os.path.join(helpers.REPO, "docs"))) + ["../README.md"]:
        if not name.endswith(".md"):
            continue
        text = open(os.path.join(helpers.REPO, "docs", name)).read()
        assert "trisul-lua-api" not in text and "shared/docs" not in text, name
        flat = re.sub(r"\s+", " ", text)
        for m in re.finditer(r"§ ?[0-9]", flat):
            near = flat[max(0, m.start() - 40):m.end() + 10]
            assert re.search(r"RFC|pcapng|draft", near[:40]), (name, near)
