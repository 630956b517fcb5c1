"""T.async end to end: real worker processes, real shared-memory rings (engine/plugins/async.lua, workers/).

Every test that runs tasks checks the accounting identity
    scheduled == ok + nil_result + error + timeout + dropped + pending
Tasks that must stay "running" wait on a gate file (gate.lua next to the plug-in: a usleep loop, no
busy spinning) and can first create a marker file so the test knows the worker has started them.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import time

import hypothesis
import hypothesis.strategies
import psutil
import pytest
from lupa.luajit21 import LuaError

from luaprobe.shm import segment
from tests import helpers

GATE_LUA = r'''
local ffi = require("ffi")
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local M = {}
function M.exists(p) local f = io.open(p, "rb"); if f then f:close(); return true end; return false end
function M.touch(p) local f = assert(io.open(p, "wb")); f:close() end
function M.sleep(s) ffi.C.usleep(s * 1e6) end
--- create `marker` (when given), then wait until `gate` exists
function M.wait(gate, marker)
  if marker then M.touch(marker) end
  while not M.exists(gate) do ffi.C.usleep(2000) end
end
return M
'''


def q(s) -> str:
    """A Lua string literal for a Python str (paths)."""
    return json.dumps(str(s))


def plugin(tmp_path, body: str, name: str = "plugin.lua") -> str:
    """Write gate.lua and the plug-in; DIR and GATE are file-level locals (string upvalues)."""
    (tmp_path / "gate.lua").write_text(GATE_LUA)
    head = (f'TrisulPlugin = TrisulPlugin or {{ id = {{ name = "test" }} }}\n'
            f'local DIR, GATE = {q(tmp_path)}, {q(tmp_path / "gate.open")}\n')
    return helpers.write_plugin(tmp_path, head + body, name)


def line_of(path: str, marker: str) -> int:
    """1-based line of the plug-in file that contains ``marker``."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if marker in line:
                return n
    raise AssertionError(marker)


def lst(vm, name: str) -> list:
    """The array part of a Lua global table, in order."""
    n = vm.exec(f"return #{name}")
    return [vm.exec(f"return {name}[{i}]") for i in range(1, n + 1)]


def drain(rt, vm, timeout: float = 30.0) -> dict:
    """Run until nothing is pending; return the stats after checking the accounting identity."""
    assert rt.run_until_idle(timeout), vm.async_stats()
    st = vm.async_stats()
    helpers.assert_accounting(st)
    assert st["pending"] == 0
    return st


def open_gate(tmp_path) -> None:
    (tmp_path / "gate.open").write_text("")


def service_until(rt, cond, timeout: float = 10.0):
    """Call rt.service() (the fast path's loop) until cond() is truthy; returns (value, seconds)."""
    t0 = time.monotonic()
    while True:
        rt.service()
        v = cond()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        rt.wait(0.005)


def luaprobe_records(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "luaprobe" and needle in r.getMessage()]


# ============================================================================ 1. the API, both call styles

STYLE_TEMPLATE = r'''
function go_STYLE(dir)
  local tag, rets = "STYLE", {}
  rets[#rets + 1] = T.async@schedule{ data = "s", onexecute = function(d) return d .. "!" end,
    onresult = function(e, d, r) got[#got + 1] = tag .. " str " .. d .. " " .. r .. " " .. e:instanceid() end }
  rets[#rets + 1] = T.async@schedule{ data = 12.5, onexecute = function(d) return d .. "|" .. type(d) end,
    onresult = function(e, d, r) got[#got + 1] = tag .. " numdata " .. d .. " " .. r end }
  rets[#rets + 1] = T.async@schedule{ data = "n", onexecute = function(d) return 42 end,
    onresult = function(e, d, r) got[#got + 1] = tag .. " numres " .. d .. " " .. r .. " " .. type(r) end }
  rets[#rets + 1] = T.async@schedule{ data = "nil", onexecute = function(d) return nil end,
    onresult = function(e, d, r) got[#got + 1] = tag .. " NIL-CALLED" end }
  rets[#rets + 1] = T.async@schedule{ data = "tbl", onexecute = function(d) return {} end,
    onresult = function(e, d, r) got[#got + 1] = tag .. " TABLE-CALLED" end,
    onerror = function(e, d, m) got[#got + 1] = tag .. " tblerr " .. d .. " " .. m end }
  rets[#rets + 1] = T.async@copybuffer("hello", dir .. "/cb_STYLE")
  rets[#rets + 1] = T.async@copybuffer(buffer.from_string("J"), dir .. "/cb_STYLE", 0)
  rets[#rets + 1] = T.async@copy(dir .. "/src", dir .. "/copy_STYLE")
  rets[#rets + 1] = T.async@cat(dir .. "/src", dir .. "/cat_STYLE")
  rets[#rets + 1] = T.async@cat(dir .. "/src", dir .. "/cat_STYLE")
  rets[#rets + 1] = T.async@rm(dir .. "/rm_STYLE")
  rets[#rets + 1] = T.async@rm(dir .. "/missing_STYLE")
  local accepted = 0
  for _, r in ipairs(rets) do if r == true then accepted = accepted + 1 end end
  return accepted, T.async@pending_items()
end
function bad_STYLE()
  T.async@schedule{ data = true, onexecute = function(d) return d end }   -- BAD_STYLE
end
function badp_STYLE()
  return pcall(function()
    T.async@schedule{ data = {}, onexecute = function(d) return d end }   -- BADP_STYLE
  end)
end
'''


def test_api_both_call_styles(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    body = 'buffer = require("luaprobe.engine.plugins.buffer")\ngot = {}\n'
    for style, sep in (("colon", ":"), ("dot", ".")):
        body += STYLE_TEMPLATE.replace("@", sep).replace("STYLE", style)
    path = plugin(tmp_path, body)
    (tmp_path / "src").write_bytes(b"SRC\x00\xff\n")
    for style in ("colon", "dot"):
        (tmp_path / f"rm_{style}").write_text("x")
    rt = runtime_factory(workers=2)
    vm = rt.load(path)

    for k, style in enumerate(("colon", "dot")):
        accepted, pending = vm.exec(f"return go_{style}({q(tmp_path)})")
        assert accepted == 12
        # results are delivered only between hooks (poll): none of the tasks scheduled so far is finished yet
        assert pending == 12 * (k + 1)
    st = drain(rt, vm)
    assert vm.exec("return T.async:pending_items()") == 0
    assert vm.exec("return T.async.pending_items()") == 0
    assert (st["scheduled"], st["ok"], st["nil_result"], st["error"]) == (24, 20, 2, 2), st

    got = [g.decode() for g in lst(vm, "got")]
    for style in ("colon", "dot"):
        mine = sorted(g for g in got if g.startswith(style + " "))
        assert len(mine) == 4, got
        assert mine[0] == f"{style} numdata 12.5 12.5|string"
        assert mine[1] == f"{style} numres n 42 string"
        assert mine[2] == f"{style} str s s! 0"
        assert mine[3].startswith(f"{style} tblerr tbl ") and "returned a table" in mine[3]
        assert (tmp_path / f"cb_{style}").read_bytes() == b"Jello"
        assert (tmp_path / f"copy_{style}").read_bytes() == b"SRC\x00\xff\n"
        assert (tmp_path / f"cat_{style}").read_bytes() == b"SRC\x00\xff\n" * 2
        assert not (tmp_path / f"rm_{style}").exists()
    assert not any("CALLED" in g for g in got)
    assert luaprobe_records(caplog, "returned a table")

    # data of another type: a Lua error naming the plug-in file and the line of the schedule call
    for style in ("colon", "dot"):
        with pytest.raises(LuaError) as ei:
            vm.exec(f"bad_{style}()")
        msg = str(ei.value)
        assert re.search(rf"plugin\.lua:{line_of(path, 'BAD_' + style)}: ", msg), msg
        assert "data must be a string (got boolean)" in msg
        ok, err = vm.exec(f"return badp_{style}()")
        assert ok is False
        err = err.decode()
        assert re.search(rf"plugin\.lua:{line_of(path, 'BADP_' + style)}: ", err), err
        assert "data must be a string (got table)" in err
    st = vm.async_stats()
    assert st["scheduled"] == 24            # rejected calls are not tasks
    helpers.assert_accounting(st)


def test_empty_string_result_reaches_onresult(runtime_factory, tmp_path):
    """docs/async.md / Trisul T.async: a string return means onresult gets that string, the empty one too.
    Truth: the rule itself, checked with strings of every length Python builds (not our own output)."""
    values = ["", "x", "\0", "a\0b", "\0" * 3]
    lits = ", ".join('"' + "".join(f"\\{ord(c)}" for c in v) + '"' for v in values)
    path = plugin(tmp_path, f'''
out = {{}}
function go()
  for _, v in ipairs({{ {lits} }}) do
    T.async:schedule{{ data = v, onexecute = function(d) return d end,
      onresult = function(e, d, r) out[#out + 1] = type(r) .. ":" .. tostring(r == d) .. ":" .. #d end }}
  end
end
''')
    rt = runtime_factory(workers=1)
    vm = rt.load(path)
    vm.exec("go()")
    st = drain(rt, vm)
    assert (st["ok"], st["nil_result"], st["error"]) == (len(values), 0, 0), st
    assert sorted(x.decode() for x in lst(vm, "out")) == sorted(f"string:true:{len(v)}" for v in values)


# ============================================================================ 2. snapshot at schedule time

def test_schedule_snapshots_the_task_table(runtime_factory, tmp_path):
    path = plugin(tmp_path, r'''
out = {}
function go()
  local task = { data = "one", onexecute = function(d) return "A:" .. d end,
                 onresult = function(e, d, r) out[#out + 1] = "r1 " .. d .. " " .. r end }
  T.async:schedule(task)
  task.data = "two"
  task.onexecute = function(d) return "B:" .. d end
  task.onresult = function(e, d, r) out[#out + 1] = "r2 " .. d .. " " .. r end
  T.async:schedule(task)
  task.data = 3
  task.onexecute = function(d) return "C:" .. d end
  task.onresult = function(e, d, r) out[#out + 1] = "r3 " .. d .. " " .. r end
  T.async.schedule(task)
  task.data, task.onexecute, task.onresult = "changed later", nil, nil   -- must not affect queued tasks
end
''')
    rt = runtime_factory(workers=2)
    vm = rt.load(path)
    vm.exec("go()")
    st = drain(rt, vm)
    assert st["ok"] == 3
    assert sorted(x.decode() for x in lst(vm, "out")) == ["r1 one A:one", "r2 two B:two", "r3 3 C:3"]


# ============================================================================ 3. upvalues

def test_upvalues_cross_to_worker_by_value(runtime_factory, tmp_path):
    path = plugin(tmp_path, r'''
PLUGIN_GLOBAL = "only in the plug-in VM"
local u_nil
local u_true, u_false = true, false
local u_num, u_big, u_inf, u_ninf, u_nan = 0.1, 2^53 - 1, math.huge, -math.huge, 0/0
local u_str = "a\0b\r\n\"\\\255z"
local u_tab = { a = { b = { 1, 2, "x" } }, [5] = true, ["k y"] = { false }, [1.5] = "f" }
local shared = { 7 }
local u_dag = { p = shared, q = shared }
local counter = 0
local function ex(d)
  local function check(c, what) if not c then error("bad upvalue " .. what) end end
  check(u_nil == nil, "nil")
  check(u_true == true and u_false == false, "booleans")
  check(u_num == 0.1 and u_big == 2^53 - 1 and u_inf == math.huge and u_ninf == -math.huge, "numbers")
  check(u_nan ~= u_nan, "nan")
  check(u_tab.a.b[1] == 1 and u_tab.a.b[2] == 2 and u_tab.a.b[3] == "x" and #u_tab.a.b == 3, "nested")
  check(u_tab[5] == true and u_tab["k y"][1] == false and u_tab[1.5] == "f", "keys")
  check(u_dag.p[1] == 7 and u_dag.q[1] == 7, "dag")
  check(getmetatable(u_tab) == nil, "metatable")
  return d .. "|" .. tostring(counter) .. "|" .. tostring(PLUGIN_GLOBAL) .. "|" .. u_str
end

results, calls = {}, 0
local acc = {}
local function onres(e, d, r)      -- runs in the plug-in VM with its own upvalues
  calls = calls + 1
  acc[#acc + 1] = r
  results = acc
end
function go()
  counter = 1
  T.async:schedule{ data = "first", onexecute = ex, onresult = onres }
  counter = 2                        -- upvalues are snapshot at schedule time
  T.async.schedule{ data = "second", onexecute = ex, onresult = onres }
end

function reject(which)
  local helper = function() return 1 end
  local cyc = {}; cyc.me = { cyc }
  local mt = setmetatable({}, {})
  local deep = { a = { b = { f = print } } }
  local fns = {
    fn = function() T.async:schedule{ data = "", onexecute = function(d) return helper() end } end,   -- REJ_fn
    cyc = function() T.async:schedule{ data = "", onexecute = function(d) return cyc.me end } end,    -- REJ_cyc
    mt = function() T.async:schedule{ data = "", onexecute = function(d) return mt end } end,         -- REJ_mt
    deep = function() T.async:schedule{ data = "", onexecute = function(d) return deep end } end,     -- REJ_deep
  }
  local ok, err = pcall(fns[which])
  return ok, err
end
''')
    rt = runtime_factory(workers=2)
    vm = rt.load(path)
    vm.exec("go()")
    st = drain(rt, vm)
    assert st["ok"] == 2 and st["error"] == 0, st
    assert vm.exec("return calls") == 2
    assert sorted(lst(vm, "results")) == [b'first|1|nil|a\x00b\r\n"\\\xffz', b'second|2|nil|a\x00b\r\n"\\\xffz']

    expect = {"fn": ("helper", "is a function"), "cyc": ("cyc", "is a cyclic table"),
              "mt": ("mt", "is a table with a metatable"), "deep": ("deep", "is a function")}
    for which, (name, what) in expect.items():
        ok, err = vm.exec(f"return reject('{which}')")
        assert ok is False
        err = err.decode()
        assert f"upvalue '{name}' of onexecute {what}" in err, err
        assert re.search(rf"plugin\.lua:{line_of(path, 'REJ_' + which)}: ", err), err
    st = vm.async_stats()
    assert st["scheduled"] == 2
    helpers.assert_accounting(st)


# ============================================================================ 4. require and T inside onexecute

def test_require_and_T_in_onexecute(runtime_factory, tmp_path, monkeypatch, capfd):
    lpdir, envdir = tmp_path / "lp", tmp_path / "envp"
    (lpdir / "pkg").mkdir(parents=True)
    envdir.mkdir()
    (tmp_path / "nearmod.lua").write_text('return { f = function(x) return "near(" .. x .. ")" end }\n')
    (lpdir / "lpmod.lua").write_text('return { f = function(x) return "lp(" .. x .. ")" end }\n')
    (lpdir / "pkg" / "sub.lua").write_text('function GLOBAL_FROM_SUB(x) return "sub(" .. x .. ")" end\nreturn true\n')
    (envdir / "envmod.lua").write_text('return { f = function(x) return "env(" .. x .. ")" end }\n')
    monkeypatch.setenv("TRISUL_LUA_PATHS", str(envdir))
    path = plugin(tmp_path, r'''
out = {}
function go()
  T.async:schedule{ data = "alpha|beta|gamma", onexecute = function(d)
      local near, lp, env = require("nearmod"), require("lpmod"), require("envmod")
      require("pkg.sub")
      local a, b, c = T.util.splitm(d, "|")
      T.log(T.K.loglevel.INFO, "worker says " .. a)
      T.logerror("worker error line " .. c)
      return near.f(a) .. lp.f(b) .. env.f(c) .. GLOBAL_FROM_SUB(a)
    end,
    onresult = function(e, d, r) out[#out + 1] = r end }
end
''')
    rt = runtime_factory(workers=1, lua_path=[str(lpdir)])
    vm = rt.load(path)
    vm.exec("go()")
    st = drain(rt, vm)
    assert st["ok"] == 1, st
    assert lst(vm, "out") == [b"near(alpha)lp(beta)env(gamma)sub(alpha)"]
    err = capfd.readouterr().err           # the worker logs to its stderr, inherited from this process
    assert "worker says alpha" in err and "worker error line gamma" in err, err


# ============================================================================ 5. onerror, counting, rate-limited logging

def test_onerror_and_rate_limited_log(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="luaprobe")
    path = plugin(tmp_path, r'''
errs = {}
function go(n)
  for i = 1, n do
    T.async:schedule{ data = "d" .. i,
      onexecute = function(d)
        error("boom " .. d)     -- BOOM
      end,
      onresult = function() errs[#errs + 1] = "ONRESULT-CALLED" end,
      onerror = function(e, d, m) errs[#errs + 1] = { d, m, e:instanceid() } end }
  end
end
''')
    boom = line_of(path, "-- BOOM")
    rt = runtime_factory(workers=2)
    vm = rt.load(path)
    t0 = time.monotonic()
    vm.exec("go(50)")
    st = drain(rt, vm)
    elapsed = time.monotonic() - t0
    assert st["error"] == 50 and st["ok"] == 0 and st["scheduled"] == 50, st
    errs = lst(vm, "errs")
    assert len(errs) == 50
    assert sorted(e[1].decode() for e in errs) == sorted(f"d{i}" for i in range(1, 51))
    for e in errs:
        d, m = e[1].decode(), e[2].decode()
        assert re.search(rf"plugin\.lua:{boom}: boom {d}\n", m), m
        assert "stack traceback:" in m
        assert e[3] == b"0"

    lines = luaprobe_records(caplog, "onexecute error")
    # the first error: one line naming plugin.lua:line at ERROR; its traceback at DEBUG only (-v)
    tbs = [r.getMessage() for r in caplog.records if r.name == "luaprobe" and "stack traceback:" in r.getMessage()]
    assert len(tbs) == 1 and all(r.levelno == logging.DEBUG for r in caplog.records
                                 if r.name == "luaprobe" and "stack traceback:" in r.getMessage()), tbs
    lines = [m for m in lines if m not in tbs]
    full = [m for m in lines if " more at " not in m]
    assert len(full) == 1 and "\n" not in full[0], lines
    assert f"plugin.lua:{boom}: boom d" in full[0]
    summaries = [m for m in lines if m not in full]
    if elapsed < 1.0:
        assert summaries == [], lines
    for m in summaries:
        assert re.search(rf"\d+ more at .*plugin\.lua:{boom} ", m), m
    assert sum(int(re.search(r"(\d+) more at", m).group(1)) for m in summaries) <= 49


# ============================================================================ 6. file helpers

def test_file_helpers(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    (tmp_path / "a").write_bytes(b"AAA")
    (tmp_path / "b").write_bytes(b"BB")
    (tmp_path / "old").write_bytes(b"x" * 100)
    (tmp_path / "victim").write_bytes(b"v")
    path = plugin(tmp_path, r'''
function go(dir)
  T.async:copy(dir .. "/a", dir .. "/old")              -- overwrites (truncates)
  T.async:cat(dir .. "/a", dir .. "/joined")             -- creates
  T.async:cat(dir .. "/b", dir .. "/joined")             -- appends
  T.async:rm(dir .. "/victim")
  T.async:rm(dir .. "/never-existed")                    -- not an error
  T.async:copybuffer("hello world", dir .. "/buf")       -- append (creates)
  T.async:copybuffer("J", dir .. "/buf", 0)              -- at offset
  T.async:copybuffer("!!", dir .. "/buf")                -- append again
  T.async:copybuffer("W", dir .. "/buf", 6)
  T.async:copybuffer("end", dir .. "/fresh", 4)          -- at an offset of a new file
  return T.async:copy(dir .. "/a", dir .. "/no/such/dir/x")   -- fails in the worker, not here
end
''')
    rt = runtime_factory(workers=3)
    vm = rt.load(path)
    assert vm.exec(f"return go({q(tmp_path)})") is True
    st = drain(rt, vm)
    assert (st["scheduled"], st["ok"], st["error"]) == (11, 10, 1), st
    assert (tmp_path / "old").read_bytes() == b"AAA"
    assert (tmp_path / "joined").read_bytes() == b"AAABB"
    assert not (tmp_path / "victim").exists()
    assert (tmp_path / "buf").read_bytes() == b"Jello World!!"
    assert (tmp_path / "fresh").read_bytes() == b"\0\0\0\0end"
    assert not (tmp_path / "no").exists()
    logged = luaprobe_records(caplog, "file helper error")
    assert len(logged) == 1 and "no/such/dir/x" in logged[0], logged


def test_copy_and_cat_argument_errors_name_the_plugin_line(runtime_factory, tmp_path):
    """T.async:copy / :cat with a name that is not a string raise at the plug-in's call (both call styles), naming
    the helper and the argument; nothing is scheduled.  (The two share one checked builder, async.lua from_to.)"""
    path = plugin(tmp_path, r'''
function bad(helper, style, which)
  local a, b = "/tmp/x", "/tmp/y"
  if which == "from" then a = nil else b = {} end
  local r
  if style == "colon" then r = T.async[helper](T.async, a, b)   -- T.async:HELPER(...)  -- CALL COLON
  else r = T.async[helper](a, b) end                             -- T.async.HELPER(...)  -- CALL DOT
  return r
end
''')
    rt = runtime_factory(workers=1)
    vm = rt.load(path)
    for helper in ("copy", "cat"):
        for style, marker in (("colon", "-- CALL COLON"), ("dot", "-- CALL DOT")):
            for which, got in (("from", "nil"), ("to", "table")):
                ok, msg = vm.exec(f"return pcall(bad, {q(helper)}, {q(style)}, {q(which)})")
                assert ok is False
                want = f"plugin.lua:{line_of(path, marker)}: T.async:{helper}: {which} must be a string (got {got})"
                assert want in msg.decode(), msg
    assert vm.async_stats()["scheduled"] == 0


def test_file_helpers_keep_fifo_order_per_target(runtime_factory, tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    for i in range(200):
        (chunks / f"{i:03d}.part").write_text(f"{i:03d}\n")
    path = plugin(tmp_path, r'''
function go(dir)
  for i = 0, 199 do
    local part = ("%s/chunks/%03d.part"):format(dir, i)
    T.async:cat(part, dir .. "/joined")
    T.async.copybuffer(("%03d\n"):format(i), dir .. "/streamed")
    if i % 3 == 0 then T.async:cat(part, dir .. "/third") end
    T.async:schedule{ data = tostring(i), onexecute = function(d) return d end }   -- keep the others busy
  end
end
''')
    rt = runtime_factory(workers=3)
    vm = rt.load(path)
    vm.exec(f"go({q(tmp_path)})")
    st = drain(rt, vm)
    assert st["ok"] == st["scheduled"] == 200 * 3 + 67, st
    expect = "".join(f"{i:03d}\n" for i in range(200))
    assert (tmp_path / "joined").read_text() == expect
    assert (tmp_path / "streamed").read_text() == expect
    assert (tmp_path / "third").read_text() == "".join(f"{i:03d}\n" for i in range(0, 200, 3))
    # all three workers took part (tasks_done is stored just after each result is published)
    done = helpers.wait_for(lambda: sum(d := [s["tasks_done"] for s in vm.pool.stats()]) == st["scheduled"] and d)
    assert min(done) > 0, done


# ============================================================================ 7. pending_items

BLOCKING = r'''
done, errs = {}, {}
function block(tag)
  return T.async:schedule{ data = tag,
    onexecute = function(d) require("gate").wait(GATE, DIR .. "/started-" .. d); return "done " .. d end,
    onresult = function(e, d, r) done[#done + 1] = r end,
    onerror = function(e, d, m) errs[#errs + 1] = d .. ": " .. m end }
end
function quick(tag)
  return T.async:schedule{ data = tag, onexecute = function(d) return "done " .. d end,
    onresult = function(e, d, r) done[#done + 1] = r end,
    onerror = function(e, d, m) errs[#errs + 1] = d .. ": " .. m end }
end
'''


def test_pending_items_is_exact(runtime_factory, tmp_path):
    path = plugin(tmp_path, BLOCKING)
    rt = runtime_factory(workers=2)
    vm = rt.load(path)
    for i in range(5):
        assert vm.exec(f"return block('b{i}')") is True
    assert vm.exec("return T.async:pending_items()") == 5
    # both workers are inside onexecute; nothing finishes while the gate is closed
    service_until(rt, lambda: len(list(tmp_path.glob("started-*"))) == 2)
    for _ in range(20):
        rt.service()
    assert vm.exec("return T.async:pending_items()") == 5
    assert vm.exec("return T.async.pending_items()") == 5
    assert vm.pending() == 5
    helpers.assert_accounting(vm.async_stats())
    open_gate(tmp_path)
    st = drain(rt, vm)
    assert vm.exec("return T.async:pending_items()") == 0
    assert st["ok"] == 5
    assert sorted(lst(vm, "done")) == [f"done b{i}".encode() for i in range(5)]


# ============================================================================ 8. overflow, then drop

def test_overflow_then_drop(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    path = plugin(tmp_path, BLOCKING + r'''
function flood(n)
  local accepted, refused, acc = 0, 0, {}
  for i = 1, n do
    if block(("t%03d"):format(i) .. string.rep(".", 60)) == true then
      accepted = accepted + 1; acc[#acc + 1] = i
    else
      refused = refused + 1
    end
  end
  accepted_ids = acc
  return accepted, refused
end
''')
    rt = runtime_factory(workers=1, ring_size=4096, overflow_limit=10)
    vm = rt.load(path)
    accepted, refused = vm.exec("return flood(200)")
    assert accepted + refused == 200
    assert refused > 0 and accepted > 10
    st = vm.async_stats()
    helpers.assert_accounting(st)
    assert st["dropped"] == refused and st["pending"] == accepted, st
    assert st["backlog"] == 10
    assert luaprobe_records(caplog, "overflow queue full")
    open_gate(tmp_path)
    st = drain(rt, vm)
    assert st["ok"] == accepted and st["dropped"] == refused and st["error"] == 0, st
    ids = lst(vm, "accepted_ids")
    done = [d.decode() for d in lst(vm, "done")]
    assert done == [f"done t{i:03d}" + "." * 60 for i in ids]        # one worker: FIFO, each once


# ============================================================================ 9, 10. worker death

def _start_victim(rt, vm, tmp_path, n_queued: int):
    """One blocked task (started) with n_queued quick tasks queued behind it on the only worker."""
    assert vm.exec("return block('victim')") is True
    for i in range(n_queued):
        assert vm.exec(f"return quick('q{i}')") is True
    service_until(rt, lambda: (tmp_path / "started-victim").exists())
    return vm.pool.slots[0].proc.pid


def _check_after_death(rt, vm, n_queued, old_pid, reason):
    st = drain(rt, vm)
    errs = [e.decode() for e in lst(vm, "errs")]
    assert errs == [f"victim: {reason}"], errs
    done = collections.Counter(d.decode() for d in lst(vm, "done"))
    assert done == collections.Counter(f"done q{i}" for i in range(n_queued)), done
    assert (st["error"], st["ok"], st["scheduled"]) == (1, n_queued, n_queued + 1), st
    assert st["redispatched"] == n_queued
    new_pid = vm.pool.slots[0].proc.pid
    assert new_pid != old_pid and psutil.pid_exists(new_pid)
    assert vm.pool.deaths == 1
    # the replacement keeps working
    assert vm.exec("return quick('after')") is True
    st = drain(rt, vm)
    assert b"done after" in lst(vm, "done") and st["ok"] == n_queued + 1


def test_worker_killed_mid_task(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    path = plugin(tmp_path, BLOCKING)
    rt = runtime_factory(workers=1)
    vm = rt.load(path)
    pid = _start_victim(rt, vm, tmp_path, 5)
    os.kill(pid, signal.SIGKILL)
    _, took = service_until(rt, lambda: vm.exec("return #errs") > 0, timeout=10)
    assert took < 2.0, f"worker death noticed after {took:.2f} s"
    _check_after_death(rt, vm, 5, pid, "worker died (killed by SIGKILL)")
    assert luaprobe_records(caplog, "killed by SIGKILL")


def test_worker_os_exit_mid_task(runtime_factory, tmp_path):
    path = plugin(tmp_path, BLOCKING + r'''
function exiting()
  return T.async:schedule{ data = "victim",
    onexecute = function(d) require("gate").touch(DIR .. "/started-" .. d)
      -- os.exit is refused in every VM (tlib.refused_exit): a process that ends itself does it through libc
      local ffi = require("ffi"); pcall(ffi.cdef, "void _exit(int)"); ffi.C._exit(3) end,
    onresult = function(e, d, r) done[#done + 1] = r end,
    onerror = function(e, d, m) errs[#errs + 1] = d .. ": " .. m end }
end
''')
    rt = runtime_factory(workers=1)
    vm = rt.load(path)
    pid = vm.pool.slots[0].proc.pid
    assert vm.exec("return exiting()") is True
    for i in range(4):
        assert vm.exec(f"return quick('q{i}')") is True
    _, took = service_until(rt, lambda: vm.exec("return #errs") > 0, timeout=10)
    assert took < 5.0
    _check_after_death(rt, vm, 4, pid, "worker died (exit status 3)")


# ============================================================================ 11. hung task

def test_hung_task_times_out(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    path = plugin(tmp_path, BLOCKING + r'''
function hang()
  return T.async:schedule{ data = "victim",
    onexecute = function(d) while true do end end,
    onresult = function(e, d, r) done[#done + 1] = r end,
    onerror = function(e, d, m) errs[#errs + 1] = d .. ": " .. m end }
end
''')
    rt = runtime_factory(workers=1, task_timeout=0.5)
    vm = rt.load(path)
    pid = vm.pool.slots[0].proc.pid
    assert vm.exec("return hang()") is True
    assert vm.exec("return quick('q0')") is True
    st = drain(rt, vm, timeout=30)
    assert (st["timeout"], st["error"], st["ok"]) == (1, 0, 1), st
    errs = [e.decode() for e in lst(vm, "errs")]
    assert len(errs) == 1 and errs[0].startswith("victim: ") and "timed out" in errs[0], errs
    assert lst(vm, "done") == [b"done q0"]
    assert vm.pool.timeouts == 1 and vm.pool.deaths == 0
    assert vm.pool.slots[0].proc.pid != pid
    assert luaprobe_records(caplog, "timed out")
    assert vm.exec("return quick('q1')") is True
    st = drain(rt, vm)
    assert st["ok"] == 2 and lst(vm, "done")[-1] == b"done q1"


# ============================================================================ 12. recycling

def test_recycle_after_max_tasks(runtime_factory, tmp_path):
    path = plugin(tmp_path, BLOCKING)
    rt = runtime_factory(workers=1, max_tasks=5)
    vm = rt.load(path)
    for i in range(23):
        assert vm.exec(f"return quick('q{i}')") is True
    st = drain(rt, vm)
    assert (st["ok"], st["error"], st["timeout"]) == (23, 0, 0), st
    assert sorted(lst(vm, "done")) == sorted(f"done q{i}".encode() for i in range(23))
    assert vm.pool.recycles == 4, vm.pool.recycles      # after tasks 5, 10, 15, 20 (the 5th worker ran 3)
    assert vm.pool.deaths == 0


def test_recycle_above_rss_cap(runtime_factory, tmp_path):
    path = plugin(tmp_path, BLOCKING + r'''
function hog(mb)
  return T.async:schedule{ data = tostring(mb), onexecute = function(d)
      local ffi = require("ffi")
      local n = tonumber(d) * 1024 * 1024
      HOG = ffi.new("uint8_t[?]", n)       -- a global: stays allocated after the task
      ffi.fill(HOG, n, 1)
      require("gate").wait(GATE, DIR .. "/started-hog")   -- stay busy until the test opens the gate
      return "hogged " .. d
    end,
    onresult = function(e, d, r) done[#done + 1] = r end,
    onerror = function(e, d, m) errs[#errs + 1] = d .. ": " .. m end }
end
''')
    rt = runtime_factory(workers=1, max_rss_mb=1e6)   # the real cap is set below from the measured baseline
    vm = rt.load(path)
    pid = vm.pool.slots[0].proc.pid
    assert vm.exec("return quick('warm')") is True
    drain(rt, vm)
    baseline = psutil.Process(pid).memory_info().rss / 1e6
    # the baseline worker is under the cap, 200 MB more is well above it
    vm.pool.config.max_rss_mb = baseline + 100
    assert vm.pool.slots[0].proc.pid == pid
    # the hog stays in the worker (gate) while the pool notices its RSS; 3 tasks queue behind it
    assert vm.exec("return hog(200)") is True
    for i in range(3):
        assert vm.exec(f"return quick('q{i}')") is True
    # the pool may see the RSS between the hog's fill and its marker file: wait for both
    service_until(rt, lambda: (vm.pool.slots[0].kill_reason or "").startswith("recycled")
                  and (tmp_path / "started-hog").exists(), timeout=20)
    assert vm.pool.slots[0].proc.pid == pid
    open_gate(tmp_path)
    # the worker leaves right after the hog task; the queued ones run on its replacement
    service_until(rt, lambda: vm.pool.recycles >= 1 and vm.pool.slots[0].proc is not None, timeout=20)
    st = drain(rt, vm)
    assert (st["ok"], st["error"], st["timeout"]) == (5, 0, 0), st
    assert st["redispatched"] == 3, st
    assert lst(vm, "done") == [b"done warm", b"hogged 200", b"done q0", b"done q1", b"done q2"]
    new_pid = vm.pool.slots[0].proc.pid
    assert new_pid != pid and not psutil.pid_exists(pid)
    assert vm.pool.deaths == 0 and vm.pool.recycles == 1
    assert psutil.Process(new_pid).memory_info().rss / 1e6 < baseline + 100
    for i in range(3, 6):
        assert vm.exec(f"return quick('q{i}')") is True
    st = drain(rt, vm)
    assert (st["ok"], st["error"], st["timeout"]) == (8, 0, 0), st
    assert vm.pool.slots[0].proc.pid == new_pid


# ============================================================================ 13. shutdown

SHUTDOWN = BLOCKING + r'''
order = {}
TrisulPlugin = { id = { name = "drain" }, onunload = function()
  order[#order + 1] = "unload"
  local f = assert(io.open(DIR .. "/order.txt", "w"))
  f:write(table.concat(order, ","))
  f:close()
end }
function slow(n)
  for i = 1, n do
    T.async:schedule{ data = tostring(i),
      onexecute = function(d) require("gate").sleep(0.05); return d end,
      onresult = function(e, d, r) order[#order + 1] = "r" .. r end }
  end
end
function blocked()
  block("stuck")
  T.async:schedule{ data = "x", onexecute = function(d) return d end,
                    onresult = function(e, d, r) order[#order + 1] = "NEVER" end,
                    onerror = function(e, d, m) order[#order + 1] = "queued:" .. m end }
end
'''


def test_shutdown_drains_then_unloads(runtime_factory, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    rt1 = runtime_factory(workers=1)
    vm1 = rt1.load(plugin(tmp_path / "one", SHUTDOWN))
    rt2 = runtime_factory(workers=1)
    vm2 = rt2.load(plugin(tmp_path / "two", SHUTDOWN))
    pids = vm1.pool.pids() + vm2.pool.pids()
    assert len(pids) == 2

    vm1.exec("slow(4)")
    assert vm1.pending() == 4
    rt1.shutdown(deadline=20)
    assert (tmp_path / "one" / "order.txt").read_text() == "r1,r2,r3,r4,unload"
    st = vm1.async_stats()
    helpers.assert_accounting(st)
    assert (st["ok"], st["timeout"], st["pending"]) == (4, 0, 0), st

    vm2.exec("blocked()")
    service_until(rt2, lambda: (tmp_path / "two" / "started-stuck").exists())
    rt2.shutdown(deadline=0.5)
    order = (tmp_path / "two" / "order.txt").read_text()
    lost = "still running at the drain deadline (0.5 s, --drain-deadline): result lost"
    assert order == f"queued:{lost},unload", order
    st = vm2.async_stats()
    helpers.assert_accounting(st)
    assert (st["ok"], st["timeout"], st["lost_at_deadline"], st["pending"]) == (0, 2, 2, 0), st
    errs = [e.decode() for e in lst(vm2, "errs")]
    assert errs == [f"stuck: {lost}"], errs

    for pid in pids:
        assert not psutil.pid_exists(pid), pid
    assert not helpers.children()
    assert helpers.our_segments() == set()


# ============================================================================ 14. parent death

PARENT = r'''
import sys, time
from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
from luaprobe.workers.pool import AsyncConfig
rt = AsyncRuntime(AsyncConfig(workers=2))
vm = rt.load(sys.argv[1])
print(" ".join(str(p) for p in vm.pool.pids()), flush=True)
time.sleep(300)
'''


def test_workers_exit_when_parent_dies(tmp_path):
    path = plugin(tmp_path, "function noop() end\n")
    parent = helpers.run_python(PARENT, path, stdout=subprocess.PIPE)
    try:
        line = parent.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        workers = [psutil.Process(p) for p in pids]
        segs = segment.list_segments(parent.pid)
        assert len(segs) == 3, segs            # doorbell + one channel per worker
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, alive
    # the dead parent cannot unlink its segments; sweep() does.  Another process's sweep (every
    # AsyncRuntime sweeps when it starts, and other test runs may be going on) can get there first.
    still = [n for n in segs if os.path.exists(os.path.join(segment.SHM_DIR, n))]
    removed = segment.sweep()
    assert segment.list_segments(parent.pid) == [], (still, removed)


# ============================================================================ latency histogram bucket

@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(hypothesis.strategies.floats(min_value=1.0001, max_value=1e13))
def test_latency_bucket_is_floor_of_4_log2(ns):
    """The histogram bucket of a latency (ns) is floor(4 * log2(ns)) (docs/async.md latency percentiles),
    computed from the exponent of ns^4 instead of math.log per result; the model: Python's math.log2."""
    import math
    lua = _bare_lua()
    b = lua.eval("function(x) return require('luaprobe.engine.plugins.async').latency_bucket(x) end")(ns)
    want = math.floor(4 * math.log2(ns))
    # x^4 rounds to the nearest double: within one ulp of a bucket boundary either side is right
    if b != want:
        assert abs(4 * math.log2(ns) - round(4 * math.log2(ns))) < 1e-12, (ns, b, want)


_LUA = []


def _bare_lua():
    if not _LUA:
        from luaprobe.shm.luajit import new_runtime
        _LUA.append(new_runtime())
    return _LUA[0]


# ============================================================================ the worker's spin window after a burst

SPIN_PLUGIN = r'''
got = 0
function burst(n)
  for i = 1, n do T.async:schedule{ data = "x", onexecute = function(d) return d end,
                                     onresult = function() got = got + 1 end } end
end
'''


def test_worker_sleeps_after_a_burst_but_spins_after_a_lone_task(runtime_factory, tmp_path):
    """A worker keeps polling its ring for worker_spin_us after a lone task (the latency case), but after a burst
    of >= BURST_TASKS tasks (a batch of packets' tasks) it sleeps within BURST_SPIN_NS: measured as the worker
    process's CPU time (kernel accounting) over the idle half second that follows each, with a 2 s window."""
    path = plugin(tmp_path, SPIN_PLUGIN)
    rt = runtime_factory(workers=1, worker_spin_us=2_000_000)
    vm = rt.load(path)
    burst = vm.lua.eval("function(n) burst(n) end")
    worker = None

    def idle_cpu_after(n: int) -> float:
        nonlocal worker
        want = vm.exec("return got") + n
        burst(n)
        service_until(rt, lambda: vm.exec("return got") >= want)
        worker = worker or psutil.Process(vm.pool.pids()[0])
        c0 = sum(worker.cpu_times()[:2])
        time.sleep(0.5)
        return sum(worker.cpu_times()[:2]) - c0

    after_burst = idle_cpu_after(500)
    after_lone = idle_cpu_after(1)
    after_burst_again = idle_cpu_after(500)
    assert after_burst < 0.05 and after_burst_again < 0.05, (after_burst, after_burst_again, after_lone)
    assert after_lone > 4 * max(after_burst, after_burst_again, 0.005), (after_lone, after_burst, after_burst_again)
    helpers.assert_accounting(vm.async_stats())
