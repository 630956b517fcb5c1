"""kill -9 of the capture process of `luaprobe run` (newcomer pass, defect 5): it was reported as an input error
(exit 3, which README reserves for a bad capture file).  A process of the run died: exit 1 (docs/operations.md),
one line saying which process and how it died, and the packets it had put in the packet ring are all walked.
Truth: the kernel's signal, and tshark's frame sizes - the bytes walked equal the sum of the first N frames."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from tests import helpers

SLOW = """
local n = 0
TrisulPlugin = { id = { name = "slow" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function()
      n = n + 1
      if n == 100 then local f = io.open("%s", "w"); f:close() end          -- the walk has begun
      local t = os.clock() while os.clock() - t < 0.0005 do end
    end } }
"""


def test_capture_killed_is_a_dead_process_not_an_input_error(tmp_path):
    pcap = tmp_path / "synth.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine", "gen", "--out", str(pcap), "--flows", "100",
                    "--packets", "12000", "--seed", "7", "--mix", "tcp=100"], check=True, capture_output=True)
    sizes = [int(x) for x in subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"],
                                            capture_output=True, text=True, check=True).stdout.split()]
    plug = tmp_path / "slow.lua"
    plug.write_text(SLOW % (tmp_path / "walking"))
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(pcap), "--out",
                          str(tmp_path / "out"), "--json", "--packet-ring-mb", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def capture():
            for k in psutil.Process(p.pid).children(recursive=True):
                if "luaprobe.engine.capture.process" in " ".join(k.cmdline()):
                    return k
        cap = helpers.wait_for(capture, timeout=60)
        kids = psutil.Process(p.pid).children(recursive=True)
        helpers.wait_for(lambda: (tmp_path / "walking").exists(), timeout=120)
        assert cap.is_running()
        cap.kill()
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    summary = json.loads(out)
    n = summary["packets"]
    assert 0 < n < len(sizes)
    assert summary["bytes"] == sum(sizes[:n])         # exactly the first n records, none lost or repeated
    lines = [ln for ln in err.splitlines() if ln.startswith("luaprobe run:")]
    assert len(lines) == 1 and f"(pid {cap.pid}) was killed by SIGKILL" in lines[0] and f"({n})" in lines[0], err
    assert summary["input_errors"] == [] and summary["exit"]["code"] == 1
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])
