"""A stop signal while `luaprobe run` waits for its SQLite store writer to commit the last rows of the run.

Found by the operator's chaos pass: with the writer stopped (`kill -STOP`) the run waits in the final close; a
Ctrl-C then raised the start-up stop ("stopped by SIGINT while starting, before any packet was processed", exit
130, although every packet had been processed) and left the writer behind as a stopped orphan with the run's
last rows (summary, flows) uncommitted.  Now the run's own handler stays until the writer has finished: the stop
signal resumes the writer (as it resumes a stopped capture process), the rows are committed, exit 0.

The plug-in holds the run in `onunload` until the test has stopped the writer, and the signal is sent once the
run's thread is blocked waiting for the writer (/proc/PID/syscall: poll), so it always lands in the final close.
Independent truths: the capture's record count (Python's own pcap walk), the database read with sqlite3, the
process table and /dev/shm.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import psutil

from luaprobe.shm import segment
from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")

PLUGIN = r"""
local dir = "%(dir)s"
local function exists(name)
  local f = io.open(dir .. "/" .. name); if f then f:close(); return true end; return false
end
TrisulPlugin = {
  id = { name = "hold at unload" },
  onunload = function()
    local f = assert(io.open(dir .. "/unloading", "w")); f:close()
    while not exists("go") do end            -- the test stops the store writer meanwhile
  end,
  simplecounter = {
    protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",   -- IPv4
    onpacket = function(engine, layer) end,
  },
}
"""

POLL = 7        # x86_64 poll(2): subprocess.communicate's PollSelector, where the final close waits


def _blocked_in_poll(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(POLL)
    except (OSError, IndexError):
        return False


def test_stop_signal_while_the_writer_commits_the_last_rows(tmp_path):
    plugin = helpers.write_plugin(tmp_path, PLUGIN % {"dir": str(tmp_path)}, name="hold.lua")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", SAMPLE,
                          "--out", str(out), "-q", "--hook-budget", "0"], cwd=helpers.REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helpers.wait_for(lambda: (tmp_path / "unloading").exists(), timeout=60)
    writer = next(c for c in psutil.Process(p.pid).children()
                  if "luaprobe.engine.store.writer" in " ".join(helpers.cmdline(c)))
    pids = [p.pid, writer.pid]
    writer.send_signal(signal.SIGSTOP)
    helpers.wait_for(lambda: writer.status() == psutil.STATUS_STOPPED, timeout=10)
    (tmp_path / "go").write_text("")
    helpers.wait_for(lambda: _blocked_in_poll(p.pid), timeout=30)     # in the final close, waiting
    p.send_signal(signal.SIGINT)
    _, err = helpers.finish(p, 60)
    assert "while starting" not in err and "Traceback" not in err, err
    assert p.returncode == 0, err             # every packet was processed before the signal, and is written
    assert not psutil.pid_exists(writer.pid) or writer.status() == psutil.STATUS_ZOMBIE, \
        f"store writer {writer.pid} left behind ({writer.status()})"
    db = sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)
    packets = db.execute("SELECT value FROM run WHERE key = 'packets'").fetchone()
    db.close()
    assert packets is not None and int(packets[0]) == helpers.pcap_records(SAMPLE)   # the summary row committed
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
