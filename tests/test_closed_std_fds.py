"""A standard descriptor closed when `luaprobe run` starts (`<&-`, `>&-`, `2>&-`, a supervisor that closed it)
must not cost the run's rows.  Before, the --out directory's lock took that number and the store writer, started
with its standard streams redirected, had it replaced: "the output directory's lock (descriptor 1) is not a
directory", exit 1, "109 rows handed to it are not in the database" (cli._open_standard_fds).  Truth: tshark's
count of the sample's frames and IP frames."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")

pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed")


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_closed_standard_descriptor_loses_no_row(tmp_path, fd):
    out = tmp_path / "o"
    keep = {0: subprocess.DEVNULL, 1: subprocess.DEVNULL, 2: subprocess.PIPE}
    p = subprocess.run([sys.executable, "-c", f"import os, sys; os.close({fd}); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'luaprobe.engine.daemon.cli', *sys.argv[1:]])",
                        "run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), "-q", "--stats-json",
                        str(tmp_path / "s.json")],
                       cwd=helpers.REPO, env=dict(os.environ, PYTHONPATH=helpers.REPO), timeout=300,
                       stdin=keep[0], stdout=keep[1], stderr=keep[2] if fd != 2 else subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        in_flows = db.execute("SELECT sum(packets_az + packets_za) FROM flows").fetchone()[0]
    finally:
        db.close()
    assert in_flows == helpers.tshark_frames(SAMPLE, "-Y", "ip or ipv6") == 126
    assert json.loads((tmp_path / "s.json").read_text())["packets"] == helpers.tshark_frames(SAMPLE)
