"""Idle expiry is exact whatever the batching: a flow silent for longer than idle_timeout has ended (state TIMEOUT,
docs/schema.md `flows`) and the next packet of its 5-tuple starts a new row, even when that packet is in the same
batch as the silence's end (engine/fastpath/flowtable.lua "Idle expiry in the packet loop").  Between-batch
expiry alone ran at whole packet-time seconds, so a silence of up to idle_timeout + 1 s could stay inside a row.

Independent truth: a Python model of the capture built here (tests/pktbuild.py, struct): each 5-tuple's packets
split at every gap > idle_timeout; per row the packets and bytes (frame length) per direction, first/last
packet time and the final state (TIMEOUT for a row a silence ended, RESET for each 5-tuple's last row, which ends
with a RST, so that no row's state depends on which packets a shard saw after it).  The same rows are required
with --batch 1, the default batch (1024) and --shards 2."""
from __future__ import annotations

import glob
import os
import random
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers
from tests.pktbuild import ACK, PSH, RST, ether, ipv4, tcp, write_pcap

IDLE = 1.0
T0 = 1700000000.0
# gaps (s) between consecutive packets of a 5-tuple: just below and just above the idle timeout, and small ones;
# none within 10 ms of it (pcap times are whole µs)
GAPS = [0.05, 0.3, 0.9, 0.95, 0.98, 1.02, 1.05, 1.3, 1.9, 2.6]


def gen(seed: int, flows: int = 60):
    """(frames [(ts, frame)] in time order, model rows {(porta, first_us): row}) for `flows` TCP 5-tuples
    (client 10.1.x.y:40000+i -> 10.2.0.1:80, so the client is the A end: higher port)."""
    rng = random.Random(seed)
    frames, rows = [], {}
    for i in range(flows):
        cl, sv, cport = f"10.1.{i // 200}.{i % 200 + 1}", "10.2.0.1", 40000 + i
        seq = [rng.randrange(2**32), rng.randrange(2**32)]
        t = T0 + rng.uniform(0, 3)
        npk = rng.randrange(6, 16)
        cur = None
        last_us = None
        for k in range(npk):
            if k:
                t += rng.choice(GAPS) + rng.uniform(0, 0.003)
            us = round(t * 1e6)
            side = rng.randrange(2)                     # 0: client -> server (A->Z), 1: server -> client
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            flags = (RST | ACK) if k == npk - 1 else (PSH | ACK if data else ACK)
            src, dst, sp, dp = (cl, sv, cport, 80) if side == 0 else (sv, cl, 80, cport)
            fr = ether(ipv4(src, dst, 6, tcp(src, dst, sp, dp, seq[side], seq[1 - side], flags, data)))
            seq[side] += len(data)
            frames.append((us / 1e6, fr))
            if cur is None or us - last_us > IDLE * 1e6:
                if cur is not None:
                    cur["state"] = "TIMEOUT"
                cur = rows[(cport, us)] = dict(first=us, last=us, p=[0, 0], b=[0, 0], state=None)
            cur["last"] = us
            cur["p"][side] += 1
            cur["b"][side] += len(fr)
            last_us = us
        cur["state"] = "RESET"
    frames.sort(key=lambda f: f[0])
    model = {k: (r["first"], r["last"], r["p"][0], r["p"][1], r["b"][0], r["b"][1], r["state"]) for k, r in rows.items()}
    return frames, model


# an sg_monitor (Trisul's flow hooks, engine/plugins/flowmon.lua) logging each record it is shown: every record a
# silence ended must reach it as a flow of its own, as a record the between-batch expiry ended does
SG = r'''
local OUT = OUTPATH
TrisulPlugin = {
  id = { name = "idle rows" },
  onload = function() T.f = io.open(OUT .. "." .. tostring({}):match("0x(%x+)"), "w") end,
  sg_monitor = {
    onnewflow = function(engine, flow) T.f:write("new\t", flow:key(), "\n") end,
    onterminate = function(engine, flow) T.f:write("term\t", flow:key(), "\n") end,
    onflush = function(engine, flow)
      local a, b = flow:time_window()
      T.f:write(string.format("flush\t%s\t%.6f\t%.6f\t%d\t%d\t%d\t%d\n", flow:key(), a, b, flow:az_packets(),
                              flow:za_packets(), flow:az_bytes(), flow:za_bytes()))
    end,
  },
  onunload = function() T.f:close() end,
}
'''


def run_rows(tmp_path, pcap: str, name: str, *extra: str) -> tuple[dict, list]:
    """`luaprobe run --idle-timeout 1` as a user runs it, with the SG plug-in; its flows table as the model's rows,
    and the plug-in's log lines (split at tabs)."""
    out = tmp_path / name
    log = str(tmp_path / (name + ".sg"))
    plugin = helpers.write_plugin(tmp_path, SG.replace("OUTPATH", '"' + log + '"'), name + "_sg.lua")
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    r = subprocess.run([exe, "run", plugin, "--pcap", pcap, "--out", str(out), "--idle-timeout", "1", "-q", *extra],
                       capture_output=True, text=True, timeout=300, cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr
    lines = []
    for f in glob.glob(log + ".*"):
        lines += [line.split("\t") for line in open(f).read().splitlines()]
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        got = c.execute("SELECT porta, portz, first_ts, last_ts, packets_az, packets_za, bytes_az, bytes_za, state "
                        "FROM flows").fetchall()
    rows = {}
    for porta, portz, first, last, paz, pza, baz, bza, state in got:
        assert portz == 80
        key = (porta, round(first * 1e6))
        assert key not in rows, key
        rows[key] = (round(first * 1e6), round(last * 1e6), paz, pza, baz, bza, state)
    return rows, lines


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    d = tmp_path_factory.mktemp("idle")
    frames, model = gen(20261201)
    path = str(d / "idle.pcap")
    write_pcap(path, frames)
    return path, model


def test_model_has_silences_on_both_sides_of_the_timeout(capture):
    """The capture tests what it should: many rows ended by a silence, all of it within a few seconds (so the
    silences lie inside batches of the default size), and gaps just under the timeout that must not split."""
    _, model = capture
    assert sum(r[6] == "TIMEOUT" for r in model.values()) > 100
    assert max(r[1] for r in model.values()) - min(r[0] for r in model.values()) < 40e6


@pytest.mark.parametrize("extra", [(), ("--batch", "1"), ("--batch", "1024"), ("--shards", "2")],
                         ids=["default", "batch1", "batch1024", "shards2"])
def test_rows_split_at_every_silence_longer_than_idle_timeout(tmp_path, capture, extra):
    path, model = capture
    got, lines = run_rows(tmp_path, path, "out", *extra)
    missing = sorted(set(model) - set(got))[:5]
    extra_rows = sorted(set(got) - set(model))[:5]
    assert not missing and not extra_rows, (len(got), len(model), missing, extra_rows)
    bad = [(k, got[k], model[k]) for k in sorted(model) if got[k] != model[k]]
    assert not bad, (len(bad), bad[:5])
    # the plug-in side: one onnewflow, one onterminate and one onflush per record, with the record's counters
    assert sum(x[0] == "new" for x in lines) == sum(x[0] == "term" for x in lines) == len(model)
    flushed = sorted((round(float(x[2]) * 1e6), round(float(x[3]) * 1e6), *map(int, x[4:8])) for x in lines
                     if x[0] == "flush")
    assert flushed == sorted(r[:6] for r in model.values())
