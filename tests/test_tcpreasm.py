"""Synthetic tests for engine/streams/tcpreasm.lua (TCP stream reassembly per flow and direction).

Real-capture coverage (every HTTP capture reassembled and its bodies checked against tshark's
export) is in tests/test_http.py; ``python tests/test_http.py --bench`` measures throughput.
"""
from __future__ import annotations

import pytest

from luaprobe.shm.luajit import new_runtime

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10

LUA = r"""
local tcpreasm = require 'luaprobe.engine.streams.tcpreasm'
local T = {}
-- run a list of packets {pdir, seq, flags, data[, ack[, ts]]} through one flow (id 7); returns the
-- delivered streams, the event log and the stats
function T.run(pkts, opts, expire)
  opts = opts or {}
  local streams, log = {[0] = {}, [1] = {}}, {}
  opts.cb = function(id, dir, off, p, n)
    local s = type(p) == 'string' and p:sub(1, n) or require('ffi').string(p, n)
    log[#log + 1] = string.format('data %d %d %d', dir, off, n)
    streams[dir][#streams[dir] + 1] = s
  end
  opts.cb_gap = function(id, dir, off, n) log[#log + 1] = string.format('gap %d %d %d', dir, off, n) end
  opts.cb_close = function(id, reason) log[#log + 1] = 'close ' .. reason end
  local R = tcpreasm.new(opts)
  for _, k in ipairs(pkts) do
    local data = k[4] or ''
    if k.restart and R:is_new_connection(k.id or 7, k[1], k[2], k[3]) then R:restart(k.id or 7) end
    R:packet(k.id or 7, k[1], k[2], k[3], data, #data, k[6] or 0, nil, k[5])
  end
  if expire then R:expire(7) end
  return table.concat(streams[0]), table.concat(streams[1]), log, R.stats, R.buffered, R:client_dir(7)
end
return T
"""


@pytest.fixture(scope='module')
def T():
    lua = new_runtime(encoding=None)
    return lua, lua.execute(LUA)


def run(T, pkts, expire=False, restart=False, **opts):
    lua, t = T
    tbl = lua.table_from([lua.table_from({**{i + 1: v for i, v in enumerate(p)}, b"restart": restart})
                          for p in pkts])
    o = lua.table_from({k.encode(): v for k, v in opts.items()})
    s0, s1, log, st, buffered, client = t.run(tbl, o, expire)
    log = [x.decode() for x in log.values()]
    st = {k.decode(): v for k, v in st.items()}
    return s0, s1, log, st, buffered, client


ISN_C, ISN_S = 1000, 5000


def handshake(c=0):
    s = 1 - c
    return [(c, ISN_C, SYN, b''), (s, ISN_S, SYN | ACK, b''), (c, ISN_C + 1, ACK, b'')]



def test_basic(T):
    pk = handshake() + [(0, ISN_C + 1, PSH | ACK, b'hello '), (0, ISN_C + 7, PSH | ACK, b'world'),
                        (1, ISN_S + 1, PSH | ACK, b'answer'),
                        (0, ISN_C + 12, FIN | ACK, b''), (1, ISN_S + 7, FIN | ACK, b'')]
    s0, s1, log, st, buf, client = run(T, pk)
    assert (s0, s1) == (b'hello world', b'answer')
    assert log == ['data 0 0 6', 'data 0 6 5', 'data 1 0 6', 'close fin']
    assert st['bytes_delivered'] == 17 and st['segments'] == 3 and st['closed'] == 1 and buf == 0


def test_direction_from_syn(T):
    """The SYN sender is dir 0 (client->server) whatever the flow table's A/Z order."""
    pk = handshake(c=1) + [(1, ISN_C + 1, PSH | ACK, b'req'), (0, ISN_S + 1, PSH | ACK, b'resp')]
    s0, s1, log, st, buf, client = run(T, pk)
    assert (s0, s1, client) == (b'req', b'resp', 1)
    # SYN lost, SYN+ACK seen: its receiver is the client
    pk = [(0, ISN_S, SYN | ACK, b''), (1, ISN_C + 1, PSH | ACK, b'req'), (0, ISN_S + 1, PSH | ACK, b'resp')]
    s0, s1, log, st, buf, client = run(T, pk)
    assert (s0, s1, client) == (b'req', b'resp', 1)
    # no handshake: the flow table's A end (higher port) is the client
    pk = [(1, 77, PSH | ACK, b'resp'), (0, 99, PSH | ACK, b'req')]
    s0, s1, log, st, buf, client = run(T, pk)
    assert (s0, s1, client) == (b'req', b'resp', 0)


def test_midstream_pickup_starts_at_first_seq(T):
    pk = [(0, 123456, ACK, b''), (0, 123456, PSH | ACK, b'abc'), (0, 123459, PSH | ACK, b'def')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'abcdef' and log == ['data 0 0 3', 'data 0 3 3']



def test_midstream_pickup_starts_at_the_peers_ack(T):
    """Without a handshake, a direction starts at the peer's last ACK number when it lies before the first captured
    byte, within ack_window (the bytes between were in flight: a mirror port captures them later); a start that
    never comes is no gap: the stream then starts at its first captured byte, offset 0, as without the ACK."""
    late = [(0, 100, PSH | ACK, b'GET', 5000), (1, 5003, PSH | ACK, b'def', 103), (1, 5000, PSH | ACK, b'abc', 103)]
    s0, s1, log, st, buf, _ = run(T, late)
    assert (s0, s1) == (b'GET', b'abcdef') and log == ['data 0 0 3', 'data 1 0 3', 'data 1 3 3'] and buf == 0
    assert st['retransmitted_bytes'] == 0 and st['gaps'] == 0
    s0, s1, log, st, buf, _ = run(T, late[:2], expire=True)            # the first bytes never come
    assert s1 == b'def' and log == ['data 0 0 3', 'data 1 0 3', 'close timeout'] and st['gaps'] == 0
    far = [(0, 100, PSH | ACK, b'GET', 5000), (1, 5000 + 70000, PSH | ACK, b'def', 103)]   # beyond ack_window
    s0, s1, log, st, buf, _ = run(T, far)
    assert s1 == b'def' and log == ['data 0 0 3', 'data 1 0 3']

def test_out_of_order(T):
    pk = handshake() + [(0, ISN_C + 7, ACK, b'world'), (0, ISN_C + 12, ACK, b'!'), (0, ISN_C + 1, ACK, b'hello ')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'hello world!' and st['out_of_order'] == 2 and buf == 0
    assert log == ['data 0 0 6', 'data 0 6 5', 'data 0 11 1']


def test_retransmission_and_overlap_first_wins(T):
    pk = handshake() + [
        (0, ISN_C + 1, ACK, b'AAAA'),          # delivered 0..4
        (0, ISN_C + 1, ACK, b'XXXX'),          # full retransmission, different bytes: ignored
        (0, ISN_C + 3, ACK, b'YYbb'),          # overlaps delivered 2..4: only 'bb' is new
        (0, ISN_C + 10, ACK, b'dddd'),         # out of order 9..13
        (0, ISN_C + 8, ACK, b'ZZZZZZ'),        # 7..13: 7..9 new, 9..13 overlaps buffered -> first wins
        (0, ISN_C + 7, ACK, b'c'),             # fills 6..7
    ]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'AAAAbbcZZdddd'
    assert st['retransmitted_bytes'] == 4 + 2 + 4
    assert st['overlaps'] == 2 and buf == 0


def test_sequence_wraparound(T):
    isn = 2 ** 32 - 3
    pk = [(0, isn, SYN, b''), (1, 10, SYN | ACK, b''),
          (0, (isn + 5) % 2 ** 32, ACK, b'EFGH'),   # out of order across the wrap
          (0, isn + 1, ACK, b'ABCD'),               # 2^32-2 .. 2^32+1
          (0, (isn + 9) % 2 ** 32, ACK, b'IJ')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'ABCDEFGHIJ' and st['gaps'] == 0


def test_gap_reported_and_stream_continues(T):
    # max_gap: more than 8 bytes buffered behind a hole -> give the hole up
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aaaa'), (0, ISN_C + 9, ACK, b'cccc'), (0, ISN_C + 13, ACK, b'dddd'),
                        (0, ISN_C + 17, ACK, b'e'), (0, ISN_C + 18, ACK, b'f')]
    s0, s1, log, st, buf, _ = run(T, pk, max_gap=8)
    assert s0 == b'aaaaccccddddef'
    assert log == ['data 0 0 4', 'gap 0 4 4', 'data 0 8 4', 'data 0 12 4', 'data 0 16 1', 'data 0 17 1']
    assert st['gaps'] == 1 and st['gap_bytes'] == 4
    # the peer's ACK beyond the hole, and ack_timeout (2 s) later still no data: sent but not captured
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aaaa'), (0, ISN_C + 9, ACK, b'cccc'),
                        (1, ISN_S + 1, ACK, b'', ISN_C + 13, 0), (0, ISN_C + 13, ACK, b'dd', None, 1),
                        (1, ISN_S + 1, ACK, b'', ISN_C + 15, 2)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 0 0 4', 'gap 0 4 4', 'data 0 8 4', 'data 0 12 2'] and buf == 0
    # ... or ack_window bytes buffered after the ACKed hole
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aaaa'), (0, ISN_C + 9, ACK, b'cccc'),
                        (1, ISN_S + 1, ACK, b'', ISN_C + 13), (0, ISN_C + 13, ACK, b'dd'),
                        (1, ISN_S + 1, ACK, b'', ISN_C + 15)]
    s0, s1, log, st, buf, _ = run(T, pk, ack_window=2)
    assert log == ['data 0 0 4', 'gap 0 4 4', 'data 0 8 4', 'data 0 12 2'] and buf == 0


def test_mirror_port_ack_before_data(T):
    """SPAN ports reorder: the ACK of a segment can come before the segment; it still fills the hole."""
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aaaa'), (0, ISN_C + 9, ACK, b'cccc'),
                        (1, ISN_S + 1, ACK, b'', ISN_C + 13), (1, ISN_S + 1, ACK, b'', ISN_C + 13),
                        (0, ISN_C + 5, ACK, b'bbbb'), (0, ISN_C + 13, ACK, b'dd')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'aaaabbbbccccdd' and st['gaps'] == 0 and st['late_fills'] == 1
    assert st['retransmitted_bytes'] == 0 and buf == 0


def test_mirror_port_reply_before_the_data_it_answers(T):
    """SPAN ports reorder the other way too: the server's reply (acknowledging 4 client bytes) comes before
    those bytes; the reply is held until they come, so each direction's bytes follow the peer bytes they
    answer (a request before its response). Bytes never captured: after ack_timeout (2 s of packet time)
    or ack_window held bytes the held segments go on as if never held, and later segments waiting for the same
    bytes are not held again."""
    pk = handshake() + [(1, ISN_S + 1, ACK, b'RESP', ISN_C + 5), (1, ISN_S + 5, ACK, b'ONSE', ISN_C + 5),
                        (0, ISN_C + 1, ACK, b'REQ!', ISN_S + 1)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert (s0, s1) == (b'REQ!', b'RESPONSE') and st['held'] == 2 and st['gaps'] == 0
    assert log == ['data 0 0 4', 'data 1 0 4', 'data 1 4 4']
    # both directions wait: each segment goes as soon as the peer bytes it acknowledges are delivered
    pk = handshake() + [(0, ISN_C + 5, ACK, b'REQ2', ISN_S + 5), (1, ISN_S + 1, ACK, b'RES1', ISN_C + 5),
                        (1, ISN_S + 5, ACK, b'RES2', ISN_C + 9), (0, ISN_C + 1, ACK, b'REQ1', ISN_S + 1)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 0 0 4', 'data 1 0 4', 'data 0 4 4', 'data 1 4 4'] and st['held'] == 3
    # the client's FIN is acknowledged too (ack = FIN + 1): nothing is missing, nothing held
    pk = handshake() + [(0, ISN_C + 1, ACK | FIN, b'REQ!', ISN_S + 1), (1, ISN_S + 1, ACK, b'RESP', ISN_C + 6)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 0 0 4', 'data 1 0 4'] and st['held'] == 0
    # never captured: 2 s later the reply goes on; the next segment waiting for the same bytes is not held
    pk = handshake() + [(1, ISN_S + 1, ACK, b'RESP', ISN_C + 5, 0), (1, ISN_S + 5, ACK, b'ONSE', ISN_C + 5, 1),
                        (1, ISN_S + 9, ACK, b'!', ISN_C + 5, 2), (1, ISN_S + 10, ACK, b'?', ISN_C + 5, 2)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 1 0 4', 'data 1 4 4', 'data 1 8 1', 'data 1 9 1'] and st['held'] == 2
    # ... or ack_window bytes held; and the end of the flow delivers what is held
    s0, s1, log, st, buf, _ = run(T, pk[:-2], ack_window=8)
    assert log == ['data 1 0 4', 'data 1 4 4'] and s1 == b'RESPONSE'
    s0, s1, log, st, buf, _ = run(T, pk[:-3], expire=True)
    assert log == ['data 1 0 4', 'close timeout']
    # a RST acknowledging peer bytes not captured yet waits for them too (the connection then ends with them)
    pk = handshake() + [(1, ISN_S + 1, ACK, b'RESP', ISN_C + 1), (0, ISN_C + 1, RST | ACK, b'', ISN_S + 9),
                        (1, ISN_S + 5, ACK, b'ONSE', ISN_C + 1)]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 1 0 4', 'data 1 4 4', 'close rst'] and st['held'] == 1 and st['gaps'] == 0
    # ... and when nothing more of the flow comes, the next idle sweep (expire_idle with the packet time) ends
    # the wait once ack_timeout passed
    lua, t = T
    R = lua.eval("require('luaprobe.engine.streams.tcpreasm').new({cb_close = function(id, why) _G.why = why end})")
    for pdir, seq, flags, data, *rest in handshake() + [(1, ISN_S + 1, ACK, b'RESP', ISN_C + 1, 0),
                                                        (0, ISN_C + 1, RST | ACK, b'', ISN_S + 9, 0)]:
        R.packet(R, 7, pdir, seq, flags, data, len(data), rest[1] if rest else 0, None, rest[0] if rest else None)
    assert R.expire_idle(R, -100, 1) == 0 and lua.globals().why is None
    assert R.expire_idle(R, -100, 2) == 0 and lua.globals().why == b'rst'
    # an ACK far beyond anything plausible (more than max_gap ahead) holds nothing
    pk = handshake() + [(1, ISN_S + 1, ACK, b'RESP', ISN_C + 5 + (1 << 20))]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 1 0 4'] and st['held'] == 0


def test_port_reuse_new_syn_starts_new_connection(T):
    """A SYN with a new ISN on an unclosed connection ends it ("reuse") and starts a new one;
    a retransmitted SYN (same ISN) does not."""
    old = handshake() + [(0, ISN_C + 1, ACK, b'one'), (0, ISN_C, SYN, b'')]         # not a reuse
    s0, _, log, st, _, _ = run(T, old, restart=True)
    assert s0 == b'one' and st['reused'] == 0
    new_isn = 3_000_000_000
    pk = handshake() + [(0, ISN_C + 1, ACK, b'one'), (1, ISN_S + 1, ACK, b'ONE'),
                        (0, new_isn, SYN, b''), (1, 77, SYN | ACK, b''), (0, new_isn + 1, ACK, b'two'),
                        (1, 78, ACK, b'TWO')]
    s0, s1, log, st, buf, client = run(T, pk, restart=True)
    assert log == ['data 0 0 3', 'data 1 0 3', 'close reuse', 'data 0 0 3', 'data 1 0 3']
    assert (s0, s1, st['reused'], st['flows'], client) == (b'onetwo', b'ONETWO', 1, 2, 0)
    # from the other side (the old server sends the new SYN): the new client is the flow's Z end
    pk = handshake() + [(0, ISN_C + 1, ACK, b'one'), (1, new_isn, SYN, b''), (0, 55, SYN | ACK, b''),
                        (1, new_isn + 1, ACK, b'two')]
    s0, s1, log, st, buf, client = run(T, pk, restart=True)
    assert log == ['data 0 0 3', 'close reuse', 'data 0 0 3'] and client == 1 and s0 == b'onetwo'


def test_hole_at_close_reported(T):
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aa'), (0, ISN_C + 5, ACK, b'bb'),
                        (1, ISN_S + 1, FIN | ACK, b''), (0, ISN_C + 7, FIN | ACK, b'')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert log == ['data 0 0 2']                      # FIN both ways seen but a hole remains
    s0, s1, log, st, buf, _ = run(T, pk, expire=True)
    assert log == ['data 0 0 2', 'gap 0 2 2', 'data 0 4 2', 'close timeout'] and buf == 0
    # FIN beyond the delivered bytes with nothing buffered: the tail is a gap
    pk = handshake() + [(0, ISN_C + 1, ACK, b'aa'), (0, ISN_C + 9, FIN | ACK, b'')]
    s0, s1, log, st, buf, _ = run(T, pk, expire=True)
    assert log == ['data 0 0 2', 'gap 0 2 6', 'close timeout']


def test_rst_closes(T):
    pk = handshake() + [(0, ISN_C + 1, ACK, b'abc'), (1, ISN_S + 1, RST, b''), (0, ISN_C + 4, ACK, b'late')]
    s0, s1, log, st, buf, _ = run(T, pk)
    assert s0 == b'abc' and log == ['data 0 0 3', 'close rst'] and st['closed'] == 1


def test_caps_with_counters(T):
    # per-flow cap: 6 bytes of out-of-order data allowed
    pk = handshake() + [(0, ISN_C + 1, ACK, b'a'), (0, ISN_C + 3, ACK, b'cccc'), (0, ISN_C + 7, ACK, b'dddd'),
                        (0, ISN_C + 12, ACK, b'ff')]
    s0, s1, log, st, buf, _ = run(T, pk, max_flow_bytes=6)
    # 'dddd' does not fit: the hole before 'cccc' is given up (gap), then 'dddd' is in order
    assert log == ['data 0 0 1', 'gap 0 1 1', 'data 0 2 4', 'data 0 6 4']
    assert st['cap_drops_flow'] == 0 and st['gaps'] == 1
    # a segment larger than the cap itself is dropped and counted; its bytes become a gap
    pk = handshake() + [(0, ISN_C + 1, ACK, b'a'), (0, ISN_C + 3, ACK, b'cccccccc'), (0, ISN_C + 11, ACK, b'd')]
    s0, s1, log, st, buf, _ = run(T, pk, max_flow_bytes=4, expire=True)
    assert st['cap_drops_flow'] == 1
    assert log == ['data 0 0 1', 'gap 0 1 9', 'data 0 10 1', 'close timeout']
    # total cap
    pk = handshake() + [(0, ISN_C + 1, ACK, b'a'), (0, ISN_C + 3, ACK, b'cccccccc')]
    s0, s1, log, st, buf, _ = run(T, pk, max_total_bytes=4)
    assert st['cap_drops_total'] == 1 and buf == 0


def test_many_flows_independent(T):
    lua, t = T
    r = lua.execute(r"""
      local tcpreasm = require 'luaprobe.engine.streams.tcpreasm'
      local got = {}
      local R = tcpreasm.new{cb = function(id, dir, off, p, n) got[id] = (got[id] or '') .. require('ffi').string(p, n) end}
      for id = 1, 50 do
        R:packet(id, 0, id * 1000, 0x02, '', 0, 0)
        R:packet(id, 0, id * 1000 + 4, 0x10, 'xyz' .. id, 3 + #tostring(id), 0)
        R:packet(id, 0, id * 1000 + 1, 0x10, 'abc', 3, 0)
      end
      local ok = 0
      for id = 1, 50 do if got[id] == 'abcxyz' .. id then ok = ok + 1 end end
      return ok, R.buffered, R.stats.flows
    """)
    assert tuple(r) == (50, 0, 50)


# --------------------------------------------------------------------------- model (hypothesis)
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

MODEL_LUA = r"""
local tcpreasm = require 'luaprobe.engine.streams.tcpreasm'
-- one client stream: SYN with isn, then segments {offset, data}; expire at the end.
-- returns delivered bytes, data log {off, n}, gap log {off, n}, stats
return function(isn, segs)
  local out, dlog, glog = {}, {}, {}
  local R = tcpreasm.new{
    cb = function(id, dir, off, p, n)
      out[#out + 1] = type(p) == 'string' and p:sub(1, n) or require('ffi').string(p, n)
      dlog[#dlog + 1] = { off, n }
    end,
    cb_gap = function(id, dir, off, n) glog[#glog + 1] = { off, n } end,
  }
  R:packet(1, 0, isn, 0x02, '', 0, 0)
  for _, s in ipairs(segs) do
    R:packet(1, 0, (isn + 1 + s[1]) % 4294967296, 0x18, s[2], #s[2], 0)
  end
  R:expire(1)
  return table.concat(out), dlog, glog, R.stats
end
"""


@st.composite
def segment_plans(draw):
    n = draw(st.integers(1, 6000))
    data = draw(st.binary(min_size=n, max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=20)))) if n > 1 else []
    bounds = [0] + cuts + [n]
    segs = [(a, data[a:b]) for a, b in zip(bounds, bounds[1:])]
    gaps = draw(st.lists(st.integers(0, len(segs) - 1), max_size=3, unique=True))
    extra = []
    for _ in range(draw(st.integers(0, 5))):                    # overlapping retransmissions (same bytes)
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, min(n, a + 1500)))
        extra.append((a, data[a:b]))
    dups = [segs[i] for i in draw(st.lists(st.integers(0, len(segs) - 1), max_size=3))]
    kept = [s for i, s in enumerate(segs) if i not in gaps] + extra + dups
    order = draw(st.permutations(range(len(kept))))
    return data, [kept[i] for i in order], draw(st.integers(0, 2**32 - 1))


@pytest.fixture(scope='module')
def model_run():
    lua = new_runtime(encoding=None)
    return lua, lua.execute(MODEL_LUA)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(plan=segment_plans())
def test_reassembly_matches_model(model_run, plan):
    """Shuffled, duplicated, overlapping and gapped segments (any ISN: wraparound included) against a byte
    model: every covered byte is delivered once and in order, every hole before the last covered byte is
    one gap of exactly its size, nothing else is delivered."""
    data, segs, isn = plan
    lua, fn = model_run
    tbl = lua.table_from([lua.table_from([a, s]) for a, s in segs])
    out, dlog, glog, stats = fn(isn, tbl)
    covered = [False] * len(data)
    for a, s in segs:
        for i in range(a, a + len(s)):
            covered[i] = True
    last = max((i for i, c in enumerate(covered) if c), default=-1)
    want = bytes(b for b, c in zip(data, covered) if c)
    holes, i = [], 0
    while i <= last:
        if not covered[i]:
            j = i
            while not covered[j]:
                j += 1
            holes.append([i, j - i])
            i = j
        else:
            i += 1
    assert out == want
    assert [list(g.values()) for g in glog.values()] == holes
    pos = 0                                                      # data log: contiguous around the gaps
    gaps = {a: n for a, n in holes}
    for d in dlog.values():
        off, n = d[1], d[2]
        while pos in gaps and pos != off:
            pos += gaps[pos]
        assert off == pos
        pos += n
    st_ = {k.decode(): v for k, v in stats.items()}
    assert st_['bytes_delivered'] == len(want) and st_['gap_bytes'] == sum(n for _, n in holes)


# --------------------------------------------------------------------------- held segments (hypothesis)
HELD_LUA = r"""
local tcpreasm = require 'luaprobe.engine.streams.tcpreasm'
-- packets {id, pdir, seq, flags, data, ack}, all at packet time 0, then every flow expired.  After every packet
-- the reassembler's held-byte totals are checked against a re-count of its queues (R.held_bytes = the sum of
-- f.hbytes over R.holding = the sum of the held payloads' lengths, and no flow outside R.holding holds).
-- Returns the delivery log ({'d', id, dir, off, bytes, peer delivered offset then} | {'g', id, dir, off, n}
-- in callback order), the gap lengths, close log
-- {id, reason}, stats, the largest held_bytes seen, and R.held_bytes / R.buffered at the end.
return function(pkts)
  local dlog, glog, clog = {}, {}, {}
  local R
  local function peer_off(id, dir)
    local f = R.flows[id]
    return f and f.s and f.s[1 - dir].off or -1
  end
  R = tcpreasm.new{
    cb = function(id, dir, off, p, n)
      local s = type(p) == 'string' and p:sub(1, n) or require('ffi').string(p, n)
      dlog[#dlog + 1] = { 'd', id, dir, off, s, peer_off(id, dir) }
    end,
    cb_gap = function(id, dir, off, n) dlog[#dlog + 1] = { 'g', id, dir, off, n }; glog[#glog + 1] = n end,
    cb_close = function(id, reason) clog[#clog + 1] = { id, reason } end,
  }
  local maxheld = 0
  local function check()
    local total = 0
    for id, f in pairs(R.flows) do
      if f.held then
        assert(R.holding[id] == f, 'a flow with held segments is not in R.holding')
        local nb = 0
        for _, it in ipairs(f.held) do nb = nb + #it.data end
        assert(nb == f.hbytes, string.format('flow %s: hbytes %s, held payloads %d', id, tostring(f.hbytes), nb))
        total = total + nb
      else
        assert(R.holding[id] == nil, 'a flow without held segments is in R.holding')
      end
    end
    assert(total == R.held_bytes, string.format('held_bytes %d, held payloads %d', R.held_bytes, total))
    if total > maxheld then maxheld = total end
  end
  for _, k in ipairs(pkts) do
    R:packet(k[1], k[2], k[3], k[4], k[5], #k[5], 0, nil, k[6])
    check()
  end
  for id in pairs(R.flows) do R:expire(id) end
  check()
  return dlog, glog, clog, R.stats, maxheld, R.held_bytes, R.buffered
end
"""


@st.composite
def held_plans(draw):
    """Keep-alive connections (1-3, flow ids 1..): a handshake, then 1-4 exchanges (a request of 1-3 segments
    of 1-300 bytes, a response of 1-4 segments of 1-1400 bytes), then FIN both ways, every segment
    acknowledging the peer bytes sent before it.  The handshakes come first, in order; every later packet of
    all the connections is captured in any order (mirror ports); with `drop`, some are not captured at all.
    Returns (packets, {(id, dir): stream bytes}, {(id, dir, offset): need}, {(id, dir): offsets of dropped
    bytes}): need is the peer stream offset a segment's ACK covers."""
    n_conns = draw(st.integers(1, 3))
    drop = draw(st.booleans())
    hand, rest, streams, needs, dropped = [], [], {}, {}, {}
    for cid in range(1, n_conns + 1):
        isn = [draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))]
        hand += [(cid, 0, isn[0], SYN, b'', None), (cid, 1, isn[1], SYN | ACK, b'', (isn[0] + 1) % 2**32),
                 (cid, 0, (isn[0] + 1) % 2**32, ACK, b'', (isn[1] + 1) % 2**32)]
        sent = [0, 0]
        streams[cid, 0], streams[cid, 1] = b'', b''
        dropped[cid, 0], dropped[cid, 1] = set(), set()

        def seg(d, data, flags=ACK):
            seqno = (isn[d] + 1 + sent[d]) % 2**32
            ack = (isn[1 - d] + 1 + sent[1 - d] + (1 if flags & FIN and d == 1 else 0)) % 2**32
            pk = (cid, d, seqno, flags, data, ack)
            if data:
                needs[cid, d, sent[d]] = sent[1 - d]
                streams[cid, d] += data
            if drop and data and draw(st.integers(0, 9)) == 0:
                dropped[cid, d].update(range(sent[d], sent[d] + len(data)))
            else:
                rest.append(pk)
            sent[d] += len(data)

        for _ in range(draw(st.integers(1, 4))):
            for d, most, count in ((0, 300, 3), (1, 1400, 4)):
                for _ in range(draw(st.integers(1, count))):
                    seg(d, draw(st.binary(min_size=1, max_size=most)))
        seg(0, b'', ACK | FIN)
        seg(1, b'', ACK | FIN)
    order = draw(st.permutations(range(len(rest))))
    return hand + [rest[i] for i in order], streams, needs, dropped


@pytest.fixture(scope='module')
def held_run():
    lua = new_runtime(encoding=None)
    return lua, lua.execute(HELD_LUA)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plan=held_plans())
def test_held_segments_against_model(held_run, plan):
    """Both directions of keep-alive connections in any capture order, against the connection that was sent:
    the held-byte totals stay exact after every packet (an independent re-count of the queues) and end at 0;
    every stream is delivered once, in order, its uncaptured bytes as gaps; with everything captured there is
    no gap and every byte is delivered only after the peer bytes its segment acknowledges (the wait is never
    given up: each segment only waits for bytes sent before it), and each connection closes with its FINs."""
    pkts, streams, needs, dropped = plan
    lua, fn = held_run
    tbl = lua.table_from([lua.table_from(list(p[:5]) + ([p[5]] if p[5] is not None else [])) for p in pkts])
    dlog, glog, clog, stats, maxheld, held_end, buffered_end = fn(tbl)
    assert held_end == 0 and buffered_end == 0
    got = {k: bytearray() for k in streams}
    seg_need = {}                                                # (id, dir) -> sorted [(start, need)]
    for (cid, d, start), need in needs.items():
        seg_need.setdefault((cid, d), []).append((start, need))
    for v in seg_need.values():
        v.sort()
    for e in dlog.values():                                      # in callback order
        kind, cid, d, off, x, peer = e[1], e[2], e[3], e[4], e[5], e[6]
        assert off == len(got[cid, d])
        if kind == b'g':
            assert all(o in dropped[cid, d] for o in range(off, off + x))
            got[cid, d] += streams[cid, d][off:off + x]
            continue
        assert x == streams[cid, d][off:off + len(x)]
        if not any(dropped.values()):
            for o in range(off, off + len(x)):                   # the segment holding byte o waited for its need
                need = max(n for s, n in seg_need[cid, d] if s <= o)
                assert peer >= need, (cid, d, o, need, peer)
        got[cid, d] += x
    assert all(bytes(got[k]) == streams[k] for k in streams)
    if not any(dropped.values()):
        assert len(glog) == 0 and stats[b'gaps'] == 0
        assert sorted((c[1], c[2]) for c in clog.values()) == [(cid, b'fin') for cid in sorted({k[0] for k in streams})]
