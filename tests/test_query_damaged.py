"""`luaprobe query` on a database whose data pages are damaged: one line naming the file, exit 3, never a traceback.

Found by a newcomer's pass (session 30): with the schema intact and a table's page damaged (a disk or file-system
fault), SQLite raises "database disk image is malformed" only while the rows are walked, outside the check the
Store made when it opened the file, and every kind of query printed a Python traceback (exit 1).  The damage here
is real by SQLite's own judgement: ``PRAGMA integrity_check`` on the damaged copy does not answer "ok" (or
fails itself).
"""
from __future__ import annotations

import os
import sqlite3

import pytest

from luaprobe.engine.store.query import WHAT
from tests.test_query_filters import EXAMPLES, cli


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A run's database with the root page of every table but sqlite_master (page 1) overwritten with noise."""
    out = tmp_path_factory.mktemp("qd") / "out"
    r = cli("run", os.path.join(EXAMPLES, "tcp_ports.lua"), os.path.join(EXAMPLES, "dns_watch.lua"),
            "--analysers", "all", "--pcap", os.path.join(EXAMPLES, "sample.pcap"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    db = out / "luaprobe.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")              # every row in the file itself, no -wal beside it
    size = con.execute("PRAGMA page_size").fetchone()[0]
    roots = sorted({r[0] for r in con.execute("SELECT rootpage FROM sqlite_master WHERE rootpage > 1")})
    con.close()
    for name in ("luaprobe.sqlite-wal", "luaprobe.sqlite-shm"):
        assert not (out / name).exists()
    data = bytearray(db.read_bytes())
    for page in roots:                                     # byte 100 of page 1 is the file header; others from 0
        start = (page - 1) * size
        for i in range(start + 8, start + size, 7):
            data[i] ^= 0xA5
    db.write_bytes(bytes(data))
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        verdict = con.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as e:                     # too damaged for the check to walk it
        verdict = str(e)
    finally:
        con.close()
    assert verdict != "ok", verdict
    return out


@pytest.mark.parametrize("json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("what", WHAT)
def test_a_damaged_page_is_one_line_not_a_traceback(damaged, what, json):
    r = cli("query", what, "--out", str(damaged), *(["--json"] if json else []))
    assert "Traceback" not in r.stderr + r.stdout
    if r.returncode == 0:                                  # a kind whose table is empty reads no damaged page
        return
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("luaprobe query: cannot read database "), r.stderr
    assert str(damaged / "luaprobe.sqlite") in r.stderr


def test_most_kinds_meet_the_damage(damaged):
    """So that the test above cannot pass by every query succeeding: the common kinds fail, as one line each."""
    codes = {w: cli("query", w, "--out", str(damaged)).returncode for w in ("flows", "counters")}
    assert codes == {"flows": 3, "counters": 3}, codes
