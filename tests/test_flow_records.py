"""Every flow record the engine writes is stored (docs/schema.md ``flows``): a flow seen twice (a capture
replayed, the same file given twice, a daemon looping a file) is two records, not one replacing the other.
Checked against tshark (packets per TCP/UDP stream of the same capture) and against the run's own written
count; and a schema-1 database (primary key (flowkey, first_ts)) keeps its rows when a run appends to it."""
from __future__ import annotations

import collections
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
MERGECAP = shutil.which("mergecap")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")


def run(*args):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, *args, "-q", "--json"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def tshark_stream_packets(path) -> collections.Counter:
    """Frames per TCP / UDP stream as tshark numbers them (tcp.stream, udp.stream)."""
    out = subprocess.run([TSHARK, "-r", path, "-T", "fields", "-e", "tcp.stream", "-e", "udp.stream"],
                         capture_output=True, text=True, check=True).stdout
    c = collections.Counter()
    for line in out.splitlines():
        tcp, _, udp = line.partition("\t")
        if tcp.strip():
            c[("tcp", int(tcp))] += 1
        elif udp.strip():
            c[("udp", int(udp))] += 1
    return c


def table(out):
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        return db.execute("SELECT flowkey, packets_az + packets_za FROM flows WHERE proto IN (6, 17)").fetchall()
    finally:
        db.close()


def per_flowkey(rows) -> list:
    c = collections.Counter()
    for fk, n in rows:
        c[fk] += n
    return sorted(c.values())


@pytest.mark.skipif(TSHARK is None or MERGECAP is None, reason="tshark / mergecap not installed")
@pytest.mark.parametrize("how", ["merged", "twice"])
def test_replayed_flows_all_stored(tmp_path, how):
    once = tshark_stream_packets(SAMPLE)
    if how == "merged":
        dup = str(tmp_path / "dup.pcap")
        subprocess.run([MERGECAP, "-a", "-w", dup, SAMPLE, SAMPLE], check=True)
        assert sum(tshark_stream_packets(dup).values()) == 2 * sum(once.values())
        args = ["--pcap", dup]
    else:
        args = ["--pcap", SAMPLE, "--pcap", SAMPLE]
    out = str(tmp_path / "o")
    summary = run(*args, "--out", out)
    rows = table(out)
    # every record written is a row
    assert summary["rows_written"]["flows"] == len(rows)
    # every TCP/UDP packet of both copies is in some record (178 of 252 before: records replaced each other)
    assert sum(n for _fk, n in rows) == 2 * sum(once.values())
    # one flow key per tshark stream, each carrying both copies' packets of that stream
    assert per_flowkey(rows) == sorted(2 * n for n in once.values())


def test_schema1_database_keeps_rows_and_appends(tmp_path):
    """A database written by schema 1 (flows keyed by (flowkey, first_ts)) is rebuilt on --append: its rows
    stay, and a replay of the same capture adds its records instead of replacing them."""
    out = str(tmp_path / "o")
    first = run("--pcap", SAMPLE, "--out", out)
    path = os.path.join(out, "luaprobe.sqlite")
    db = sqlite3.connect(path)
    cols = [r[1] for r in db.execute("PRAGMA table_info(flows)") if r[1] != "id"]
    db.executescript(f"""
        CREATE TABLE old AS SELECT {", ".join(cols)} FROM flows;
        DROP TABLE flows;
        CREATE TABLE flows ({", ".join(c + (" TEXT NOT NULL" if c == "flowkey" else "") for c in cols)},
                            PRIMARY KEY (flowkey, first_ts));
        INSERT INTO flows SELECT * FROM old; DROP TABLE old; DROP INDEX IF EXISTS flows_flowkey;
        UPDATE meta SET value = '1' WHERE key = 'schema_version';""")
    before = sorted(db.execute("SELECT flowkey, first_ts, packets_az, packets_za FROM flows").fetchall())
    db.close()
    assert len(before) == first["rows_written"]["flows"]
    second = run("--pcap", SAMPLE, "--out", out, "--append")
    db = sqlite3.connect(path)
    try:
        after = sorted(db.execute("SELECT flowkey, first_ts, packets_az, packets_za FROM flows").fetchall())
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        ids = [r[0] for r in db.execute("SELECT id FROM flows")]
    finally:
        db.close()
    assert len(after) == len(before) + second["rows_written"]["flows"]
    assert sorted(before * 2) == after
    assert len(set(ids)) == len(ids)
