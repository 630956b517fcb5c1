"""A plug-in that does not load says so in one line (two for a failed `require`), through the real CLI.

Independent truths: LuaJIT's own `loadfile` message for a syntax error (a fresh lupa VM, not luaprobe's), the line
of the `require` counted in the file we wrote, and the directories we put on the search path ourselves.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from lupa import luajit21

from luaprobe.engine.plugins.errors import load_error
from luaprobe.shm.exits import EXIT_PLUGIN
from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")

SYNTAX = """TrisulPlugin = { id = { name = "broken" },
  onload = function()
    local x = = 1
  end }
"""

REQUIRE = """-- a plug-in whose helper module is not installed
local helper = require "%s"
TrisulPlugin = { id = { name = "needs a helper" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", onpacket = function() end } }
"""


def luaprobe(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_check_syntax_error_prints_only_the_error(tmp_path):
    path = helpers.write_plugin(tmp_path, SYNTAX, name="broken.lua")
    truth = luajit21.LuaRuntime().eval(f"select(2, loadfile({path!r}))")       # LuaJIT's own message
    tail = truth.split(":3: ", 1)[1]             # LuaJIT shortens a long chunk name to "..."; we name it whole
    assert truth.startswith(("...", path)) and tail == "unexpected symbol near '='"
    truth = f"{path}:3: {tail}"
    r = luaprobe("check", path, cwd=str(tmp_path))
    assert r.returncode == 4, r                                                # docs/operations.md: plug-in error
    assert r.stdout == ""                                                      # no "types: (no script type ...)"
    assert r.stderr == f"luaprobe check: {truth}\n"


def _require_plugin(tmp_path, module="no_such_helper"):
    plug = tmp_path / "plugins"
    plug.mkdir()
    path = helpers.write_plugin(plug, REQUIRE % module, name="needs.lua")
    line = next(i for i, t in enumerate(open(path).read().splitlines(), 1) if "require" in t and "--" not in t)
    extra, env_dir = tmp_path / "lib", tmp_path / "envlib"
    extra.mkdir()
    env_dir.mkdir()
    return path, line, str(extra), str(env_dir)


def _assert_require_lines(lines, path, line, module, dirs):
    assert len(lines) == 2, lines
    assert lines[0].endswith(f'{path}:{line}: require "{module}": module not found'), lines
    assert lines[1].startswith("    searched: ")
    searched = lines[1][len("    searched: "):].split(", ")
    pos = [searched.index(d) for d in dirs]                                    # each one, in search order
    assert pos == sorted(pos), searched


@pytest.mark.parametrize("module", ["no_such_helper", "vendor.no_such.helper"])
def test_check_failed_require_is_one_line_plus_search_path(tmp_path, module):
    path, line, extra, env_dir = _require_plugin(tmp_path, module)
    r = luaprobe("check", path, "--lua-path", extra, cwd=str(tmp_path), env={"TRISUL_LUA_PATHS": env_dir})
    assert r.returncode == 4 and r.stdout == ""
    assert "traceback" not in r.stderr and "no file" not in r.stderr and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("luaprobe check: ")
    _assert_require_lines(lines, path, line, module, [os.path.dirname(path), extra, env_dir])


@pytest.mark.parametrize("shards", ["1", "2"])
def test_run_failed_require_is_one_problem_line(tmp_path, shards):
    path, line, extra, env_dir = _require_plugin(tmp_path)
    r = luaprobe("run", path, "--pcap", SAMPLE, "--lua-path", extra, "--out", str(tmp_path / "out"), "-q",
                 "--shards", shards, cwd=str(tmp_path), env={"TRISUL_LUA_PATHS": env_dir})
    assert r.returncode == 4, r.stderr
    assert "traceback" not in r.stderr and "no file" not in r.stderr and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("plug-in problem: ")
    _assert_require_lines(lines, path, line, "no_such_helper", [os.path.dirname(path), extra, env_dir])


def test_load_error_against_luajit_require(tmp_path):
    """Real LuaJIT `require` messages for search paths we set: the directories come back in order, once each."""
    dirs = [str(tmp_path / "a"), str(tmp_path / "b c"), "."]
    lua = luajit21.LuaRuntime()
    lua.execute(f"package.path = {';'.join(d + '/?.lua;' + d + '/?/init.lua' for d in dirs)!r}; "
                f"package.cpath = {';'.join(d + '/?.so' for d in dirs)!r}")
    for name in ("m", "x.y", "deep.er.mod"):
        msg = lua.execute(f"local function f() local m = require({name!r}); return m end\n"
                          "return select(2, xpcall(f, debug.traceback))")
        assert "stack traceback" in msg
        first, second = load_error(msg).split("\n")
        assert first == f'[string "<python>"]:1: require "{name}": module not found'
        assert second == "    searched: " + ", ".join(dirs)
    assert load_error("x.lua:3: boom\nstack traceback:\n\tx.lua:3: in main chunk") == "x.lua:3: boom"


BROKEN_HELPER = """local M = {}
function M.f( return 1 end
return M
"""


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("cmd", ["check", "run"])
def test_syntax_error_in_a_required_helper_is_one_line(tmp_path, cmd, deep):
    """A helper module that is found but does not compile (Lua's loader: "error loading module 'm' from file 'F':"
    then a newline, a tab and the syntax error) is ONE line naming the plug-in's `require` line, the module and the
    module's own file and line (was two lines, the second starting with a tab). ``deep``: a directory path longer
    than LuaJIT's 60-byte chunk names, which it shortens to "...": named whole. Truth: LuaJIT's own `loadfile`
    message for the helper (a fresh lupa VM) and the `require` line counted in the file we wrote."""
    plugdir = tmp_path / ("d" * 40 + "/" + "e" * 40 if deep else "plugins")
    plugdir.mkdir(parents=True)
    (plugdir / "broken_helper.lua").write_text(BROKEN_HELPER)
    path = helpers.write_plugin(plugdir, REQUIRE % "broken_helper", name="needs.lua")
    line = next(i for i, t in enumerate(open(path).read().splitlines(), 1) if "require" in t and "--" not in t)
    helper = str(plugdir / "broken_helper.lua")
    truth = luajit21.LuaRuntime().eval(f"select(2, loadfile({helper!r}))")
    assert truth.startswith(("...", helper)) and (not deep or truth.startswith("...")), truth
    truth = helper + ":2: " + truth.split(":2: ", 1)[1]
    if cmd == "check":
        r = luaprobe("check", path, cwd=str(tmp_path))
        want = f'luaprobe check: {path}:{line}: require "broken_helper" failed: {truth}'
    else:
        r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
        want = f'plug-in problem: {path}:{line}: require "broken_helper" failed: {truth}'
    assert r.returncode == 4, r.stderr
    assert r.stderr.splitlines() == [want], r.stderr


BAD_COUNTERGROUP = """TrisulPlugin = { id = { name = "bad declaration" },
  countergroup = { control = { guid = "{11111111-2222-3333-4444-555555555556}", name = "g"%s }, meters = %s } }
"""


@pytest.mark.parametrize("control,meters,problem", [
    ("", '{ { "zero", T.K.vartype.COUNTER, 10, "m", "d", "u" } }', 'countergroup.meters[1] id is "zero", not a meter number'),
    ("", '{ { 0, "COUNTER", 10, "m", "d", "u" } }', 'countergroup.meters[1] vartype is "COUNTER", not a T.K.vartype number'),
    ("", '{ { 0, 0, 10, 0, "m" }, { 1.5, 0, 10, 0, "n" } }', "countergroup.meters[2] id is 1.5, not a meter number"),
    ("", '{ { 0, 0, "ten", 0, "m", "d", "u" } }', 'countergroup.meters[1] topn is "ten", not a number'),
    ("", '{ { 0, 0, 10, 0, {}, "d", "u" } }', "countergroup.meters[1] name is a table, not a string"),
    ("", "5", "countergroup.meters is a number, not a table of meters"),
    (', bucketsize = "sixty"', "{}", 'countergroup.control.bucketsize is "sixty", not a whole number of seconds >= 1'),
    (", bucketsize = -5", "{}", "countergroup.control.bucketsize is -5, not a whole number of seconds >= 1"),
    (", bucketsize = 0.5", "{}", "countergroup.control.bucketsize is 0.5, not a whole number of seconds >= 1"),
    # found by a hostile pass (2026-12-02): 2.5 passed, its bucket times of .5 s were rejected by the store writer
    # at the end of the run (exit 1, "bad row(s) rejected"); inf made buckets of NaN
    (", bucketsize = 2.5", "{}", "countergroup.control.bucketsize is 2.5, not a whole number of seconds >= 1"),
    (", bucketsize = 1/0", "{}", "countergroup.control.bucketsize is inf, not a whole number of seconds >= 1"),
])
@pytest.mark.parametrize("cmd", ["check", "run"])
def test_a_bad_countergroup_declaration_is_one_problem_line(tmp_path, cmd, control, meters, problem):
    """A countergroup whose meters or bucket size have the wrong type is a plug-in problem (exit 4, one line naming
    the file and the field; README "Exit codes"). Before: a meter id or vartype that is not a number was an internal
    error (exit 1, "ValueError: invalid literal for int()", no file named), `meters = 5` blamed host.lua's own line,
    and a bucket size that is not a positive number was taken as 60 s in silence. Truth: the declaration we wrote
    (docs/reference.md: meters are {id, vartype, topN, bottomN, name, description, units} of numbers and strings)."""
    path = helpers.write_plugin(tmp_path, BAD_COUNTERGROUP % (control, meters), name="bad_cg.lua")
    if cmd == "check":        # the listing on stdout, with its problem line (as for any declaration problem)
        r = luaprobe("check", path, cwd=str(tmp_path))
        lines, want = [t for t in r.stdout.splitlines() if "problem" in t], f"    problem: {path}: {problem}"
    else:
        r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
        lines, want = r.stderr.splitlines(), f"plug-in problem: {path}: {problem}"
    assert r.returncode == 4, r.stderr
    assert len(lines) == 1 and lines[0].startswith(want), (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout and "host.lua" not in r.stderr + r.stdout


@pytest.mark.parametrize("body, problem", [
    ('simplecounter = { protocol_guid = "{77E462A8-C5B8-4D8D-9A0E-0C6E0AE1E1E2}", onpacket = function() end }',
     "simplecounter.protocol_guid {77E462A8-C5B8-4D8D-9A0E-0C6E0AE1E1E2} is not a protocol luaprobe decodes"),
    ("simplecounter = { onpacket = function() end }", "simplecounter.protocol_guid is missing"),
    ('simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}" }',
     "simplecounter.onpacket is not a function"),
    ("packet_storage = { }", "packet_storage has neither filter nor filter_payload"),
])
@pytest.mark.parametrize("cmd", ["check", "run"])
def test_check_reports_what_run_refuses_at_setup(tmp_path, cmd, body, problem):
    """A simplecounter whose protocol_guid is missing or not one luaprobe decodes, or whose onpacket is not a function,
    and a packet_storage without a filter: `run` refuses the type when it sets its walk up (exit 4, one line naming
    the file), and `check` says so too.  Before, `check` listed such a file as `simplecounter (supported)` and exited
    0, so a plug-in that passed `luaprobe check` failed in `luaprobe run`.  Truth: the plug-in we wrote
    (docs/reference.md: a simplecounter needs protocol_guid, one of the GUIDs luaprobe decodes, and onpacket)."""
    path = helpers.write_plugin(tmp_path, 'TrisulPlugin = { id = { name = "setup" }, %s }\n' % body, name="setup.lua")
    if cmd == "check":
        r = luaprobe("check", path, cwd=str(tmp_path))
        lines, want = [t for t in r.stdout.splitlines() if "problem" in t], f"    problem: {path}: {problem}"
    else:
        r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
        lines, want = r.stderr.splitlines(), f"plug-in problem: {path}: {problem}"
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert lines == [want], (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout


# the shape of trisul-scripts' natsyslog: syslog-protocol.lua declares the protocol natsyslogctr.lua's simplecounter counts
SYSLOG_GUID = "{4323003E-D060-440B-CA26-E146C0C7DB4E}"
SYSLOG_HANDLER = """TrisulPlugin = { id = { name = "syslog" },
  protocol_handler = {
    control = { guid = "%s", name = "SYSLOG", host_protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
                host_protocol_ports = { 514 } },
    parselayer = function(layer) return layer:layer_bytes(), nil end } }
""" % SYSLOG_GUID
SYSLOG_COUNTER = """TrisulPlugin = { id = { name = "syslog counter" },
  simplecounter = { protocol_guid = "%s", onpacket = %s } }
"""


@pytest.mark.parametrize("with_handler, onpacket, problem", [
    (True, "function() end", None),
    (False, "function() end", f"simplecounter.protocol_guid {SYSLOG_GUID} is not a protocol luaprobe decodes"),
    (True, "nil", "simplecounter.onpacket is not a function"),
])
def test_check_knows_the_protocols_of_the_run_s_protocol_handlers(tmp_path, with_handler, onpacket, problem):
    """A simplecounter on a protocol another plug-in of the run declares (protocol_handler) is no problem for `run`,
    which registers every handler's protocol in every VM first; `check` over the same files agrees, and reports the
    unknown GUID over the counter alone, or with the handler the next problem `run` finds (exit 4 both)."""
    files = [helpers.write_plugin(tmp_path, SYSLOG_COUNTER % (SYSLOG_GUID, onpacket), name="counter.lua")]
    if with_handler:
        files.append(helpers.write_plugin(tmp_path, SYSLOG_HANDLER, name="handler.lua"))
    checked = luaprobe("check", *files, cwd=str(tmp_path))
    ran = luaprobe("run", *files, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
    assert ran.returncode == checked.returncode == (4 if problem else 0), (checked, ran)
    want = [f"{files[0]}: {problem}"] if problem else []
    assert [t.split("problem: ", 1)[1] for t in checked.stdout.splitlines() if "problem: " in t] == want, checked
    assert [t.split("problem: ", 1)[1] for t in ran.stderr.splitlines() if "problem: " in t] == want, ran


ASYNC_REQUIRE = """local n = 0
TrisulPlugin = { id = { name = "requires a helper in its worker" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      n = n + 1
      if n == 1 then
        T.async:schedule{ data = "x",
          onexecute = function(d)
            local m = require "broken_helper"
            return d
          end }
      end
    end } }
"""


@pytest.mark.parametrize("deep", [False, True])
def test_syntax_error_in_a_helper_required_by_a_worker_is_one_line(tmp_path, deep):
    """The same helper required inside T.async onexecute (in the worker's VM, workers/worker.lua): its error is
    logged as ONE line naming the plug-in's `require` line, the module and the module's own file and line, as
    the load error above (was two lines: "error loading module 'broken_helper' from file '...':" then a tab and
    the syntax error).  Truth: LuaJIT's own `loadfile` message for the helper (a fresh lupa VM), the `require`
    line counted in the file we wrote."""
    plugdir = tmp_path / ("d" * 40 + "/" + "e" * 40 if deep else "plugins")
    plugdir.mkdir(parents=True)
    (plugdir / "broken_helper.lua").write_text(BROKEN_HELPER)
    path = helpers.write_plugin(plugdir, ASYNC_REQUIRE, name="needs.lua")
    line = next(i for i, t in enumerate(open(path).read().splitlines(), 1) if 'require "broken_helper"' in t)
    helper = str(plugdir / "broken_helper.lua")
    truth = luajit21.LuaRuntime().eval(f"select(2, loadfile({helper!r}))")
    truth = helper + ":2: " + truth.split(":2: ", 1)[1]
    r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr                     # a task's error is the plug-in's business, not the run's
    mine = [x for x in r.stderr.splitlines() if "broken_helper" in x or x.startswith(("  |", "\t"))]
    want = f'T.async onexecute error: {path}:{line}: require "broken_helper" failed: {truth}'
    assert len(mine) == 1 and mine[0].endswith(want), r.stderr


@pytest.mark.parametrize("control,problem", [
    ("bucketsize = 0", "flowtracker.control.bucketsize is 0, not a whole number of seconds >= 1"),
    ("bucketsize = 0.001", "flowtracker.control.bucketsize is 0.001, not a whole number of seconds >= 1"),
    ('bucketsize = "x"', 'flowtracker.control.bucketsize is "x", not a whole number of seconds >= 1'),
    ("count = 0", "flowtracker.control.count is 0, not a whole number of flows >= 1"),
    ("bucketsize = 2.5", "flowtracker.control.bucketsize is 2.5, not a whole number of seconds >= 1"),
    ("count = 2.5", "flowtracker.control.count is 2.5, not a whole number of flows >= 1"),
])
def test_a_bad_flowtracker_control_is_one_problem_line(tmp_path, control, problem):
    """A flowtracker whose bucket size is below one second was an internal error at the end of the run (exit 1,
    "ZeroDivisionError: integer modulo by zero", flowmon.py), a negative one or a count of 0 gave no toppers in
    silence. Now a plug-in problem: exit 4, one line naming the file and the field (README "Exit codes")."""
    path = helpers.write_plugin(tmp_path, 'TrisulPlugin = { id = { name = "ft" }, flowtracker = { control = { name = "t", '
                                f'{control} }}, getmetric = function(engine, flow) return 1 end }} }}', name="ft.lua")
    r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
    assert r.returncode == 4, r.stderr
    assert r.stderr.splitlines() == [f"plug-in problem: {path}: {problem}"], r.stderr


@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_check_of_a_directory_without_plug_ins_says_so_like_run(tmp_path, content):
    """`luaprobe check DIR` on a directory holding no plug-in (empty, or only a text file) printed nothing and
    exited 0, while `luaprobe run DIR` of the same directory exits 4 ("no plug-in files found"). Now check says
    the same line and exits 4 too. Truth: run's own answer for that directory (README "Exit codes": 4)."""
    d, run = _no_plugin_dir(tmp_path, content)
    r = luaprobe("check", str(d), cwd=str(tmp_path))
    assert r.returncode == run.returncode, (r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr == f"luaprobe check: no plug-in files found in {d}\n"


@pytest.mark.parametrize("cmd", ["check", "run", "start"])
def test_a_plug_in_path_holding_a_newline_cannot_forge_a_second_problem_line(tmp_path, cmd):
    """Bad input gives ONE clear line (README "Exit codes"): a plug-in directory named "evil<newline>plug-in
    problem: fake.lua" printed its syntax error as two lines, the second a forged "plug-in problem: fake.lua/..."
    line. Now control characters in problem lines are escaped (\\x0a), as log lines already were; the one
    documented two-line problem, a failed require's "searched:" line, is kept (test_check_failed_require_...).
    Truth: LuaJIT's own loadfile message for the file (a fresh lupa VM), its chunk name escaped."""
    d = tmp_path / "evil\nplug-in problem: fake.lua"
    d.mkdir()
    path = helpers.write_plugin(d, SYNTAX, name="p.lua")
    truth = luajit21.LuaRuntime().eval(f"select(2, loadfile({path!r}))")
    tail = truth.split(":3: ", 1)[1]
    shown = path.replace("\n", "\\x0a")
    if cmd == "check":
        r = luaprobe("check", path, cwd=str(tmp_path))
        want = f"luaprobe check: {shown}:3: {tail}"
    elif cmd == "run":
        r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
        want = f"plug-in problem: {shown}:3: {tail}"
    else:                                      # the daemon refuses to start: its line, then where the log is
        toml = tmp_path / "probe.toml"
        toml.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n[source]\npcap = ["{SAMPLE}"]\n'
                        f'[plugins]\npaths = ["{path.replace(chr(10), "{LF}")}"]\n'.replace("{LF}", "\\n"))
        r = luaprobe("start", "--config", str(toml), cwd=str(tmp_path))
        want = f"luaprobe start: plug-in problem: {shown}:3: {tail}"
        assert r.stderr.splitlines()[1:] == [f"luaprobe start: not started: fix the problem and start again "
                                             f"(log {tmp_path / 'run' / 'supervisor.log'})"], r.stderr
        st = luaprobe("status", "--run-dir", str(tmp_path / "run"), cwd=str(tmp_path))
        lines = st.stdout.splitlines()
        assert f"last error: plug-in problem: {shown}:3: {tail}" in lines, st.stdout
        assert not any(t.startswith("plug-in problem: fake.lua") for t in lines), st.stdout
        assert r.returncode == 4, r.stderr
        assert r.stderr.splitlines()[0] == want, r.stderr
        return
    assert r.returncode == 4, r.stderr
    assert r.stderr.splitlines() == [want], r.stderr


ONLOAD_RAISES = """TrisulPlugin = { id = { name = "onload raises" },
  onload = function()
    local cfg = nil
    return cfg.threshold
  end,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", onpacket = function() end } }
"""


@pytest.mark.parametrize("shards", ["1", "2"])
def test_an_error_in_onload_is_one_problem_line(tmp_path, shards):
    """An error raised in onload is a plug-in problem (docs/operations.md, exit 4) said in ONE line naming the file
    and the line of the error, as a load error is. Before: the same error came twice, first as a logged
    `ERROR: onload error: ...` line (timestamp, pid), then as the `plug-in problem:` line.  Truth: LuaJIT's own
    message for the same statement (a fresh lupa VM) and the line counted in the file we wrote."""
    path = helpers.write_plugin(tmp_path, ONLOAD_RAISES, name="onload_raises.lua")
    line = next(i for i, t in enumerate(open(path).read().splitlines(), 1) if "cfg.threshold" in t)
    truth = luajit21.LuaRuntime().eval("select(2, pcall(function() local cfg = nil; return cfg.threshold end))")
    truth = truth.split(": ", 1)[1]                           # "attempt to index local 'cfg' (a nil value)"
    r = luaprobe("run", path, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", "--shards", shards,
                 cwd=str(tmp_path))
    assert r.returncode == 4, r.stderr
    want = f"plug-in problem: {path}: onload failed: {path}:{line}: {truth}"
    assert r.stderr.splitlines() == [want], r.stderr        # one line, also when both shards load the plug-in
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("cmd", ["check", "run"])
def test_a_fifo_or_device_named_lua_in_a_plugin_directory_is_skipped_with_one_line(tmp_path, cmd):
    """A FIFO named x.lua in a plug-in directory: before, `check` and `run` opened it to look for "TrisulPlugin"
    and waited for a writer for ever (killed by timeout after 20 s: "stopped by SIGTERM while starting"); a link to
    /dev/zero named z.lua would have been read without end.  Now each is skipped with one warning line naming it
    (once, though the directory is listed several times in a run) and the real plug-in beside them runs: a
    simplecounter on every Ethernet frame, its hook calls = the sample's records walked by helpers.pcap_records."""
    d = tmp_path / "plugins"
    d.mkdir()
    helpers.write_plugin(d, """TrisulPlugin = { id = { name = "all" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) end } }
""", name="all.lua")
    os.mkfifo(d / "fifo.lua")
    os.symlink("/dev/zero", d / "zero.lua")
    args = [cmd, str(d)] + (["--pcap", SAMPLE, "--out", str(tmp_path / "o"), "--json"] if cmd == "run" else [])
    r = luaprobe(*args, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "not a plug-in file: skipped" in ln]
    assert [w.split("WARNING ")[-1] for w in warned] == [f"{d / 'fifo.lua'}: a FIFO, not a plug-in file: skipped",
                                                        f"{d / 'zero.lua'}: a device, not a plug-in file: skipped"]
    if cmd == "run":
        import json
        calls = [p["hook_calls"] for p in json.loads(r.stdout)["plugins"]]
        assert calls == [{"simplecounter.onpacket": helpers.pcap_records(SAMPLE)}], calls
    else:
        assert str(d / "all.lua") in r.stdout


def _as_nobody():
    """argv prefix running a command as nobody (no capability), or None where that cannot be done here."""
    import shutil
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        return None
    pre = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    ok = subprocess.run(pre + [sys.executable, "-c", "import luaprobe.engine.daemon.cli"], capture_output=True,
                        cwd=helpers.REPO, timeout=60)
    return pre if ok.returncode == 0 else None


@pytest.mark.parametrize("how", ["dangling link", "unreadable"])
@pytest.mark.parametrize("cmd", ["check", "run"])
def test_a_lua_file_in_a_plugin_directory_that_cannot_be_read_is_a_problem_line(tmp_path, cmd, how):
    """The newcomer review (session 18): a plug-in directory holding x.lua that cannot be opened (a symbolic link
    whose target is gone, a file without read permission) was passed over in silence: `check` listed the
    other plug-ins and exited 0, `run` ran without it, exit 0.  A plug-in the user put there did not run and
    nothing said so.  Now it is a plug-in that failed to load: one problem line naming it and the OS's reason
    (the truth: open() of the same path), exit 4, the plug-in beside it still runs (its hook calls = the
    sample's records, helpers.pcap_records)."""
    prefix = [] if how == "dangling link" else _as_nobody()
    if prefix is None:
        pytest.skip("cannot run a command as a user without read permission here")
    if prefix and cmd == "run":
        pytest.skip("a run as another user needs the interpreter reachable by it (checked by test_privdrop.py)")
    if prefix:                                          # pytest's tmp_path is root's own (0700): nobody must reach d
        import tempfile
        tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="luaprobe-unreadable-"))
        os.chmod(tmp_path, 0o755)
    try:
        _cannot_be_read(tmp_path, cmd, how, prefix)
    finally:
        if prefix:
            import shutil
            shutil.rmtree(tmp_path)


def _cannot_be_read(tmp_path, cmd, how, prefix):
    d = tmp_path / "plugins"
    d.mkdir()
    helpers.write_plugin(d, """TrisulPlugin = { id = { name = "all" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) end } }
""", name="all.lua")
    bad = d / "b.lua"
    if how == "dangling link":
        os.symlink(tmp_path / "gone.lua", bad)
        with pytest.raises(OSError) as e:
            open(bad, "rb")
        reason = e.value.strerror
    else:
        helpers.write_plugin(d, "TrisulPlugin = { id = { name = 'locked' } }\n", name="b.lua")
        os.chmod(bad, 0)
        import errno
        reason = os.strerror(errno.EACCES)
        os.chmod(d, 0o755)
    args = [cmd, str(d)] + (["--pcap", SAMPLE, "--out", str(tmp_path / "o"), "--json"] if cmd == "run" else [])
    r = subprocess.run(prefix + [sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    want = f"cannot open {bad}: {reason}"
    if cmd == "run":                                    # --json: the problem is in the summary's exit reasons
        import json
        summary = json.loads(r.stdout)
        assert summary["exit"] == {"code": 4, "reasons": [f"plug-in problem: {want}"]}, summary["exit"]
        calls = [p["hook_calls"] for p in summary["plugins"]]
        assert calls == [{"simplecounter.onpacket": helpers.pcap_records(SAMPLE)}], calls
    else:
        assert r.stderr == f"luaprobe check: {want}\n", r.stderr
        assert str(d / "all.lua") in r.stdout


def _no_plugin_dir(tmp_path, content):
    """A plug-in directory without a plug-in file (empty, or holding the file `content` with text) and `luaprobe run`'s
    answer for it (the truth: exit 4, "no plug-in files found in DIR"): (directory, CompletedProcess)."""
    d = tmp_path / "plugins"
    d.mkdir()
    if content:
        (d / content).write_text("not a plug-in\n")
    run = luaprobe("run", str(d), "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
    assert run.returncode == 4 and f"no plug-in files found in {d}" in run.stderr, run.stderr
    return d, run


def _start_on(base, plugins, run: str = "", source: str = ""):
    """`luaprobe start` in `base` (a probe.toml there: run_dir base/run, the sample capture, [plugins] paths = the
    `plugins` directory, `run` / `source` extra lines of those tables); a daemon it left running is stopped.
    Returns start's CompletedProcess."""
    from luaprobe.engine.daemon import control
    (base / "probe.toml").write_text(f'[run]\nout_dir = "o"\nrun_dir = "run"\n{run}[source]\npcap = ["{SAMPLE}"]\n'
                                     f'{source}[plugins]\npaths = ["{plugins}"]\n')
    try:
        return luaprobe("start", "--config", str(base / "probe.toml"), cwd=str(base))
    finally:
        if control.read_pid(str(base / "run")) is not None:
            luaprobe("stop", "--run-dir", str(base / "run"), cwd=str(base))


@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_start_of_a_directory_without_plug_ins_is_one_line_and_starts_nothing(tmp_path, content):
    """`luaprobe start` with `[plugins] paths` naming a directory that holds no plug-in (the newcomer review, session
    18): before, the daemon started, its fast path exited 4 ("plug-in error: no plug-in files found in ...") and
    `start` printed that line and five lines of supervisor.log.  Now it is found before anything starts, as `run`
    and `check` find it (test above): one line, exit 4 (run's code for it), no supervisor.  Truth: run's own answer
    for that directory."""
    d, run = _no_plugin_dir(tmp_path, content)
    r = _start_on(tmp_path, d)
    assert (r.returncode, r.stdout) == (run.returncode, ""), r.stderr
    assert r.stderr == f"luaprobe start: plug-in error: no plug-in files found in {d} (nothing started)\n"
    assert not (tmp_path / "run" / "supervisor.pid").exists()


def test_start_with_only_unsupported_script_types_is_refused_like_run(tmp_path):
    """The newcomer review (session 18): a `[plugins] paths` whose only script types luaprobe does not run (an
    inputfilter): `run` and `check` exit 4 ("no plug-in ... can run"), but `start` said "started" (the type's
    "not supported" line is a listing at start, not a problem) and the daemon then failed with exit status 4
    ("failed: plug-in or usage error").  Now the fast path reports "no plug-in of this run can run" with its
    loaded plug-ins, so `start` refuses, exit 4, and stops what it started.  Truths: run's and check's own exit
    code and line for the same directory."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "input.lua").write_text('TrisulPlugin = { id = { name = "input" }, '
                                 'inputfilter = { filter = function() return true end } }\n')
    run = luaprobe("run", str(d), "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", cwd=str(tmp_path))
    assert run.returncode == 4 and "no plug-in of this run can run" in run.stderr, run.stderr
    assert luaprobe("check", str(d), cwd=str(tmp_path)).returncode == 4
    r = _start_on(tmp_path, d, source="loop = true\n")
    assert r.returncode == 4, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert any("no plug-in of this run can run" in x for x in lines), lines
    assert lines[-1].startswith("luaprobe start: not started: fix the problem"), lines


def test_a_dangling_lua_name_in_a_search_directory_is_passed_over(tmp_path):
    """The rule above is for plug-in directories: a --lua-path directory holds helper modules, and a name there that
    cannot be opened is not a plug-in the user asked for; it is passed over as before (exit 0, no problem line),
    and the plug-in given runs (its hook calls = the sample's records)."""
    libs = tmp_path / "libs"
    libs.mkdir()
    os.symlink(tmp_path / "gone.lua", libs / "helper.lua")
    path = helpers.write_plugin(tmp_path, """TrisulPlugin = { id = { name = "all" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) end } }
""", name="all.lua")
    r = luaprobe("run", path, "--lua-path", str(libs), "--pcap", SAMPLE, "--out", str(tmp_path / "o"), "--json",
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    import json
    summary = json.loads(r.stdout)
    assert summary["exit"] == {"code": 0, "reasons": []}
    assert [p["hook_calls"] for p in summary["plugins"]] == [{"simplecounter.onpacket": helpers.pcap_records(SAMPLE)}]


def test_sharded_start_with_only_unsupported_script_types_is_refused_as_one_fast_path_is(tmp_path):
    """The newcomer review (session 18): with `[run] shards = 2` the fast path (shards.ShardedRun) did not call
    the daemon's plug-ins-loaded callback (child_main said "loaded, no problem" at once), so `start` said
    "started" for a plug-in directory that `run`, `check` and a one-shard `start` refuse, and the daemon ran on,
    walking packets for no plug-in.  Now the coordinator probes the plug-ins once, before its shards start, and
    reports what one fast path reports.  Truth: the one-shard `start`'s own exit code and lines for the same
    directory (test above: run's and check's); the problem is found once (one line in supervisor.log)."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "input.lua").write_text('TrisulPlugin = { id = { name = "input" }, '
                                 'inputfilter = { filter = function() return true end } }\n')
    from luaprobe.engine.daemon import control
    from luaprobe.engine.fastpath.run import NOTHING_RUNS
    results = {}
    for shards in (1, 2):
        base = tmp_path / f"s{shards}"
        base.mkdir()
        results[shards] = _start_on(base, d, run=f"shards = {shards}\n", source="loop = true\n")
    one, two = results[1], results[2]
    assert one.returncode == 4, one.stderr
    assert two.returncode == one.returncode, (two.stdout, two.stderr)
    assert two.stderr.replace(str(tmp_path / "s2"), "X") == one.stderr.replace(str(tmp_path / "s1"), "X")
    line = "plug-in problem: " + NOTHING_RUNS.format(n=1, where="listed by luaprobe check")
    assert f"luaprobe start: {line}\n" in two.stderr
    log = (tmp_path / "s2" / "run" / "supervisor.log").read_text()
    assert log.count(line) == 1, log
    assert control.read_pid(str(tmp_path / "s2" / "run")) is None


def test_start_whose_daemon_failed_on_its_plug_ins_and_exited_before_a_status_request_says_the_same(tmp_path, capsys):
    """`luaprobe start` on a short input: the fast path reports its plug-in problem, finishes the input and the
    supervisor exits (failed, exit 4) before start's first status request gets an answer (seen in CI under load:
    "luaprobe start: plug-in problem: ...", then "<log> ends with:" and the log's tail instead of the two lines of
    the case where the request wins).  Both orders now give the same lines and exit 4.  The real wait
    (supervisor._wait_loaded) with a supervisor process that has exited 4 and the state file it left (the fields
    the supervisor's status() writes: state, last_error, last_exit_code, loaded, plugin_problems)."""
    from luaprobe.engine.daemon import control, supervisor
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    problem = "/plugins/p.lua:3: unexpected symbol near '='"
    control.write_json(control.path(str(run_dir), control.STATE), {
        "state": "failed: plug-in or usage error (exit status 4)", "last_error": f"plug-in problem: {problem}",
        "last_exit_code": EXIT_PLUGIN, "loaded": True, "plugin_problems": [problem]})
    p = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    p.wait()
    rc = supervisor._wait_loaded(str(run_dir), p, timeout=5)
    log_path = control.path(str(run_dir), control.LOG)
    assert (rc, capsys.readouterr().err.splitlines()) == (EXIT_PLUGIN, [
        f"luaprobe start: plug-in problem: {problem}",
        f"luaprobe start: not started: fix the problem and start again (log {log_path})"])
