"""One packet must not forge a second log line or table row (security rule: traffic is not trusted).  A real
`luaprobe run` whose HTTP header carries U+0085 (NEL), U+2028 / U+2029 (line / paragraph separators) and U+009B
(CSI) as UTF-8; a plug-in logs the header and stores it as an alert; the truth is Python's str.splitlines (which,
like xterm for NEL, breaks lines at these characters) over stderr and over `luaprobe query alerts`."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers
from tests import pktbuild as pb

EVIL = "v\u0085FORGED-1\u2028FORGED-2\u2029FORGED-3\u009b2J"

PLUGIN = r"""
TrisulPlugin = { id = { name = "logforge" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
      local v = tostring(req:get_value("X-Evil"))
      T.log(T.K.loglevel.INFO, "header " .. v)
      engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", nil, "sig", 1, "alert " .. v)
    end } }
"""


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], capture_output=True,
                          timeout=300, env=env, **kw)


def test_unicode_line_breaks_from_packets_do_not_forge_lines(tmp_path):
    c = pb.Conv()
    c.handshake()
    c.send(True, pb.http_request("/f", headers=[("X-Evil", EVIL)]))
    c.send(False, pb.http_response(b"abc", headers=[("Content-Length", 3)]))
    c.close()
    pcap, plug, out = tmp_path / "e.pcap", tmp_path / "logforge.lua", tmp_path / "out"
    pb.write_pcap(str(pcap), c.frames)
    plug.write_text(PLUGIN)
    r = cli("run", str(plug), "--pcap", str(pcap), "--out", str(out))
    err = r.stderr.decode("utf-8")
    assert r.returncode == 0, err
    assert "header v\\u0085FORGED-1\\u2028FORGED-2\\u2029FORGED-3\\u009b2J" in err
    assert not [ln for ln in err.splitlines() if ln.startswith("FORGED")], err
    q = cli("query", "alerts", "--out", str(out))
    text = q.stdout.decode("utf-8")
    assert q.returncode == 0 and "alert v\\u0085FORGED-1" in text, text
    assert not [ln for ln in text.splitlines() if ln.lstrip().startswith("FORGED")], text
