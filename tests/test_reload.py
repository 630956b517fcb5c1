"""`luaprobe reload` with a broken plug-in or a setting only a restart applies (docs/operations.md "Reload"):
the error is one line naming file:line (as `luaprobe check` prints it), exit 4, and the running fast path
and its plug-in instances are kept; the fast path itself refuses a live backend reload of a broken file
(SIGHUP sent to it directly) the same way.  Real daemons, real processes (tests/test_supervisor.py's fixture)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import EXAMPLES, daemon, free_port  # noqa: F401 - the fixture

MONITOR = """
TrisulPlugin = {
  id = { name = "kept monitor" },
  engine_monitor = { onmetronome = function(engine, ts) end },
}
"""
COUNTER = """
TrisulPlugin = {
  id = { name = "frontend" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", onpacket = function(engine, layer) end },
}
"""


def check_line(path) -> str:
    """What `luaprobe check` prints for a plug-in that does not load (the independent reference)."""
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "check", str(path)], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert p.returncode == 4, p.stderr
    (line,) = p.stderr.splitlines()
    return line.removeprefix("luaprobe check: ")


def instances(daemon, name) -> list:
    return [(p["type"], p["instance"]) for p in daemon.stats()["plugins"] if p["plugin"].endswith(name)]


def test_reload_of_a_broken_backend_plugin_is_refused_and_the_old_instances_keep_running(daemon, tmp_path):
    plug = tmp_path / "plugins"
    plug.mkdir()
    script = plug / "monitor.lua"
    script.write_text(MONITOR)
    daemon.start(plugins=[plug])
    helpers.wait_for(lambda: len(instances(daemon, "monitor.lua")) == 2, 30, 0.1)    # two backend instances
    before = daemon.status()
    script.write_text(MONITOR + "this is not lua (\n")
    expected = check_line(script)
    assert re.match(re.escape(str(script)) + r":\d+: ", expected), expected
    r = daemon.cli("reload")
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"luaprobe reload: refused: {expected}" in r.stderr.splitlines()
    assert "kept" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    st = daemon.status()
    assert (st["state"], st["fastpath_pid"], st["reloads"]) == ("running", before["fastpath_pid"], 0)
    assert len(instances(daemon, "monitor.lua")) == 2
    # The fast path's own check (a reload that reached it, e.g. SIGHUP sent to it directly)
    log = os.path.join(daemon.run_dir, control.LOG)
    os.kill(st["fastpath_pid"], signal.SIGHUP)
    helpers.wait_for(lambda: "backend reload refused" in open(log).read(), 30, 0.1)
    lines = [x for x in open(log).read().splitlines() if "backend reload refused" in x]
    assert len(lines) == 1 and lines[0].endswith(f"the running backend instances are kept: {expected}"), lines
    assert "backend scripts reloaded" not in open(log).read()
    assert len(instances(daemon, "monitor.lua")) == 2
    assert daemon.status()["fastpath_pid"] == before["fastpath_pid"]
    # fixed: the reload goes through and new instances replace the old ones
    script.write_text(MONITOR)
    r = daemon.cli("reload")
    assert r.returncode == 0, r.stderr
    helpers.wait_for(lambda: "backend scripts reloaded (2 instance(s))" in open(log).read(), 30, 0.1)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_reload_with_changed_settings_and_a_broken_frontend_plugin_keeps_the_fast_path(daemon, tmp_path):
    plug = tmp_path / "plugins"
    plug.mkdir()
    script = plug / "counter.lua"
    script.write_text(COUNTER)
    daemon.start(plugins=[plug])
    daemon.wait_packets(100)
    before = daemon.status()
    script.write_text(COUNTER.replace("TrisulPlugin = {", "TrisulPlugin = {{"))
    expected = check_line(script)
    text = open(daemon.config).read().replace("drain_deadline = 5", "drain_deadline = 6")    # a settings change
    open(daemon.config, "w").write(text)
    r = daemon.cli("reload")
    assert r.returncode == 4 and f"luaprobe reload: refused: {expected}" in r.stderr.splitlines(), r.stderr
    st = daemon.status()
    assert (st["state"], st["fastpath_pid"], st["reloads"]) == ("running", before["fastpath_pid"], 0)
    assert instances(daemon, "counter.lua")
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_reload_says_which_settings_need_a_restart(daemon):
    port = free_port()
    daemon.start(port=port)
    before = daemon.status()
    other = free_port()
    text = open(daemon.config).read()
    text = text.replace(f"prometheus_port = {port}", f"prometheus_port = {other}")
    text = text.replace('json_lines_file = "run/stats.jsonl"', 'json_lines_file = "run/other.jsonl"')
    open(daemon.config, "w").write(text)
    r = daemon.cli("reload")
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if x.startswith("luaprobe reload: note: ")]
    assert len(notes) == 2, r.stderr
    assert notes[0] == (f"luaprobe reload: note: [stats] prometheus_port changed ({port} -> {other}): takes effect "
                        f"at the next start (stop, then start); the daemon keeps {port}")
    assert "[stats] json_lines_file changed" in notes[1]
    st = daemon.status()
    assert st["fastpath_pid"] == before["fastpath_pid"] and st["state"] == "running"   # nothing else changed
    import urllib.request
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "luaprobe_up" in body                                       # the old port still serves
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
