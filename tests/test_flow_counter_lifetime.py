"""engine:add_flow_counter state lives as long as its flow record (engine/plugins/engine.lua flows_ended): after
many short flows have expired the engine holds the counters of the live flows only, and a counter counts exactly
the later packets of the connection it was added on, not those of a later one on the same 5-tuple: after that
record expired, or a new SYN with a new ISN while it was live (port reuse: the flow table starts the record again,
and engine.lua new_connection drops the old connection's counters at that SYN).

Independent truths: the capture as built here (tests/pktbuild.py): which frames belong to which connection and
their lengths; the counters are read back from the run's SQLite database."""
from __future__ import annotations

import random

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests import pktbuild as pb
from tests.test_fastpath import counter_sums, db

TCP = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"
GROUP = "{AAAAAAAA-0000-4000-8000-0000000000F2}"

PLUGIN = '''
TrisulPlugin = { id = { name = "fclife" },
  countergroup = { control = { guid = "%(g)s", name = "fclife", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "bytes", "Bytes", "B" },
                              { 1, T.K.vartype.MAXIMUM, 10, "flows", "Flows", "n" } } },
  simplecounter = { protocol_guid = "%(tcp)s",
    onpacket = function(engine, layer)
      local b = layer:rawbytes()
      if b:hval_8(13) == 2 then                       -- a SYN: a counter for this connection, keyed by its ISN
        local n = 0
        for _ in pairs(engine.flow_counters) do n = n + 1 end   -- flows the engine holds counters for
        engine:update_counter("%(g)s", "held", 1, n)
        engine:add_flow_counter(layer:packet():flowid():id(), "%(g)s", "c" .. b:hval_32(4), 0, 0)
      end
    end } }
'''


def build(seed: int, n: int = 300):
    """Frames and {"c<client ISN>": wire bytes of that connection after its SYN}: n 5-tuples one second apart,
    every third carries a second connection (new ISN), half of them 6-9 s after the first (its record expired: idle
    5 s), half 5-40 ms after it (the same record started again: port reuse, mostly within the same second)."""
    rng = random.Random(seed)
    frames, truth = [], {}
    for i in range(n):
        t = 1700000000.0 + i + rng.uniform(0, 0.5)
        conns = 2 if i % 3 == 0 else 1
        for _ in range(conns):
            c = pb.Conv("10.1.%d.%d" % (i // 250, i % 250 + 1), "10.2.0.1", cport=20000 + i, sport=8080,
                        cisn=rng.randrange(1, 2**32), sisn=rng.randrange(2**32), t0=t)
            isn = c.cseq
            c.handshake()
            for _ in range(rng.randrange(1, 4)):
                c.send(rng.random() < 0.5, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 900))))
            if rng.random() < 0.7:
                c.close()
            truth["c%d" % isn] = sum(len(f) for _, f in c.frames[1:])
            frames += c.frames
            t = c.t + (rng.uniform(6, 9) if i % 2 else rng.uniform(0.005, 0.04))
    frames.sort(key=lambda f: f[0])
    return frames, truth


def test_flow_counters_end_with_their_flow(tmp_path):
    frames, truth = build(20261130)
    pcap = tmp_path / "many.pcap"
    pb.write_pcap(str(pcap), frames)
    plug = tmp_path / "fclife.lua"
    plug.write_text(PLUGIN % {"g": GROUP, "tcp": TCP})
    out = tmp_path / "out"
    s = FastPath(RunConfig(plugins=[str(plug)], files=[str(pcap)], out_dir=str(out), idle_timeout=5)).run()
    assert s["packets"] == len(frames)
    got = counter_sums(str(out), GROUP)
    held = got.pop("held")
    assert {k: v[0] for k, v in got.items()} == truth
    with db(str(out)) as c:
        most = c.execute("SELECT max(value) FROM counters WHERE group_guid = ? AND key = 'held' AND meter = 1",
                         (GROUP.upper(),)).fetchone()[0]
    # ~1.33 new flows per second, idle timeout 5 s (expired at most 1 s late): ~10 live at a SYN, 400 without the drop
    assert 0 < most <= 14, (most, held)


HANDLER_PLUGIN = '''
TrisulPlugin = { id = { name = "fclate" },
  countergroup = { control = { guid = "%(g)s", name = "fclate", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "bytes", "Bytes", "B" } } },
  reassembly_handler = {
    filter = function(engine, ts, flow) return true end,
    onnewflow = function(engine, ts, flow)           -- at the connection's SYN: count every later packet
      engine:add_flow_counter(flow:id(), "%(g)s", flow:id(), 0, 0)
    end } }
'''


def _files_out_of_time_order(tmp_path, seed):
    """Two captures, the second one a year older than the first (every packet of it is late: docs/plugins.md "Time
    never goes backwards"), and {flow key: wire bytes of that connection after its SYN}."""
    rng = random.Random(seed)
    paths, truth = [], {}
    for f, t0 in enumerate((1700000000.0, 1668000000.0)):
        frames = []
        for i in range(40):
            c = pb.Conv("10.%d.0.%d" % (f + 1, i + 1), "10.9.0.1", cport=30000 + i, sport=443,
                        cisn=rng.randrange(1, 2**32), sisn=rng.randrange(2**32), t0=t0 + i * 0.3)
            c.handshake()
            for _ in range(rng.randrange(1, 5)):
                c.send(rng.random() < 0.5, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 900))))
            c.close()
            key = "06A:0A.%02X.00.%02X:p-%04X_0A.09.00.01:p-01BB" % (f + 1, i + 1, 30000 + i)
            truth[key] = sum(len(fr) for _, fr in c.frames[1:])
            frames += c.frames
        frames.sort(key=lambda fr: fr[0])
        paths.append(str(tmp_path / ("f%d.pcap" % f)))
        pb.write_pcap(paths[-1], frames)
    return paths, truth


WALK_PLUGIN = '''
TrisulPlugin = { id = { name = "fclate" },
  countergroup = { control = { guid = "%(g)s", name = "fclate", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "bytes", "Bytes", "B" } } },
  simplecounter = { protocol_guid = "%(tcp)s",
    onpacket = function(engine, layer)
      if layer:rawbytes():hval_8(13) == 2 then        -- a SYN: count every later packet of the connection
        local id = layer:packet():flowid():id()
        engine:add_flow_counter(id, "%(g)s", id, 0, 0)
      end
    end } }
'''


def test_flow_counters_of_late_connections_added_by_a_packet_hook(tmp_path):
    """The same two captures with the counter added by a simplecounter hook at the SYN (the walk's own flow
    counters, Host sc_pick): every late connection counts its later packets too."""
    paths, truth = _files_out_of_time_order(tmp_path, 20261202)
    plug = tmp_path / "fclate.lua"
    plug.write_text(WALK_PLUGIN % {"g": GROUP, "tcp": TCP})
    out = tmp_path / "out"
    s = FastPath(RunConfig(plugins=[str(plug)], files=paths, out_dir=str(out))).run()
    assert s["late_packets"] > 0
    assert {k: v[0] for k, v in counter_sums(str(out), GROUP).items()} == truth


def test_flow_counters_of_late_connections_added_by_a_reassembly_hook(tmp_path):
    """A reassembly_handler adds a counter at each connection's NEWFLOW (its SYN), and the connections of the second
    --pcap file are a year older than the first's (trisul-scripts' tlsversions.lua over trisul-tutorial.pcap then
    mix-eth-tls-http-dns.pcap lost every byte of the second file's TLS flows).  The hook's time is the event's
    packet time, the late SYN's was clamped to the engine's time, so the SYN's new-connection check saw the counter
    as older and dropped it.  Truth: the frames built here, every packet after the SYN, in both files."""
    paths, truth = _files_out_of_time_order(tmp_path, 20261201)
    plug = tmp_path / "fclate.lua"
    plug.write_text(HANDLER_PLUGIN % {"g": GROUP})
    out = tmp_path / "out"
    s = FastPath(RunConfig(plugins=[str(plug)], files=paths, out_dir=str(out))).run()
    assert s["late_packets"] > 0
    got = {k: v[0] for k, v in counter_sums(str(out), GROUP).items()}
    assert got == truth
