"""The text summary of a sharded run says what its counters figure counts (newcomer pass): the rows the counters
table gained, as one fast path's figure on a new database, and how many updates the shards wrote, which the store
combines into one row per (group, bucket, key, meter): checked against the rows sqlite3 finds in the store, for a
new database and for --append of the same capture into it (the same rows updated: none gained)."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "trisul-tutorial.pcap")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")


def rows(out) -> int:
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        return db.execute("SELECT COUNT(*) FROM counters").fetchone()[0]
    finally:
        db.close()


def test_sharded_written_line_matches_the_store(tmp_path):
    out = str(tmp_path / "o")
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    before = 0
    for extra in ([], ["--append"]):
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", PCAP,
                            "--shards", "2", "--out", out, *extra], cwd=helpers.REPO, capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        (line,) = [x for x in r.stdout.splitlines() if x.startswith("written: ")]
        m = re.match(r"written: counters (\d+) \(combined from (\d+) updates by 2 shards\)", line)
        assert m, line
        after = rows(out)
        assert int(m.group(1)) == after - before
        assert int(m.group(2)) > after - before if extra else int(m.group(2)) >= after - before > 0
        before = after
    assert before > 0
