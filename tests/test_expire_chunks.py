"""The idle expiry in chunks (engine/fastpath/flowtable.lua FT:expire, issue 10: the cost of a flow's end).

A long-running probe ends every flow by idle expiry.  Since session 17 expire() takes the idle flows EXPIRE_CHUNK
at a time in four small loops (collect along the LRU list, touch and hash, fn per flow, free per flow) instead of
one loop with fn and free_flow's two loops inside it (a different trace tree in each process: 289-848 ns a flow in
record order, 474-2 438 in random order, tools/bench/flush_cost.py --expire).  Checked here, deterministically:

* the touch loop (2) compiles to a looping root trace of loads, the key's hash and one store (the hash kept for the
  free) a flow, and no call: the records' and index slots' misses overlap (fails on the code before: no such loop);
* which flows expire, in which order, with which record, per call and with ``max``, against a Python model of the
  documented rule (walk the LRU list from its head; a flow with now - last_ts > idle is reported and freed, one only
  in the boundary second is stepped over, the walk stops at the first flow with now - lsec <= idle; at most ``max``
  reported a call), with an ``fn`` that terminates itself or the next flow of the list (which then is neither
  reported nor freed twice), over a table whose list visits the records in random order and crosses chunks.
"""
from __future__ import annotations

import collections
import math
import os

from luaprobe.shm.luajit import new_runtime, package_dirs
from tests import helpers
from tools.bench import fillir
from tools.bench.walkir import IR_NAMES

N, IDLE = 3000, 6.0
MAXES = (700, 1, 513, 37, 100000)     # max of successive expire() calls, cycled
NOW = (1008.5, 1020.0)                # the boundary second 1002 at the first: idle and not idle flows interleaved

LUA = r"""
local ffi = require "ffi"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local decode = require "luaprobe.engine.fastpath.decode"
-- N UDP flows 10.1.x.y:(1024 + i) -> 192.0.2.1:53, first packets in [1000, 1002) in order of i, then a second packet
-- for two flows in three, in a shuffled order, at times spread over [1002, 1005).  Then for each `now` expire(now, fn,
-- max) with max cycling over MAXES until it returns 0; fn records the flow and terminates itself (i % 7 == 0) or the
-- next flow of the list when that one is live and idle (i % 5 == 0).  Returns the packets, the list before each
-- now, the reports, the counters, and the IR of the looping root traces starting at flowtable.lua:LINE.
return function(N, IDLE, LINE, NOW1, NOW2, ...)
  local maxes = {...}
  local ft = flowtable.new{capacity = 8192, idle_timeout = IDLE, active_timeout = 1e9, huge_pages = false}
  local d = decode.new()
  local idx_of, num_of, pk = {}, {}, {}
  local function flow(i) udp_flow(d, i) end
  local function send(i, ts)
    flow(i)
    local idx = ft:update(d, ts, 60)
    assert(idx_of[i] == nil or idx_of[i] == idx)
    idx_of[i], num_of[idx] = idx, i
    pk[#pk + 1] = ("%d %.17g"):format(i, ts)
  end
  for i = 0, N - 1 do send(i, 1000 + i * 2 / N) end
  local order = {}
  for i = 0, N - 1 do order[i + 1] = i end
  math.randomseed(11)
  for i = N, 2, -1 do local j = math.random(1, i); order[i], order[j] = order[j], order[i] end
  local m = math.floor(N * 2 / 3)
  for k = 1, m do send(order[k], 1002 + (k - 1) * 3 / m) end
  assert(ft.live == N)
  local traces, lists, reps = {}, {}, {}
  attach_loop_ir("flowtable.lua:" .. LINE, traces)
  local now
  local function fn(idx, reason)
    local e = ft:entry(idx)
    local i = num_of[idx]
    reps[#reps + 1] = ("%d %d %.17g %.17g %d %d"):format(i, reason, e.id, e.last_ts, e.packets_az + e.packets_za,
                                                        bit.band(e.state, 0x100))
    if i % 7 == 0 then
      ft:terminate(idx)
    elseif i % 5 == 0 and i + 1 < N then
      local j = idx_of[i + 1]
      if ft:is_live(j) and now - ft:entry(j).last_ts > IDLE then ft:terminate(j) end
    end
  end
  local c = 0
  for _, t in ipairs({NOW1, NOW2}) do
    now = t
    local l = {}
    ft:each(function(idx) l[#l + 1] = tostring(num_of[idx]) end)
    lists[#lists + 1] = table.concat(l, " ")
    while true do
      local mx = maxes[c % #maxes + 1]
      c = c + 1
      local n = ft:expire(now, fn, mx)
      reps[#reps + 1] = ("call %g %d %d"):format(now, mx, n)
      if n == 0 then break end
    end
  end
  jit.attach(function() end)
  return table.concat(pk, "\n"), table.concat(lists, "\n"), table.concat(reps, "\n"), table.concat(traces, "\n"),
    ("%d %d %d %d"):format(ft.live, ft.expired, ft.expired_idle, ft.terminated)
end
"""


def _touch_line() -> int:
    """The line of expire()'s loop (2) (the `for k = 0, m - 1 do` whose next line is `local x = ids[k]` and whose
    loop hashes the key)."""
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, line in enumerate(src) if line.startswith("function FT:expire"))
    line = next((i for i in range(start, len(src)) if src[i].strip().startswith("for k = 0, m - 1 do")
                 and "hash_key" in src[i + 2]), None)
    assert line is not None, "expire has no touch loop"
    return line + 1


def _run(line=0):
    """LUA's results (strings); line: the touch loop's line, whose traces are returned (0: none)."""
    rt = new_runtime(encoding=None)
    out = rt.execute(helpers.LOOP_IR_LUA + helpers.UDP_FLOW_LUA + LUA)(N, IDLE, line, NOW[0], NOW[1], *MAXES)
    return [x.decode() if isinstance(x, bytes) else x for x in out]


def _parse(line):
    """A report line as a tuple: ("call", now, max, n) or (flow, reason, id, last_ts, packets, TIMEDOUT bit)."""
    w = line.split()
    if w[0] == "call":
        return ("call", float(w[1]), int(w[2]), int(w[3]))
    return (int(w[0]), int(w[1]), int(float(w[2])), float(w[3]), int(w[4]), int(w[5]))


def _model(packets, lists):
    """The reports and each call's ("call", now, max, n), as _parse's tuples, from the packets sent and the list's
    order before each now (FT:each), by the documented rule and fn's terminations; the flows left, the terminations."""
    last, npk = {}, collections.Counter()
    for line in packets.split("\n"):
        i, ts = line.split()
        last[int(i)] = float(ts)
        npk[int(i)] += 1
    out, c, terminated = [], 0, 0
    live = set(last)
    for now, lst in zip(NOW, lists.split("\n")):
        order = [int(x) for x in lst.split()]
        assert set(order) == live
        while True:
            mx = MAXES[c % len(MAXES)]
            c += 1
            n = 0
            for f in order:
                if n >= mx:
                    break
                if f not in live:
                    continue
                if now - last[f] > IDLE:
                    out.append((f, 1, f + 1, last[f], npk[f], 256))     # ids are 1.. in creation order
                    live.discard(f)
                    n += 1
                    if f % 7 == 0:
                        terminated += 1
                    elif f % 5 == 0 and f + 1 in live and now - last[f + 1] > IDLE:
                        live.discard(f + 1)
                        terminated += 1
                elif now - math.floor(last[f]) > IDLE:     # lsec: the second of its last packet (times increase)
                    continue
                else:
                    break
            out.append(("call", now, mx, n))
            if n == 0:
                break
    return out, live, terminated


def test_expire_touch_loop_is_loads_a_hash_and_one_store():
    packets, lists, reps, traces, counters = _run(_touch_line())
    assert traces, "the touch loop of expire did not compile to a looping trace"
    for t in traces.split("\n"):
        ops = collections.Counter(fillir.per_packet([IR_NAMES[int(o)] for o in t.split(",")]))
        # ids[k], the key's five 64-bit words, the cold record's first word, the home slot's idx
        assert ops["XLOAD"] == 8, f"loads a flow: {ops}"
        assert ops["XSTORE"] == 1, ops                     # hs[k]
        assert ops["CALLN"] == 0 and ops["CALLL"] == 0 and ops["CALLS"] == 0 and ops["CALLXS"] == 0, ops


def test_expire_reports_and_frees_as_the_model_in_list_order():
    packets, lists, reps, traces, counters = _run()
    want, live, terminated = _model(packets, lists)
    got = [_parse(r) for r in reps.split("\n")]
    first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert got == want, f"first difference at report {first}: {got[first:first + 3]} != {want[first:first + 3]}"
    reports = [w for w in want if w[0] != "call"]
    # the first now stepped over flows of the boundary second and stopped before the end, across several chunks
    end1 = want.index(("call", NOW[0], next(w[2] for w in want if w[0] == "call" and w[1] == NOW[0] and w[3] == 0), 0))
    at1 = [w for w in want[:end1] if w[0] != "call"]
    assert 600 < len(at1) < N - 600
    assert any(NOW[0] - w[3] <= IDLE for w in reports[len(at1):] if math.floor(w[3]) == 1002)
    assert any(w[2] == 1 and w[3] == 1 for w in want if w[0] == "call")    # max 1: one flow
    assert counters == f"0 {len(reports)} {len(reports)} {terminated}"
    assert terminated > 100 and not live
