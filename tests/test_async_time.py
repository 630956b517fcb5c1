"""Time in offline runs (docs/async.md "Time"): what onresult writes carries the packet time at which
its task was scheduled, exactly: not the time of the packet being replayed when the result arrived, nor
that time plus onexecute's measured run time (before, which made rows differ from run to run by µs).

The capture (engine/examples/sample.pcap, 136 packets over 6.4 s) replays in milliseconds, while each
task sleeps SLEEP_US in the worker; the expected times come from the capture itself, parsed here with
``struct`` (not with luaprobe's reader).  Cross-check of the TCP packet count:
``tshark -r engine/examples/sample.pcap -Y 'tcp and not icmp' | wc -l`` -> 78.
"""
from __future__ import annotations

import os
import struct

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.engine.store.writer import Store
from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
SLEEP_US = 3000
ALERT = "{AAAAAAAA-0000-4000-8000-0000000000A1}"

PLUGIN = r'''
local n = 0
TrisulPlugin = { id = { name = "async time" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = n + 1
      T.async:schedule{ data = tostring(n),
        onexecute = function(d)
          local ffi = require("ffi")
          pcall(ffi.cdef, "int usleep(unsigned int usec);")
          ffi.C.usleep(SLEEP_US)
          return d
        end,
        onresult = function(e, d, r)
          local sec, usec = e:timestamp()
          e:add_alert("ALERT", nil, "T" .. d, 3, ("%s %d %d"):format(d, sec, usec))
        end }
    end } }
'''


def packet_times_us(path: str) -> tuple[list[int], list[int]]:
    """Times (µs since the epoch) of all packets and of the TCP-over-IP packets of a little-endian µs
    Ethernet pcap."""
    buf = open(path, "rb").read()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", buf, 0)
    assert magic == 0xA1B2C3D4 and linktype == 1
    every, out, pos = [], [], 24
    while pos + 16 <= len(buf):
        sec, usec, caplen, _ = struct.unpack_from("<IIII", buf, pos)
        frame = buf[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        every.append(sec * 1_000_000 + usec)
        off, etype = 14, struct.unpack_from(">H", frame, 12)[0]
        while etype in (0x8100, 0x88A8):
            etype = struct.unpack_from(">H", frame, off + 2)[0]
            off += 4
        if (etype == 0x0800 and frame[off + 9] == 6) or (etype == 0x86DD and frame[off + 6] == 6):
            out.append(sec * 1_000_000 + usec)
    return every, out


def test_onresult_outputs_carry_the_schedule_time(tmp_path):
    plugin = tmp_path / "async_time.lua"
    plugin.write_text(PLUGIN.replace("SLEEP_US", str(SLEEP_US)).replace("ALERT", ALERT))
    out = str(tmp_path / "out")
    summary = FastPath(RunConfig(plugins=[str(plugin)], files=[SAMPLE], out_dir=out)).run()
    st = summary["plugins"][0]["async"]
    helpers.assert_accounting(st)
    every, truth = packet_times_us(SAMPLE)
    assert len(truth) == 78
    assert st["ok"] == 78 and st["pending"] == 0, st
    # the capture goes on for seconds after its last TCP packet (and replays in milliseconds): a result
    # stamped with the packet replayed when it arrived would be seconds late
    assert every[-1] - truth[-1] > 3_000_000
    with Store(out) as s:
        alerts = s.alerts()
    assert len(alerts) == 78
    seen = set()
    for a in alerts:
        i, sec, usec = (int(x) for x in a["message"].split())
        seen.add(i)
        stamp = a["ts_sec"] * 1_000_000 + a["ts_usec"]
        assert stamp == sec * 1_000_000 + usec                  # the alert row and engine:timestamp() agree
        assert stamp == truth[i - 1], (i, stamp - truth[i - 1])    # the scheduling packet's time, to the µs
    assert seen == set(range(1, 79))
