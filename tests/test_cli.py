"""Command-line output modes of `luaprobe run` (the summary itself is checked in test_fastpath.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests import helpers


def luaprobe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd or helpers.REPO,
                          capture_output=True, text=True, timeout=120)


def test_json_prints_the_summary_as_json(tmp_path):
    r = luaprobe("demo", "--out", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == 136 and s["input_errors"] == []
    assert {p["type"] for p in s["plugins"]} >= {"simplecounter", "engine_monitor", "countergroup"}


def test_quiet_prints_nothing_on_success(tmp_path):
    r = luaprobe("demo", "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 0
    assert r.stdout == "" and r.stderr == ""


def test_quiet_still_reports_input_errors(tmp_path):
    r = luaprobe("run", "engine/examples/tcp_ports.lua", "--pcap", f"{helpers.PCAPS}/bad-huge-caplen-record.pcap",
                 "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 3
    assert r.stdout == "" and "byte offset 5035" in r.stderr and "Traceback" not in r.stderr
