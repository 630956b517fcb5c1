"""`luaprobe query` filters that cannot apply are refused, not silently ignored or matched against nothing.

Found by the operator's chaos pass: `query flows --group x` listed every flow (the filter was ignored) and
`query alerts --group nosuch` printed "(0 rows)" with exit 0, so a misspelled group looked like an empty one.
Now: a filter on a kind it does not filter is a usage error (exit 2) and a group name that names no group of the
kind is one line listing the names (exit 2); a GUID is always taken.  Truth: the database read with sqlite3.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "out"
    r = cli("run", os.path.join(EXAMPLES, "tcp_ports.lua"), os.path.join(EXAMPLES, "dns_watch.lua"),
            "--pcap", os.path.join(EXAMPLES, "sample.pcap"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    return out


def cli(*args):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=EXAMPLES,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("what, flag", [("flows", "--group"), ("edges", "--group"), ("flows", "--meter"),
                                        ("alerts", "--meter"), ("run", "--key")])
def test_a_filter_on_a_kind_it_does_not_filter_is_refused(out, what, flag):
    r = cli("query", what, "--out", str(out), flag, "x")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.startswith(f"luaprobe query: {flag} does not filter {what} (it filters "), r.stderr


def test_a_group_name_that_names_nothing_is_refused_with_the_names(out):
    db = sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)
    alerts = db.execute("SELECT count(*) FROM alerts").fetchone()[0]
    tcp = db.execute("SELECT count(*) FROM counters c JOIN counter_groups g ON g.guid = c.group_guid "
                     "WHERE g.name = 'TCP ports'").fetchone()[0]
    db.close()
    assert alerts > 0 and tcp > 0
    r = cli("query", "alerts", "--out", str(out), "--group", "nosuch")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r
    assert "--group 'nosuch': no alerts group of that name (names: " in r.stderr and "User Alerts" in r.stderr
    r = cli("query", "counters", "--out", str(out), "--group", "tcpports")
    assert r.returncode == 2 and "TCP ports" in r.stderr, r
    r = cli("query", "alerts", "--out", str(out), "--group", "user alerts", "--json")       # names: any case
    assert r.returncode == 0 and len(r.stdout.splitlines()) == alerts, r
    r = cli("query", "counters", "--out", str(out), "--group", "TCP ports", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == tcp, r
    r = cli("query", "alerts", "--out", str(out), "--group", "{00000000-0000-4000-8000-000000000000}")
    assert r.returncode == 0 and r.stdout.endswith("(0 rows)\n"), r                     # a GUID: taken as is


def test_a_meter_name_that_names_nothing_is_refused_with_the_names(out):
    """`query counters --meter pakets` (a typo) printed "(0 rows)" with exit 0, so a misspelled meter looked like an
    empty one, while a misspelled --group is refused.  Now one line listing the meter names (of --group when given),
    exit 2; a name matches in any case, a meter id is always taken.  Truth: counter_groups.meters_json and the
    counters table read with sqlite3."""
    import json
    db = sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)
    guid, meters = db.execute("SELECT guid, meters_json FROM counter_groups WHERE name = 'TCP ports'").fetchone()
    names = {m["id"]: m["name"] for m in json.loads(meters)}
    packets = db.execute("SELECT count(*) FROM counters WHERE group_guid = ? AND meter = ?",
                         (guid, [i for i, n in names.items() if n == "packets"][0])).fetchone()[0]
    db.close()
    assert packets > 0
    for extra in ([], ["--group", "TCP ports"]):
        r = cli("query", "counters", "--out", str(out), "--meter", "pakets", *extra)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r
        assert r.stderr.startswith("luaprobe query: --meter 'pakets': no meter ") and "packets" in r.stderr, r.stderr
        assert all(n in r.stderr for n in names.values()), r.stderr
    r = cli("query", "counters", "--out", str(out), "--group", "TCP ports", "--meter", "Packets", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == packets, r
    r = cli("query", "counters", "--out", str(out), "--meter", "7")                      # an id: taken as is
    assert r.returncode == 0 and r.stdout.endswith("(0 rows)\n"), r


def test_numbers_sqlite_cannot_hold_and_digits_int_cannot_read_are_lines_not_tracebacks(out):
    """Found by a hostile pass (2026-12-02): `query alerts --limit 99999999999999999999` (any kind with a LIMIT)
    ended in a Python traceback, sqlite3.IntegrityError "datatype mismatch", exit 1; `query counters --meter
    99999999999999999999` in OverflowError; `--meter ²` (str.isdigit() is true for "²" and "٣", int() refuses "²")
    in ValueError.  Now --limit is 0..2^63-1 (SQLite's largest integer) with the usual one line, exit 2; a meter id
    is ASCII digits: a larger one than SQLite holds matches no row, and "²" / "٣" are names, refused as such.  Truth:
    the counters table read with sqlite3."""
    db = sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)
    alerts = db.execute("SELECT count(*) FROM alerts").fetchone()[0]
    meter1 = db.execute("SELECT count(*) FROM counters WHERE meter = 1").fetchone()[0]
    db.close()
    assert alerts > 0 and meter1 > 0
    for what in ("alerts", "resources", "fts", "counters", "flows", "keyinfo", "edges", "toppers"):
        r = cli("query", what, "--out", str(out), "--limit", "99999999999999999999")
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, (what, r)
        assert r.stderr == ("luaprobe query: argument --limit: 99999999999999999999 is out of range: must be between "
                            "0 and 9223372036854775807 (luaprobe query --help)\n"), r.stderr
    r = cli("query", "alerts", "--out", str(out), "--limit", str(2**63 - 1), "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == alerts, r
    r = cli("query", "counters", "--out", str(out), "--meter", "99999999999999999999")
    assert r.returncode == 0 and r.stdout.endswith("(0 rows)\n") and r.stderr == "", r
    r = cli("query", "counters", "--out", str(out), "--meter", " 1 ", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == meter1, r
    for m in ("²", "٣"):
        r = cli("query", "counters", "--out", str(out), "--meter", m)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r
        assert r.stderr.startswith(f"luaprobe query: --meter '{m}': no meter of that name (names: "), r.stderr


# A plug-in shaped like trisul-scripts' urlmon.lua (its counter group is named "URL Service ", a blank at the end)
# that also declares an alert group and a resource group (as custom_alerts / custom_resources do) and uses them.
DECLARED = """TrisulPlugin = { id = { name = "declared" },
  countergroup = { control = { guid = "{C93B79D5-20A0-49D8-FA27-160B45D49C00}", name = "URL Service ",
      description = "d", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 20, 20, "Hits", " Hits ", "hits" } } },
  alertgroup = { control = { guid = "{aaaaaaaa-1111-2222-3333-444444444444}", name = "My Alerts ", description = "d" } },
  resourcegroup = { control = { guid = "{bbbbbbbb-1111-2222-3333-444444444444}", name = " My Resources",
      description = "d" } },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      local f = layer:packet():flowid()
      engine:update_counter("{C93B79D5-20A0-49D8-FA27-160B45D49C00}", "k", 0, 1)
      engine:add_alert("{aaaaaaaa-1111-2222-3333-444444444444}", f, "SIG", 2, "m")
      engine:add_resource("{bbbbbbbb-1111-2222-3333-444444444444}", f, "u", "c")
    end } }
"""


def test_declared_names_with_blanks_and_guids_without_braces_find_their_rows(tmp_path):
    """A group declared by a script is found by its name, with or without the blanks around it the script gave it,
    in any case, and by its GUID with or without braces.  Before: `--group "URL Service"` (urlmon.lua's group) and
    `--group "URL Service "` were both refused although the list of names in the refusal showed the group; a declared
    alert / resource group's name passed the check and then matched nothing ("(0 rows)"); a GUID without braces
    matched nothing.  Truth: the rows of each group in the database, read with sqlite3."""
    (tmp_path / "declared.lua").write_text(DECLARED)
    out = tmp_path / "out"
    r = cli("run", str(tmp_path / "declared.lua"), "--pcap", os.path.join(helpers.REPO, "tests", "data",
            "http-get-text.pcap"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    db = sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)
    n = {what: db.execute(f"SELECT count(*) FROM {table} WHERE upper({col}) = ?", (guid,)).fetchone()[0]
         for what, table, col, guid in (("counters", "counters", "group_guid", "{C93B79D5-20A0-49D8-FA27-160B45D49C00}"),
                                         ("alerts", "alerts", "alert_guid", "{AAAAAAAA-1111-2222-3333-444444444444}"),
                                         ("resources", "resources", "resource_guid",
                                          "{BBBBBBBB-1111-2222-3333-444444444444}"))}
    db.close()
    assert min(n.values()) > 0, n
    asks = {"counters": ["URL Service ", "URL Service", "url service", "c93b79d5-20a0-49d8-fa27-160b45d49c00"],
            "alerts": ["My Alerts ", "my alerts", "AAAAAAAA-1111-2222-3333-444444444444",
                       "{aaaaaaaa-1111-2222-3333-444444444444}"],
            "resources": [" My Resources", "My Resources", "bbbbbbbb-1111-2222-3333-444444444444"]}
    for what, groups in asks.items():
        for g in groups:
            r = cli("query", what, "--out", str(out), "--group", g, "--json")
            assert r.returncode == 0 and len(r.stdout.splitlines()) == n[what], (what, g, r)
    for meter in ("Hits", " hits ", "0"):
        r = cli("query", "counters", "--out", str(out), "--group", "URL Service", "--meter", meter, "--json")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == n["counters"], (meter, r)


def test_help_names_every_kind_each_filter_applies_to():
    """`luaprobe query --help` listed --group for five kinds (not toppers, which it filters by tracker) and --key
    without fts and edges.  Truth: query.FILTERS, the table the refusal of a filter on another kind uses."""
    from luaprobe.engine.store.query import FILTERS
    text = " ".join(cli("query", "--help").stdout.split())
    for flag, kinds in FILTERS.items():
        part = text.split(f"--{flag} ", 2)[2].split(" --", 1)[0]       # the option's own help text
        assert all(k in part for k in kinds), (flag, part)
