"""A plug-in whose file name holds a newline ("x\\nERROR forged.lua") must not start a line of its own on stderr or
stdout: every place that prints the name -- the ``[name#instance]`` tag of its log lines and of its print()
output, the summary's row, the ``luaprobe run: exit 4: ...`` line -- escapes it (``\\x0a``), as the input-error
and problem lines already did (shm/logs.py one_line).  Before, the tag, the row and the exit line printed it raw: a
forged "ERROR forged.lua#..." line.  Truth: Python's str.splitlines over the real CLI's stdout and stderr."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import helpers

DNS = os.path.join(helpers.PCAPS, "dns-udp-a-aaaa-mx.pcap")
BODY = """
TrisulPlugin = { id = { name = "nl" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function() print("printed"); error("every call") end } }
"""


@pytest.mark.parametrize("shards", ["1", "2"])
def test_plugin_file_name_with_newline_stays_on_its_lines(tmp_path, shards):
    plug = tmp_path / "x\nERROR forged.lua"
    plug.write_text(BODY)
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plug), "--pcap", DNS,
                        "--out", str(tmp_path / "o"), "--shards", shards], capture_output=True, text=True,
                       timeout=300, env=env, cwd=str(tmp_path))
    assert p.returncode == 4, p.stderr                      # the hook failed on every call
    out, err = p.stdout.splitlines(), p.stderr.splitlines()
    assert not [ln for ln in out + err if ln.startswith("ERROR forged")], (out, err)
    assert [ln for ln in err if ln.startswith("luaprobe run: exit 4: x\\x0aERROR forged.lua#")]
    assert [ln for ln in out if ln.startswith("x\\x0aERROR forged.lua [simplecounter")]
    assert [ln for ln in out if ln.startswith("[x\\x0aERROR forged.lua#") and ln.endswith("] printed")]
    assert [ln for ln in err if "ERROR [x\\x0aERROR forged.lua#" in ln and "simplecounter.onpacket error" in ln]
