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


def test_a_hog_under_budget_and_limit_reconciles(tmp_path):
    """A hook that allocates without bound under both a hook budget and a memory limit: the walk stops at the
    batch's first memory-limit hit (host.lua walk), so every figure agrees: errors <= calls in the summary and the
    text line, the exit line's count is the hook's calls, and hook_budget counts a subset of the hook's errors."""
    import json as _json
    import re
    import subprocess as _sp
    import sys as _sys
    from tests import proc_tools
    plug = tmp_path / "hog.lua"
    plug.write_text('TrisulPlugin = { id = { name = "x" }, simplecounter = { protocol_guid = '
                    '"{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",\n  onpacket = function(e, l) local t = {} '
                    'for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end end } }\n')
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "examples",
                          "sample.pcap")
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", str(plug), "--pcap", sample, "--out", str(tmp_path / "out"), "--hook-budget", "2",
                          "--plugin-memory-mb", "64", "--stats-json", str(tmp_path / "s.json")], env=env)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        proc_tools.assert_nothing_left(tag, [p.pid])
    assert p.returncode == 4, err
    s = _json.load(open(tmp_path / "s.json"))
    (sc,) = [x for x in s["plugins"] if x["type"] == "simplecounter"]
    calls, errors = sc["hook_calls"]["simplecounter.onpacket"], sc["hook_errors"]["simplecounter.onpacket"]
    assert errors == calls and sc["hook_errors"].get("hook_budget", 0) <= errors
    assert sc["hook_errors"].get("hook_budget", 0) == calls - 1   # the walk stopped at the memory hit
    m = re.search(r"hook calls (\d+) errors (\d+)", out)
    assert m and int(m.group(1)) == calls and int(m.group(2)) == errors, out
    assert f"failed on every call ({calls})" in err and "memory limit 64 MiB exceeded" in err
