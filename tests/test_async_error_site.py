"""An error raised with a value that is not a message (`error()`, `error({code = 1})`, an object with __tostring) in
onexecute or onresult is logged as one line naming the plug-in file and the line that raised it, as the same error
in a hook is (docs/async.md: "logged ... as one line"; docs/operations.md: errors name file and line).  Before, the
T.async log had no location for them: `T.async onexecute error: nil`, `... error: table: 0x7f06...`,
`T.async onresult: nil`.  Truth: the line numbers are found in the plug-in's text by markers, not from luaprobe; the
plug-in sits in a directory path longer than LuaJIT's 60-byte chunk names (which it shortens to "...tail")."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
PLUGIN = r'''
TrisulPlugin = { id = { name = "bad values" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if SENT then return end
      SENT = true
      local function ok(d) return "r" end
      T.async:schedule { data = "a", onexecute = function(d)
        error()                                                 -- MARK exec-nil
      end }
      T.async:schedule { data = "b", onexecute = function(d)
        error({ code = 1 })                                     -- MARK exec-table
      end }
      T.async:schedule { data = "c", onexecute = ok, onresult = function(e, d, r)
        error()                                                 -- MARK result-nil
      end }
      T.async:schedule { data = "d", onexecute = ok, onresult = function(e, d, r)
        error(setmetatable({}, { __tostring = function() return "custom" end }))   -- MARK result-obj
      end }
    end } }
'''


def test_errors_without_a_message_name_the_plugin_line(tmp_path):
    d = tmp_path / ("a-directory-name-long-enough-that-luajit-shortens-the-chunk-name" * 2)
    d.mkdir()
    p = d / "badvalues.lua"
    p.write_text(PLUGIN)
    lines = p.read_text().splitlines()
    line = {tag: next(i for i, x in enumerate(lines, 1) if f"MARK {tag}" in x)
            for tag in ("exec-nil", "exec-table", "result-nil", "result-obj")}
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
                        "--out", str(tmp_path / "o")], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    logged = [x for x in r.stderr.splitlines() if "T.async" in x]
    assert len(logged) == 4, r.stderr
    expect = {f"T.async onexecute error: {p}:{line['exec-nil']}: nil",
              f"T.async onresult: {p}:{line['result-nil']}: nil",
              f"T.async onresult: {p}:{line['result-obj']}: custom"}
    for e in expect:
        assert sum(x.endswith(e) for x in logged) == 1, (e, r.stderr)
    table = f"T.async onexecute error: {p}:{line['exec-table']}: table: 0x"
    assert sum(table in x for x in logged) == 1, r.stderr
    assert "onresult_errors 2" in r.stdout and "error 2 " in r.stdout, r.stdout
