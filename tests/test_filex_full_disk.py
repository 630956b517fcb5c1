"""filex on a full --filex-dir: a file whose bytes did not all reach the disk is never handed to onfile_http.

Found by the operator's chaos pass: with --filex-dir on a small filesystem, onfile_http got files said to be whole
(`length` = the body's size, `incomplete` nil) that held only part of it on disk (24 774 of 2 000 000 bytes): stdio
drops a buffer whose flush failed with ENOSPC and reports the later writes and the close as done once other files
were removed and space came back.  docs/filex.md: files that hit a write error are not delivered (`write_errors`).
Now the size on disk is checked after the close.

Independent truth: the generator's manifest (FILE.bodies.json: every body's URL and size); the plug-in reports,
for each file it is given, the request path, the size it finds on disk and `length`.  The filesystem is a real
256 KiB tmpfs (skipped where mounting is not allowed).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from tests import helpers

PLUGIN = r"""
TrisulPlugin = { id = { name = "filex size check" }, filex_monitor = {
  onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
    local f = io.open(path, "rb"); local n = f and f:seek("end") or -1; if f then f:close() end
    engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", flow, "FILE", 3,
                     req:get_path() .. " " .. n .. " " .. length .. " " .. tostring(incomplete))
  end } }
"""


def cli(*args):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=300)


def test_files_cut_short_by_a_full_disk_are_not_delivered(tmp_path):
    cap = tmp_path / "http.pcap"
    r = cli("gen", "--out", str(cap), "--flows", "60", "--mix", "http=100", "--http-sizes", "20000,300000",
            "--concurrency", "3", "--seed", "7")
    assert r.returncode == 0, r.stderr
    sizes = {b["url"]: b["size"] for b in json.load(open(f"{cap}.bodies.json"))["bodies"]}
    assert len(sizes) == 60
    plugin = helpers.write_plugin(tmp_path, PLUGIN, name="fxcheck.lua")
    with helpers.tmpfs(tmp_path / "fx", "size=256k") as fx:
        out = tmp_path / "out"
        r = cli("run", plugin, "--pcap", str(cap), "--out", str(out), "--filex-dir", str(fx / "files"), "--json")
        assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["filex"][0]
    assert st["http_bodies"] == 60 and st["files"] + st["write_errors"] == 60
    assert st["write_errors"] > 0 and st["files"] > 0, st         # the disk did fill, and some files fitted
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
        got = [m.split() for (m,) in db.execute("SELECT message FROM alerts WHERE sigid = 'FILE'")]
    assert len(got) == st["files"]
    for url, on_disk, length, incomplete in got:
        assert int(on_disk) == int(length) == sizes[url] and incomplete == "nil", (url, on_disk, length, sizes[url])
