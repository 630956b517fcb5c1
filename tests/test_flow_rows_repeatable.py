"""Same capture, same rows, whatever the batching (issue 10: "same file, same result, every run").

Flow expiry (idle and active timeout, engine/fastpath/flowtable.lua expire) runs at each new second of packet time,
before the second's first packet (engine/fastpath/driver.lua fill, tick_first).  It ran after the second's first
batch: so where an active timeout cut a flow, and which new flows a full table took, depended on how many of the
second's packets that first batch held (--batch 1: one; the default: up to 1 024).

Independent truth: a Python model of the capture built here (tests/pktbuild.py, struct), UDP only: at each new
second S of packet time (a second holding a packet) every record with S - last > idle or S - first > active ends
(TIMEOUT) and frees its place; then the packet: a record silent for longer than idle ends (TIMEOUT) and a new one
starts in place; a new 5-tuple takes a place when fewer than capacity records are live, else it is dropped
(flow_table_full_drops).  Records live at the end are OPEN.  The run's flows table must hold exactly the model's
rows, and its summary the model's drops and record count, with --batch 1, 7, the default and 1024 (and --shards 2
where the table does not fill: the capacity is per shard).
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers
from tests.pktbuild import ether, ipv4, udp, write_pcap

T0 = 1700000000
IDLE, ACTIVE, CAP = 2, 5, 1024


def gen():
    """[(ts, frame, key, side)] in time order: key (client address, client port); side 0: client -> server (the
    client's port is the higher: the A end)."""
    pk = []

    def add(t, i, side=0, n=20):
        cl, port = f"10.3.{i >> 8}.{i & 255}", 40000 + i % 20000
        src, dst, sp, dp = (cl, "10.9.0.1", port, 53) if side == 0 else ("10.9.0.1", cl, 53, port)
        pk.append((round(t * 1e6) / 1e6, ether(ipv4(src, dst, 17, udp(src, dst, sp, dp, bytes(n)))), (cl, port), side))

    # second 0: 1 200 new flows in 0.6 s, more than the capacity
    for i in range(1200):
        add(T0 + 0.0002 + i * 0.0005, i, 0, 10 + i % 50)
    # every third of them answers at 2.x (live when second 3 opens), the rest are idle then (3 - last > 2)
    for i in range(0, 1200, 3):
        add(T0 + 2.1 + i * 0.0004, i, 1, 30)
    # second 3 opens with new flows: they find the places expiry freed at 3 only if it ran before them; some live flows
    # send before them and between them (they take their place in the LRU list then: the order of the rows)
    for j in range(800):
        add(T0 + 3.0001 + j * 0.0004, 5000 + j, 0, 12)
    for i in range(0, 60, 3):
        add(T0 + 3.00002 + i * 0.000001, i, 0, 15)
    for i in range(60, 600, 3):
        add(T0 + 3.0003 + i * 0.0004, i, 0, 15)
    # one long flow, a packet every 0.3 s for 20 s: the active timeout cuts it at whole seconds
    for k in range(67):
        add(T0 + 0.05 + 0.3 * k, 9000, k % 2, 100)
    # its own second 21: everything not refreshed is idle
    add(T0 + 21.5, 9001)
    pk.sort(key=lambda p: p[0])
    return pk


def model(packets, cap, order=False):
    """The rows {(client address, client port, first µs): (last µs, packets a->z, z->a, bytes a->z, z->a, state)}
    and the drops of the documented expiry and admission (module doc).  ``order``: also each row's place in the order
    one fast path writes them (its flows ``id``, 1-based): at each tick the rows of records a silence ended in the
    packet loop since the last tick, in packet order, then the idle ones in LRU order (the second of the flow's last
    packet; in it, the flows moved there before those created there, each by the packet that placed them), then the
    active ones in creation
    order (a record started again in place counts as created then); at the end of input the records left, in LRU
    order (engine/fastpath/flowtable.lua "LRU list", "Expiry"; driver.lua expire, flush_flows)."""
    live, rows, drops, tick, pend = {}, [], 0, None, []

    def end(r, state):
        return (*r["key"], r["first"], r["last"], *r["p"], *r["b"], state)

    def new(key, us, i):
        return dict(key=key, first=us, last=us, p=[0, 0], b=[0, 0], lsec=us // 1000000, lseq=(1, i), aseq=i)

    for i, (ts, fr, key, side) in enumerate(packets):
        s = math.floor(ts)
        if tick is None or s > tick:
            idle = sorted((r for r in live.values() if s - r["last"] / 1e6 > IDLE), key=lambda r: (r["lsec"], r["lseq"]))
            active = sorted((r for r in live.values() if not s - r["last"] / 1e6 > IDLE and s - r["first"] / 1e6 > ACTIVE),
                            key=lambda r: r["aseq"])
            rows.extend(pend)
            pend = []
            for r in idle + active:
                rows.append(end(live.pop(r["key"]), "TIMEOUT"))
            tick = s
        us = round(ts * 1e6)
        r = live.get(key)
        if r is not None and us - r["last"] > IDLE * 1e6:
            pend.append(end(r, "TIMEOUT"))
            r = live[key] = dict(new(key, us, i), lsec=r["lsec"], lseq=r["lseq"])   # in place: no admission
        if r is None:
            if len(live) >= cap:
                drops += 1
                continue
            r = live[key] = new(key, us, i)
        if s > r["lsec"]:
            r["lsec"], r["lseq"] = s, (0, i)
        r["last"] = us
        r["p"][side] += 1
        r["b"][side] += len(fr)
    rows.extend(pend)
    rows.extend(end(r, "OPEN") for r in sorted(live.values(), key=lambda r: (r["lsec"], r["lseq"])))
    out = {(a, p, f): tuple(rest) for a, p, f, *rest in rows}
    if order:
        return out, drops, {(a, p, f): n for n, (a, p, f, *_rest) in enumerate(rows, 1)}
    return out, drops


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    packets = gen()
    path = str(tmp_path_factory.mktemp("rows") / "full.pcap")
    write_pcap(path, [(t, fr) for t, fr, _k, _s in packets])
    return path, packets


def run(tmp_path, pcap, name, *extra):
    """`luaprobe run` as a user runs it: the flows table as model rows (and the ids by row), the summary."""
    out = tmp_path / name
    plugin = helpers.write_plugin(tmp_path, "", "empty.lua")
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    r = subprocess.run([exe, "run", plugin, "--pcap", pcap, "--out", str(out), "-q", "--stats-json",
                        str(out) + ".json", "--idle-timeout", str(IDLE), "--active-timeout", str(ACTIVE), *extra],
                       capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        got = c.execute("SELECT id, ipa, porta, first_ts, last_ts, packets_az, packets_za, bytes_az, bytes_za, state "
                        "FROM flows").fetchall()
    rows, ids = {}, {}
    for fid, ipa, porta, first, last, *rest in got:
        addr = ".".join(str(int(x, 16)) for x in ipa.split("."))
        key = (addr, porta, round(first * 1e6))
        assert key not in rows, key
        rows[key] = (round(last * 1e6), *rest)
        ids[key] = fid
    with open(str(out) + ".json") as f:
        return rows, ids, json.load(f)


def test_capture_fills_the_table_and_cuts_the_long_flow(capture):
    """The capture tests what it should: drops in second 0, and the places second 3's new flows need are free only
    after expiry at 3 (some are still dropped); the long flow is cut by the active timeout several times."""
    _, packets = capture
    rows, drops = model(packets, CAP)
    opened = [k for k in rows if k[2] >= (T0 + 3) * 1e6 and k[2] < (T0 + 4) * 1e6]
    assert drops > 176 and len(opened) > 500
    assert sum(k[1] == 49000 for k in rows) >= 3


BATCHES = [(), ("--batch", "1"), ("--batch", "7"), ("--batch", "1024")]
BATCH_IDS = ["default", "batch1", "batch7", "batch1024"]


@pytest.mark.parametrize("extra", BATCHES, ids=BATCH_IDS)
def test_full_table_admits_what_the_model_admits(tmp_path, capture, extra):
    path, packets = capture
    want, drops = model(packets, CAP)
    got, _ids, summary = run(tmp_path, path, "out", "--flow-capacity", str(CAP), *extra)
    assert summary["flow_table_full_drops"] == drops
    assert summary["flows"] == len(want)
    missing, extra_rows = sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5]
    assert not missing and not extra_rows, (len(got), len(want), missing, extra_rows)
    bad = [(k, got[k], want[k]) for k in sorted(want) if got[k] != want[k]]
    assert not bad, (len(bad), bad[:5])


@pytest.mark.parametrize("extra", BATCHES + [("--shards", "2")], ids=BATCH_IDS + ["shards2"])
def test_active_timeout_cuts_at_whole_seconds(tmp_path, capture, extra):
    """The default capacity (the table never fills): every row, the long flow's active-timeout cuts included."""
    path, packets = capture
    want, drops = model(packets, 1 << 30)
    assert drops == 0
    got, _ids, summary = run(tmp_path, path, "out", *extra)
    assert summary["flow_table_full_drops"] == 0 and summary["flows"] == len(want)
    bad = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
    assert not bad, (len(bad), [(k, got.get(k), want.get(k)) for k in bad[:5]])


@pytest.mark.parametrize("extra", BATCHES, ids=BATCH_IDS)
def test_ids_number_rows_in_the_order_one_fast_path_writes_them(tmp_path, capture, extra):
    """The flows ``id`` (SQLite numbers the rows in the order they are written) with a full table: the model's order,
    whatever --batch.  A batch's new flows entered the LRU list before the known flows its packets moved there, so the
    rows of flows that ended together came out in an order that followed the batches."""
    path, packets = capture
    want, _drops, want_ids = model(packets, CAP, order=True)
    got, ids, _summary = run(tmp_path, path, "out", "--flow-capacity", str(CAP), *extra)
    assert got == want
    bad = sorted((want_ids[k], ids[k], k) for k in want if ids[k] != want_ids[k])
    assert not bad, (len(bad), bad[:5])



def test_sharded_ids_are_the_same_on_every_run(tmp_path, capture):
    """--shards 2: shard k numbers its rows base + j * 2 + k + 1 (engine/store/writer.py _Writer._flow_ids), so each
    row's id is the same on every run and with any --batch; the rows themselves are those of one fast path.  A second
    run appended to the same database numbers its rows after the first run's."""
    path, packets = capture
    want, _drops = model(packets, 1 << 30)
    runs = [run(tmp_path, path, f"out{i}", "--shards", "2", *extra)
            for i, extra in enumerate([(), ("--batch", "1"), ()])]
    for got, ids, _summary in runs:
        assert got == want
        assert ids == runs[0][1]
    ids = sorted(runs[0][1].values())
    assert len(set(ids)) == len(ids) and ids[0] >= 1 and ids[-1] <= 2 * len(ids) + 1
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    plugin = helpers.write_plugin(tmp_path, "", "empty.lua")
    r = subprocess.run([exe, "run", plugin, "--pcap", path, "--out", str(tmp_path / "out0"), "-q", "--append",
                        "--shards", "2", "--idle-timeout", str(IDLE), "--active-timeout", str(ACTIVE)],
                       capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{tmp_path / 'out0' / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        again = [x[0] for x in c.execute("SELECT id FROM flows ORDER BY id")]
    assert again[:len(ids)] == ids and len(again) == 2 * len(ids)
    assert [i - ids[-1] for i in again[len(ids):]] == ids


def test_analyser_items_do_not_follow_the_batches(tmp_path):
    """The built-in HTTP analyser's rows (URL resources, HTTP-header documents) with a short idle timeout: the same with
    --batch 1, the default and 1024.  Its reassembly's idle expiry (every 10 s of packet time) ran at the end of a batch
    and stamped what it completed with the batch's last TCP packet: keep-alive requests' rows 0.1 s apart between
    --batch 1 and the default (engine/analysers/run.lua run_batch)."""
    pcap = os.path.join(helpers.PCAPS, "http-website-keepalive.pcap")
    plugin = helpers.write_plugin(tmp_path, "", "empty.lua")
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    got = []
    for i, extra in enumerate([("--batch", "1"), (), ("--batch", "1024")]):
        out = tmp_path / f"a{i}"
        r = subprocess.run([exe, "run", plugin, "--analysers", "http", "--pcap", pcap, "--out", str(out), "-q",
                            "--idle-timeout", "2", *extra], capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
        assert r.returncode == 0, r.stderr
        with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
            got.append((sorted(c.execute("SELECT ts_sec, ts_usec, resource_guid, flowkey, uri, contents FROM resources")),
                        sorted(c.execute("SELECT ts_sec, ts_usec, fts_guid, flowkey, text FROM fts"))))
    assert len(got[0][0]) > 20 and len(got[0][1]) > 40
    assert got[1] == got[0] and got[2] == got[0]
