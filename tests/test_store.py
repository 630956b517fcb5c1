"""The output database: the writer process, the read side and `luaprobe query` (real files, real processes)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from luaprobe.engine.store import query
from luaprobe.engine.store.writer import DB_NAME, KINDS, Store, StoreError, StoreNotFound, StoreWriter, SCHEMA_VERSION
from tests import helpers

HOSTS = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}"
MYGROUP = "{A1B2C3D4-0000-4aaa-bbbb-0123456789ab}"           # mixed case on purpose
USER_ALERTS = "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}"
URL_RES = "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}"
METERS = [{"id": 0, "vartype": 0, "topn": 10, "bottomn": 0, "name": "Bytes", "description": "all bytes",
           "units": "Bps"},
          {"id": 1, "vartype": 0, "topn": 10, "bottomn": 0, "name": "Packets", "description": "", "units": "pps"}]


@pytest.fixture
def dbfile(tmp_path):
    return str(tmp_path / DB_NAME)


def write_all(path, **kinds):
    with StoreWriter(path) as w:
        for kind, rows in kinds.items():
            w.write(kind, rows)
        report = w.close()
    return report


def sample(path):
    """One row (or a few) of every kind; returns the writer's report."""
    return write_all(
        path,
        counter_groups=[(MYGROUP.lower(), "My Group", "test group", 60, json.dumps(METERS))],
        counters=[(MYGROUP.lower(), 1_700_000_040, "C0.A8.01.02", 0, 1500),
                  (MYGROUP, 1_700_000_040, "C0.A8.01.02", 1, 1),
                  (HOSTS.lower(), 1_700_000_040, "0A.00.00.01", 0, 2.5)],
        key_info=[(MYGROUP, "C0.A8.01.02", "router", "the gateway")],
        alerts=[(1_700_000_001, 250, USER_ALERTS.lower(), "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016", "sig-1",
                 "policy", 1, "hello\nworld", "ALARM", "alerty.lua")],
        resources=[(1_700_000_002, 5, URL_RES.lower(), "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0050",
                    "http://example.com/", b"\x00\xffbinary", "urls.lua"),
                   (1_700_000_003, 0, URL_RES, None, "GET /x", b"utf8 \xc3\xa9", "urls.lua")],
        flows=[("06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016", 6, "C0.A8.01.02", 2964, "D1.D8.F9.3A", 22,
                1_700_000_000.5, 1_700_000_010.25, 10, 8, 1000, 800, "CLOSED", "ssh", 1234, 0, 2)],
        fts=[(1_700_000_004, 7, "{28217924-e7a5-4523-993c-44b52758d5a8}", "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0050",
              "GET / HTTP/1.1\r\nHost: example.com", "luaprobe")],
        run=[("pcap", json.dumps("x.pcap")), ("stats", json.dumps({"packets": 18}))],
        decl_groups=[("alert", "{aaaaaaaa-1111-2222-3333-444444444444}", "My Alerts", "mine")],
        edges=[(1_700_000_004, "{aaaaaaaa-1111-2222-3333-444444444444}", "ja3", HOSTS.lower(), "C0.A8.01.02",
                "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016", "jahash.lua")],
        flow_toppers=[("Top TCP", 1_700_000_000, 1, "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016", 1800)],
    )


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_every_kind(dbfile):
    report = sample(dbfile)
    assert report["errors"] == [] and report["returncode"] == 0
    assert report["rows"] == {"counter_groups": 1, "counters": 3, "key_info": 1, "alerts": 1, "resources": 2,
                              "fts": 1, "flows": 1, "run": 2, "decl_groups": 1, "edges": 1, "flow_toppers": 1}
    with Store(dbfile) as s:
        assert s.decl_groups() == [{"kind": "alert", "guid": "{AAAAAAAA-1111-2222-3333-444444444444}",
                                    "name": "My Alerts", "description": "mine"}]
        (e,) = s.edges()
        assert (e["s_guid"], e["s_key"], e["t_guid"], e["t_key"]) == (
            "{AAAAAAAA-1111-2222-3333-444444444444}", "ja3", HOSTS, "C0.A8.01.02")
        assert s.flow_toppers("top tcp") == [{"tracker": "Top TCP", "bucket_ts": 1_700_000_000, "rank": 1,
                                              "flowkey": "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016",
                                              "metric": 1800}]
        groups = s.counter_groups()
        assert [(g["guid"], g["name"], g["bucketsize"]) for g in groups] == [(MYGROUP.upper(), "My Group", 60)]
        assert groups[0]["meters"] == METERS
        c = s.counters()
        assert c == [
            {"group_guid": HOSTS, "group_name": "Hosts", "bucket_ts": 1_700_000_040, "key": "0A.00.00.01",
             "label": None, "meter": 0, "meter_name": None, "value": 2.5},
            {"group_guid": MYGROUP.upper(), "group_name": "My Group", "bucket_ts": 1_700_000_040,
             "key": "C0.A8.01.02", "label": "router", "meter": 0, "meter_name": "Bytes", "value": 1500},
            {"group_guid": MYGROUP.upper(), "group_name": "My Group", "bucket_ts": 1_700_000_040,
             "key": "C0.A8.01.02", "label": "router", "meter": 1, "meter_name": "Packets", "value": 1},
        ]
        assert s.key_info() == [{"group_guid": MYGROUP.upper(), "group_name": "My Group", "key": "C0.A8.01.02",
                                 "label": "router", "description": "the gateway"}]
        (a,) = s.alerts()
        assert (a["ts_sec"], a["ts_usec"], a["alert_guid"], a["sigid"], a["classification"], a["priority"],
                a["message"], a["status"], a["plugin"]) == (1_700_000_001, 250, USER_ALERTS, "sig-1", "policy", 1,
                                                             "hello\nworld", "ALARM", "alerty.lua")
        r1, r2 = s.resources()
        assert r1["resource_guid"] == URL_RES and r1["uri"] == "http://example.com/"
        assert r1["contents"] == "\x00\\xffbinary"           # a BLOB: invalid UTF-8 shown escaped by the reader
        assert r2["contents"] == "utf8 é" and r2["flowkey"] is None
        raw = sqlite3.connect(dbfile).execute("SELECT contents FROM resources ORDER BY id").fetchall()
        assert raw == [(b"\x00\xffbinary",), ("utf8 é",)]   # binary kept exactly, valid UTF-8 stored as text
        (f,) = s.flows()
        assert f == {"id": 1, "flowkey": "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016", "proto": 6, "ipa": "C0.A8.01.02",
                     "porta": 2964, "ipz": "D1.D8.F9.3A", "portz": 22, "first_ts": 1_700_000_000.5,
                     "last_ts": 1_700_000_010.25, "packets_az": 10, "packets_za": 8, "bytes_az": 1000,
                     "bytes_za": 800, "state": "CLOSED", "tags": "ssh", "setup_rtt_us": 1234, "retrans_az": 0,
                     "retrans_za": 2}
        assert s.run_info() == {"pcap": "x.pcap", "stats": {"packets": 18}}
        (d,) = s.fts(guid="HTTP Headers")
        assert (d["fts_guid"], d["text"], d["ts_usec"]) == ("{28217924-E7A5-4523-993C-44B52758D5A8}",
                                                            "GET / HTTP/1.1\r\nHost: example.com", 7)


def test_database_is_wal_with_documented_tables(dbfile):
    sample(dbfile)
    db = sqlite3.connect(dbfile)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(KINDS) | {"meta"} <= tables
    doc = open(os.path.join(helpers.REPO, "docs", "schema.md")).read()
    for t in tables:                                    # every table and column is documented
        assert f"`{t}`" in doc, t
        for col in (r[1] for r in db.execute(f"PRAGMA table_info({t})")):
            assert f"`{col}`" in doc, (t, col)


def test_upserts_key_info_groups_run_last_wins_flows_all_kept(dbfile):
    with StoreWriter(dbfile) as w:
        w.write("key_info", [(HOSTS, "K", "old", None)])
        w.write("counter_groups", [(MYGROUP, "Old", "", 30, "[]")])
        w.write("run", [("state", '"running"')])
        w.write("flows", [("F", 6, "A", 1, "Z", 2, 10.0, 11.0, 1, 0, 60, 0, "OPEN", "", None, 0, 0)])
        w.flush(sync=True)
        w.write("key_info", [(HOSTS.lower(), "K", "new", "d")])
        w.write("counter_groups", [(MYGROUP.lower(), "New", "x", 60, "[]")])
        w.write("run", [("state", '"done"'), ("stats", {"packets": 3, "bytes": [1, 2]})])  # non-text: JSON-encoded
        w.write("flows", [("F", 6, "A", 1, "Z", 2, 10.0, 19.0, 5, 4, 300, 200, "CLOSED", "t", 900, 1, 0),
                          ("F", 6, "A", 1, "Z", 2, 50.0, 51.0, 1, 0, 60, 0, "OPEN", "", None, 0, 0)])  # port reuse
        # every flow record is a row (a replayed flow with the same key and first_ts included), in write order
    with Store(dbfile) as s:
        assert [(k["key"], k["label"], k["description"]) for k in s.key_info()] == [("K", "new", "d")]
        assert [(g["name"], g["bucketsize"]) for g in s.counter_groups()] == [("New", 60)]
        assert s.run_info() == {"state": "done", "stats": {"packets": 3, "bytes": [1, 2]}}
        assert [(f["first_ts"], f["last_ts"], f["packets_az"], f["state"], f["setup_rtt_us"], f["retrans_az"])
                for f in s.flows()] == [(10.0, 11.0, 1, "OPEN", None, 0), (10.0, 19.0, 5, "CLOSED", 900, 1),
                                        (50.0, 51.0, 1, "OPEN", None, 0)]
        assert [f["id"] for f in s.flows()] == [1, 2, 3]


def test_older_flows_table_gets_the_added_columns(dbfile):
    """A database written before setup_rtt_us / retrans_az / retrans_za existed: readable (NULL there), and
    opening it for writing (--append, the daemon) adds the columns, keeping the old rows."""
    old = sqlite3.connect(dbfile)
    old.executescript(
        "CREATE TABLE flows (flowkey TEXT NOT NULL, proto INTEGER, ipa TEXT, porta INTEGER, ipz TEXT, portz INTEGER,"
        " first_ts REAL NOT NULL, last_ts REAL, packets_az INTEGER, packets_za INTEGER, bytes_az INTEGER,"
        " bytes_za INTEGER, state TEXT, tags TEXT, PRIMARY KEY (flowkey, first_ts));"
        "INSERT INTO flows VALUES ('F', 6, 'A', 1, 'Z', 2, 10.0, 11.0, 1, 0, 60, 0, 'OPEN', '');")
    for t in ("counters", "counter_groups", "key_info", "alerts", "resources", "run"):
        old.execute(f"CREATE TABLE {t} (x)")
    old.commit()
    old.close()
    with Store(dbfile) as s:
        (f,) = s.flows()
        assert (f["packets_az"], f["setup_rtt_us"], f["retrans_az"], f["retrans_za"]) == (1, None, None, None)
    rc, out, _ = run_query("flows", "--db", dbfile)
    assert rc == 0 and "setup rtt us" in out
    sqlite3.connect(dbfile).executescript("DROP TABLE counters; DROP TABLE counter_groups; DROP TABLE key_info;"
                                          "DROP TABLE alerts; DROP TABLE resources; DROP TABLE run;")
    with StoreWriter(dbfile) as w:
        w.write("flows", [("G", 6, "A", 3, "Z", 2, 20.0, 21.0, 1, 1, 60, 60, "CLOSED", "", 5, 0, 1)])
    with Store(dbfile) as s:
        assert [(f["flowkey"], f["setup_rtt_us"], f["retrans_za"]) for f in s.flows()] == [("F", None, None),
                                                                                            ("G", 5, 1)]


# ------------------------------------------------------------------------------------------------ counters
def test_counter_upsert_sums_partial_flushes(dbfile):
    with StoreWriter(dbfile) as w:
        for part in range(5):                          # five partial flushes of the same bucket
            w.write("counters", [(HOSTS, 60, "K1", 0, 10), (HOSTS.lower(), 60, "K1", 1, 1),
                                 (HOSTS, 120, "K1", 0, part)])
            w.flush(sync=part % 2 == 0)
        w.write("counters", [(HOSTS, 60, "K1", 0, 0.5)])  # float meters add too
    with Store(dbfile) as s:
        got = {(r["bucket_ts"], r["key"], r["meter"]): r["value"] for r in s.counters()}
    assert got == {(60, "K1", 0): 50.5, (60, "K1", 1): 5, (120, "K1", 0): 0 + 1 + 2 + 3 + 4}


def test_guids_case_insensitive_and_group_names(dbfile):
    sample(dbfile)
    with Store(dbfile) as s:
        want = s.counters(group=MYGROUP.upper())
        assert len(want) == 2
        for spelling in (MYGROUP, MYGROUP.lower(), "My Group", "my group", "MY GROUP"):
            assert s.counters(group=spelling) == want, spelling
        # Well-known groups resolve by name even though no script declared them (docs/reference.md "Well-known groups").
        assert [r["key"] for r in s.counters(group="hosts")] == ["0A.00.00.01"]
        assert [r["key"] for r in s.counters(group=HOSTS.lower())] == ["0A.00.00.01"]
        # key_info written with one spelling joins counters written with another.
        assert {r["label"] for r in s.counters(group=MYGROUP)} == {"router"}
        assert len(s.alerts(guid=USER_ALERTS.lower())) == 1 and len(s.alerts(guid="User Alerts")) == 1
        assert len(s.resources(guid=URL_RES.lower())) == 2 and len(s.resources(guid="url")) == 2
        assert s.resources(guid="{00000000-0000-0000-0000-000000000000}") == []
        # filters: key or its label, meter id or name
        assert s.counters(key="ROUTER") == want
        assert [r["meter"] for r in s.counters(group=MYGROUP, meter="packets")] == [1]
        assert [r["meter"] for r in s.counters(group=MYGROUP, meter=0)] == [0]
    # Stored upper-case: plain SQL users see one spelling.
    db = sqlite3.connect(dbfile)
    assert {r[0] for r in db.execute("SELECT group_guid FROM counters")} == {HOSTS, MYGROUP.upper()}


def test_200k_counter_rows_in_batches(dbfile):
    n_buckets, n_keys, n_meters = 20, 2_500, 4          # 200k distinct (bucket, key, meter) rows
    total = 0
    t0 = time.monotonic()
    with StoreWriter(dbfile, batch_rows=5000) as w:
        blocked = 0.0
        for rep in range(2):                            # each row twice: the second pass must add up
            for b in range(n_buckets):
                rows = [(HOSTS, 60 * b, f"K{k:05d}", m, k + m + rep) for k in range(n_keys) for m in range(n_meters)]
                total += sum(r[4] for r in rows)
                t = time.perf_counter()
                w.write("counters", rows)
                blocked += time.perf_counter() - t
        report = w.close()
    assert report["rows"]["counters"] == 2 * n_buckets * n_keys * n_meters and report["errors"] == []
    db = sqlite3.connect(dbfile)
    assert db.execute("SELECT count(*), sum(value) FROM counters").fetchone() == (n_buckets * n_keys * n_meters, total)
    per_meter = dict(db.execute("SELECT meter, sum(value) FROM counters GROUP BY meter"))
    assert per_meter == {m: n_buckets * sum(2 * (k + m) + 1 for k in range(n_keys)) for m in range(n_meters)}
    # The caller mostly appends to lists: far less time than the writer needs for 400k upserts.
    assert blocked < max(2.0, (time.monotonic() - t0) / 2), blocked


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case", ["missing_dir", "parent_is_file", "readonly_dir"])
def test_unwritable_location_error_surfaces_on_close(tmp_path, case):
    if case == "missing_dir":
        path = tmp_path / "no" / "such" / DB_NAME
        hint = "does not exist"
    elif case == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / DB_NAME
        hint = "is not a directory"
    else:
        d = tmp_path / "ro"
        d.mkdir(mode=0o500)
        path = d / DB_NAME
        hint = "not writable"
        if os.geteuid() == 0:          # root writes to a mode 0500 directory: make it a read-only file system
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                              capture_output=True).returncode != 0:
                pytest.skip("root and no mount (CAP_SYS_ADMIN) here: no read-only directory to test with")
    try:
        w = StoreWriter(str(path))
        w.write("counters", [(HOSTS, 0, "K", 0, 1)] * 10_000)   # never blocks or raises mid-run
        w.flush()
        with pytest.raises(StoreError) as ei:
            w.close()
        msg = str(ei.value)
        assert str(path) in msg and "cannot open database" in msg and hint in msg
        assert not path.exists()
    finally:
        if case == "readonly_dir" and os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)


def test_wait_ready_reports_open_failure(tmp_path):
    w = StoreWriter(str(tmp_path / "missing" / DB_NAME))
    with pytest.raises(StoreError, match="cannot open database"):
        w.wait_ready()
    with pytest.raises(StoreError):
        w.close()


def test_bad_rows_are_reported_good_rows_kept(dbfile):
    w = StoreWriter(dbfile)
    w.write("counters", [(HOSTS, 60, "K", 0, 1), (HOSTS, "not-a-time", "K", 0, 1), (HOSTS, 60, "K", 0),
                         (HOSTS, 60, "K", 0, 2), (None, 60, "K", 0, 1)])
    w.write("alerts", [(1, 0, None, None, "s", "c", 1, "m", "ALARM", "p"), (1, 0, USER_ALERTS, None, "s", "c", 1,
                                                                             "m", "ALARM", "p")])
    w.write("counters", [(HOSTS, 60, "K", 0, object())])   # not even encodable: reported by the parent side
    with pytest.raises(StoreError) as ei:
        w.close()
    msg = str(ei.value)
    assert "5 bad row(s)" in msg and "not-a-time" in msg and "expected 5 fields" in msg and "NOT NULL" in msg
    assert "unencodable" in msg
    rep = ei.value.report
    assert rep["rows"]["counters"] == 2 and rep["rows"]["alerts"] == 1
    assert rep["bad_rows"] == {"counters": 3, "alerts": 1, "unencodable": 1}
    with Store(dbfile) as s:
        assert [r["value"] for r in s.counters()] == [3] and len(s.alerts()) == 1
    assert w.rows_lost() == 0        # rejected rows are accounted, not lost (the unencodable one was counted twice: -1)


def test_disk_full_is_fatal_and_reported(dbfile):
    w = StoreWriter(dbfile, max_page_count=40)            # ~160 KiB database: "database or disk is full"
    w.write("counters", [(HOSTS, 0, "K", 0, 1)])
    w.flush(sync=True)
    w.write("resources", [(1, 0, URL_RES, None, f"u{i}", "x" * 4000, "p") for i in range(200)])
    with pytest.raises(StoreError, match="full"):
        w.flush(sync=True)
    w.write("counters", [(HOSTS, 60, "K", 0, 1)] * 100)   # later rows are discarded, not silently
    with pytest.raises(StoreError) as ei:
        w.close()
    assert "full" in str(ei.value) and "discarded" in str(ei.value)
    with Store(dbfile) as s:                              # what was committed before stays readable
        assert [r["value"] for r in s.counters()] == [1]


def test_writer_crash_surfaces_on_close(dbfile):
    w = StoreWriter(dbfile)
    w.wait_ready()
    os.kill(w.pid, signal.SIGKILL)
    helpers.wait_for(lambda: _gone(w.pid), timeout=10)   # a zombie until close() reaps it
    w.write("counters", [(HOSTS, 0, "K", 0, 1)] * 50_000)  # EPIPE is absorbed, not raised in the hot path
    w.flush()
    with pytest.raises(StoreError, match="signal 9"):
        w.close()


def _db_rows(path) -> int:
    """Rows in the database, counted by SQLite itself (the independent truth for rows_lost)."""
    with sqlite3.connect(path) as db:
        return sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("counters", "resources"))


def test_check_sees_a_killed_writer_at_once_and_counts_the_rows_lost(dbfile):
    """Operations "Faults": a writer killed mid-run is seen by the non-blocking check (not only at close), and
    rows_lost = rows handed to the writer - rows SQLite has (failed before: no check, nothing counted)."""
    w = StoreWriter(dbfile)
    w.wait_ready()
    w.write("counters", [(HOSTS, t, "K", 0, 1) for t in range(5000)])
    w.flush(sync=True)
    assert w.check() is None and w.rows_lost() == 0
    w.write("counters", [(HOSTS, t, "K", 1, 1) for t in range(70_000)])   # shipped, partly in an open transaction
    w.flush()
    os.kill(w.pid, signal.SIGKILL)
    why = helpers.wait_for(w.check, timeout=10)
    assert why == f"store writer (pid {w.pid}) was killed by SIGKILL"
    w.write("counters", [(HOSTS, 0, "K", 2, 1)] * 10)     # queued after the death: lost too
    w.close(check=False)
    assert w.rows_lost() == 75_010 - _db_rows(dbfile) and w.rows_lost() >= 10


def test_check_sees_a_full_disk_and_counts_the_rows_lost(dbfile):
    w = StoreWriter(dbfile, max_page_count=40)            # ~160 KiB database: "database or disk is full"
    w.write("counters", [(HOSTS, 0, "K", 0, 1)])
    w.flush(sync=True)
    w.write("resources", [(1, 0, URL_RES, None, f"u{i}", "x" * 4000, "p") for i in range(200)])
    w.flush()
    why = helpers.wait_for(w.check, timeout=10)
    assert why.startswith(f"store writer (pid {w.pid}) failed: ") and "full" in why, why
    w.close(check=False)
    assert _db_rows(dbfile) == 1 and w.rows_lost() == 200


def test_unknown_kind_rejected_at_call(dbfile):
    with StoreWriter(dbfile) as w:
        with pytest.raises(ValueError, match="unknown store kind"):
            w.write("countres", [])


def test_reader_sees_committed_rows_while_writer_runs(dbfile):
    with StoreWriter(dbfile) as w:
        w.write("counters", [(HOSTS, 0, "K", 0, 7)])
        w.flush(sync=True)
        with Store(dbfile) as s:
            assert [r["value"] for r in s.counters()] == [7]
        w.write("counters", [(HOSTS, 0, "K", 0, 1)])


def test_store_missing_and_foreign_files(tmp_path):
    with pytest.raises(StoreNotFound, match=str(tmp_path / "nope.sqlite")):
        Store(str(tmp_path / "nope.sqlite"))
    assert not (tmp_path / "nope.sqlite").exists()
    sqlite3.connect(str(tmp_path / "other.sqlite")).execute("CREATE TABLE t(x)")
    with pytest.raises(StoreError, match="not a luaprobe database"):
        Store(str(tmp_path / "other.sqlite"))


# ------------------------------------------------------------------------------------------------ processes
PARENT = r"""
import sys, time
from luaprobe.engine.store.writer import StoreWriter
w = StoreWriter(sys.argv[1])
w.write("counters", [("{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", 0, "K", 0, 5)])
w.flush(sync=True)
w.write("counters", [("{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", 0, "K", 0, 1)])
w.flush()                      # sent, not acknowledged: the writer commits it when it sees EOF
print(w.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # reparented, waiting for a reaper
    except psutil.NoSuchProcess:
        return True


def test_writer_exits_when_parent_is_killed(dbfile):
    parent = helpers.run_python(PARENT, dbfile, stdout=subprocess.PIPE, text=True)
    try:
        writer_pid = int(parent.stdout.readline())
        assert psutil.Process(writer_pid).ppid() == parent.pid
        parent.kill()
        parent.wait(5)
        helpers.wait_for(lambda: _gone(writer_pid), timeout=10)
    finally:
        parent.kill()
        parent.wait(5)
        parent.stdout.close()
    with Store(dbfile) as s:
        assert [r["value"] for r in s.counters()] == [6]


def test_writer_exits_when_parent_dies_even_if_pipe_is_inherited(dbfile):
    """A forked child keeps the pipe open, so no EOF comes: the parent-pid check still ends the writer."""
    code = PARENT.replace('print(w.pid, flush=True)',
                          'import os\nif os.fork() == 0:\n    time.sleep(60); os._exit(0)\nprint(w.pid, flush=True)')
    parent = helpers.run_python(code, dbfile, stdout=subprocess.PIPE, text=True)
    try:
        writer_pid = int(parent.stdout.readline())
        forked = [p for p in psutil.Process(parent.pid).children() if p.pid != writer_pid]
        parent.kill()
        parent.wait(5)
        helpers.wait_for(lambda: _gone(writer_pid), timeout=10)
    finally:
        parent.kill()
        parent.wait(5)
        parent.stdout.close()
        for p in forked:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_stop_signals_are_ignored(dbfile):
    """SIGINT, SIGHUP and SIGTERM are the fast path's to handle (a signal to the whole process group reaches the
    writer too: Ctrl-C, `timeout`, systemd's control-group stop); the writer goes on until the parent closes the
    pipe.  Before, SIGTERM ended it at once ("commits and exits"): in a run, every row the fast path had not yet
    handed over was lost (tests/test_sighup.py)."""
    w = StoreWriter(dbfile)
    w.write("counters", [(HOSTS, 0, "K", 0, 3)])
    w.flush(sync=True)
    w.write("counters", [(HOSTS, 0, "K", 0, 4)])
    w.flush()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        os.kill(w.pid, sig)
        w.flush(sync=True)                                 # a round trip: the writer ran after the signal ...
        assert psutil.Process(w.pid).status() != psutil.STATUS_ZOMBIE   # ... and is still there
    w.write("counters", [(HOSTS, 0, "K", 0, 5)])
    assert w.close()["returncode"] == 0
    with Store(dbfile) as s:
        assert [r["value"] for r in s.counters()] == [12]


# ------------------------------------------------------------------------------------------------ query CLI
def run_query(*args):
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.store.query", *args], cwd=helpers.REPO, capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def test_query_counters_text(tmp_path, dbfile):
    sample(dbfile)
    rc, out, err = run_query("counters", "--out", str(tmp_path))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["group", "bucket", "(UTC)", "key", "meter", "value"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[-1] == "(3 rows)"
    body = lines[2:-1]
    assert "Hosts" in body[0] and "2023-11-14T22:14:00Z" in body[0] and body[0].endswith("2.5")
    assert "My Group" in body[1] and "C0.A8.01.02 (router)" in body[1] and "0 Bytes" in body[1]
    assert body[1].endswith("1500") and "1 Packets" in body[2]
    # aligned: every column starts at the same offset in every line
    col = lines[0].index("key")
    assert all(line[col - 2:col] == "  " for line in body)
    rc, out, _ = run_query("counters", "--db", dbfile, "--group", "my group", "--limit", "1")
    assert rc == 0 and out.splitlines()[-1] == "(1 row)" and "0 Bytes" in out


def test_query_json_every_kind(tmp_path, dbfile):
    sample(dbfile)
    expect = {"alerts": 1, "resources": 2, "fts": 1, "counters": 3, "flows": 1, "keyinfo": 1, "groups": 1, "run": 2}
    for what, n in expect.items():
        rc, out, err = run_query(what, "--db", dbfile, "--json")
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == n, what
    rc, out, _ = run_query("counters", "--db", dbfile, "--json", "--key", "router", "--group", MYGROUP.lower())
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["group_name"], r["key"], r["label"], r["meter_name"], r["value"]) for r in rows] == [
        ("My Group", "C0.A8.01.02", "router", "Bytes", 1500), ("My Group", "C0.A8.01.02", "router", "Packets", 1)]
    rc, out, _ = run_query("alerts", "--db", dbfile, "--json", "--group", "user alerts")
    (a,) = [json.loads(line) for line in out.splitlines()]
    assert a["message"] == "hello\nworld" and a["alert_guid"] == USER_ALERTS


def test_query_text_other_kinds(dbfile):
    sample(dbfile)
    rc, out, _ = run_query("alerts", "--db", dbfile)
    assert rc == 0 and "2023-11-14T22:13:21.000250Z" in out and "hello\\nworld" in out and "(1 row)" in out
    rc, out, _ = run_query("resources", "--db", dbfile, "--group", URL_RES.lower())
    assert rc == 0 and "http://example.com/" in out and "(2 rows)" in out
    rc, out, _ = run_query("flows", "--db", dbfile)
    assert rc == 0 and "C0.A8.01.02:2964" in out and "2023-11-14T22:13:20.500000Z" in out
    rc, out, _ = run_query("keyinfo", "--db", dbfile)
    assert rc == 0 and "router" in out and "the gateway" in out


def test_query_missing_database(tmp_path):
    missing = tmp_path / "nothing-here"
    rc, out, err = run_query("alerts", "--out", str(missing))
    assert rc == 3 and out == ""
    assert str(missing / DB_NAME) in err and "no luaprobe database" in err
    assert not missing.exists()
    assert query.main(["counters", "--db", str(tmp_path / "x.sqlite")]) == 3


def test_query_main_in_process(dbfile, capsys):
    sample(dbfile)
    assert query.main(["counters", "--db", dbfile, "--json", "--limit", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(SystemExit) as ei:
        query.main(["bogus"])
    assert ei.value.code == 2


def _open_when_set(path, ev):
    from luaprobe.engine.store.writer import open_rw
    ev.wait()
    open_rw(path).close()


def test_writers_opening_one_new_database_at_once_all_succeed(tmp_path):
    """The shards of a run open the same new database at the same moment: every open succeeds (the WAL switch,
    for which SQLite calls no busy handler, and the schema in one immediate transaction wait for each other;
    before, about 1 open in 120 failed with 'database is locked')."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for i in range(20):
        path, ev = str(tmp_path / f"db{i}.sqlite"), ctx.Event()
        procs = [ctx.Process(target=_open_when_set, args=(path, ev)) for _ in range(6)]
        for p in procs:
            p.start()
        ev.set()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6, i
        con = sqlite3.connect(path)
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()


def test_query_json_tells_blob_from_text(dbfile):
    """`luaprobe query --json`: a BLOB (a script's non-UTF-8 string) is {"hex": ...} of its bytes, a TEXT value a
    JSON string, so the 1-byte BLOB 0xFF and the 4-character text '\\xff' differ (both printed "\\\\xff" before).
    Truth: SQLite's own typeof() and hex() of the stored values."""
    with StoreWriter(dbfile) as w:
        w.write("counters", [(HOSTS, 60, b"\xff", 0, 1), (HOSTS, 60, "\\xff", 0, 2), (HOSTS, 60, b"\x00a\xfe", 0, 3)])
        w.write("resources", [(1, 0, URL_RES, None, b"GET \xff", "\\xff", "p"),
                              (2, 0, URL_RES, None, "GET /", b"\xff", "p")])
        w.write("alerts", [(1, 0, USER_ALERTS, None, b"sig\xff", None, 1, b"m\xc3", "ALARM", "p")])
    raw = sqlite3.connect(dbfile)
    truth = {}
    for table, cols in (("counters", ("key",)), ("resources", ("uri", "contents")), ("alerts", ("sigid", "message"))):
        for row in raw.execute(f"SELECT {', '.join(f'typeof({c}), hex({c})' for c in cols)} FROM {table}"):
            for typ, hx in zip(row[::2], row[1::2]):
                if typ == "blob":
                    truth.setdefault(table, []).append({"hex": hx.lower()})
                else:
                    truth.setdefault(table, []).append(bytes.fromhex(hx).decode("utf-8"))
    got = {}
    for what, table, cols in (("counters", "counters", ("key",)), ("resources", "resources", ("uri", "contents")),
                              ("alerts", "alerts", ("sigid", "message"))):
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "query", what, "--db", dbfile, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            row = json.loads(line)
            got.setdefault(table, []).extend(row[c] for c in cols)
    assert sorted(map(json.dumps, got["counters"])) == sorted(map(json.dumps, truth["counters"]))
    assert got["resources"] == truth["resources"] and got["alerts"] == truth["alerts"]
    assert {"hex": "ff"} in got["counters"] and "\\xff" in got["counters"]
    with Store(dbfile) as s:                      # the default reader keeps its escaped text
        assert sorted(r["key"] for r in s.counters()) == ["\x00a\\xfe", "\\xff", "\\xff"]
    with Store(dbfile, blobs="bytes") as s:
        assert sorted(r["key"] for r in s.counters() if isinstance(r["key"], bytes)) == [b"\x00a\xfe", b"\xff"]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_writer_survives_a_terminal_signal_during_its_startup(dbfile, sig):
    """A hangup or Ctrl-C to the process group is the fast path's to handle (a graceful stop), also while the
    writer's interpreter is still starting: it is born with those signals blocked and ignores them once serving.
    The signal is sent right after Popen returned (the writer's Python start-up takes tens of ms), then rows are
    written and committed: the writer must still be there and report every row."""
    with StoreWriter(dbfile) as w:
        os.kill(w.pid, sig)
        w.write("alerts", [(1_700_000_001, 0, USER_ALERTS, "", "k", "", 1, "m", "", "t.lua")])
        report = w.close()
    assert report["errors"] == [] and report["returncode"] == 0 and report["rows"]["alerts"] == 1, report
    with sqlite3.connect(dbfile) as db:
        assert db.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1


def _flow(i: int, **kw) -> tuple:
    """A flows row (writer.FLOW_COLUMNS order) with values of every documented type, numbered i."""
    row = dict(flowkey=f"06A:0A.00.00.{i % 256:02X}:p-{i:04X}_0A.00.00.FE:p-0050", proto=6, ipa=f"0A.00.00.{i % 256:02X}",
               porta=i, ipz="0A.00.00.FE", portz=80, first_ts=1.7e9 + i / 3, last_ts=1.7e9 + i, packets_az=i,
               packets_za=2 ** 40 + i, bytes_az=60 * i, bytes_za=0, state="CLOSED" if i % 2 else "OPEN",
               tags="" if i % 3 else "NAT RST", setup_rtt_us=None if i % 2 else 1000 + i, retrans_az=i % 5,
               retrans_za=0)
    row.update(kw)
    return tuple(row.values())


def _flows_table(path) -> list[tuple]:
    """Every flows row with each value's SQLite storage class, in id order."""
    cols = ", ".join(f"{c}, typeof({c})" for c in ("id", "flowkey", "proto", "ipa", "porta", "ipz", "portz",
                                                   "first_ts", "last_ts", "packets_az", "packets_za", "bytes_az",
                                                   "bytes_za", "state", "tags", "setup_rtt_us", "retrans_az",
                                                   "retrans_za"))
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT {cols} FROM flows ORDER BY id").fetchall()
    finally:
        db.close()


def test_built_flow_rows_are_stored_as_checked_rows_in_write_order(tmp_path):
    """Rows written ``built`` (the engine's flow export: no per-row check, no savepoint in the writer) end up
    exactly as the same rows through the checked path -- values, storage classes and ids in write order, built
    and checked batches interleaved (the truth: the second database, written all checked)."""
    rows = [_flow(i) for i in range(5000)]
    parts = [(rows[:10], False), (rows[10:3000], True), (rows[3000:3001], False), (rows[3001:], True)]
    with StoreWriter(str(tmp_path / "a.sqlite"), batch_rows=512) as w:
        for part, built in parts:
            w.write("flows", part, built=built)
        report = w.close()
    assert report["rows"]["flows"] == 5000 and not report["errors"]
    write_all(str(tmp_path / "b.sqlite"), flows=rows)
    got = _flows_table(tmp_path / "a.sqlite")
    assert got == _flows_table(tmp_path / "b.sqlite")
    assert [r[0] for r in got] == list(range(1, 5001)) and got[0][2] == rows[0][0]


def test_a_bad_built_row_is_rejected_alone(dbfile):
    """Built rows cannot fail by construction; should one fail all the same (here a NULL flowkey: NOT NULL), the
    rows before it stay in once (no savepoint to roll back to), it is reported, and the rows after it are
    written: the same table and report as the checked path gives."""
    rows = [_flow(i) for i in range(300)]
    rows[150] = _flow(150, flowkey=None)
    w = StoreWriter(dbfile)
    w.write("flows", rows, built=True)
    report = w.close(check=False)
    assert report["rows"]["flows"] == 299 and report["bad_rows"] == {"flows": 1}
    assert "NOT NULL constraint failed: flows.flowkey" in report["errors"][0]
    got = _flows_table(dbfile)
    assert [r[2] for r in got] == [r[0] for r in rows if r[0] is not None]
    assert [r[0] for r in got] == list(range(1, 300))


#: flow_topper_parts rows of one writer of the race below: RANKS per bucket, 20 buckets
RANKS = 1000


def _rank_then_close_together(path, k, together, q):
    """A shard's writer: parts of flowtracker buckets (ranked in the store: queries flow_topper_parts) and
    counters, all committed (flush(sync=True)); then it waits at the barrier ``together`` for the other writers
    and closes; puts 'ok' or the error on ``q``."""
    w = StoreWriter(path)
    for b in range(20):
        w.write("flow_toppers", [("T", b * 10, r, f"fk{k}-{r}", RANKS + 1 - r, k, 3) for r in range(1, RANKS + 1)])
        w.write("counters", [(HOSTS, b * 10, f"k{k}", 0, 1)])
    w.flush(sync=True)
    together.wait(60)
    try:
        w.close()
        q.put("ok")
    except StoreError as e:
        q.put(str(e))


def test_writers_closing_one_database_at_once_all_succeed(tmp_path):
    """The shards of a run close their writers on one database at the same moment: every close succeeds.  Before,
    the close's PRAGMA optimize (which analyses flow_topper_parts, queried by the ranking) ran in autocommit, read
    then upgraded to a write, and failed at once with 'database is locked' when another writer committed in
    between (SQLITE_BUSY_SNAPSHOT: no busy handler): 2 of 30 rounds of 3 writers, a shard dead at the end of its
    run (test_shard_summary.py, --shards 3).  Truth: SQLite's own refusal, in real processes.

    The old race test (60 rounds of 3 writers of 60 rows each, closed when an event was set) met that refusal in
    0-3 of 60 rounds with the old optimize put back (2026-12-02, session 22).  Here each round's writers have
    committed everything and wait at one barrier, and each close analyses 20 000 rows (RANKS): with the old
    optimize 46 of 46 rounds failed (3 runs), so 6 rounds suffice."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for i in range(6):
        path, together, q = str(tmp_path / f"db{i}.sqlite"), ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_rank_then_close_together, args=(path, k, together, q)) for k in range(3)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert results == ["ok"] * 3, (i, results)
        con = sqlite3.connect(path)
        assert con.execute("SELECT COUNT(*) FROM flow_toppers").fetchone()[0] == 20 * 3
        con.close()


def test_writer_holds_the_claim_it_is_given_and_refuses_without_it(tmp_path):
    """``StoreWriter(lock_fd=...)``: the writer process inherits the output directory's claim (usage.OutClaim) and
    holds it while it lives: a second claim of the directory is refused while only the writer holds it (this
    process's descriptor closed), and free again once the writer has exited.  A descriptor that is not an open
    directory is a fatal open error naming it, nothing written."""
    from luaprobe.engine.daemon.usage import UsageError, claim_out_dir
    out = str(tmp_path / "o")
    claim = claim_out_dir(out)
    w = StoreWriter(os.path.join(out, DB_NAME), lock_fd=claim.fd)
    w.wait_ready()
    claim.release()                                  # this process's descriptor gone: the writer's alone holds it
    with pytest.raises(UsageError, match="is writing into it now"):
        claim_out_dir(out).release()
    w.write("run", [("k", "v")])
    assert w.close()["rows"]["run"] == 1
    claim_out_dir(out).release()                     # the writer has exited: free
    with open(tmp_path / "f", "w") as f:
        w = StoreWriter(str(tmp_path / "x.sqlite"), lock_fd=f.fileno())
        with pytest.raises(StoreError, match=rf"lock \(descriptor {f.fileno()}\) is not a directory"):
            w.close()
    assert not os.path.exists(tmp_path / "x.sqlite")
