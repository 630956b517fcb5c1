"""A run directory's state.json that is not what a supervisor writes (hand-edited, another program's file).

With no supervisor running, `status`, `stop` and `stats` read the state the last one saved.  A state.json that is
not JSON, not a JSON object, or whose fields have other types than the supervisor writes (`{"state": 5}`, `[]`,
`{"state": "running", "last_stats": 5}`) gave a Python traceback, exit 1 (AttributeError); a file that is not JSON
was taken for no file ("never started").  Now: one line naming the file and what is wrong with it, exit 3 (no
daemon is running, docs/operations.md "Exit codes"), nothing on stdout.  The state.json a real supervisor left is
still read and shown.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import psutil
import pytest

from luaprobe.shm.exits import EXIT_NOT_RUNNING
from tests import helpers

DAMAGED = [
    ('{"state": 5}', '"state" is an integer, not a string'),
    ("[]", "a list, not a JSON object"),
    ("5", "an integer, not a JSON object"),
    ('{"state": "running", "last_stats": 5}', '"last_stats" is an integer, not an object or null'),
    ('{"state": "stopped", "last_stats": {"packets": "x"}}', '"last_stats" "packets" is a string, not a number'),
    ('{"state": "failed", "plugin_problems": [1]}', '"plugin_problems" holds an integer, not only strings'),
    ('{"state": "stopped", "last_exit_code": "x"}', '"last_exit_code" is a string, not an integer or null'),
    ('{"restarts": 0}', 'no "state"'),
    ("garbage{", "not JSON"),
    (b"\xff\xfe", "not JSON"),
]
COMMANDS = [["status"], ["status", "--json"], ["stop"], ["stats"], ["stats", "--json"]]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("content, what", DAMAGED, ids=[str(c) for c, _ in DAMAGED])
@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_a_damaged_state_file_gets_one_line_naming_it(tmp_path, cmd, content, what):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    state = run / "state.json"
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        state.write_text(content)
    r = _cli(*cmd, "--run-dir", str(run))
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.returncode, r.stdout) == (EXIT_NOT_RUNNING, ""), (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"luaprobe {cmd[0]}: "), r.stderr
    assert f"{state} is damaged: {what}" in lines[0], lines[0]


def test_the_state_a_real_supervisor_left_is_shown(tmp_path):
    """A daemon over sample.pcap finishes its input and exits; its state.json (every field the supervisor writes,
    last_stats too) is read as before: `status` shows it, `stop` says not running, exit 3, no damage line."""
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n'
                   f'[source]\npcap = ["{helpers.REPO}/engine/examples/sample.pcap"]\n'
                   f'[plugins]\npaths = ["{helpers.REPO}/engine/examples/tcp_ports.lua"]\n')
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config", str(cfg)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"supervisor pid (\d+)", r.stdout)
    if m:                                   # "started: supervisor pid N, ...": wait until it has finished the input
        try:
            psutil.Process(int(m.group(1))).wait(timeout=120)
        except psutil.NoSuchProcess:
            pass
    run = tmp_path / "run"
    saved = json.loads((run / "state.json").read_text())
    assert saved["state"] == "stopped (input finished)" and saved["last_stats"], saved
    st = _cli("status", "--run-dir", str(run))
    assert (st.returncode, st.stderr) == (EXIT_NOT_RUNNING, ""), st.stderr
    assert st.stdout.startswith("state:      stopped (input finished)") and "last stats:" in st.stdout, st.stdout
    sp = _cli("stop", "--run-dir", str(run))
    assert sp.returncode == EXIT_NOT_RUNNING and sp.stderr.startswith("luaprobe stop: not running (stopped (input "
                                                                      "finished); looked in"), sp.stderr


@pytest.mark.parametrize("content", ["5", "[]", '{"time": "x"}', '{"time": 1, "processes": 5}', "garbage{"])
def test_a_damaged_stats_file_is_passed_over(tmp_path, content):
    """stats.json (the fast path's snapshot, rewritten by the supervisor) hand-damaged, no supervisor: `stats --json`
    gave a traceback (TypeError / AttributeError); now the file counts as missing: the last state, exit 3."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "stats.json").write_text(content)
    r = _cli("stats", "--json", "--run-dir", str(run))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == EXIT_NOT_RUNNING, (r.returncode, r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["live"] is False and "packets" not in out
