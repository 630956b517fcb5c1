"""A T.async worker that crashes in onexecute (a plug-in's FFI null write: SIGSEGV in the worker process) is one
ERROR line naming the plug-in file, the signal and that its task failed (workers/pool.py death_line); the run goes
on with the pool restarting the worker, ends with exit 0, and the counters reconcile: ok + error + dropped ==
scheduled, error == the tasks that crashed, each of them reaching onerror.  Before: two lines per crash ("T.async
onexecute error: worker died (killed by SIGSEGV)" and "async worker 1 killed by SIGSEGV; restarting in 0.05 s"),
neither naming the plug-in's path.  The chaos soak (tests/test_chaos.py) covers SIGKILLs sent from outside.

Truth: the task numbers the plug-in crashes on (the test chose them), each onerror's alert read back with sqlite3,
the kernel's signal named in the worker's exit, /proc and /dev/shm for what is left (tests/proc_tools.py)."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

from tests import helpers, proc_tools

CRASHES = (50, 120)

PLUGIN = r"""local CRASH = { ["%d"] = true, ["%d"] = true }
TrisulPlugin = { id = { name = "worker crash" },
  request_async_workers = 1,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      seen = (seen or 0) + 1
      if seen > 200 then return end
      T.async:schedule{ data = tostring(seen),
        onexecute = function(d)
          if CRASH[d] then local ffi = require("ffi"); ffi.cast("int*", 0)[0] = 1 end
          return d
        end,
        onresult = function(e, d, r) end,
        onerror = function(e, d, m)
          e:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "k", "ERR", 1, d .. ": " .. m)
        end }
    end } }
""" % CRASHES


@pytest.mark.timeout(240)
def test_a_worker_crash_in_onexecute_is_one_line_and_the_run_goes_on(tmp_path):
    plugin = tmp_path / "wcrash.lua"
    plugin.write_text(PLUGIN)
    stats = tmp_path / "stats.json"
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag) as pids:
        p = proc_tools.start(["run", str(plugin), "--pcap", os.path.join(helpers.PCAPS, "trisul-tutorial.pcap"),
                              "--out", str(tmp_path / "out"), "--stats-json", str(stats)], env=env)
        pids.add(p.pid)
        with helpers.killed_when_left(p):
            out, err = p.communicate(timeout=200)
    assert p.returncode == 0, err[-3000:]
    want = (f"[wcrash.lua] T.async worker 1 of {plugin} died (killed by SIGSEGV) running a task (onexecute or a "
            f"file helper): that task failed (counted as error, onerror called); the run goes on, restarting the "
            f"worker in ")
    lines = [ln for ln in err.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert len(lines) == len(CRASHES) and all(want in ln for ln in lines), err[-3000:]
    assert "onexecute error" not in err, err[-3000:]
    a = json.loads(stats.read_text())["plugins"][0]["async"]
    assert a["scheduled"] == 200 and a["error"] == len(CRASHES), a
    assert a["ok"] + a["nil_result"] + a["error"] + a["timeout"] + a["dropped"] + a["pending"] == a["scheduled"], a
    assert a["ok"] == 200 - len(CRASHES) and a["dropped"] == 0 and a["worker_deaths"] == len(CRASHES), a
    with sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite") as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(alerts)")]
        col = next(c for c in ("message", "msg", "alert_message") if c in cols)
        got = sorted(r[0] for r in db.execute(f"SELECT {col} FROM alerts"))
    assert got == sorted(f"{n}: worker died (killed by SIGSEGV)" for n in CRASHES), got
