"""Command-line output modes of `luaprobe run` (the summary itself is checked in test_fastpath.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import helpers


def luaprobe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd or helpers.REPO,
                          capture_output=True, text=True, timeout=120)


def test_json_prints_the_summary_as_json(tmp_path):
    r = luaprobe("demo", "--out", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == 136 and s["input_errors"] == []
    assert {p["type"] for p in s["plugins"]} >= {"simplecounter", "engine_monitor", "countergroup"}


@pytest.mark.parametrize("shards", ["1", "2"])
def test_quiet_prints_nothing_on_success(tmp_path, shards):
    """-q hides the plug-ins' INFO lines (window_report.lua logs one per window) in every process of the run:
    shard processes inherit the level (they printed them under --shards before)."""
    r = luaprobe("demo", "--out", str(tmp_path / "out"), "-q", "--shards", shards)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def _first_oversized_record(path: str, limit: int = 1 << 20) -> tuple[int, int]:
    """(byte offset, caplen) of the first record whose caplen exceeds ``limit``, read with Python's struct
    (classic pcap, either byte order): the independent truth for the walker's error line."""
    import struct
    data = open(path, "rb").read()
    end = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    off = 24
    while off + 16 <= len(data):
        caplen = struct.unpack_from(end + "I", data, off + 8)[0]
        if caplen > limit:
            return off, caplen
        off += 16 + caplen
    raise AssertionError("no oversized record")


@pytest.mark.parametrize("shards,quiet", [("1", True), ("1", False), ("2", True), ("2", False)])
def test_bad_capture_is_one_line(tmp_path, shards, quiet):
    """A damaged capture: exactly one stderr line naming the file and the record's byte offset, exit 3
    (it was printed twice: a log line from the fast path and again from the summary)."""
    path = f"{helpers.PCAPS}/bad-huge-caplen-record.pcap"
    off, caplen = _first_oversized_record(path)
    r = luaprobe("run", "engine/examples/tcp_ports.lua", "--pcap", path, "--out", str(tmp_path / "out"),
                 "--shards", shards, *(["-q"] if quiet else []))
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines() == [f"luaprobe run: input error: {path}: byte offset {off}: caplen {caplen} "
                                     "exceeds the maximum 1048576"], r.stderr
    assert (r.stdout == "") == quiet


def test_sharded_summary_has_one_line_per_plugin(tmp_path):
    """--shards 2: the text summary merges each plug-in's rows over the shards (a frontend type once, with the
    number of shards; a backend instance once, with its shard), and the merged hook calls are the whole
    capture's: tcp_ports.lua's simplecounter runs once per TCP packet (tshark's count)."""
    sample = "engine/examples/sample.pcap"
    tcp = subprocess.run(["tshark", "-r", sample, "-Y", "tcp"], capture_output=True, text=True, cwd=helpers.REPO)
    n_tcp = len(tcp.stdout.splitlines())
    r = luaprobe("demo", "--out", str(tmp_path / "out"), "--shards", "2")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if " hook calls " in line]
    labels = [line.split(" hook calls ")[0] for line in rows]
    assert labels == ["dns_watch.lua [simplecounter, 2 shards]", "file_sha256.lua [filex_monitor, 2 shards]",
                      "tcp_ports.lua [countergroup, 2 shards]", "tcp_ports.lua [simplecounter, 2 shards]",
                      "window_report.lua [engine_monitor#0, shard 0]", "window_report.lua [engine_monitor#1, shard 0]"]
    assert f"tcp_ports.lua [simplecounter, 2 shards] hook calls {n_tcp} errors 0" in rows


# ------------------------------------------------------------------ exit codes tell the truth (docs/operations.md)

IPV4 = "{0A2C724B-5B9F-4BA6-9C97-B05080558574}"  # sample.pcap: 121 IPv4 packets (tshark -r sample.pcap -Y ip | wc -l)
GOOD = f"""TrisulPlugin = {{ id = {{ name = "good" }},
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    engine:update_counter("{{99A78737-4B41-4387-8F31-8077DB917336}}", "udp", 0, 1) end }} }}
"""
FAILING = {
    "syntax.lua": "TrisulPlugin = { id = { name = 'x' }\n",
    "onload.lua": f"""TrisulPlugin = {{ id = {{ name = "x" }}, onload = function() error("no config") end,
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer) end }} }}
""",
    "every_call.lua": f"""TrisulPlugin = {{ id = {{ name = "x" }},
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    engine:add_alrt("{IPV4}", nil, "k", 1, "m") end }} }}
""",
}


def _good_total(out):
    import sqlite3
    with sqlite3.connect(f"{out}/luaprobe.sqlite") as db:
        return db.execute("SELECT sum(value) FROM counters WHERE key = 'udp'").fetchone()[0]


def test_failing_plugin_exits_4_and_the_others_still_run(tmp_path):
    sample = f"{helpers.REPO}/engine/examples/sample.pcap"
    for name, body in FAILING.items():
        d = tmp_path / name
        d.mkdir()
        (d / "good.lua").write_text(GOOD)
        (d / name).write_text(body)
        out = tmp_path / ("out-" + name)
        r = luaprobe("run", str(d), "--pcap", sample, "--out", str(out), "--json")
        assert r.returncode == 4, (name, r.stderr)
        s = json.loads(r.stdout)
        assert s["exit"]["code"] == 4 and len(s["exit"]["reasons"]) == 1, s["exit"]       # one failing plug-in
        assert name in " ".join(s["exit"]["reasons"]), s["exit"]
        assert _good_total(out) == 121                    # the good plug-in's work is all there
        assert "Traceback" not in r.stderr
    # a hook that fails only sometimes is not a failed plug-in
    d = tmp_path / "sometimes"
    d.mkdir()
    (d / "s.lua").write_text(GOOD.replace("engine:update_counter(", "n = (n or 0) + 1; if n % 2 == 0 then "
                                          "error('odd') end; engine:update_counter("))
    r = luaprobe("run", str(d), "--pcap", sample, "--out", str(tmp_path / "o2"), "-q")
    assert r.returncode == 0, r.stderr


def test_results_lost_at_the_drain_deadline_are_counted_and_exit_4(tmp_path):
    (tmp_path / "slow.lua").write_text(f"""TrisulPlugin = {{ id = {{ name = "slow" }},
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    T.async:schedule({{ data = "x", onexecute = function(d)
      local t = os.clock() while os.clock() - t < 5 do end return d end }}) end }} }}
""")
    r = luaprobe("run", str(tmp_path / "slow.lua"), "--pcap", f"{helpers.REPO}/engine/examples/sample.pcap",
                 "--out", str(tmp_path / "out"), "--drain-deadline", "0.2", "--overflow-limit", "1000", "--json")
    assert r.returncode == 4, r.stderr
    a = json.loads(r.stdout)["plugins"][0]["async"]
    assert a["scheduled"] == 121 and a["lost_at_deadline"] == a["timeout"] == 121 - a["ok"] - a["dropped"], a
    assert "onexecute error" not in r.stderr and "result lost" in r.stderr


def test_json_stdout_is_only_json_whatever_plugins_print(tmp_path):
    (tmp_path / "p.lua").write_text(f"""TrisulPlugin = {{ id = {{ name = "p" }},
  onload = function() print("{{ not json") io.write("raw write\\n") end,
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    print("packet") T.async:schedule({{ data = "x", onexecute = function(d) print("worker") return d end }}) end }} }}
""")
    r = luaprobe("run", str(tmp_path / "p.lua"), "--pcap", f"{helpers.REPO}/engine/examples/sample.pcap",
                 "--out", str(tmp_path / "out"), "--json", "-v")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)                                   # the whole of stdout is one JSON document
    assert s["packets"] == 136 and s["plugins"][0]["async"]["ok"] == 121
    assert r.stderr.count("packet\n") == 121 and r.stderr.count("worker\n") == 121 and "raw write" in r.stderr
