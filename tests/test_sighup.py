"""SIGHUP (a terminal hangup, `kill -HUP`) stops `luaprobe run` gracefully, like SIGTERM (exit 129; docs/operations.md
"Exit codes"): before, it killed the run with no clean-up (exit 129 by the signal, nothing written, segments left).
A hangup reaches the whole process group, so the capture process, the store writer and the workers ignore it and are
stopped by the fast path.  Real processes; truth for "written": the database's run table and flows, read with sqlite3."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers, proc_tools

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("syn") / "syn.pcap")
    subprocess.run([sys.executable, "-m", "luaprobe.engine", "gen", "--out", path, "--flows", "3000",
                    "--mix", "tcp=40,udp=20,dns=20,http=20"], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("group", [False, True], ids=["kill-HUP", "hangup-of-the-process-group"])
def test_sighup_stops_run_gracefully(tmp_path, syn, group):
    out = tmp_path / "out"
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", EXAMPLES, "--pcap", syn, "--out", str(out), "--json"], env=env,
                         cwd=tmp_path)                                    # file_sha256.lua copies to ./extracted
    # the capture process, the store writer and the workers run: the packet loop is under way
    helpers.wait_for(lambda: proc_tools.worker_running(proc_tools.tagged_processes(tag)), 60, 0.05)
    pids = [x.pid for x in proc_tools.tagged_processes(tag)]
    if group:
        os.killpg(p.pid, signal.SIGHUP)
    else:
        p.send_signal(signal.SIGHUP)
    try:
        stdout, err = p.communicate(timeout=120)
    finally:
        proc_tools.assert_nothing_left(tag, pids)
    assert p.returncode == 129, err
    assert "stopped early by SIGHUP: the input up to the stop was processed and written" in err
    summary = json.loads(stdout)
    assert summary["stopped_by"] == "SIGHUP" and summary["exit"]["code"] == 129
    assert summary.get("capture_death") is None and summary["input_errors"] == []
    db = sqlite3.connect(out / "luaprobe.sqlite")
    stored = json.loads(db.execute("select value from run where key = 'stopped_by'").fetchone()[0])
    assert stored == "SIGHUP"
    assert db.execute("select count(*) from flows").fetchone()[0] == summary["flows"] > 0
