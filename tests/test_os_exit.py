"""os.exit in a plug-in is refused as a plug-in error (engine/plugins/tlib.lua refused_exit; docs/plugins.md
"os.exit"): before, it ended `luaprobe run` / `check` silently with the plug-in's code, wrote nothing and left the
packet ring and doorbell in /dev/shm.  Truth for "results kept": tshark's packet count of the capture against the
flows table's packets."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from tests import helpers, proc_tools

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
SC = ('TrisulPlugin = { id = { name = "x" }, simplecounter = { protocol_guid = '
      '"{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",\n  onpacket = function(e, l) %s end } }\n')
BACKEND = ('TrisulPlugin = { id = { name = "b" }, engine_monitor = {\n'
           '  onmetronome = function(e, ts, tick) %s end } }\n')
ASYNC = ('TrisulPlugin = { id = { name = "a" }, simplecounter = { protocol_guid = '
         '"{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",\n  onpacket = function(e, l)\n'
         '    if sent then return end; sent = true\n'
         '    T.async:schedule{ data = "d", onexecute = function(d) os.exit(5) end,\n'
         '      onresult = function() end,\n'
         '      onerror = function(e, d, m) T.logerror("ONERROR " .. m) end } end } }\n')


def tshark_packets() -> int:
    out = subprocess.run(["tshark", "-r", SAMPLE, "-T", "fields", "-e", "frame.number"], capture_output=True,
                         text=True, check=True).stdout.split()
    return len(out)


def run(tmp_path, plugin_src, *extra, cmd="run"):
    plug = tmp_path / "exits.lua"
    plug.write_text(plugin_src)
    env, tag = proc_tools.tagged_env()
    args = [cmd, str(plug)] + (["--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", *extra] if cmd == "run" else [])
    p = proc_tools.start(args, env=env)
    try:
        out, err = p.communicate(timeout=180)
    finally:
        proc_tools.assert_nothing_left(tag, [p.pid])
    return p.returncode, err, str(plug)


@pytest.mark.parametrize("where,src", [("hook", SC % "os.exit(7)"), ("backend", BACKEND % "os.exit(7)")])
def test_os_exit_in_a_hook_is_a_plugin_error_and_the_run_writes_everything(tmp_path, where, src):
    rc, err, plug = run(tmp_path, src)
    assert rc == 4, err
    assert f"{plug}:2: os.exit(7) refused" in err
    assert "failed on every call" in err
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    walked = json.loads(db.execute("select value from run where key = 'packets'").fetchone()[0])
    assert walked == tshark_packets()                   # the whole capture was walked and the summary written
    assert db.execute("select count(*) from flows").fetchone()[0] > 0


@pytest.mark.parametrize("cmd", ["run", "check"])
def test_os_exit_at_top_level_is_a_load_error(tmp_path, cmd):
    rc, err, plug = run(tmp_path, "os.exit(9)\n", cmd=cmd)
    assert rc == 4, err
    lines = [x for x in err.splitlines() if "os.exit(9)" in x]
    assert lines and all(f"{plug}:1: os.exit(9) refused" in x for x in lines), err
    assert "Traceback" not in err


def test_os_exit_in_onexecute_fails_the_task_not_the_worker(tmp_path):
    rc, err, _ = run(tmp_path, ASYNC, "--json")
    assert "ONERROR" in err and "os.exit(5) refused" in err, err
    assert "worker died" not in err
