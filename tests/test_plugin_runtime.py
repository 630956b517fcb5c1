"""Plug-in runtime: C Lua modules load in plug-in VMs and T.async workers (issue 14.6); print lines (14.7).

A real C module is compiled here with gcc against the Lua C API (declared by hand: no Lua headers needed) and put
beside the plug-in, where Trisul users keep their modules; the plug-in counts TCP packets under the key the C
function computes, and a worker task calls the same module.  The expected count comes from tshark.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
GUID = "{5A0C1E2D-3B4F-4C6D-8E9F-0A1B2C3D4E5F}"

C_MODULE = r"""
typedef struct lua_State lua_State;
typedef int (*lua_CFunction)(lua_State *L);
extern void lua_createtable(lua_State *L, int narr, int nrec);
extern void lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);
extern void lua_setfield(lua_State *L, int idx, const char *k);
extern long lua_tointeger(lua_State *L, int idx);
extern void lua_pushinteger(lua_State *L, long n);
static int add(lua_State *L) { lua_pushinteger(L, lua_tointeger(L, 1) + lua_tointeger(L, 2)); return 1; }
int luaopen_lpcmod(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushcclosure(L, add, 0);
  lua_setfield(L, -2, "add");
  return 1;
}
"""

PLUGIN = """
local cm = require "lpcmod"
TrisulPlugin = { id = { name = "cmod" },
  countergroup = { control = { guid = "%(guid)s", name = "cmod", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      engine:update_counter("%(guid)s", tostring(cm.add(40, 2)), 0, 1)
      if not scheduled then
        scheduled = true
        T.async:schedule({ data = "7",
          onexecute = function(d) return tostring(require("lpcmod").add(tonumber(d), 1000)) end,
          onresult = function(e, d, r) e:update_counter("%(guid)s", "async-" .. r, 0, 1) end })
      end
    end } }
"""


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("tshark") is None, reason="needs gcc and tshark")
def test_c_module_loads_in_plugin_and_worker(tmp_path):
    src = tmp_path / "lpcmod.c"
    src.write_text(C_MODULE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "lpcmod.so"), str(src)], check=True)
    plug = tmp_path / "cmod.lua"
    plug.write_text(PLUGIN % {"guid": GUID})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE, "--out", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tcp = subprocess.run(["tshark", "-r", SAMPLE, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True).stdout.split()
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        rows = dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key", (GUID,)))
    finally:
        db.close()
    assert rows == {"42": len(tcp), "async-1007": 1}


PRINTER = """
TrisulPlugin = { id = { name = "printer" }, request_async_workers = 3,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = (n or 0) + 1
      print("front", n, string.rep("f", 3000))
      for k = 1, 5 do
        T.async:schedule({ data = n .. "." .. k,
          onexecute = function(d) print("work", d, string.rep("w", 3000)) return nil end })
      end
    end } }
"""


def test_print_in_onexecute_is_tagged_and_whole(tmp_path):
    """Issue 14.7: worker print lines carry [script#worker-N] like plug-in lines, and 3 workers plus the fast path
    printing 3 KB lines at once into one pipe never interleave within a line."""
    import re
    plug = tmp_path / "printer.lua"
    plug.write_text(PRINTER)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tcp = int(subprocess.run(["tshark", "-r", SAMPLE, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                             capture_output=True, text=True, check=True).stdout.count("\n"))
    front = re.compile(r"\[printer\.lua#[0-9A-F]+\] front\t(\d+)\t" + "f" * 3000)
    work = re.compile(r"\[printer\.lua#worker-[123]\] work\t(\d+\.\d)\t" + "w" * 3000)
    lines = [x for x in r.stdout.splitlines() if x.startswith("[printer.lua#")]
    assert all(front.fullmatch(x) or work.fullmatch(x) for x in lines)
    assert sorted(int(front.fullmatch(x).group(1)) for x in lines if front.fullmatch(x)) == list(range(1, tcp + 1))
    assert sorted(work.fullmatch(x).group(1) for x in lines if work.fullmatch(x)) == \
        sorted(f"{n}.{k}" for n in range(1, tcp + 1) for k in range(1, 6))
