"""A ``--shards N`` run summary reconciles with a one-shard run of the same capture, key for key (docs/scale.md
"The run summary"): ``--stats-json`` and the printed text, for 2 and 3 shards, over several captures, with
plug-ins that write counters (a countergroup with key info, simplecounters), flow-keyed alerts (a SYN alert on the
flow id), a flowtracker's top-K, and the built-in analysers (resources, FTS documents, their counter groups).

Independent truths: every ``rows_written`` figure is the row count sqlite3 finds in that table of the run's own
database; ``packets`` / ``bytes`` are the capture's records and the sum of their original lengths, walked here.
What truly differs (timings, the per-process work of each fast path, the per-shard detail) is named in
TIMINGS / PER_PROCESS / SHARDED_ONLY below and left out of the comparison; everything else must be equal.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys

import pytest

from tests import helpers
from tests.test_fastpath import G_TCP, PORT_GROUP, write_counting_plugins
from tests.test_flowmon import FT, FT_UDP
from tests.test_shards import SYN_ALERT, SYN_ALERT_PLUGIN

CAPTURES = ["trisul-tutorial.pcap", "mix-eth-tls-http-dns.pcap", "vlan-mpls-mixed.pcap", "tcp-echo-many-flows.pcap",
            "trisul-16minutes.pcap"]
TIMINGS = {"elapsed_s", "closed_s", "packet_loop_s", "packet_loop_cpu_s", "packet_loop_rusage", "packet_loop_warmup"}
#: the work of each fast-path process (N of them), not of the traffic: pages prefaulted, ring wakes, CPU pinning
PER_PROCESS = {"flow_prefault", "packet_ring_space_wakes", "packet_ring_mapped_ahead_mb", "cpus_pinned",
               "flow_table_pages"}
SHARDED_ONLY = {"shards", "shard_deaths", "packets_read", "packets_lost", "store_rows_lost"}


def write_plugins(d) -> str:
    """Counting simplecounters, the example countergroup, a SYN alert keyed by flow id, a label per TCP port seen
    (key info: several shards label the same key), two flowtrackers: ``d``."""
    write_counting_plugins(d)
    shutil.copy(os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua"), d / "tcp_ports.lua")
    (d / "ft.lua").write_text(FT)
    (d / "ft_udp.lua").write_text(FT_UDP)          # 300 s buckets: ranked again when a late UDP flow ends
    (d / "syn_alert.lua").write_text(SYN_ALERT_PLUGIN)
    (d / "labels.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "port labels" }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      local port = tostring(layer:getbyte(2) * 256 + layer:getbyte(3))
      engine:update_key_info("{PORT_GROUP}", port, "port " .. port)
    end,
  }},
}}
''')
    return str(d)


def capture_totals(path: str) -> tuple[int, int]:
    """(records, sum of original lengths in bytes) of a classic little-endian pcap, walked here."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\xd4\xc3\xb2\xa1", "classic little-endian pcap expected"
    off, n, total = 24, 0, 0
    while off + 16 <= len(data):
        incl, orig = struct.unpack_from("<II", data, off + 8)
        off, n, total = off + 16 + incl, n + 1, total + orig
    return n, total


def table_rows(out: str) -> dict:
    """{table: rows} of the run's database, counted by sqlite3."""
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in names}
    finally:
        db.close()


def run(tmp_path, plugins: str, pcap: str, n: int) -> tuple[dict, str, str]:
    """``luaprobe run`` (the CLI, as a user runs it) with --shards n: (--stats-json summary, stdout, out dir)."""
    out, stats = str(tmp_path / f"out{n}"), str(tmp_path / f"stats{n}.json")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugins, "--pcap", pcap,
                        "--analysers", "all", "--out", out, "--shards", str(n), "--stats-json", stats],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    with open(stats) as f:
        return json.load(f), r.stdout, out


def plugin_totals(summary: dict) -> dict:
    """{(plug-in file, script type): {hook: calls}, errors, async counts summed}: one row per script type, whatever
    the instances (their ids differ per run and per shard)."""
    out: dict = collections.defaultdict(collections.Counter)
    for p in summary["plugins"]:
        row = out[os.path.basename(p["plugin"]), p["type"]]
        row.update({f"calls.{k}": v for k, v in p["hook_calls"].items()})
        row.update({f"errors.{k}": v for k, v in p["hook_errors"].items()})
        row.update({f"async.{k}": v for k, v in (p.get("async") or {}).items() if isinstance(v, int)})
    return {k: dict(v) for k, v in out.items()}


def differences(one: dict, many: dict, path: str = "") -> list[str]:
    """Every key path where the two summaries differ (a key in one only, or another value)."""
    if isinstance(one, dict) and isinstance(many, dict):
        out = []
        for k in sorted(set(one) | set(many), key=str):
            if k not in many or k not in one:
                out.append(f"{path}{k}: only in {'one shard' if k in one else 'the sharded run'}")
            else:
                out += differences(one[k], many[k], f"{path}{k}.")
        return out
    return [] if one == many else [f"{path[:-1]}: {one!r} != {many!r}"]


def comparable(s: dict) -> dict:
    """The summary without what truly differs: timings, per-process work (also the store writers' statements and
    commits: N writers each declare the groups and update their part of a counter row; a flowtracker's part
    ranked again in one shard rewrites that part's rows, ``toppers_rewritten``), per-shard detail and the store's
    path; plug-ins as totals per script type."""
    left_out = TIMINGS | PER_PROCESS | SHARDED_ONLY | {"plugins", "store"}
    out = {k: v for k, v in s.items() if k not in left_out}
    out["plugins"] = plugin_totals(s)
    out["store"] = {k: v for k, v in s["store"].items() if k not in ("path", "commits", "rows")}
    out["flow_backends"] = {k: v for k, v in s["flow_backends"].items() if k != "toppers_rewritten"}
    return out


def text_lines(stdout: str) -> list[str]:
    """The printed summary with its timing and instance ids taken out: a plug-in line as 'FILE [TYPE] ...',
    'elapsed' dropped, a sharded 'written:' line's parenthesised note on the shards' updates dropped, the database
    path as DB."""
    out = []
    for line in stdout.splitlines():
        line = re.sub(r"\s+elapsed [\d.]+ s$", "", line)
        line = re.sub(r"\[(\w+)(?:#\w+)?(?:, \d+ shards)?\]", r"[\1]", line)
        line = re.sub(r" \([^)]*shards[^)]*\)", "", line)
        out.append(re.sub(r"  -> \S+$", "  -> DB", line))
    return out


@pytest.mark.parametrize("capture", CAPTURES)
def test_sharded_summary_reconciles_with_one_shard(tmp_path, capture):
    pcap = os.path.join(helpers.PCAPS, capture)
    plugins = write_plugins(tmp_path / "plugins")
    packets, nbytes = capture_totals(pcap)
    one, text1, out1 = run(tmp_path, plugins, pcap, 1)
    for n in (2, 3):
        many, text, out = run(tmp_path, plugins, pcap, n)
        for s, o in ((one, out1), (many, out)):
            rows = table_rows(o)
            assert {k: rows[k] for k in s["rows_written"]} == s["rows_written"]      # what the database holds
            assert (s["packets"], s["bytes"]) == (packets, nbytes)
            assert s["closed_s"] >= s["elapsed_s"] > 0          # start until the SQLite database is closed
            assert s["analysers"]["names"] == ["counters", "dns", "http", "tls"]
        assert differences(comparable(one), comparable(many)) == []
        assert set(one) | SHARDED_ONLY == set(many), "keys of one shard missing from the sharded summary"
        assert (many["packets_read"], many["packets_lost"], many["store_rows_lost"]) == (packets, 0, 0)
        assert [sh["shard"] for sh in many["shards"]] == list(range(n))
        writers = collections.Counter(many["store"]["rows"]) - collections.Counter({"run": many["store"]["rows"]["run"]})
        assert writers == sum((collections.Counter(sh["store"]["rows"]) for sh in many["shards"]), collections.Counter())
        assert many["rows_written"]["counters"] <= sum(sh["rows_written"]["counters"] for sh in many["shards"])
        assert text_lines(text) == text_lines(text1)


def test_corpus_bench_reads_a_sharded_run(tmp_path, monkeypatch):
    """tools/bench/corpus_bench.py --run-args "--shards 2" reads a sharded run's summary as one fast path's
    (``closed_s``, ``packet_loop_warmup``, ``packets``, hook calls): before, KeyError 'closed_s'.  Truth: the
    capture's own record count, which cell() checks against the summary's packets."""
    from tools.bench import corpus_bench
    pcap = os.path.join(helpers.PCAPS, "tcp-echo-many-flows.pcap")
    packets, _ = capture_totals(pcap)
    monkeypatch.setattr(corpus_bench, "RUN_ARGS", ["--shards", "2"])
    r = corpus_bench.cell(pcap, packets, "counter", 1, str(tmp_path))
    assert r["engine"][0] > 0 and r["loop"][0] > r["engine"][0] and r["cpu"][0] > 0
    assert r["calls"] >= 1      # the counter shape's hook: once per TCP packet at least, over both shards
