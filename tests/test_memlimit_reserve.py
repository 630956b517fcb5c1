"""A plug-in that fills its VM to the last bytes of --plugin-memory-mb with small objects is disabled cleanly.

Found by CI (a flaky test_lua_input.py memory-limit test): the allocation that crossed the limit was sometimes a small
one, leaving the VM a few bytes under it, and luaprobe's own error path (the xpcall's traceback, the error's report,
the line that disables the instance) then failed in turn, outside any xpcall: `internal error: LuaMemoryError`
(exit 1, for an inputfilter step, an engine_monitor tick, an sg_monitor flow event) or LuaJIT's `PANIC: unprotected
error in call to Lua API` that aborted the run (a simplecounter's batch walk).  A chain of one-slot tables
(`KEEP = { KEEP }`) until the allocator refuses makes that case every time.  Now the memory limit keeps a reserve
for what runs after the error (engine/plugins/_lpwatch.c `limited_alloc`), and a hook called alone that hit the limit
disables its instance at once (engine/plugins/host.lua `call3`): exit 4, one line naming the file, the hook and the
limit, every packet walked.  Truth: the packet count read from the capture's own records (helpers.pcap_records).
Real processes; conftest.py's leak guard checks processes and segments.  The same in a T.async worker VM:
tests/test_worker_memory.py ("small-tables").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
FILL = "local ok, e = pcall(function() while true do KEEP = { KEEP } end end)\n  error(e, 0)"
TCP = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"

HOOKS = {
    "inputfilter.step": "inputfilter = { step = function(packet, engine)\n  %s\nend }" % FILL,
    "simplecounter.onpacket": f'simplecounter = {{ protocol_guid = "{TCP}", onpacket = function(engine, layer)\n'
                              f"  {FILL}\nend }}",
    "engine_monitor.onmetronome": "engine_monitor = { onmetronome = function(engine, ts, tick)\n  %s\nend }" % FILL,
    "sg_monitor.onnewflow": "sg_monitor = { onnewflow = function(engine, flow)\n  %s\nend }" % FILL,
}


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", *args, "--plugin-memory-mb",
                           "64", "--out", str(tmp_path / "out"), "--stats-json", str(tmp_path / "s.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_a_vm_filled_to_its_last_bytes_is_disabled_not_a_crash(tmp_path, hook):
    plugin = helpers.write_plugin(tmp_path, 'TrisulPlugin = { id = { name = "tight" },\n%s }\n' % HOOKS[hook],
                                  name="tight.lua")
    if hook == "inputfilter.step":
        r = _run(tmp_path, "--lua-input", plugin)
    else:
        r = _run(tmp_path, plugin, "--pcap", SAMPLE)
    out = r.stdout + r.stderr
    assert r.returncode == 4, out
    assert "PANIC" not in out and "internal error" not in out and "Traceback" not in out, out
    assert f"memory limit 64 MiB exceeded in {hook} (--plugin-memory-mb); instance disabled" in out, out
    s = json.loads((tmp_path / "s.json").read_text())
    if hook == "inputfilter.step":
        assert s["lua_input"]["ended"] == "disabled" and s["lua_input"]["step_calls"] == 1
    else:
        assert s["packets"] == helpers.pcap_records(SAMPLE)            # the run went on: every packet walked
    assert [p["disabled"] for p in s["plugins"] if p.get("disabled")], s["plugins"]
