"""Arguments of the counter calls (`update_counter`, `update_counter_bytes`, `add_flow_counter`,
`reset_flow_counter`) that the output cannot hold: a meter id outside 0..15, a key nil or NaN, a value NaN or
infinite.  Truth: Trisul's countergroup contract (at most 16 meters, ids from 0: docs/schema.md `counters.meter`,
../shared/docs/trisul-lua-api.md §4.2) and the database itself (sqlite3): what a call writes is read back.

Before (found by a hostile run of luaprobe, 2026-12-02): `update_counter(g, k, 1.5, 1)` (or a meter inf, >= 2^63, a
NaN value, inf and -inf summed into one bucket) reached the store writer, which rejected the row at the end of the
run: exit 1, "the SQLite store writer failed" (an internal error, not the plug-in's); a negative meter was dropped
without a word; and a meter of 2^40 made a cg_monitor of the group build a list of 2^40 values per key in the backend
(8 GB and still going after 120 s).  Now each is a Lua error at the plug-in's line, which the hook's error isolation
counts (docs/plugins.md), so the run goes on and a hook failing on every call is exit 4.
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "http-get-text.pcap")       # 14 packets, all IPv4 (tests/data/MANIFEST.md)
G = "{11111111-2222-3333-4444-555555555555}"

FUZZ = r"""
local G = "%s"
local done = false
TrisulPlugin = {
  id = { name = "counter args" },
  countergroup = { control = { guid = G, name = "Args", description = "d", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "a", "a", "a" }, { 15, T.K.vartype.COUNTER, 10, 0, "p", "p", "p" } } },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local fk = layer:packet():flowid():id()
      local calls = {
        { "meter 1.5", function() engine:update_counter(G, "m", 1.5, 1) end },
        { "meter -1", function() engine:update_counter(G, "m", -1, 1) end },
        { "meter 16", function() engine:update_counter(G, "m", 16, 1) end },
        { "meter inf", function() engine:update_counter(G, "m", 1/0, 1) end },
        { "meter nan", function() engine:update_counter(G, "m", 0/0, 1) end },
        { "meter 2^40", function() engine:update_counter(G, "m", 2^40, 1) end },
        { "meter 2^63", function() engine:update_counter(G, "m", 2^63, 1) end },
        { "key nil", function() engine:update_counter(G, nil, 0, 1) end },
        { "key nan", function() engine:update_counter(G, 0/0, 0, 1) end },
        { "value nan", function() engine:update_counter(G, "v", 0, 0/0) end },
        { "value inf", function() engine:update_counter(G, "v", 0, 1/0) end },
        { "value -inf", function() engine:update_counter(G, "v", 0, -1/0) end },
        { "bytes meter 99", function() engine:update_counter_bytes(G, "b", 99) end },
        { "flow counter meter 2.5", function() engine:add_flow_counter(fk, G, "f", 2.5, 0) end },
        { "reset flow counter meter -3", function() engine:reset_flow_counter(fk, G, "f", -3) end },
        -- what stays valid, as before: meter 0 and 15, a meter given as text, nil or a non-number (meter 0)
        { "ok meter 15", function() engine:update_counter(G, "ok", 15, 7) end },
        { "ok meter '15'", function() engine:update_counter(G, "ok", "15", 1) end },
        { "ok meter nil", function() engine:update_counter(G, "ok", nil, 2) end },
        { "ok meter abc", function() engine:update_counter(G, "ok", "abc", 3) end },
        { "ok value 1e300", function() engine:update_counter(G, "big", 0, 1e300) end },
      }
      for _, c in ipairs(calls) do
        local ok, err = pcall(c[2])
        print(("CALL %%s | %%s"):format(c[1], ok and "ok" or tostring(err)))
      end
    end },
}
""" % G


def run(tmp_path, body, *extra):
    d = tmp_path / "plugins"
    d.mkdir(exist_ok=True)
    (d / "p.lua").write_text(body)
    for name, text in extra:
        (d / name).write_text(text)
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    out = tmp_path / "out"
    r = subprocess.run([exe, "run", str(d), "--pcap", PCAP, "--out", str(out)], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path))
    return r, str(d / "p.lua"), sqlite3.connect(str(out / "luaprobe.sqlite"))


def test_bad_counter_arguments_are_errors_at_the_plugins_line(tmp_path):
    r, path, db = run(tmp_path, FUZZ)
    assert r.returncode == 0, r.stderr                   # before: 1, "store writer ... failed: ... bad row(s) rejected"
    assert "store writer" not in r.stderr and "Traceback" not in r.stderr
    # the message of each call, from the plug-in's file name on (Lua shortens a long path to "...tail")
    calls = {m.group(1): m.group(2).rsplit("/", 1)[-1] for m in re.finditer(r"CALL (.+?) \| (.*)", r.stdout)}
    assert len(calls) == 20, r.stdout
    line = {m.group(1): i + 1 for i, text in enumerate(FUZZ.splitlines())
            for m in [re.search(r'\{ "([^"]+)", function', text)] if m}
    where = lambda name: f"p.lua:{line[name]}: "   # noqa: E731
    for name, meter in (("meter 1.5", "1.5"), ("meter -1", "-1"), ("meter 16", "16"), ("meter inf", "inf"),
                        ("meter nan", "nan"), ("meter 2^40", "1099511627776"), ("meter 2^63", "9.2233720368548e+18")):
        assert calls[name] == where(name) + f"update_counter: meter {meter} is not one of 0..15 (a counter group " \
                                            "has at most 16 meters)", (name, calls[name])
    assert calls["bytes meter 99"] == where("bytes meter 99") + "update_counter_bytes: meter 99 is not one of 0..15 " \
                                                                "(a counter group has at most 16 meters)"
    assert calls["flow counter meter 2.5"].startswith(where("flow counter meter 2.5") + "add_flow_counter: meter 2.5 ")
    assert calls["reset flow counter meter -3"].startswith(where("reset flow counter meter -3")
                                                           + "reset_flow_counter: meter -3 ")
    assert calls["key nil"] == where("key nil") + "update_counter: key is nil"
    assert calls["key nan"] == where("key nan") + "update_counter: key is nan"
    for v in ("nan", "inf", "-inf"):
        assert calls[f"value {v}"] == where(f"value {v}") + f"update_counter: value {v} is not a finite number"
    assert all(v == "ok" for k, v in calls.items() if k.startswith("ok ")), calls
    # the database holds exactly the valid calls (a refused call writes nothing)
    rows = sorted(db.execute("SELECT key, meter, value FROM counters WHERE group_guid = ?", (G,)).fetchall())
    assert rows == [("big", 0, 1e300), ("ok", 0, 5), ("ok", 15, 8)]
    assert db.execute("SELECT count(*) FROM counters WHERE meter NOT BETWEEN 0 AND 15").fetchone()[0] == 0


CGMON = r"""
TrisulPlugin = { id = { name = "cgm" },
  cg_monitor = { counter_guid = "%s",
    onflush = function(engine, ts, key, metrics) print(("FLUSH %%s %%d"):format(key, #metrics)) end } }
""" % G

HUGE_METER = r"""
TrisulPlugin = {
  id = { name = "huge meter" },
  countergroup = { control = { guid = "%s", name = "Args", description = "d", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "a", "a", "a" } } },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      engine:update_counter("%s", "k", 3, 1)
      engine:update_counter("%s", "k", 2^40, 1)
    end },
}
""" % (G, G, G)


def test_a_huge_meter_fails_the_hook_instead_of_a_cg_monitor_list_of_its_size(tmp_path):
    """The reported shape: a cg_monitor on the group, a hook updating meter 2^40 on every packet.  Before: the
    backend built [0] * (2^40 + 1) per key (engine/plugins/monitors.py), 8 GB of RSS and no end.  Now every call
    fails at its line: exit 4 (a hook failed on every call, README "Exit codes"), and the cg_monitor sees the
    meters the hook wrote before the bad call: 4 of them (0..3), meter 3 counting the 14 packets."""
    r, path, db = run(tmp_path, HUGE_METER, ("cgm.lua", CGMON))
    assert r.returncode == 4, r.stderr
    assert re.search(rf"simplecounter\.onpacket error: {re.escape(path)}:9: update_counter: meter 1099511627776 is "
                     r"not one of 0\.\.15", r.stderr), r.stderr
    assert "simplecounter.onpacket failed on every call (14)" in r.stderr
    assert re.findall(r"FLUSH (\S+) (\d+)", r.stdout) == [("k", "4")]
    assert db.execute("SELECT key, meter, value FROM counters WHERE group_guid = ?", (G,)).fetchall() == [("k", 3, 14)]


NONFINITE = r"""
local done = false
TrisulPlugin = {
  id = { name = "nonfinite" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local A = "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}"
      for i, v in ipairs({ 0/0, 1/0, -1/0, 2 }) do
        engine:add_alert(A, nil, "A" .. i, v, "m")
        engine:add_alert_full(A, nil, "F" .. i, "c", v, "m")
        local fk = "11A:0A.00.00.0" .. i .. ":p-0001_0A.00.00.99:p-0035"
        engine:new_flow_record(fk, v, 100, v, 2)
        engine:update_flow(fk, 1, v)
        engine:set_flow_duration(fk, v)
      end
    end },
}
"""


def test_non_finite_priorities_and_flow_numbers_are_not_stored(tmp_path):
    """Found by a hostile pass (2026-12-02): add_alert's priority and the flow-import numbers (new_flow_record,
    update_flow, set_flow_duration) took NaN and +-inf as given: the alerts table held a priority NULL or Infinity,
    flows bytes_az NULL or Infinity, last_ts Infinity, and `luaprobe query alerts --json` printed `Infinity`, which is
    not JSON.  Now such a value is treated as one that is not a number always was: priority 3 (the default), 0 bytes /
    packets / seconds.  Truth: the values the plug-in wrote, read back with sqlite3, and Python's strict JSON."""
    import json
    r, path, db = run(tmp_path, NONFINITE)
    assert r.returncode == 0, r.stderr
    prio = dict(db.execute("SELECT sigid, priority FROM alerts").fetchall())
    assert prio == {"A1": 3, "F1": 3, "A2": 3, "F2": 3, "A3": 3, "F3": 3, "A4": 2, "F4": 2}, prio
    flows = {fk[:15]: rest for fk, *rest in db.execute(
        "SELECT flowkey, bytes_az, bytes_za, packets_az, packets_za, last_ts - first_ts FROM flows "
        "WHERE flowkey LIKE '11A:0A.00.00.0%'")}
    # new_flow_record announces a record and leaves its metrics (Trisul: "metrics unchanged"); update_flow adds
    assert flows == {"11A:0A.00.00.01": [0, 0, 0, 0, 0.0], "11A:0A.00.00.02": [0, 0, 0, 0, 0.0],
                     "11A:0A.00.00.03": [0, 0, 0, 0, 0.0], "11A:0A.00.00.04": [0, 2, 0, 0, 2.0]}, flows

    def strict(c):
        raise ValueError(f"not JSON: {c}")
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    for what in ("alerts", "flows"):
        q = subprocess.run([exe, "query", what, "--out", str(tmp_path / "out"), "--json"], capture_output=True,
                           text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        rows = [json.loads(ln, parse_constant=strict) for ln in q.stdout.splitlines()]
        assert len(rows) == (8 if what == "alerts" else 5)
