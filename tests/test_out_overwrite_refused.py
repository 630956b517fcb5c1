"""`--overwrite` removes the earlier run's database only once the new run has passed every check (docs/schema.md).

Before (found by a newcomer's pass, session 30): `check_out_dir` unlinked `luaprobe.sqlite` when it claimed `--out`,
and a dozen checks came after it (the analysers' names, `--interface`, `--bpf`, `--speed`, `--user` / `--group`, the
ray backend, `--file-root`, a plug-in directory with no plug-in).  A run refused by one of them said so in one line,
exit 2 or 4, and the earlier results were gone.  The truth here is the database file's own bytes (SHA-256) before
and after the refused run, and a read of its rows by Python's sqlite3.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sqlite3

import pytest

from tests.test_usage import PLUGIN, SAMPLE, luaprobe, one_line

# (extra arguments in place of `--pcap SAMPLE` or beside it, exit code, a fragment of the one line)
REFUSED_LATE = [
    (["--pcap", SAMPLE, "--analysers", "bogus"], 2, "unknown analyser 'bogus'"),
    (["--interface", "nosuch0lp"], 2, "--interface nosuch0lp: no such network interface"),
    (["--pcap", SAMPLE, "--bpf", "tcp"], 2, "--bpf needs --interface"),
    (["--generate", "packets=10", "--speed", "5"], 2, "--speed needs --pcap"),
    (["--pcap", SAMPLE, "--user", "nosuchuser-lp"], 2, "--user nosuchuser-lp"),
    (["--pcap", SAMPLE, "--group", "root"], 2, "--group root"),
    (["--pcap", SAMPLE, "--file-root", "/nonexistent-lp"], 2, "/nonexistent-lp"),
]
if importlib.util.find_spec("ray") is None:
    REFUSED_LATE.append((["--pcap", SAMPLE, "--async-backend", "ray"], 2, "--async-backend ray"))


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _counters(db: str) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT sum(value) FROM counters").fetchone()[0]


@pytest.fixture
def earlier_run(tmp_path):
    out = str(tmp_path / "out")
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q").returncode == 0
    db = os.path.join(out, "luaprobe.sqlite")
    assert _counters(db) > 0
    return out, db, _sha(db)


@pytest.mark.parametrize("extra,code,fragment", REFUSED_LATE, ids=[" ".join(c[0][2:] or c[0]) for c in REFUSED_LATE])
def test_a_run_refused_after_claiming_out_keeps_the_earlier_database(earlier_run, extra, code, fragment):
    out, db, sha = earlier_run
    r = luaprobe("run", PLUGIN, "--out", out, "-q", "--overwrite", *extra)
    one_line(r, code, fragment)
    assert _sha(db) == sha                                 # the earlier results, byte for byte
    assert _counters(db) > 0


def test_a_plugin_directory_without_plugins_keeps_the_earlier_database(earlier_run, tmp_path):
    out, db, sha = earlier_run
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    r = luaprobe("run", str(empty), "--pcap", SAMPLE, "--out", out, "-q", "--overwrite")
    one_line(r, 4, "no plug-in files found")
    assert _sha(db) == sha


def test_overwrite_that_runs_still_replaces(earlier_run):
    """The other side: a run that starts replaces the earlier database (its rows only, not twice the counts)."""
    out, db, sha = earlier_run
    first = _counters(db)
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q", "--overwrite").returncode == 0
    assert _counters(db) == first
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q", "--append").returncode == 0
    assert _counters(db) == 2 * first
