"""The simplecounter walk on mixed batches (engine/plugins/host.lua Host:run_batch, issue 10): where some packets
have the plug-in's protocol and others not.  What must hold: which packets reach onpacket, and flow counters
(engine:add_flow_counter), which count every later packet of the flow whether or not it has the hook's protocol,
also when a hook adds one in the middle of a batch (the list walk, sc_select / sc_pick_sel, passes over the
packets without the protocol: sc_catch_up gives them theirs).

The truth is the capture as built here (tests/pktbuild.py): which frames carry which layer, their lengths.
"""
from __future__ import annotations

import random

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests import pktbuild as pb
from tests.test_fastpath import counter_sums, plugin_entries

VLAN_GUID = "{4C500002-0000-4000-8000-4C5056C4E002}"
GUIDS = {"tcp": "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", "udp": "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
         "ipv6": "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}", "vlan": VLAN_GUID}
GROUP = "{AAAAAAAA-0000-4000-8000-0000000000F1}"


def vlan(frame: bytes, vid: int = 7) -> bytes:
    """802.1Q tag inserted after the MAC addresses."""
    return frame[:12] + b"\x81\x00" + vid.to_bytes(2, "big") + frame[12:]


def counting_plugin(path, layer: str) -> None:
    path.write_text(f'TrisulPlugin = {{ id = {{ name = "{layer}" }},\n'
                    f'  simplecounter = {{ protocol_guid = "{GUIDS[layer]}",\n'
                    '    onpacket = function(engine, layer) end } }\n')


def test_hook_calls_on_mixed_batches(tmp_path):
    """Random TCP / UDP / IPv6 / VLAN-tagged frames in batches of 8 and 1024: each VM's hook calls equal the
    frames with its layer."""
    rng = random.Random(7)
    frames, want = [], {"tcp": 0, "udp": 0, "ipv6": 0, "vlan": 0}
    for i in range(3000):
        six, is_tcp, tagged = rng.random() < 0.3, rng.random() < 0.6, rng.random() < 0.2
        src, dst = ("2001:db8::1", "2001:db8::2") if six else ("10.0.0.1", "10.0.0.2")
        l4 = (pb.tcp(src, dst, 1000 + i % 50, 80, i, 0, 0x10, b"x" * (i % 7)) if is_tcp
              else pb.udp(src, dst, 2000 + i % 50, 53, b"y" * (i % 5)))
        ip = pb.ipv6(src, dst, 6 if is_tcp else 17, l4) if six else pb.ipv4(src, dst, 6 if is_tcp else 17, l4)
        fr = pb.ether(ip)
        if tagged:
            fr = vlan(fr)
        want["tcp" if is_tcp else "udp"] += 1
        want["ipv6"] += six
        want["vlan"] += tagged
        frames.append((1000 + i * 1e-4, fr))
    pcap = tmp_path / "mix.pcap"
    pb.write_pcap(pcap, frames)
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    for layer in want:
        counting_plugin(plugdir / f"{layer}.lua", layer)
    for batch in (8, 1024):
        s = FastPath(RunConfig(plugins=[str(plugdir)], files=[str(pcap)], out_dir=str(tmp_path / f"o{batch}"),
                               batch=batch)).run()
        assert s["packets"] == 3000
        got = {layer: plugin_entries(s, f"{layer}.lua")[0]["hook_calls"]["simplecounter.onpacket"] for layer in want}
        assert got == want, batch


def test_flow_counter_added_mid_batch_counts_every_later_packet(tmp_path):
    """A VLAN simplecounter adds a flow counter for its flow on the first tagged packet of flow A; A's packets
    alternate tagged / untagged among untagged UDP noise, all in one batch.  Every later packet of A adds its
    wire length, the untagged ones (no hook call, so not in the walk's position list) included."""
    a = ("10.1.0.1", "10.1.0.2", 40000, 80)
    frames, later = [], 0
    first_tagged = None
    for i in range(60):
        if i % 3 == 2:                                               # UDP noise, untagged, other hosts
            frames.append(pb.ether(pb.ipv4("10.9.0.1", "10.9.0.2", 17, pb.udp("10.9.0.1", "10.9.0.2", 5000 + i, 53,
                                                                              b"q" * 20))))
            continue
        fr = pb.ether(pb.ipv4(a[0], a[1], 6, pb.tcp(a[0], a[1], a[2], a[3], 1000 + i, 0, 0x18, b"d" * (i + 1))))
        tagged = i % 2 == 1
        if tagged:
            fr = vlan(fr)
        if first_tagged is not None:
            later += len(fr)
        elif tagged:
            first_tagged = i
        frames.append(fr)
    pcap = tmp_path / "a.pcap"
    pb.write_pcap(pcap, [(2000 + k * 1e-3, f) for k, f in enumerate(frames)])
    plug = tmp_path / "fc.lua"
    plug.write_text(
        'local added = false\n'
        'TrisulPlugin = { id = { name = "fc" },\n'
        f'  countergroup = {{ control = {{ guid = "{GROUP}", name = "fc", bucketsize = 60 }},\n'
        '                   meters = { { 0, T.K.vartype.COUNTER, 10, "bytes", "Bytes", "B" } } },\n'
        f'  simplecounter = {{ protocol_guid = "{VLAN_GUID}",\n'
        '    onpacket = function(engine, layer)\n'
        '      if not added then\n'
        '        added = true\n'
        f'        engine:add_flow_counter(layer:packet():flowid():id(), "{GROUP}", "flowA", 0, 0)\n'
        '      end\n'
        '    end } }\n')
    s = FastPath(RunConfig(plugins=[str(plug)], files=[str(pcap)], out_dir=str(tmp_path / "out"))).run()
    assert s["packets"] == len(frames)
    sc = next(p for p in plugin_entries(s, "fc.lua") if p["type"] == "simplecounter")
    assert sc["hook_calls"]["simplecounter.onpacket"] == sum(1 for i in range(60) if i % 3 != 2 and i % 2 == 1)
    assert counter_sums(str(tmp_path / "out"), GROUP) == {"flowA": {0: later}}
