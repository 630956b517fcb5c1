"""Every dropped T.async task is counted under its reason (docs/async.md "Accounting"): a real `luaprobe run` whose
plug-in floods a tiny request ring (drops: overflow queue full) and schedules again in onunload (drops: the engine
is stopping).  The truth is the plug-in's own record of where `schedule` returned false (docs/async.md: false means
dropped), written by onunload, not luaprobe's summary.  Before: only the total `dropped`; the log line gave every
drop since the last line the reason of the last one, with "(limit N queued tasks)" also for a stopping engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import helpers

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
PLUGIN = r'''
local OUT = %s
local refused_pkt, refused_unload, accepted = 0, 0, 0
local function one(tag)
  return T.async:schedule { data = tag .. string.rep("p", 200),
    onexecute = function(d)
      local ffi = require "ffi"
      pcall(ffi.cdef, "int usleep(unsigned int usec);")
      ffi.C.usleep(2000)
      return d
    end }
end
TrisulPlugin = {
  id = { name = "flood" },
  onunload = function()
    for i = 1, 7 do if one("u" .. i) == false then refused_unload = refused_unload + 1 end end
    local f = assert(io.open(OUT, "w"))
    f:write(("%%d %%d %%d\n"):format(accepted, refused_pkt, refused_unload)); f:close()
  end,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if one("p") == false then refused_pkt = refused_pkt + 1 else accepted = accepted + 1 end
    end },
}
'''


def test_each_dropped_task_is_counted_under_its_reason(tmp_path):
    record = tmp_path / "record.txt"
    p = tmp_path / "flood.lua"
    p.write_text(PLUGIN % json.dumps(str(record)))
    base = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
            "--ring-size", "4096", "--overflow-limit", "10", "--drain-deadline", "120"]
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    r = subprocess.run(base + ["--out", str(tmp_path / "o"), "--json", "-q"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    accepted, refused_pkt, refused_unload = map(int, record.read_text().split())
    assert refused_unload == 7 and refused_pkt > 0, (accepted, refused_pkt)   # the flood really overflowed
    (plugin,) = json.loads(r.stdout)["plugins"]
    a = plugin["async"]
    helpers.assert_accounting(a)
    assert (a["dropped_overflow"], a["dropped_stopping"], a["dropped_start"], a["dropped_no_workers"]) == \
        (refused_pkt, refused_unload, 0, 0), a
    assert a["ok"] == accepted and a["dropped"] == refused_pkt + refused_unload, a
    drops = [x for x in r.stderr.splitlines() if "T.async: dropped" in x]     # at most one line a second
    assert drops and all(x.endswith(" task(s): overflow queue full at the limit of 10 queued tasks")
                         or "engine is stopping" in x for x in drops), r.stderr
    assert "engine is stopping (limit" not in r.stderr, r.stderr
    # the text summary names both reasons
    t = subprocess.run(base + ["--out", str(tmp_path / "t")], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert t.returncode == 0, t.stderr
    (row,) = [x for x in t.stdout.splitlines() if x.startswith("flood.lua [")]
    assert " (overflow queue full " in row and ", engine stopping 7) pending 0" in row, row
