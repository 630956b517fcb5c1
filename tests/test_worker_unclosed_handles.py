"""A T.async worker collects the io.popen / io.open handles an onexecute never closes before they pile up
(workers/worker.lua collect_unclosed).  trisul-scripts' fileextract/save_content_types_sha256.lua, run unmodified,
does `local h = io.popen("sha256sum " .. path)`, reads it and never closes it: each task left a pipe descriptor and
a zombie `sh` until the worker's Lua heap happened to be collected; a looped daemon had 1,645 descriptors open in
one worker (above the common `ulimit -n` of 1024, where io.popen and io.open fail).  Truth: the worker's own
/proc/PID/fd, counted by `ls` from inside the task (the shell's $PPID is the worker)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers

PLUGIN = r"""
local most, MOST_FILE = 0, "@MOST@"
TrisulPlugin = {
  id = { name = "popen, never closed" },
  request_async_workers = 1,
  simplecounter = {
    protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",   -- UDP
    onpacket = function(engine, layer)
      T.async:schedule {
        data = "x",
        onexecute = function(d)
          local h = io.popen("true")                   -- never closed
          local c = io.popen("ls /proc/$PPID/fd | wc -l")
          local n = c:read("*a")
          c:close()
          return n
        end,
        onresult = function(e, d, r)
          local n = tonumber(r)
          if n > most then
            most = n
            local f = io.open(MOST_FILE, "w"); f:write(most); f:close()
          end
        end,
      }
    end,
  },
}
"""


def test_worker_collects_handles_a_task_never_closed(tmp_path):
    pcap = tmp_path / "udp.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine", "gen", "--out", str(pcap), "--flows", "20",
                    "--packets", "1500", "--seed", "3", "--mix", "udp=100"], check=True, capture_output=True)
    most = tmp_path / "most.txt"
    plug = helpers.write_plugin(tmp_path, PLUGIN.replace("@MOST@", str(most)))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(pcap), "--out",
                        str(tmp_path / "out"), "-q", "--drain-deadline", "240"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    n = int(most.read_text())
    # 1,500 tasks: before, one more descriptor each (no collection came: ~1,500); now a collection at 256, checked
    # every 16 tasks
    assert 20 < n <= 256 + 16 + 8, n
