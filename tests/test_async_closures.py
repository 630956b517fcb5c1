"""T.async with closures created per call (issue 11): prototype identity, upvalues by value at schedule
time when they cross only on change, and lp_fninfo (shm/_lpsync.c) against the debug library.

Real worker processes and rings as in tests/test_async.py; every run checks the accounting identity.
"""
from __future__ import annotations

from tests.test_async import drain, lst, plugin

FRESH = r'''
got = {}
local function keep(e, d, r) got[#got + 1] = r end
local SAME = "same"
-- a new closure per call; `v` differs per call, SAME never changes
function fresh(n)
  for i = 1, n do
    local v = i
    T.async:schedule{ data = tostring(i), onexecute = function(d) return d .. ":" .. v .. ":" .. SAME end,
                      onresult = function(e, d, r) got[#got + 1] = r end }
  end
end
-- the function assigns its upvalues in the worker: each task still starts from its schedule-time values
local n, m = 0, 0
local function bump(d)
  n = n + 1
  local function inner() m = m + 10 end
  inner()
  return n .. "/" .. m
end
function mutating(k)
  for i = 1, k do T.async:schedule{ data = "", onexecute = bump, onresult = keep } end
  n = 5
  T.async:schedule{ data = "", onexecute = bump, onresult = keep }
end
-- a table upvalue mutated after schedule and before the flush (same hook): the task has the old content
function tables()
  local t = { x = 1 }
  local function ex(d) return tostring(t.x) end
  T.async:schedule{ data = "", onexecute = ex, onresult = keep }
  t.x = 2
  T.async:schedule{ data = "", onexecute = ex, onresult = keep }
  t = { x = 3 }
  T.async:schedule{ data = "", onexecute = ex, onresult = keep }
end
-- onexecute changes a table upvalue's contents in the worker: each task starts from its own snapshot
function table_in_worker(k)
  local cfg = { hits = 0 }
  local function ex(d) cfg.hits = cfg.hits + 1; return tostring(cfg.hits) end
  for i = 1, k do T.async:schedule{ data = "", onexecute = ex, onresult = keep } end
end
-- 300 prototypes made at run time and dropped: a collected prototype must never lend its identity
function generated(k)
  for i = 1, k do
    local f = assert(loadstring("local c = " .. i .. "; return function(d) return d .. '=' .. c end"))()
    T.async:schedule{ data = tostring(i), onexecute = f, onresult = keep }
    f = nil
    if i % 50 == 0 then collectgarbage() end
  end
end
'''


def results(vm) -> list[str]:
    return [x.decode() for x in lst(vm, "got")]


def test_fresh_closures_carry_their_own_upvalues(runtime_factory, tmp_path):
    rt = runtime_factory(workers=2)
    vm = rt.load(plugin(tmp_path, FRESH))
    vm.exec("fresh(300)")
    st = drain(rt, vm)
    assert st["ok"] == 300 and st["error"] == 0, st
    assert sorted(results(vm)) == sorted(f"{i}:{i}:same" for i in range(1, 301))
    # one prototype: one function id (bytecode shipped once per worker), however many closures
    assert vm.lua.eval("function(a) return a.nfids end")(vm.async_obj) == 1


def test_upvalues_assigned_in_the_worker_do_not_leak_into_later_tasks(runtime_factory, tmp_path):
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, FRESH))
    vm.exec("mutating(20)")
    st = drain(rt, vm)
    assert st["ok"] == 21, st
    assert results(vm) == ["1/10"] * 20 + ["6/10"]          # one worker: FIFO


def test_table_upvalues_are_snapshot_at_schedule(runtime_factory, tmp_path):
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, FRESH))
    vm.exec("tables()")
    st = drain(rt, vm)
    assert st["ok"] == 3, st
    assert results(vm) == ["1", "2", "3"]


def test_table_contents_changed_in_the_worker_do_not_leak(runtime_factory, tmp_path):
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, FRESH))
    vm.exec("table_in_worker(10)")
    st = drain(rt, vm)
    assert st["ok"] == 10, st
    assert results(vm) == ["1"] * 10


def test_prototypes_made_at_run_time(runtime_factory, tmp_path):
    rt = runtime_factory(workers=2)
    vm = rt.load(plugin(tmp_path, FRESH))
    vm.exec("generated(300)")
    st = drain(rt, vm)
    assert st["ok"] == 300 and st["error"] == 0, st
    assert sorted(results(vm)) == sorted(f"{i}={i}" for i in range(1, 301))


FNINFO = r'''
local async = require("luaprobe.engine.plugins.async")
local fninfo = async.fninfo
local a, b, c, d, e, f, g, h, i, j = 1, "two", true, nil, {}, 6.5, "7", 8, 9, 10
local function mk() return function() return a, b, c, d, e, f, g, h, i, j end end
local f1, f2 = mk(), mk()
local z = function() return b end
local out = {}
local k1, n1 = fninfo(f1)
out[#out + 1] = k1 == select(1, fninfo(f2)) and k1 ~= select(1, fninfo(z))
out[#out + 1] = n1 == debug.getinfo(f1, "u").nups and select(2, fninfo(z)) == debug.getinfo(z, "u").nups
local vals = { select(3, fninfo(f1)) }
local same = #vals <= 8
for idx = 1, 8 do same = same and vals[idx] == select(2, debug.getupvalue(f1, idx)) end
out[#out + 1] = same
b = "changed"                                  -- closed upvalues are read live
out[#out + 1] = select(4, fninfo(f1)) == "changed"
local function opener()                        -- an open upvalue (its variable still on the stack)
  local live = "open"
  local inner = function() return live end
  local r = select(3, fninfo(inner))
  live = "moved"
  return r == "open" and select(3, fninfo(inner)) == "moved"
end
out[#out + 1] = opener()
out[#out + 1] = fninfo(print) == nil and fninfo(nil) == nil and fninfo({}) == nil and fninfo("x") == nil
out[#out + 1] = async.fninfo_fallback == nil
return unpack(out)
'''


def test_lp_fninfo_agrees_with_the_debug_library(tmp_path):
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    assert list(lua.execute(FNINFO)) == [True] * 7


GROWING = r'''
order = {}
-- fresh closures with a changing upvalue, scheduled in rounds between services: the FIFO wraps around and
-- grows (1 024 slots at first) while tasks of earlier rounds are still in it
function round(first, k)
  for i = first, first + k - 1 do
    local u = i % 7
    T.async:schedule{ data = tostring(i), onexecute = function(d) return d .. "/" .. u end,
                      onresult = function(e, d, r) order[#order + 1] = d .. "=" .. r end }
  end
end
'''


def test_fifo_growth_keeps_every_task_with_its_data_and_order(runtime_factory, tmp_path):
    """One worker returns results in request order, so onresult sees exactly the schedule order (the model), each
    task with its own data and upvalue, across FIFO chunk edges and growth (engine/plugins/async.lua chunk_for_tail)."""
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, GROWING))
    rnd = vm.lua.eval("function(a, k) round(a, k) end")
    first = 1
    # after a full drain the FIFO's head is past slot 1 (the next growth copies wrapped positions); after one
    # service only some results are in (growth with tasks of earlier rounds still queued)
    for k, full in ((700, True), (1500, False), (700, True), (3000, False), (9000, False)):
        rnd(first, k)
        first += k
        if full:
            drain(rt, vm)
        else:
            rt.service()
    st = drain(rt, vm)
    n = first - 1
    assert st["ok"] == n == st["scheduled"], st
    got = [x.decode() for x in lst(vm, "order")] if n < 2000 else \
        vm.lua.eval("function() return table.concat(order, ',') end")().decode().split(",")
    assert got == [f"{i}={i}/{i % 7}" for i in range(1, n + 1)]
    # it did grow: the FIFO spanned 8 chunks of 1024 positions or more at once (engine/plugins/async.lua)
    assert vm.lua.eval("function(a) return a.workers[1].peak_chunks end")(vm.async_obj) >= 8
    # and gave them back: with nothing in flight only the tail's chunk is held
    assert vm.lua.eval("function(a) return a.workers[1].nchunks end")(vm.async_obj) == 1


HOISTED = r'''
got = {}
local U, S, F, Z = 0, "a", true, 0
local T5a, T5b, T5c, T5d, T5e = 1, 2, 3, 4, 5
local tbl = { n = 0 }
local function keep(e, d, r) got[#got + 1] = r end
local one = { data = "", onexecute = function(d) return d .. ":" .. U .. ":" .. S .. ":" .. tostring(F) .. ":" .. Z end,
              onresult = keep }
local other = { data = "", onexecute = function(d) return d .. "/" .. U end, onresult = keep }
local five = { data = "", onexecute = function(d) return d .. "=" .. T5a + T5b + T5c + T5d + T5e end, onresult = keep }
local withtable = { data = "", onexecute = function(d) return d .. "#" .. tbl.n .. U end, onresult = keep }
-- one task table written once, its upvalues changed between calls in a loop LuaJIT compiles
function hoisted(n)
  for i = 1, n do
    if i % 3 == 0 then U = U + 1 end
    if i % 50 == 0 then S = (i % 100 == 0) and "a" or ("b" .. tostring(i % 7 == 8)):sub(1, 1) end
    if i % 40 == 0 then F = not F end
    if i % 11 == 0 then U = U + 0.5 end
    if i % 7 == 0 then Z = -Z end                        -- 0 and -0 are equal, but tostring(-0) is "-0"
    one.data = tostring(i)
    T.async:schedule(one)
    if i % 97 == 0 then other.data = tostring(i); T.async:schedule(other) end
    if i % 5 == 0 then T5c = T5c + 1; five.data = tostring(i); T.async:schedule(five) end
    if i % 13 == 0 then tbl.n = tbl.n + 1; withtable.data = tostring(i); T.async:schedule(withtable) end
  end
end
'''


def _fmt(x: float) -> str:
    """Lua's tostring of a number (%.14g)."""
    return "%.14g" % x


def test_hoisted_closure_ships_the_values_of_each_schedule_call(runtime_factory, tmp_path):
    """The same closure scheduled again and again from a compiled loop that changes its upvalues in between: every
    task runs with the values of its own schedule call (lp_uvc_same / lp_uvc_take skip the snapshot only while the
    raw values are unchanged); against a model of the loop.  With one worker results come in schedule order."""
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, HOISTED))
    n = 3000
    vm.exec(f"hoisted({n})")
    st = drain(rt, vm)
    want, u, s, f, z, t5c, tn = [], 0.0, "a", True, 0.0, 3, 0
    for i in range(1, n + 1):
        if i % 3 == 0:
            u += 1
        if i % 50 == 0:
            s = "a" if i % 100 == 0 else "b"
        if i % 40 == 0:
            f = not f
        if i % 11 == 0:
            u += 0.5
        if i % 7 == 0:
            z = -z
        want.append(f"{i}:{_fmt(u)}:{s}:{str(f).lower()}:{_fmt(z)}")
        if i % 97 == 0:
            want.append(f"{i}/{_fmt(u)}")
        if i % 5 == 0:
            t5c += 1
            want.append(f"{i}={_fmt(1 + 2 + t5c + 4 + 5)}")
        if i % 13 == 0:
            tn += 1
            want.append(f"{i}#{tn}{_fmt(u)}")
    assert st["ok"] == len(want) and st["error"] == 0, st
    got = vm.lua.eval("function() return table.concat(got, ',') end")().decode().split(",")
    assert got == want


MANY = r'''
-- a new prototype per task (loadstring per call), between tasks of one prototype with a per-call upvalue
function many(from, to)
  for i = from, to do
    local f = assert(loadstring("local c = " .. i .. "; return function(d) return d .. '=' .. c end"))()
    T.async:schedule{ data = tostring(i), onexecute = f, onresult = keep }
    local v = i
    T.async:schedule{ data = "h", onexecute = function(d) return d .. v end, onresult = keep }
  end
end
'''


def test_functions_no_pending_task_uses_are_forgotten(runtime_factory, tmp_path):
    """10 000 prototypes, scheduled 1 000 at a time, results delivered after every second thousand (so functions
    are forgotten while others' tasks are pending, and forgotten fids come back for new functions, whose DEFINE
    replaces the worker's copy): every task runs its own function, and the VM never holds more than twice the cache
    (FN_CACHE, 4 096) functions.  Before, all 10 000 were kept, in the VM and in every worker (async_closures_rss.py: 100 000 held
    145 MB of the VM's heap and 79 MB of the worker's)."""
    rt = runtime_factory(workers=2)
    vm = rt.load(plugin(tmp_path, FRESH + MANY))
    for k in range(10):
        vm.exec(f"many({k * 1000 + 1}, {k * 1000 + 1000})")
        if k % 2:                      # at most two thousands' functions pending at a sweep: at most 8 192 fids
            drain(rt, vm)
        else:
            rt.service()
    st = drain(rt, vm)
    assert st["ok"] == 20000 and st["error"] == 0, st
    assert sorted(results(vm)) == sorted([f"{i}={i}" for i in range(1, 10001)] + [f"h{i}" for i in range(1, 10001)])
    nfids = vm.lua.eval("function(a) return a.nfids end")(vm.async_obj)
    assert nfids <= 2 * 4096, nfids
