"""File names that are not UTF-8 (any bytes but NUL and '/' are legal on Linux) wherever paths travel: --pcap,
the plug-in file and its directory, --lua-path, --out, --stats-json.  Each runs the real CLI with bytes in argv;
the packet counts come from tshark, the names in the summary, the store and the messages are the escaped
text shm/logs.path_text gives (``\\xff``), and no line is a traceback."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
HTTP = os.path.join(helpers.PCAPS, "http-get-text.pcap")
DNS = os.path.join(helpers.PCAPS, "dns-udp-a-aaaa-mx.pcap")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
DNS_WATCH = os.path.join(helpers.REPO, "engine", "examples")


def luaprobe(*args: bytes | str):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    argv = [os.fsencode(sys.executable), b"-m", b"luaprobe.engine.daemon.cli", *map(os.fsencode, args)]
    return subprocess.run(argv, cwd=helpers.REPO, capture_output=True, timeout=180, env=env)


def tshark_packets(path) -> int:
    out = subprocess.run([TSHARK, "-r", path, "-T", "fields", "-e", "frame.number"], capture_output=True,
                         text=True, check=True).stdout
    return len(out.split())


def shown(name: bytes) -> str:
    """The escaped text of a name: what the CLI must show (independent of luaprobe's own helper)."""
    return "".join(chr(b) if b < 0x80 else f"\\x{b:02x}" for b in name)


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_non_utf8_names_everywhere(tmp_path):
    base = os.fsencode(str(tmp_path))
    pcap = base + b"/x\xff.pcap"
    shutil.copyfile(HTTP, pcap)
    plugdir = base + b"/pl\xfd"
    os.mkdir(plugdir)
    plug = plugdir + b"/tcp\xfb.lua"
    shutil.copyfile(PLUGIN, plug)
    lpath = base + b"/lp\xfc"
    os.mkdir(lpath)
    out = base + b"/o\xfa"
    stats = out + b"/s\xf0.json"
    r = luaprobe("run", plugdir, "--pcap", pcap, "--pcap", DNS, "--out", out, "--stats-json", stats,
                 "--lua-path", lpath)
    err = r.stderr.decode("utf-8")                  # the messages are valid UTF-8 text
    assert r.returncode == 0, err
    assert "Traceback" not in err
    text = r.stdout.decode("utf-8")
    assert shown(b"tcp\xfb.lua") in text and shown(out) + "/luaprobe.sqlite" in text
    s = json.loads(open(stats, "rb").read().decode("utf-8"))
    assert s["packets"] == tshark_packets(HTTP) + tshark_packets(DNS) == 20
    assert s["files"] == s["files_done"] == [shown(pcap), DNS]
    assert {p["plugin"] for p in s["plugins"]} == {shown(plug)}
    db = sqlite3.connect(os.fsdecode(out + b"/luaprobe.sqlite"))
    assert json.loads(db.execute("SELECT value FROM run WHERE key = 'files_done'").fetchone()[0]) == \
        [shown(pcap), DNS]
    db.close()


def test_non_utf8_name_of_a_damaged_capture_is_one_line_and_the_next_file_is_read(tmp_path):
    bad = os.fsencode(str(tmp_path)) + b"/t\xfe.pcap"
    with open(HTTP, "rb") as f, open(bad, "wb") as g:
        g.write(f.read()[:3000])                      # cut inside the 4th record
    r = luaprobe("run", PLUGIN, "--pcap", bad, "--pcap", DNS, "--out", str(tmp_path / "o"), "-q", "--json")
    assert r.returncode == 3
    lines = r.stderr.decode("utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"luaprobe run: input error: {shown(bad)}: byte offset "), lines
    s = json.loads(r.stdout)
    assert s["files_done"] == [DNS] and s["files"] == [shown(bad), DNS]
    data, off, whole = open(HTTP, "rb").read()[:3000], 24, 0
    while off + 16 <= len(data) and off + 16 + struct.unpack_from("<I", data, off + 8)[0] <= len(data):
        off, whole = off + 16 + struct.unpack_from("<I", data, off + 8)[0], whole + 1
    assert f"byte offset {off}:" in lines[0]
    assert s["packets"] == helpers.pcap_records(DNS) + whole


@pytest.mark.parametrize("which", ["pcap", "plugin", "lua-path"])
def test_missing_non_utf8_names_are_one_escaped_line(tmp_path, which):
    missing = os.fsencode(str(tmp_path)) + b"/no\xfe"
    args = {"pcap": [PLUGIN, "--pcap", missing], "plugin": [missing, "--pcap", DNS],
            "lua-path": [PLUGIN, "--pcap", DNS, "--lua-path", missing]}[which]
    r = luaprobe("run", *args, "--out", str(tmp_path / "o"))
    lines = r.stderr.decode("utf-8").splitlines()
    assert r.returncode == (3 if which == "pcap" else 2)
    assert len(lines) == 1 and shown(missing) in lines[0], lines


def test_async_plugin_in_a_non_utf8_directory(tmp_path):
    """T.async workers get the plug-in's directory on their package.path: the bytes, not a decoding error."""
    d = os.fsencode(str(tmp_path)) + b"/pa\xfd"
    os.mkdir(d)
    for f in ("dns_watch.lua", "blocklist.txt"):
        shutil.copyfile(os.path.join(DNS_WATCH, f), d + b"/" + f.encode())
    r = luaprobe("run", d, "--pcap", DNS, "--out", str(tmp_path / "o"), "-q", "--json")
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(r.stdout)["plugins"]
    a = p["async"]
    assert p["plugin"] == shown(d + b"/dns_watch.lua") and a["scheduled"] == a["ok"] > 0
