"""`luaprobe run --json --stats-json` when the SQLite store writer dies mid-run: the summary still comes out.

Found by the operator's chaos pass: `kill -9` of the store writer ended the run with the documented exit-1 line,
but `--json` printed nothing and `--stats-json` was not written (a capture process's death gives both), so a
monitoring job lost every counter of the run, the rows lost included.  Now both carry the summary up to the
death, with ``store_death`` {pid, rows_lost, error} and ``exit`` {code 1, reasons}.

The plug-in holds the fast path in a hook at its 5000th packet until the test has killed the writer, so the
death always lands mid-run.  Independent truths: the plug-in's own count of its hook calls (written to a file
while it holds), the process table, /dev/shm (conftest.py's guard).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil

from tests import helpers

PLUGIN = r"""
local dir = "%(dir)s"
local function exists(name)
  local f = io.open(dir .. "/" .. name); if f then f:close(); return true end; return false
end
local seen = 0
TrisulPlugin = {
  id = { name = "holder" },
  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",   -- TCP
    onpacket = function(engine, layer)
      seen = seen + 1
      if seen == 5000 then
        local f = assert(io.open(dir .. "/running", "w")); f:write(seen); f:close()
        while not exists("go") do end         -- the test kills the store writer meanwhile
      end
    end,
  },
}
"""


def test_summary_reaches_json_and_stats_json_when_the_store_writer_dies(tmp_path):
    plugin = helpers.write_plugin(tmp_path, PLUGIN % {"dir": str(tmp_path)}, name="holder.lua")
    stats = tmp_path / "stats.json"
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin,
                          "--generate", "packets=2000000,flows=500,mix=tcp=100,seed=3", "--out", str(tmp_path / "out"),
                          "--json", "--stats-json", str(stats), "--hook-budget", "0"], cwd=helpers.REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helpers.wait_for(lambda: (tmp_path / "running").exists(), timeout=60)
    writer = next(c for c in psutil.Process(p.pid).children()
                  if "luaprobe.engine.store.writer" in " ".join(helpers.cmdline(c)))
    writer.send_signal(signal.SIGKILL)
    helpers.wait_for(lambda: not writer.is_running() or writer.status() == psutil.STATUS_ZOMBIE, timeout=10)
    (tmp_path / "go").write_text("")
    out, err = helpers.finish(p, 120)
    assert p.returncode == 1, err
    line = f"luaprobe run: exit 1: the SQLite store writer (pid {writer.pid}) was killed by SIGKILL; "
    assert line in err and "Traceback" not in err, err
    s = json.loads(out)                                   # stdout is the summary, pure JSON
    assert json.loads(stats.read_text()) == s             # and --stats-json holds the same
    death = s["store_death"]
    assert death["pid"] == writer.pid and death["rows_lost"] >= 0 and death["error"] in err
    assert s["exit"]["code"] == 1 and s["exit"]["reasons"] == [death["error"]]
    calls = s["plugins"][0]["hook_calls"]["simplecounter.onpacket"]
    assert 5000 <= calls <= s["packets"] < 2_000_000      # walked past the hold, ended by the death
