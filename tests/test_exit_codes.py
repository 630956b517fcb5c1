"""The exit-code table of docs/operations.md is the one truth: shm/exits.py, README.md and the CLI's help agree with
it, and every code in it is produced by a real `luaprobe` process (here, or by the named test that needs a longer
set-up: a dead shard, a signal, a stop deadline).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

from luaprobe.shm import exits
from tests import helpers

DOCS = os.path.join(helpers.REPO, "docs", "operations.md")
EX = os.path.join(helpers.REPO, "engine", "examples")
SAMPLE = os.path.join(EX, "sample.pcap")


def table_codes() -> dict[int, str]:
    """{code: meaning} from the table under "## Exit codes" in docs/operations.md ("130 / 143" gives both)."""
    text = open(DOCS).read()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\| ([\d /]+) \| ([^|]*) \|", line)
        if m:
            for code in m.group(1).split("/"):
                out[int(code)] = m.group(2).strip()
    return out


def test_table_matches_shm_exits():
    codes = table_codes()
    assert set(codes) == {0, 1, 2, 3, 4, 5, 130, 143, 129}, codes
    assert (exits.EXIT_OK, exits.EXIT_INTERNAL, exits.EXIT_USAGE, exits.EXIT_INPUT, exits.EXIT_PLUGIN,
            exits.EXIT_STOP_KILLED) == (0, 1, 2, 3, 4, 5)
    assert exits.EXIT_STOPPED == {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
    assert codes[2].startswith("usage error") and codes[3].startswith("input error")
    assert codes[4].startswith("plug-in error") and codes[1].startswith("internal error")


def test_readme_and_cli_help_name_every_code():
    readme = open(os.path.join(helpers.REPO, "README.md")).read().split("Exit codes", 1)[1][:2500]
    cli_doc = importlib.import_module("luaprobe.engine.daemon.cli").__doc__
    for code in table_codes():
        assert re.search(rf"\b{code}\b", readme), code
        if code != 5:                                    # 5 is the daemon's `stop`: docs/operations.md
            assert re.search(rf"\b{code}\b", cli_doc), code


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


BROKEN = 'TrisulPlugin = { id = { name = "broken" }\n'

# code -> (argv builder, fragment of the one stderr line); the longer ones are tested where they are set up
SCENARIOS = {
    0: (lambda t: ["run", EX, "--pcap", SAMPLE, "--out", str(t / "out"), "-q"], None),
    2: (lambda t: ["run", "/nonexistent.lua", "--pcap", SAMPLE], "/nonexistent.lua: no such plug-in file"),
    3: (lambda t: ["run", EX, "--pcap", str(t / "nope.pcap")], "nope.pcap: no such file"),
    4: (lambda t: ["check", helpers.write_plugin(t, BROKEN, name="broken.lua")], "broken.lua:2: "),
}
ELSEWHERE = {
    1: "tests/test_shards.py::test_kill_9_of_a_shard_accounts_for_every_packet",
    5: "tests/test_supervisor.py::test_stop_past_stop_deadline_exits_5_naming_what_was_killed",
    130: "tests/test_stop.py::test_signal_during_the_final_drain_is_named_and_exits_128_plus_sig",
    143: "tests/test_stop.py::test_file_run_stops_gracefully",
    129: "tests/test_sighup.py::test_sighup_stops_run_gracefully",
}


def test_every_code_has_a_test():
    assert set(SCENARIOS) | set(ELSEWHERE) == set(table_codes())
    for where in ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in open(os.path.join(helpers.REPO, path)).read(), where


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_code_from_a_real_run(tmp_path, code):
    argv, fragment = SCENARIOS[code]
    r = _run(tmp_path, *argv(tmp_path))
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    if fragment is not None:
        assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
