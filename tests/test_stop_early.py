"""A stop ends the walk within about a batch (newcomer pass, defect 3): with a 1 ms hook, SIGTERM after 3 s used
to walk the whole 32 MiB ring (7000 packets, 11 s) and then say "stopped early".  Packets already in the ring are
passed over and counted (`not_walked_at_stop`).  Truth: tshark's frame sizes (the walked packets are exactly the
first N records) and the capture's frame count."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil

from tests import helpers

BUSY = """
local n = 0
TrisulPlugin = { id = { name = "busy" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function()
      n = n + 1
      if n == 100 then local f = io.open("%s", "w"); f:close() end
      local t = os.clock() while os.clock() - t < 0.001 do end
    end } }
"""


def test_a_stop_passes_over_the_rest_of_the_ring_and_counts_it(tmp_path):
    pcap = tmp_path / "synth.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine", "gen", "--out", str(pcap), "--flows", "100",
                    "--packets", "12000", "--seed", "7", "--mix", "tcp=100"], check=True, capture_output=True)
    sizes = [int(x) for x in subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"],
                                            capture_output=True, text=True, check=True).stdout.split()]
    plug = tmp_path / "busy.lua"
    plug.write_text(BUSY % (tmp_path / "walking"))
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(pcap), "--out",
                          str(tmp_path / "out"), "--json", "--batch", "64"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = []
    try:
        helpers.wait_for(lambda: (tmp_path / "walking").exists(), timeout=120)
        kids = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    s = json.loads(out)
    walked, skipped = s["packets"], s["not_walked_at_stop"]
    assert s["stopped_by"] == "SIGTERM"
    assert walked < len(sizes) // 2 and skipped > 0                  # the walk ended early, the rest is counted
    assert walked + skipped <= len(sizes)                           # read = walked + not walked, no more
    assert s["bytes"] == sum(sizes[:walked])                        # the walked ones are the first records
    assert "Traceback" not in err
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])
