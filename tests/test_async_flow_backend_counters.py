"""A plug-in VM writes each counter bucket once, also when flow-backend plug-ins (sg_monitor / flowtracker) run and
T.async results arrive in the drain at the end of input (docs/async.md "Time").

Before: with a flow backend active, FastPath._finish took every bucket of every VM (`_collect(None)`, holds ignored)
before the T.async drain; a result that came in the drain reopened its bucket, and the second part of the bucket
was merged into the first by meter type (engine/store/meters.py).  A RUNNING_COUNTER part holds the VM's whole
running total, so the total was counted twice (bucket 1516788081 of trisul-tutorial.pcap: 21 and 26 stored for
13 TCP packets so far, with 1 and 4 workers), and every other key's idle row with it; a DELTA_RATE_COUNTER's second
part took its first sample from the VM's latest bucket.  COUNTER, RATE_COUNTER, AVERAGE, GAUGE, MAXIMUM, MINIMUM
merged exactly even then (deltas, sum and count, later sample, extremes).

Truth, independent of luaprobe: the capture's TCP packets and times read with ``struct``
(test_async_time.packet_times_us; tshark -r trisul-tutorial.pcap -Y tcp | wc -l: 1043); the plug-in schedules one
task per TCP packet (k = 1..1043 in capture order) and its onresult feeds every meter type, whose values per
1-second bucket are computed here from the T.K.vartype definitions (docs/plugins.md "Counters").
"""
from __future__ import annotations

import collections
import os
import sqlite3
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luaprobe.engine.store import meters
from tests import helpers
from tests.test_async_time import packet_times_us
from tests.test_meter_merge import GROUP as E_GROUP, Engines

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
GROUP = "{C0DE0A11-5EED-4D5E-8C0E-0000000000B5}"

# every T.K.vartype as meter id = vartype; onexecute sleeps 4 ms for odd k, so with several workers results of one
# bucket come on both sides of the end of input (the replay of the 34 s capture takes milliseconds)
PLUGIN = r'''
local n = 0
TrisulPlugin = { id = { name = "async meters" },
  countergroup = {
    control = { guid = "GROUP", name = "async meters", bucketsize = 1 },
    meters = {
      { 0, T.K.vartype.COUNTER, 10, 0, "results", "Results", "n" },
      { 1, T.K.vartype.RATE_COUNTER, 10, 0, "rate", "k per second", "n" },
      { 2, T.K.vartype.GAUGE, 10, 0, "last", "Last k", "n" },
      { 3, T.K.vartype.RUNNING_COUNTER, 10, 0, "total", "Results so far", "n" },
      { 4, T.K.vartype.AVERAGE, 10, 0, "avg", "Mean k", "n" },
      { 5, T.K.vartype.DELTA_RATE_COUNTER, 10, 0, "dsec", "Seconds", "n" },
      { 6, T.K.vartype.MAXIMUM, 10, 0, "max", "Largest k", "n" },
      { 7, T.K.vartype.MINIMUM, 10, 0, "min", "Smallest k", "n" },
    } },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = n + 1
      T.async:schedule{ data = tostring(n),
        onexecute = function(d)
          if tonumber(d) % 2 == 1 then
            local ffi = require("ffi")
            pcall(ffi.cdef, "int usleep(unsigned int usec);")
            ffi.C.usleep(4000)
          end
          return d
        end,
        onresult = function(e, d, r)
          local k = tonumber(d)
          local sec = e:timestamp()
          for m, v in pairs({ [0] = 1, k, k, 1, k, sec, k, k }) do e:update_counter("GROUP", "all", m, v) end
        end }
    end } }
'''.replace("GROUP", GROUP)
SG = 'TrisulPlugin = { id = { name = "sg watches" },\n' \
     '  sg_monitor = { onflush = function(engine, flow) T.n = (T.n or 0) + 1 end } }\n'


def model() -> dict:
    """{(bucket, meter): value} the plug-in's meters must hold, from the capture's TCP packets (k = 1..1043).  The
    RUNNING_COUNTER (meter 3) carries over: its total is also stored in every later second with packets of any kind
    (docs/plugins.md "Counters")."""
    every, tcp = packet_times_us(CAPTURE)
    assert len(tcp) == 1043
    per = collections.defaultdict(list)
    for k, t in enumerate(tcp, 1):
        per[t // 1_000_000].append((t, k))
    out, total, prev = {}, 0, None
    for b in sorted(per):
        ks = [k for _, k in per[b]]
        total += len(ks)
        out.update({(b, 0): len(ks), (b, 1): sum(ks), (b, 2): max(per[b])[1], (b, 3): total,
                    (b, 4): sum(ks) / len(ks), (b, 5): b - (b if prev is None else prev), (b, 6): max(ks),
                    (b, 7): min(ks)})
        prev = b
    running = sorted((b, v) for (b, m), v in out.items() if m == 3)
    for b in {t // 1_000_000 for t in every} - set(per):
        before = [v for s, v in running if s < b]
        if before:
            out[(b, 3)] = before[-1]
    return out


def run(tmp_path, name: str, *args: str) -> dict:
    """One `luaprobe run` of the plug-in with the sg_monitor; the group's stored {(bucket, meter): value}."""
    d = tmp_path / name
    d.mkdir()
    (d / "meters.lua").write_text(PLUGIN)
    (d / "sg.lua").write_text(SG)
    out = d / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(d / "meters.lua"),
                        str(d / "sg.lua"), "--pcap", CAPTURE, "--out", str(out), "--drain-deadline", "300", "-q",
                        *args], cwd=helpers.REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT bucket_ts, key, meter, value FROM counters WHERE group_guid = ?", (GROUP,))
        got = {}
        for b, key, m, v in rows:
            assert key == "all"
            got[(b, m)] = v
    return got


@pytest.mark.parametrize("args", [("--workers", "1"), ("--workers", "4"), ("--workers", "3", "--window", "5")],
                         ids=["w1", "w4", "w3-window5"])
def test_every_meter_type_with_a_flow_backend_equals_the_model(tmp_path, args):
    """1 and several workers (and 5-second windows: window flushes while tasks are pending): every meter type's
    stored value of every bucket equals the model.  Fails on 9fdb61b / fdf7964 (RUNNING_COUNTER counted twice)."""
    want = model()
    got = run(tmp_path, "r", *args)
    assert set(got) == set(want)
    bad = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k])}
    assert not bad, sorted(bad.items())[:8]


# ------------------------------------------------------------------ engine.lua: a take of all buckets is final

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(st.tuples(st.integers(0, 299), st.sampled_from(list(range(8))), st.integers(0, 1000)),
                       min_size=1, max_size=30),
       after=st.lists(st.tuples(st.integers(0, 299), st.sampled_from(list(range(8))), st.integers(0, 1000)),
                      min_size=1, max_size=30))
def test_results_after_a_take_of_all_buckets_open_no_written_bucket(before, after):
    """A VM whose buckets were all taken (take_counters(nil)) and that then gets T.async results at earlier times
    (any order) writes no (group, bucket, key, meter) a second time, and its RUNNING_COUNTER's last row is the sum of
    every sample once.  Before: the results reopened the written buckets (a second part each, the running total
    again in it)."""
    engines = Engines()
    e = engines.new()
    t_end = max(s for s, _, _ in before)
    for sec, m, v in sorted(before):
        engines.feed(e, sec, 0, m, v)
    first = engines.rows(e)
    e._result = True                                  # as Async:call_hook sets it while an onresult runs
    for sec, m, v in after:
        engines.feed(e, min(sec, t_end), 0, m, v)
    e._result = False
    second = engines.rows(e)
    assert not {r[:4] for r in first} & {r[:4] for r in second}
    running = [r for r in meters.merge_rows(first + second) if r[3] == 3]
    want = sum(v for _, m, v in before + after if m == 3)
    if running:
        assert max(running, key=lambda r: r[1])[4] == want
    assert all(r[0] == E_GROUP for r in first + second)
