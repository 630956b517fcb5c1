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


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_whole_process_group_loses_nothing(tmp_path, syn, sig, code):
    """`timeout`, `kill -TERM -PGID`, systemd's default KillMode=control-group and a terminal's Ctrl-C signal every
    process of the run at once.  Before, SIGTERM also ended the store writer at once: exit 1 "writer exited (code
    0) without a final report; ... rows handed to it are not in the database", the database empty (0 flows).
    Now the writer ignores it like SIGINT / SIGHUP and the fast path stops gracefully (exit 143 / 130): the flows
    the summary counts are the database's rows (sqlite3)."""
    out = tmp_path / "out"
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", EXAMPLES, "--pcap", syn, "--out", str(out), "--json"], env=env, cwd=tmp_path)
    helpers.wait_for(lambda: proc_tools.worker_running(proc_tools.tagged_processes(tag)), 60, 0.05)
    pids = [x.pid for x in proc_tools.tagged_processes(tag)]
    os.killpg(p.pid, sig)
    try:
        stdout, err = p.communicate(timeout=120)
    finally:
        proc_tools.assert_nothing_left(tag, pids)
    name = signal.Signals(sig).name
    assert p.returncode == code, err
    assert f"stopped early by {name}: the input up to the stop was processed and written" in err, err
    summary = json.loads(stdout)
    assert summary["stopped_by"] == name and summary["store"]["errors"] == []
    assert f"killed by {name}" not in err, err                  # no worker died of it ("async worker 1 killed ...")
    a = [x["async"] for x in summary["plugins"] if x.get("async")]
    assert a and all(x["worker_deaths"] == 0 and x["scheduled"] == x["ok"] + x["nil_result"] + x["error"] +
                     x["timeout"] + x["dropped"] + x["lost_at_stop"] + x["lost_at_deadline"] for x in a), a
    db = sqlite3.connect(out / "luaprobe.sqlite")
    assert db.execute("select count(*) from flows").fetchone()[0] == summary["flows"] > 0
