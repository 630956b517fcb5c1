"""Behaviours real Trisul scripts (trisulnsm/trisul-scripts, lua/) rely on, each through the real CLI with a minimal
plug-in written here (never a copy of a real script).  The truth of each test is the rule Trisul's Lua API states
(quoted per test) or an independent implementation (Python's json), not luaprobe's own output."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests import helpers

PCAP = os.path.join(helpers.REPO, "tests", "data", "http-get-text.pcap")
TCP = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}"


def luaprobe(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


# ============================================================================ package.path: parent search directory

NEEDS_ROOT_MODULE = """local M = require "rootmod"
TrisulPlugin = { id = { name = "sub" },
  onload = function() print("LOAD " .. M.x) end,
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      T.async:schedule{ data = "d",
        onexecute = function(d) return require("rootmod").x .. " outside=" .. tostring(pcall(require, "outsidemod")) end,
        onresult = function(e, d, r) print("RESULT " .. r) end }
    end } }
""" % TCP


def test_parent_search_directory_on_package_path(tmp_path):
    """Trisul: package.path holds the script's own directory, its parent search directory (a script in a per-app
    subdirectory requires a module at the search directory's top) and the helpers directory; the async worker VM
    gets the same path.  A directory above the search directory is not on it."""
    root = tmp_path / "plugins"
    (root / "app").mkdir(parents=True)
    (root / "rootmod.lua").write_text('return { x = "root-module" }\n')
    (tmp_path / "outsidemod.lua").write_text("return {}\n")           # above the search directory: not reachable
    (root / "app" / "p.lua").write_text(NEEDS_ROOT_MODULE)
    cwd = str(root / "app")                      # Lua's default "./?.lua" must not reach tmp_path
    r = luaprobe("check", str(root), cwd=cwd)
    assert r.returncode == 0, r
    assert "module not found" not in r.stderr
    for k, how in enumerate((["run", str(root)], ["run", "--lua-path", str(root), str(root / "app" / "p.lua")])):
        r = luaprobe(*how, "--pcap", PCAP, "--out", str(tmp_path / f"out{k}"), cwd=cwd)
        assert r.returncode == 0, r
        lines = [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[p.lua#")]
        assert lines == ["LOAD root-module", "RESULT root-module outside=false"], r.stdout


# ============================================================================ T.env.get_config directories

ENV_PLUGIN = """local KEYS = { "App>DataDirectory", "App>DBRoot", "App>RunStateDirectory" }
local function touch(dir, name) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(name); f:close() end
TrisulPlugin = { id = { name = "env" },
  onload = function()
    for i, k in ipairs(KEYS) do print("VM " .. k .. " " .. T.env.get_config(k)); touch(T.env.get_config(k), "vm" .. i) end
    print("DATAPATH " .. T.host:get_datapath())
  end,
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      T.async:schedule{ data = "w", onexecute = function(d)
          local out = {}
          for i, k in ipairs(KEYS) do
            out[#out + 1] = k .. " " .. T.env.get_config(k)
            local f = assert(io.open(T.env.get_config(k) .. "/" .. d .. i, "w")); f:write(d .. i); f:close()
          end
          return table.concat(out, ";")
        end,
        onresult = function(e, d, r) print("WORKER " .. r) end }
    end } }
""" % TCP


def _env_lines(stdout: str) -> dict:
    out = {}
    for ln in stdout.splitlines():
        if ln.startswith("[env.lua#"):
            kind, rest = ln.split("] ", 1)[1].split(" ", 1)
            out.setdefault(kind, []).append(rest)
    return out


def test_env_directories_exist_are_distinct_and_configurable(tmp_path):
    """Trisul API (T.env): get_config("App>DataDirectory" / "App>DBRoot" / "App>RunStateDirectory") name the
    probe's data, database and run-state directories; scripts create files and bind unix sockets in them, so they
    must exist.  Defaults: three distinct directories under --out, mode 0700; each can be set by a flag.  The plug-in
    VM and its async worker answer the same; files the Lua side made are found by Python at those paths."""
    path = tmp_path / "env.lua"
    path.write_text(ENV_PLUGIN)
    out = tmp_path / "out"
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(out), cwd=str(tmp_path))
    assert r.returncode == 0, r
    got = _env_lines(r.stdout)
    want = {"App>DataDirectory": out / "trisul" / "data", "App>DBRoot": out / "trisul" / "dbroot",
            "App>RunStateDirectory": out / "trisul" / "run"}
    assert got["VM"] == [f"{k} {v}" for k, v in want.items()], r.stdout
    assert got["WORKER"] == [";".join(f"{k} {v}" for k, v in want.items())]
    assert got["DATAPATH"] == [str(want["App>DataDirectory"])]
    assert len(set(want.values())) == 3
    for i, d in enumerate(want.values(), 1):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700, d
        assert (d / f"vm{i}").read_text() == f"vm{i}" and (d / f"w{i}").read_text() == f"w{i}"

    # set by flags: a missing directory is made (its parent exists), an existing one is used as it is
    mine = {"--data-dir": tmp_path / "d", "--db-root": tmp_path / "db", "--run-state-dir": tmp_path / "rs"}
    (tmp_path / "db").mkdir()
    flags = [x for k, v in mine.items() for x in (k, str(v))]
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(tmp_path / "out2"), *flags, cwd=str(tmp_path))
    assert r.returncode == 0, r
    got = _env_lines(r.stdout)
    assert got["VM"] == [f"{k} {v}" for k, v in zip(want, mine.values())], r.stdout
    for i, d in enumerate(mine.values(), 1):
        assert (d / f"vm{i}").exists() and (d / f"w{i}").exists()
    # a directory whose parent does not exist: a usage error naming the flag, nothing started
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(tmp_path / "out3"), "--run-state-dir",
                 str(tmp_path / "no" / "such"), cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().endswith(f"--run-state-dir {tmp_path}/no/such: the parent "
                                                           f"directory {tmp_path}/no does not exist"), r
    assert not (tmp_path / "out3").exists()


DBCONFIG_PLUGIN = """TrisulPlugin = { id = { name = "dbc" },
  onload = function()
    local p = T.env.get_config("App>DBRoot") .. "/config/mydb.level"
    local f, err = io.open(p, "w")
    print("OPEN " .. (f and "ok" or tostring(err)))
    if f then f:write("x"); f:close() end
  end }
"""


def test_dbroot_has_trisuls_config_subdirectory(tmp_path):
    """Trisul's App>DBRoot is the context directory (.../context0) whose config/ subdirectory always holds the
    context's configuration (the API reference's search directory .../context0/config/local-lua); scripts keep their
    own files there (passive-dns-creator.lua opens <DBRoot>/config/PassiveDNSDB.level with LevelDB, which makes
    one directory level only).  Both the default and a --db-root given have it, owner-only."""
    path = tmp_path / "dbc.lua"
    path.write_text(DBCONFIG_PLUGIN)
    for k, extra in enumerate(([], ["--db-root", str(tmp_path / "mydb")])):
        out = tmp_path / f"out{k}"
        r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(out), *extra, cwd=str(tmp_path))
        assert r.returncode == 0, r
        assert [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[dbc.lua")] == ["OPEN ok"]
        root = tmp_path / "mydb" if extra else out / "trisul" / "dbroot"
        assert (root / "config" / "mydb.level").read_text() == "x"
        assert ((root / "config").stat().st_mode & 0o777) == 0o700


ENGINEID_PLUGIN = """TrisulPlugin = { id = { name = "eid" },
  onload = function() print("LOAD " .. T.enginetype .. " " .. tostring(T.backend_engineid)) end,
  simplecounter = { protocol_guid = "%s", onpacket = function() end },
  engine_monitor = { onbeginflush = function(engine, ts)
      if not SEEN then SEEN = true; print("FLUSH " .. engine:instanceid() .. " " .. math.type_or(T.backend_engineid)) end
    end } }
function math.type_or(x) return type(x) .. ":" .. tostring(x) end
""" % TCP


def test_backend_engineid_is_the_backend_instance(tmp_path):
    """API reference §7: T.backend_engineid is the backend flusher id, a number, in backend VMs (the frontend has
    none); luaprobe's backend instances are engine:instanceid() "0", "1", ... (--backend-instances)."""
    path = tmp_path / "eid.lua"
    path.write_text(ENGINEID_PLUGIN)
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(tmp_path / "o"), "--backend-instances", "3",
                 cwd=str(tmp_path))
    assert r.returncode == 0, r
    lines = sorted(ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[eid.lua"))
    assert lines == ["FLUSH 0 number:0", "FLUSH 1 number:1", "FLUSH 2 number:2",
                     "LOAD backend 0", "LOAD backend 1", "LOAD backend 2", "LOAD frontend nil"], r.stdout


# ============================================================================ an error inside a helper's require chain

def test_error_in_required_helper_names_the_plugin_and_the_require(tmp_path):
    """A plug-in whose require chain fails inside a helper (haSSH: ssh-spy.lua requires ssh-dissect, which
    requires md5ffi, which raises) is named, with the line of its require and the module it asked for, followed
    by the helper's own error as LuaJIT reports it (a fresh lupa VM requiring the same module is the truth)."""
    from lupa import luajit21
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "inner.lua").write_text('local x = 1\nerror("no libcrypto here")\nreturn {}\n')
    (d / "middle.lua").write_text('local M = {}\nM.inner = require("inner")\nreturn M\n')
    (d / "missing_dep.lua").write_text('local m = require "no_such_module_anywhere"\nreturn m\n')
    plug = d / "spy.lua"
    plug.write_text('-- a plug-in\nlocal P = { }\nlocal D = require\'middle\'\n'
                    'TrisulPlugin = { id = { name = "spy" }, onload = function() end }\n')
    plug2 = d / "spy2.lua"
    plug2.write_text('local M = require "missing_dep"\nTrisulPlugin = { id = { name = "spy2" } }\n')
    lua = luajit21.LuaRuntime()
    lua.execute(f"package.path = {str(d)!r} .. '/?.lua;' .. package.path")
    truth = lua.eval("select(2, pcall(require, 'middle'))")
    assert truth.endswith("inner.lua:2: no libcrypto here")
    r = luaprobe("check", str(plug), cwd=str(d))
    assert r.returncode == 4, r
    assert r.stderr == f'luaprobe check: {plug}:3: require "middle" failed: {truth}\n', r.stderr
    r = luaprobe("check", str(plug2), cwd=str(d))
    assert r.returncode == 4, r
    first = r.stderr.splitlines()[0]
    assert first.startswith(f'luaprobe check: {plug2}:1: require "missing_dep" failed: '), r.stderr
    assert first.endswith('missing_dep.lua:1: require "no_such_module_anywhere": module not found'), r.stderr
    assert r.stderr.splitlines()[1].startswith(f"    searched: {d}, ")


# ============================================================================ require 'JSON' (helpers)

import json  # noqa: E402

import hypothesis  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_SCALAR = st.one_of(st.booleans(), st.integers(-2**53, 2**53), _TEXT,
                    st.floats(allow_nan=False, allow_infinity=False))
#: JSON values Lua tables represent one way only: no null, no empty array/object (both are an empty table)
_VALUE = st.recursive(_SCALAR, lambda kids: st.one_of(st.lists(kids, min_size=1, max_size=4),
                                                      st.dictionaries(_TEXT, kids, min_size=1, max_size=4)),
                      max_leaves=12)


def _json_vm():
    from luaprobe.shm.luajit import new_runtime
    from luaprobe.shm.searchpath import plugin_dirs
    lua = new_runtime(plugin_dirs(None))
    return lua, lua.eval("require('JSON')")


def _to_py(lua, v):
    """A decoded Lua value as Python: a table with keys 1..n is a list, else a dict of str keys."""
    from lupa import luajit21 as lupa
    if lupa.lua_type(v) != "table":
        return v.decode("utf-8") if isinstance(v, bytes) else v
    items = list(v.items())
    keys = [k for k, _ in items]
    if keys and all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
        return [_to_py(lua, v[k]) for k in range(1, len(keys) + 1)]
    return {k.decode("utf-8"): _to_py(lua, x) for k, x in items}


def _num_eq(a, b):
    """Equal as JSON values (Lua has one number type: 1 and 1.0 are the same number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_num_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_num_eq(a[k], b[k]) for k in a)
    return a == b


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(_VALUE, st.booleans())
def test_json_helper_decodes_what_python_encodes(value, ascii_only):
    """Trisul scripts `require'JSON'` (plugins/lua/helpers) and call JSON:decode: any JSON text Python's json writes
    (\\u escapes and surrogate pairs with ensure_ascii, raw UTF-8 without) decodes to the same value."""
    lua, J = _json_vm()
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    got = _to_py(lua, lua.eval("function(J, s) return J:decode(s) end")(J, text))
    assert _num_eq(got, value), (text, got)


_ENC_SCALAR = st.one_of(st.booleans(), st.integers(-2**31, 2**31), _TEXT)
_ENC_VALUE = st.recursive(_ENC_SCALAR, lambda kids: st.one_of(st.lists(kids, min_size=1, max_size=4),
                                                              st.dictionaries(_TEXT, kids, min_size=1, max_size=4)),
                          max_leaves=12)


def _to_lua(lua, v):
    if isinstance(v, list):
        return lua.table_from([_to_lua(lua, x) for x in v])
    if isinstance(v, dict):
        return lua.table_from({k.encode(): _to_lua(lua, x) for k, x in v.items()})
    return v.encode() if isinstance(v, str) else v


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(_ENC_VALUE)
def test_json_helper_encodes_what_python_decodes(value):
    """JSON:encode of a Lua table gives text Python's json.loads reads back as the same value."""
    lua, J = _json_vm()
    out = lua.eval("function(J, v) return J:encode(v) end")(J, _to_lua(lua, value))
    assert _num_eq(json.loads(out.decode("utf-8")), value), out


def test_json_helper_in_a_plugin_and_its_worker(tmp_path):
    """A plug-in's `require'JSON'` at load and inside onexecute (the worker VM has the helpers directory too),
    as malware-cymru-alert.lua / ocsp_check_async.lua do; a bad text raises a Lua error the plug-in can pcall."""
    path = tmp_path / "j.lua"
    path.write_text("""local JSON = require'JSON'
TrisulPlugin = { id = { name = "j" },
  onload = function()
    print("LOAD " .. JSON:encode({ a = { 1, 2, "x" } }) .. " " .. tostring(pcall(JSON.decode, JSON, "{bad")))
  end,
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      T.async:schedule{ data = JSON:encode({ n = 41 }), onexecute = function(d)
          local JSON = require'JSON'
          local t = JSON:decode(d)
          return JSON:encode({ n = t.n + 1 })
        end,
        onresult = function(e, d, r) print("RESULT " .. r) end }
    end } }
""" % TCP)
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 0, r
    lines = [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[j.lua#")]
    load = lines[0].split(" ")
    assert json.loads(load[1]) == {"a": [1, 2, "x"]} and load[2] == "false", lines
    assert json.loads(lines[1].split(" ", 1)[1]) == {"n": 42}, lines


# ============================================================================ print: every line tagged

def test_multiline_print_tags_every_line(tmp_path):
    """Trisul: each line a script prints is tagged with the script and its instance (printcertchain.lua prints a
    certificate chain with embedded newlines in one print).  Truth: Python's split of the same text."""
    text = "subject: CN=a\n  issuer: CN=b\n\n\tserial 01\nend"
    lit = text.replace("\n", "\\n").replace("\t", "\\t")
    path = tmp_path / "pc.lua"
    path.write_text('TrisulPlugin = { id = { name = "pc" }, onload = function() print("%s") print("x", "y") end }\n'
                    % lit)
    r = luaprobe("run", str(path), "--pcap", PCAP, "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 0, r
    mine = [ln for ln in r.stdout.split("\n") if ln.startswith("[pc.lua#")]
    tag = mine[0].split("] ", 1)[0] + "] "
    assert all(ln.startswith(tag) for ln in mine)
    assert [ln[len(tag):] for ln in mine] == text.split("\n") + ["x\ty"], r.stdout
    assert not [ln for ln in r.stdout.split("\n") if ln.strip() and ln.strip() in text.split("\n")], r.stdout


# ============================================================================ hook errors: one line, readable summaries

HELPER_ERR = """local H = {}
function H.parse(x)
  return "n=" .. x.missing       -- HELPER LINE
end
return H
"""


def test_hook_error_is_one_line_naming_the_plugin(tmp_path):
    """A hook error is one log line naming the plug-in's file:line (the brief: bad plug-in input gets one clear
    line; the traceback through luaprobe's engine only with -v).  The error here is raised in a helper module the
    hook calls, so the plug-in's own line comes from the traceback; both lines are counted in the files we wrote."""
    (tmp_path / "hlp.lua").write_text(HELPER_ERR)
    plug = tmp_path / "he.lua"
    plug.write_text("""local H = require "hlp"
TrisulPlugin = { id = { name = "he" },
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      local s = H.parse({})       -- PLUGIN LINE (not a tail call: its frame stays in the traceback)
      return s
    end } }
""" % TCP)
    pl = next(i for i, t in enumerate(plug.read_text().splitlines(), 1) if "PLUGIN LINE" in t)
    hl = next(i for i, t in enumerate(HELPER_ERR.splitlines(), 1) if "HELPER LINE" in t)
    # LuaJIT shortens a long chunk name to "..." and its tail: the helper's name is checked by its tail
    want = re.compile(rf"simplecounter\.onpacket error: {re.escape(str(plug))}:{pl}: \S*hlp\.lua:{hl}: "
                      "attempt to concatenate")
    for verbose in ([], ["-v"]):
        r = luaprobe("run", *verbose, str(plug), "--pcap", PCAP, "--out", str(tmp_path / f"o{len(verbose)}"),
                     cwd=str(tmp_path))
        assert r.returncode == 4, r                          # failed on every call (README: plug-in problem)
        err = r.stderr.splitlines()
        mine = [ln for ln in err if "simplecounter.onpacket error:" in ln]
        assert len(mine) == (2 if verbose else 1), r.stderr
        assert want.search(mine[0]), r.stderr
        assert not [ln for ln in err if "stack traceback" in ln or "host.lua" in ln] or verbose, r.stderr
        if verbose:
            assert "stack traceback" in r.stderr and "DEBUG" in mine[1]


def test_repeated_error_summary_reads_as_a_sentence():
    """The once-a-second summary of a repeated error: "N more at FILE:LINE (last: ...)" for an error with a source
    line, "N more: MESSAGE" for one without (cg_monitor's "returned a non-boolean", which read "32 more at returned
    a non-boolean ... (last: ...)").  A clock we drive; the counts reconcile with the reports made."""
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    lines, clock = [], [0]
    log = lua.eval("function(logf, now) return require('luaprobe.engine.plugins.errlog').new(logf, '/p/x.lua', now) end")(
        lambda level, msg: lines.append((level, msg.decode())), lambda: clock[0])
    report = lua.eval("function(l, k, m) l:report(k, m) end")
    for i in range(10):
        clock[0] = i * 300_000_000                                   # 0.3 s apart
        report(log, b"cg_monitor.onbegintopperflush", b"returned a non-boolean (counted as true)")
        report(log, b"simplecounter.onpacket error", f"/p/x.lua:7: boom {i}\nstack traceback:\n\t/p/x.lua:7: in f".encode())
    errs = [m for lv, m in lines if lv == 4]
    nb = [m for m in errs if m.startswith("cg_monitor")]
    assert nb[0] == "cg_monitor.onbegintopperflush: returned a non-boolean (counted as true)"
    assert all(m.startswith("cg_monitor.onbegintopperflush: ") and m.endswith(" more: returned a non-boolean "
                                                                            "(counted as true)") for m in nb[1:]), nb
    assert " at " not in "".join(nb)
    boom = [m for m in errs if m.startswith("simplecounter")]
    assert boom[0] == "simplecounter.onpacket error: /p/x.lua:7: boom 0"
    for m in boom[1:]:
        assert re.fullmatch(r"simplecounter\.onpacket error: \d+ more at /p/x\.lua:7 \(last: boom \d\)", m), m
    count = lambda ms: sum(int(re.search(r"(\d+) more", m).group(1)) for m in ms[1:])   # noqa: E731
    assert count(nb) <= 9 and count(boom) <= 9 and len(nb) > 1
    assert [m for lv, m in lines if lv == 8] == ["simplecounter.onpacket error: /p/x.lua:7: boom 0\nstack traceback:"
                                                 "\n\t/p/x.lua:7: in f"]


def test_a_long_plugin_path_reads_the_same():
    """LuaJIT shortens a chunk name longer than 60 bytes to "..." and its tail: the first line and the summaries of
    an error in such a plug-in still name the full path and read "N more at FILE:LINE" (test_error_isolation failed
    when pytest's tmp_path made the path long: the summary said "N more: ...").  A clock we drive."""
    from luaprobe.shm.luajit import new_runtime
    path = "/tmp/" + "d" * 70 + "/x.lua"
    lua = new_runtime()
    lines, clock = [], [0]
    log = lua.eval("function(logf, p, now) return require('luaprobe.engine.plugins.errlog').new(logf, p, now) end")(
        lambda level, msg: lines.append((level, msg.decode())), path.encode(), lambda: clock[0])
    report = lua.eval("function(l, k, m) l:report(k, m) end")
    short = "..." + path[-50:]                                    # what LuaJIT puts in the message
    for i in range(4):
        clock[0] = i * 1_100_000_000
        report(log, b"simplecounter.onpacket error", f"{short}:7: boom {i}\nstack traceback:\n\t{short}:7: in f".encode())
    errs = [m for lv, m in lines if lv == 4]
    assert errs[0] == f"simplecounter.onpacket error: {path}:7: boom 0", errs
    for m in errs[1:]:
        assert m.startswith(f"simplecounter.onpacket error: 1 more at {path}:7 (last: boom "), m
    assert len(errs) == 4



ERROR_VALUES = {
    # an error value that is not a string: its text ("table: 0x55d0...") is new on every call
    "table.lua": "error({code = 1})",
    # a Buffer range error raised through a tail call: no file:line, and the offset and size change per packet
    "tail.lua": "local b = layer:rawbytes()\n      return b:hval_32(b:size() + 7)",
}


def test_an_error_whose_text_changes_on_every_call_is_logged_once(tmp_path):
    """Before: the rate limit keyed an error without "file:line:" by its text, so error({code = 1}) in onpacket
    logged one ERROR line per packet (each "table: 0x..." differs) until 256 keys were used up: 256 lines for
    trisul-tutorial's 1043 TCP packets; a tail-called Buffer range error 100+ lines.  Now: one first line (the
    plug-in's line when the traceback has it), then at most the once-a-second "N more" summaries.  The count of
    calls and errors is tshark's number of TCP frames (1043), not ours."""
    pcap = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
    for name, body in ERROR_VALUES.items():
        plug = tmp_path / name
        plug.write_text(f"""TrisulPlugin = {{ id = {{ name = "{name}" }},
  simplecounter = {{ protocol_guid = "{{77E462AB-2E42-42ec-9A58-C1A6821D6B31}}",
    onpacket = function(engine, layer)
      {body}
    end }} }}
""")
        r = luaprobe("run", str(plug), "--pcap", pcap, "--out", str(tmp_path / f"o-{name}"), "-q", cwd=str(tmp_path))
        assert r.returncode == 4, r.stderr
        assert r.stderr.splitlines()[-1].endswith("simplecounter.onpacket failed on every call (1043)"), r.stderr
        logged = [ln for ln in r.stderr.splitlines() if "simplecounter.onpacket error:" in ln]
        first = [ln for ln in logged if " more at " not in ln and " more: " not in ln]
        assert len(first) == 1, (name, len(first), first[:3])
        if name == "table.lua":
            assert f"{plug}:4: table: 0x" in first[0], first[0]
        else:
            assert "Buffer:hval_32(): offset " in first[0], first[0]


# ============================================================================ only unsupported script types: exit 4

INPUTFILTER = """TrisulPlugin = { id = { name = "input" },
  inputfilter = { step = function(packet, engine) return false end } }
"""
GOOD = """TrisulPlugin = { id = { name = "good" },
  simplecounter = { protocol_guid = "%s", onpacket = function() end } }
""" % TCP


def test_only_unsupported_types_is_a_plugin_error(tmp_path):
    """README exit codes: 4 is a plug-in error.  A run or check whose only plug-in has a script type luaprobe does
    not run (an inputfilter, as trisul-scripts' frontend_scripts/inputfilter files) has nothing to run: exit 4 with the reason; a directory where
    another plug-in runs keeps exit 0 (the unsupported one is listed)."""
    alone, mixed = tmp_path / "alone", tmp_path / "mixed"
    for d in (alone, mixed):
        d.mkdir()
        (d / "input.lua").write_text(INPUTFILTER)
    (mixed / "good.lua").write_text(GOOD)
    r = luaprobe("check", str(alone), cwd=str(tmp_path))
    assert r.returncode == 4 and "not supported" in r.stdout, r
    assert r.stderr.startswith("luaprobe check: no plug-in here can run") and len(r.stderr.splitlines()) == 1, r
    r = luaprobe("check", str(mixed), cwd=str(tmp_path))
    assert r.returncode == 0 and "inputfilter (not supported)" in r.stdout, r
    r = luaprobe("run", str(alone), "--pcap", PCAP, "--out", str(tmp_path / "o1"), cwd=str(tmp_path))
    assert r.returncode == 4, r
    assert "luaprobe run: exit 4: no plug-in of this run can run" in r.stderr, r
    r = luaprobe("run", str(mixed), "--pcap", PCAP, "--out", str(tmp_path / "o2"), cwd=str(tmp_path))
    assert r.returncode == 0 and "not supported" in r.stdout + r.stderr, r


ALERTGROUP = """TrisulPlugin = { id = { name = "decl" },
  alertgroup = { control = { guid = "{23794772-EDEB-421E-BD92-B5C62E7F2346}", name = "Decl Alerts",
    description = "declared only" } } }
"""


def test_declarations_alone_check_and_run_agree(tmp_path):
    """A directory whose only script declares an alertgroup (trisul-scripts' custom_alerts/my-alerts.lua) has no
    unsupported type: docs/plugins.md says declarations are stored in decl_groups, so `run` stores it and exits 0,
    and `check` must agree (exit 0, the declaration listed) instead of 'no plug-in here can run ()'."""
    d = tmp_path / "decl"
    d.mkdir()
    (d / "my-alerts.lua").write_text(ALERTGROUP)
    r = luaprobe("check", str(d), cwd=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r
    assert "alertgroup: Decl Alerts {23794772-EDEB-421E-BD92-B5C62E7F2346}" in r.stdout, r
    r = luaprobe("run", str(d), "--pcap", PCAP, "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    assert r.returncode == 0, r
    import sqlite3
    with sqlite3.connect(str(tmp_path / "o" / "luaprobe.sqlite")) as db:
        names = [row[0] for row in db.execute("select * from decl_groups")
                 if "23794772-EDEB-421E-BD92-B5C62E7F2346" in str(row).upper()]
    assert names, "the alertgroup is not in decl_groups"


# ============================================================================ cg_monitor.onupdate: old argument order

CGMON = """TrisulPlugin = { id = { name = "cgm" },
  cg_monitor = { counter_guid = "{889900CC-0063-11A5-8380-FEBDBABBDBEA}",
    onupdate = function(%s) end } }
"""


def test_check_warns_for_the_old_onupdate_argument_order(tmp_path):
    """Trisul documents cg_monitor onupdate(engine, ts, key, metrics); cgmon_2.lua names (dbengine, key, tvsec,
    metrics) and then fails on every call.  check lists a warning naming the parameters, as it does for the legacy
    onattribute order; the documented naming (and the skeleton's) gets none."""
    cases = {"old.lua": "dbengine, key, tvsec, metrics", "doc.lua": "engine, ts, key, metrics",
             "skel.lua": "engine, timestamp, key, arrayofmetrics"}
    for name, params in cases.items():
        (tmp_path / name).write_text(CGMON % params)
    r = luaprobe("check", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 0, r
    warnings = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("warning:")]
    assert warnings == [f"warning: {tmp_path}/old.lua: cg_monitor.onupdate(dbengine, key, tvsec, metrics) names its "
                        "parameters in the old order (engine, key, ts, metrics); Trisul documents onupdate(engine, ts, "
                        "key, metrics) and luaprobe calls it so: the 2nd argument is the timestamp (docs/plugins.md "
                        "\"Monitors\")"], r.stdout


# ============================================================================ T.contextid: one per backend instance

# trisul-scripts' backend_scripts/flows/sg3.lua (and sg2.lua): an sg_monitor opens "/tmp/fdetails.<T.contextid>"
# for writing in onload and writes one line per flushed flow.  Trisul runs the backend instances as separate
# flusher threads, each its own context; when all instances had T.contextid 0 they truncated and overwrote one
# file and about half the flows were lost.
SG_LOG = """TrisulPlugin = { id = { name = "sg3 shape" },
  onload = function() T.flowlogfile = io.open("%s/fdetails." .. T.contextid, "w") end,
  onunload = function() T.flowlogfile:close() end,
  sg_monitor = {
    onflush = function(engine, flw)
      local f = flw:flow()
      T.flowlogfile:write(string.format("%%s %%s %%s %%s %%s\\n", tonumber(f:protocol(), 16), f:ipa_readable(),
        f:porta_readable(), f:ipz_readable(), f:portz_readable()))
    end } }
"""


def test_backend_instances_have_their_own_contextid(tmp_path):
    """Every flow reaches one instance's file, each instance writes its own; truth: tshark's conversations
    (tests/data/tshark-flows-mix-eth-tls-http-dns.tsv: proto, address, port, address, port, ...)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    plugin = helpers.write_plugin(tmp_path, SG_LOG % logs, name="sg3shape.lua")
    cap = os.path.join(helpers.PCAPS, "mix-eth-tls-http-dns.pcap")
    r = luaprobe("run", plugin, "--pcap", cap, "--out", str(tmp_path / "out"), "--backend-instances", "3",
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["fdetails.0", "fdetails.1", "fdetails.2"]
    got = []
    for p in logs.iterdir():
        for line in p.read_text().splitlines():
            proto, a, pa, z, pz = line.split()
            got.append((proto, *sorted([(a, pa), (z, pz)])))
    want = []
    with open(os.path.join(helpers.PCAPS, "tshark-flows-mix-eth-tls-http-dns.tsv")) as f:
        for row in f:
            proto, a, pa, z, pz = row.split("\t")[:5]
            want.append((proto, *sorted([(a, pa), (z, pz)])))
    assert sorted(got) == sorted(want)


# ============================================================================ FlowID readable addresses

READABLE = """TrisulPlugin = { id = { name = "readable" },
  simplecounter = { protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer)
      local f = layer:packet():flowid()
      print("ENDS " .. f:ipa_readable() .. " " .. f:ipz_readable())
    end } }
"""


def test_flowid_readable_ipv6_is_rfc5952_text(tmp_path):
    """ipa_readable()/ipz_readable() of an IPv6 flow are the text tshark prints and T.util.ntop gives (RFC 5952:
    ff02::fb, not ff02:0:0:0:0:0:0:fb), so a script can compare them with an address it was given."""
    cap = os.path.join(helpers.PCAPS, "mix-eth-tls-http-dns.pcap")
    r = luaprobe("run", helpers.write_plugin(tmp_path, READABLE), "--pcap", cap, "--out", str(tmp_path / "out"),
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    got = {frozenset(ln.split("ENDS ", 1)[1].split()) for ln in r.stdout.splitlines() if "ENDS " in ln}
    out = subprocess.run(["tshark", "-r", cap, "-Y", "udp", "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e",
                          "ipv6.src", "-e", "ipv6.dst"], capture_output=True, text=True, check=True).stdout
    want = {frozenset(x for x in ln.split("\t") if x) for ln in out.splitlines()}
    assert any(":" in a for pair in want for a in pair) and got == want


# ============================================================================ reset_flow_counter re-attaches

RESET_FC = """local G = "{6A7B8C9D-0E1F-4A2B-8C3D-4E5F6A7B8C9D}"
local n = 0
TrisulPlugin = { id = { name = "reset fc" },
  countergroup = { control = { guid = G, name = "server", bucketsize = 3600 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, 0, "bytes", "bytes", "B" } } },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = n + 1
      if n == 1 then engine:add_flow_counter(layer:flowkey(), G, "k0", 0, 0) end
      if n == 3 then engine:reset_flow_counter(layer:flowkey(), G, "k1", 0) end
      if n == 9 then engine:reset_flow_counter(layer:flowkey(), G, "k2", 0) end
      if n == 12 then engine:reset_flow_counter(layer:flowkey(), G) end
    end } }
"""


def test_reset_flow_counter_replaces_the_flow_counter(tmp_path):
    """trisul-scripts' httpserver/httpsvr.lua: "reset flow counter attaches a counter to flow so each packet is
    automatically metered with this info until the next reset flow counter is called for that flow" — it passes
    (flowkey, guid, key, meter).  Without key it only removes.  Truth: tshark's frame lengths of the one flow."""
    cap = os.path.join(helpers.PCAPS, "http-get-text.pcap")
    r = luaprobe("run", helpers.write_plugin(tmp_path, RESET_FC), "--pcap", cap, "--out", str(tmp_path / "out"),
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lens = [int(x) for x in subprocess.run(["tshark", "-r", cap, "-T", "fields", "-e", "frame.len"],
                                           capture_output=True, text=True, check=True).stdout.split()]
    assert len(lens) == 14
    import sqlite3
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key",
                          ("{6A7B8C9D-0E1F-4A2B-8C3D-4E5F6A7B8C9D}",)))
    db.close()
    # a counter counts the packets after the one whose hook added it: k0 packets 2-3, k1 4-9, k2 10-12, none after
    assert got == {"k0": sum(lens[1:3]), "k1": sum(lens[3:9]), "k2": sum(lens[9:12])}


# ============================================================================ T.host:broadcast -> channellistener

def trisul_flowkey(proto: int, s: str, sp: int, d: str, dp: int) -> str:
    """Trisul's flow id, written from its rule: proto in hex, 'A' (IPv4) or 'B' (IPv6), the A end, '_', the Z end;
    the Z end has the lower port (equal ports: the lower address); IPv4 as dotted hex bytes, IPv6 as 32 hex digits."""
    import ipaddress
    ends = sorted([(sp, ipaddress.ip_address(s).packed), (dp, ipaddress.ip_address(d).packed)])
    (zp, za), (ap, aa) = ends
    v6 = len(aa) == 16
    ip = (lambda b: b.hex().upper()) if v6 else (lambda b: ".".join(f"{x:02X}" for x in b))   # noqa: E731
    return f"{proto:02X}{'B' if v6 else 'A'}:{ip(aa)}:p-{ap:04X}_{ip(za)}:p-{zp:04X}"


BROADCASTER = r"""TrisulPlugin = { id = { name = "sender", clsid = "{ff2faa88-57bb-42b7-af27-edda7c91a437}" },
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      T.host:broadcast("{00000000-0000-0000-0000-00000000000a}", TrisulPlugin.id.clsid,
                       layer:packet():flowid():id() .. "\t\0\255")
    end },
  channellistener = { onchannelmessage = function(msgid, buf) error("not to the sender's class: " .. msgid) end } }
""" % TCP
LISTENER = r"""TrisulPlugin = { id = { name = "%s", clsid = "%s" },
  onload = function() T.f = io.open([==[%s]==], "wb") end,
  onunload = function() T.f:close() end,
  channellistener = { onchannelmessage = function(msgid, buf)
    T.f:write(msgid, "\t", buf:size(), "\t", buf:tostring(), "\n")
  end } }
"""


def test_broadcast_reaches_the_channellisteners_of_its_class(tmp_path):
    """Trisul: T.host:broadcast(msgid, classid, msg) is received by channellistener.onchannelmessage(msgid, buffer)
    (trisul-scripts' techniques/broadcast-state.lua shares state between instances so).  luaprobe delivers it
    between batches to the channellisteners of plug-ins whose id.clsid is classid (case-insensitive), other VMs
    than the sender's; the buffer holds the message's bytes unchanged.  Truth: tshark's TCP frames, one message
    each, with the frame's flow id (Trisul's flow-id layout from tshark's fields)."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "sender.lua").write_text(BROADCASTER)
    for name, cls in (("same", "{FF2FAA88-57BB-42B7-AF27-EDDA7C91A437}"), ("other", "{11111111-57bb-42b7-af27-edda7c91a437}")):
        (plug / f"{name}.lua").write_text(LISTENER % (name, cls, str(tmp_path / f"{name}.out")))
    r = luaprobe("run", str(plug), "--pcap", PCAP, "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r
    rows = subprocess.run(["tshark", "-r", PCAP, "-Y", "tcp", "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport",
                           "-e", "ip.dst", "-e", "tcp.dstport"], capture_output=True, text=True, check=True).stdout
    key = lambda s, sp, d, dp: trisul_flowkey(6, s, int(sp), d, int(dp))   # noqa: E731
    want = [b"{00000000-0000-0000-0000-00000000000a}\t%d\t%s\t\x00\xff" % (len(key(*w)) + 3, key(*w).encode())
            for w in (line.split("\t") for line in rows.splitlines())]
    assert len(want) == 14
    assert (tmp_path / "same.out").read_bytes().split(b"\n")[:-1] == want
    assert (tmp_path / "other.out").read_bytes() == b""


# ============================================================================ onload: check does not call it; relative names

ONLOAD_READS = """TrisulPlugin = { id = { name = "feed" },
  onload = function()
    local n = 0
    for line in io.lines("feed.txt") do n = n + 1 end
    print("LINES " .. n)
  end,
  simplecounter = { protocol_guid = "%s", onpacket = function() end } }
""" % TCP


def test_onload_reads_relative_to_the_working_directory_and_check_does_not_call_it(tmp_path):
    """docs/plugins.md: `check` runs a file's top level only, never onload; a file onload opens by a relative name
    (dyndns-alert.lua: io.lines("dynamic-dns.txt")) is looked for in luaprobe's working directory, as the OS resolves
    it for any process.  Truth: the lines Python counts in the file, and Python's own open() failing from the other
    directory with the same strerror.  From the other directory: one line naming the file and line, exit 4, no
    traceback."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "feed.lua").write_text(ONLOAD_READS)
    (d / "feed.txt").write_text("a.example # p\nb.example # p\nc.example # p\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    want = len((d / "feed.txt").read_text().splitlines())
    for cwd in (d, elsewhere):
        r = luaprobe("check", str(d), cwd=str(cwd))
        assert r.returncode == 0 and r.stderr == "" and "feed.txt" not in r.stdout, r
    r = luaprobe("run", str(d), "--pcap", PCAP, "--out", str(tmp_path / "o1"), "-q", cwd=str(d))
    assert r.returncode == 0, r
    assert [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[feed.lua")] == [f"LINES {want}"]
    r = luaprobe("run", str(d), "--pcap", PCAP, "--out", str(tmp_path / "o2"), "-q", cwd=str(elsewhere))
    try:
        open(os.path.join(str(elsewhere), "feed.txt"))
        raise AssertionError("feed.txt exists in the other directory")
    except FileNotFoundError as e:
        why = e.strerror
    path = d / "feed.lua"
    assert r.returncode == 4 and "Traceback" not in r.stderr, r
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    want_line = f"plug-in problem: {path}: onload failed: {path}:4: bad argument #1 to 'lines' (feed.txt: {why})"
    assert lines == [want_line], lines


# ============================================================================ what onunload makes is stored

UNLOAD = r"""local G = "{6A7B8C9D-0E1F-4A2B-8C3D-4E5F6A7B8C9D}"
TrisulPlugin = { id = { name = "bye" },
  countergroup = { control = { guid = G, name = "Bye", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, "n", "n", "n" } } },
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer) E = engine; N = (N or 0) + 1 end },
  onunload = function()
    if E == nil then return end            -- the countergroup's own VM saw no packet
    E:update_counter(G, "tcp packets", 0, N)
    E:add_alert_ids("{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", "", "sid-unload", "end of run", 1, "bye")
    E:post_message_frontend("nobody is left to read this")
  end }
""" % TCP


def test_what_onunload_makes_is_stored(tmp_path):
    """A script that totals in its hooks and writes the total in onunload (the engine it kept from a hook: onunload
    has none): the counter and the alert are in the database (before: the last outputs were taken before onunload
    ran, and these were lost); the message it posts reaches nobody and counts as undelivered.  Truth: tshark's TCP
    frames."""
    import json
    import sqlite3
    stats = tmp_path / "stats.json"
    r = luaprobe("run", helpers.write_plugin(tmp_path, UNLOAD), "--pcap", PCAP, "--out", str(tmp_path / "out"),
                 "--stats-json", str(stats), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    tcp = len(subprocess.run(["tshark", "-r", PCAP, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                             capture_output=True, text=True, check=True).stdout.split())
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key",
                     ("{6A7B8C9D-0E1F-4A2B-8C3D-4E5F6A7B8C9D}",)).fetchall()
    alerts = db.execute("SELECT sigid, message FROM alerts").fetchall()
    db.close()
    assert tcp == 14 and got == [("tcp packets", tcp)]
    assert alerts == [("sid-unload", "bye")]
    assert json.loads(stats.read_text())["messages_undelivered"] == 1


# ============================================================================ inputfilter.step_alert

IDS = r"""TrisulPlugin = { id = { name = "ids" },
  onload = function()
    Q = {
      { AlertGroupGUID = "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", TimestampSecs = 1362692521, TimestampUsecs = 5,
        SigIDKey = 2001, SigIDLabel = "ET POLICY test", SourceIP = "192.168.1.10", SourcePort = 51000,
        DestIP = "10.0.0.1", DestPort = 80, Protocol = 6, Priority = 1, ClassificationKey = "policy",
        AlertStatus = "allowed", SensorID = 4, SigRev = 2 },
      { AlertGroupGUID = "{9afd8c08-07eb-47e0-bf05-28b4a7ae8dc9}", TimestampSecs = 1362692522,
        SigIDKey = "sid-7", AlertDetails = "v6 thing", SourceIP = "2001:db8::1", SourcePort = 53,
        DestIP = "2001:db8::2", DestPort = 53, Protocol = 17 },
      { AlertGroupGUID = "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", SigIDKey = 3 },    -- no TimestampSecs
      { AlertGroupGUID = "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", TimestampSecs = 1362692523, SigIDKey = "last" },
    }
  end,
  inputfilter = {
    step = function(packet, engine) error("step is never called") end,
    step_alert = function() return table.remove(Q, 1) end,
  },
}
"""


OUT_OF_RANGE = r"""G = "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}"
TrisulPlugin = { id = { name = "ids" },
  onload = function()
    Q = {
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "first" },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "p", Priority = 2^70 },
      { AlertGroupGUID = G, TimestampSecs = 1e300, SigIDKey = "t" },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "u", TimestampUsecs = 1e7 },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "q", Priority = "99999999999999999999" },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "proto", Protocol = 300,
        SourceIP = "10.0.0.1", DestIP = "10.0.0.2" },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = "port", SourcePort = 70000,
        SourceIP = "10.0.0.1", DestIP = "10.0.0.2" },
      { AlertGroupGUID = G, TimestampSecs = 1362692521, SigIDKey = { 1, 2 } },
      { AlertGroupGUID = G, TimestampSecs = -5, SigIDKey = "neg" },
      { AlertGroupGUID = G, TimestampSecs = 1362692522, SigIDKey = "last", Priority = "2" },
    }
  end,
  inputfilter = { step_alert = function() return table.remove(Q, 1) end },
}
"""


def test_inputfilter_alert_numbers_out_of_range_are_hook_errors(tmp_path):
    """A step_alert number outside its field's range (a Priority of 2^70, a time of 1e300 or below 0, microseconds
    of 10^7, protocol 300, port 70000) or a table where text goes is a hook error naming the field, and the other
    alerts of the same poll are stored; exit 0.  Before, the huge numbers reached the store writer, which rejected the
    whole batch: exit 1, every alert of the poll lost."""
    import sqlite3
    r = luaprobe("run", helpers.write_plugin(tmp_path, OUT_OF_RANGE, "ids.lua"), "--pcap", PCAP, "--out",
                 str(tmp_path / "out"), "--stats-json", str(tmp_path / "s.json"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    for what in ("Priority 1180591620717411303424 is out of range", "TimestampSecs 10000000000000000525... is out",
                 "TimestampUsecs 10000000 is out of range (0..999999)", "Protocol 300 is out of range (0..255)",
                 "SourcePort 70000 is out of range (0..65535)", "SigIDKey is a table, not text",
                 "TimestampSecs -5 is out of range"):
        assert what in r.stderr, (what, r.stderr)
    assert "Traceback" not in r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert db.execute("SELECT sigid, priority FROM alerts ORDER BY id").fetchall() == [("first", 3), ("last", 2)]
    db.close()
    s = json.loads((tmp_path / "s.json").read_text())
    assert [p["hook_errors"] for p in s["plugins"]] == [{"inputfilter.step_alert": 8}]


BROADCAST_ONLOAD = """TrisulPlugin = { id = { name = "ol" },
  onload = function() T.host:broadcast("hello", nil, "from onload") end,
  engine_monitor = { onmetronome = function() end } }
"""
PRINT_LISTENER = """TrisulPlugin = { id = { name = "cl" },
  channellistener = { onchannelmessage = function(msgid, buf) print("CHAN " .. msgid .. " " .. buf:tostring()) end } }
"""


def test_broadcast_from_onload_is_delivered(tmp_path):
    """T.host:broadcast in onload (before the fast path listens for posts) is delivered with the first collection,
    once per backend instance of the sender (2 by default); before, onload failed with "engine:on_post() is not a
    method of the engine object" and the plug-in was disabled (exit 4)."""
    r = luaprobe("run", helpers.write_plugin(tmp_path, BROADCAST_ONLOAD, "ol.lua"),
                 helpers.write_plugin(tmp_path, PRINT_LISTENER, "cl.lua"), "--pcap", PCAP, "--out", str(tmp_path / "out"),
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("CHAN hello from onload") == 2, r.stdout + r.stderr


def test_inputfilter_step_alert_alerts_are_stored(tmp_path):
    """Trisul's inputfilter: step_alert() returns nil when there is no alert, else a table of alert fields
    (AlertGroupGUID, TimestampSecs and SigIDKey mandatory), as trisul-scripts' suricata_eve_unixsocket.lua builds
    them.  luaprobe polls it beside the packet input (step, the packet-feeding side, is not called): each alert is a
    row of `alerts` with its own time and its flow's Trisul flow id; one without a mandatory field is a hook error
    naming the field, not a row.  Truth: the fields given, and the flow-id rule (trisul_flowkey)."""
    import sqlite3
    r = luaprobe("run", helpers.write_plugin(tmp_path, IDS, "ids.lua"), "--pcap", PCAP, "--out", str(tmp_path / "out"),
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "inputfilter.step_alert error: alert without TimestampSecs" in r.stderr and "Traceback" not in r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = db.execute("SELECT ts_sec, ts_usec, alert_guid, flowkey, sigid, classification, priority, message, status, "
                     "plugin FROM alerts ORDER BY id").fetchall()
    db.close()
    g = "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}"
    assert got == [
        (1362692521, 5, g, trisul_flowkey(6, "192.168.1.10", 51000, "10.0.0.1", 80), "2001", "policy", 1,
         "ET POLICY test", "allowed", "ids.lua"),
        (1362692522, 0, g, trisul_flowkey(17, "2001:db8::1", 53, "2001:db8::2", 53), "sid-7", "", 3, "v6 thing", "",
         "ids.lua"),
        (1362692523, 0, g, "", "last", "", 3, "", "", "ids.lua")]
    r = luaprobe("check", str(tmp_path / "ids.lua"), cwd=str(tmp_path))
    assert r.returncode == 0 and "inputfilter (supported)" in r.stdout and "inputfilter.step: runs as the input of" in r.stdout
    # sharded: the inputfilter runs in shard 0 only, so each alert is stored once
    r = luaprobe("run", str(tmp_path / "ids.lua"), "--pcap", PCAP, "--out", str(tmp_path / "out2"), "--shards", "2",
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    db = sqlite3.connect(tmp_path / "out2" / "luaprobe.sqlite")
    assert db.execute("SELECT ts_sec, sigid, flowkey FROM alerts ORDER BY ts_sec").fetchall() == [
        (r_[0], r_[4], r_[3]) for r_ in got]
    db.close()
