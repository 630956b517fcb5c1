"""The per-plug-in-VM memory limit (--plugin-memory-mb, docs/operations.md): a hook that allocates without bound
gets a Lua error, its instance is disabled with one line naming it and the limit, the run ends with code 4 and the
host is never at risk.  Every run here is also under RLIMIT_AS (4 GiB): if the limit failed, the run would hit that
instead of the OOM killer.  Truth: the documented exit code, tshark's frame count, the kernel's view of children."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
HOG = """
TrisulPlugin = { id = { name = "hog" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end
    end } }
"""


def _as_limit():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_a_hook_over_its_memory_limit_is_disabled_and_named(tmp_path):
    plug = tmp_path / "hog.lua"
    plug.write_text(HOG)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE,
                        "--out", str(tmp_path / "out"), "--plugin-memory-mb", "64", "--json"],
                       capture_output=True, text=True, timeout=300, preexec_fn=_as_limit)
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    summary = json.loads(r.stdout)
    frames = subprocess.run(["tshark", "-r", SAMPLE, "-T", "fields", "-e", "frame.number"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert summary["packets"] == len(frames)              # the run went on over the whole capture
    (hog,) = [p for p in summary["plugins"] if p["type"] == "simplecounter"]
    why = "hog.lua [simplecounter#%s]: memory limit 64 MiB exceeded in simplecounter.onpacket" % hog["instance"]
    assert hog["disabled"].startswith(why)
    assert hog["hook_calls"]["simplecounter.onpacket"] == hog["hook_errors"]["simplecounter.onpacket"] >= 1
    assert hog["batches_skipped"] >= 1                    # disabled: later batches are not walked
    assert any(why in reason for reason in summary["exit"]["reasons"])
    assert [ln for ln in r.stderr.splitlines() if ln.endswith("instance disabled") and "ERROR " + why in ln]
    assert not helpers.our_segments()


def test_the_limit_is_a_setting_with_a_range(tmp_path):
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", SAMPLE, "--pcap", SAMPLE, "--out",
                        str(tmp_path / "o"), "--plugin-memory-mb", "-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--plugin-memory-mb" in r.stderr, r.stderr
