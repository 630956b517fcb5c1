"""Behaviours real Trisul scripts (trisulnsm/trisul-scripts, lua/) rely on, each through the real CLI with a minimal
plug-in written here (never a copy of a real script).  The truth of each test is the rule Trisul's Lua API states
(quoted per test) or an independent implementation (Python's json), not luaprobe's own output."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers

PCAP = os.path.join(helpers.REPO, "tests", "data", "http-get-text.pcap")
TCP = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}"


def luaprobe(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


# ============================================================================ package.path: parent search directory

NEEDS_ROOT_MODULE = """local M = require "rootmod"
TrisulPlugin = { id = { name = "sub" },
  onload = function() print("LOAD " .. M.x) end,
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      T.async:schedule{ data = "d",
        onexecute = function(d) return require("rootmod").x .. " outside=" .. tostring(pcall(require, "outsidemod")) end,
        onresult = function(e, d, r) print("RESULT " .. r) end }
    end } }
""" % TCP


def test_parent_search_directory_on_package_path(tmp_path):
    """Trisul: package.path holds the script's own directory, its parent search directory (a script in a per-app
    subdirectory requires a module at the search directory's top) and the helpers directory; the async worker VM
    gets the same path.  A directory above the search directory is not on it."""
    root = tmp_path / "plugins"
    (root / "app").mkdir(parents=True)
    (root / "rootmod.lua").write_text('return { x = "root-module" }\n')
    (tmp_path / "outsidemod.lua").write_text("return {}\n")           # above the search directory: not reachable
    (root / "app" / "p.lua").write_text(NEEDS_ROOT_MODULE)
    cwd = str(root / "app")                      # Lua's default "./?.lua" must not reach tmp_path
    r = luaprobe("check", str(root), cwd=cwd)
    assert r.returncode == 0, r
    assert "module not found" not in r.stderr
    for k, how in enumerate((["run", str(root)], ["run", "--lua-path", str(root), str(root / "app" / "p.lua")])):
        r = luaprobe(*how, "--pcap", PCAP, "--out", str(tmp_path / f"out{k}"), cwd=cwd)
        assert r.returncode == 0, r
        lines = [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[p.lua#")]
        assert lines == ["LOAD root-module", "RESULT root-module outside=false"], r.stdout
