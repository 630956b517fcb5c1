"""Hooks that create closures are called by the walker's stitch point directly (issue 11; engine/plugins/host.lua
walk_direct through engine/plugins/_lpwatch.c wd.hcall, without the invoke function): wd.hcall behaves as xpcall,
and every hook gets exactly the arguments Trisul's documentation gives it, as in the inline walk.

Truth: Lua's own xpcall for wd.hcall; the hook signatures of docs.trisul.org (simplecounter onpacket(engine,
layer); protocol_handler parselayer(layer); packet_storage filter(engine, timestamp, flow) and
filter_payload(engine, timestamp, flow, direction, seekpos, buffer)) and the same plug-ins without closures, walked
inline in the same run: vararg hooks record select('#', ...), the type of each argument and the kind of their
caller (debug.getinfo), per call."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from luaprobe.engine.plugins.vm import new_runtime
from tests import helpers

CAP = os.path.join(helpers.PCAPS, "mix-eth-tls-http-dns.pcap")
TCP = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"
UDP = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"

# REC(hook, ...) counts one call: its argument count, the types of its arguments and the kind of the hook's caller
PRELUDE = r"""
local seen = {}
local function REC(hook, what, ...)
  local n, types = select("#", ...), {}
  for i = 1, n do types[i] = type((select(i, ...))) end
  local key = hook .. "\t" .. n .. "\t" .. table.concat(types, ",") .. "\t" .. what
  seen[key] = (seen[key] or 0) + 1
end
local function dump()
  local f = assert(io.open(os.getenv("STITCH_OUT") .. "/NAME.tsv", "w"))
  for k, v in pairs(seen) do f:write(k, "\t", v, "\n") end
  f:close()
end
"""
# HOOKBODY: the caller's kind, then (stitched only) a closure, which sends the hook through the stitch point
BODY = 'local what = debug.getinfo(2, "S").what CLOSURE'
PLUGINS = {
    "sc": """TrisulPlugin = { id = { name = "sc" }, onunload = dump,
      simplecounter = { protocol_guid = "%s",
        onpacket = function(...) BODY REC("onpacket", what, ...) end } }""" % TCP,
    "ph": """TrisulPlugin = { id = { name = "ph" }, onunload = dump,
      protocol_handler = { control = { guid = "{6B1C6E2A-3E55-4F0B-9C1D-1A2B3C4D5E6F}", name = "probe NAME",
                                       host_protocol_guid = "%s", host_protocol_ports = { 53 } },
        parselayer = function(...) BODY REC("parselayer", what, ...) return nil end } }""" % UDP,
    "ps": """TrisulPlugin = { id = { name = "ps" }, onunload = dump,
      packet_storage = {
        filter = function(...) BODY REC("filter", what, ...) return -1 end,
        filter_payload = function(...) BODY REC("filter_payload", what, ...) return -1 end } }""",
}
#: docs.trisul.org: each hook's arguments
SIGNATURES = {"onpacket": "table,table", "parselayer": "table", "filter": "table,number,table",
              "filter_payload": "table,number,table,number,number,table"}


def _records(path):
    out = Counter()
    with open(path) as f:
        for line in f:
            hook, n, types, what, count = line.rstrip("\n").split("\t")
            out[(hook, int(n), types, what)] += int(count)
    return out


def test_stitched_hooks_get_their_arguments_from_the_c_call(tmp_path):
    plugs, outdir = tmp_path / "plugins", tmp_path / "rec"
    plugs.mkdir()
    outdir.mkdir()
    for kind, src in PLUGINS.items():
        for mode, closure in (("inline", ""), ("stitched", "local keep = function() return what end")):
            name = f"{kind}_{mode}"
            body = src.replace("BODY", BODY.replace("CLOSURE", closure))
            (plugs / f"{name}.lua").write_text((PRELUDE + body).replace("NAME", name))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plugs), "--pcap", CAP,
                        "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, STITCH_OUT=str(outdir)))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert not summary["plugin_problems"]
    walks = {os.path.basename(p["plugin"])[:-4]: p["walk"] for p in summary["plugins"]}
    assert walks == {f"{k}_{m}": m for k in PLUGINS for m in ("inline", "stitched")}
    for kind in PLUGINS:
        inline, stitched = _records(outdir / f"{kind}_inline.tsv"), _records(outdir / f"{kind}_stitched.tsv")
        assert inline and stitched
        # no Lua frame between the hook and its protected call: xpcall inline (the invoke function tail-calls
        # the hook), the C function stitched
        assert {w for (_, _, _, w) in inline} == {"C"} == {w for (_, _, _, w) in stitched}, (inline, stitched)
        calls = Counter({k[:3]: v for k, v in stitched.items()})
        assert calls == Counter({k[:3]: v for k, v in inline.items()})
        for (hook, n, types), count in calls.items():
            assert types == SIGNATURES[hook] and n == len(types.split(",")), (hook, n, types)
    assert {k[0] for kind in PLUGINS for k in _records(outdir / f"{kind}_stitched.tsv")} == set(SIGNATURES)


HCALL = r"""
local wd = require("luaprobe.engine.plugins.watchdog")
local function h(m) return "handled: " .. tostring(m) end
local function pack(...) return { n = select("#", ...), ... } end
local function same(a, b)
  if a.n ~= b.n then return false end
  for i = 1, a.n do if a[i] ~= b[i] then return false end end
  return true
end
local out = {}
local cases = {
  { function(...) return select("#", ...), ... end, { 1, nil, "x", nil } },       -- holes and trailing nils kept
  { function() end, {} },                                                          -- no results
  { function(a, b) return a + b, a * b, "third" end, { 6, 7 } },
  { function(x) error("boom " .. x, 0) end, { "y" } },                              -- the handler's value
  { function() error({}) end, {} },                                                 -- a non-string error
  { function() local t = nil; return t.x end, {} },                                 -- a runtime error
}
for i, c in ipairs(cases) do
  local f, args = c[1], c[2]
  local want = pack(xpcall(f, h, unpack(args, 1, table.maxn(args) > 0 and 4 or 0)))
  local got = pack(wd.hcall(h, f, unpack(args, 1, table.maxn(args) > 0 and 4 or 0)))
  if type(want[2]) == "string" then want[2] = want[2]:gsub("table: 0x%x+", "table") end
  if type(got[2]) == "string" then got[2] = got[2]:gsub("table: 0x%x+", "table") end
  out[i] = same(want, got) and "same" or ("want %s %s got %s %s"):format(want.n, tostring(want[2]), got.n,
                                                                          tostring(got[2]))
end
local ok, err = pcall(wd.hcall, h)
out[#out + 1] = (not ok and tostring(err):find("message handler and function expected")) and "same" or tostring(err)
return out
"""


def test_hcall_is_xpcall_with_the_handler_first():
    lua = new_runtime([])
    res = list(lua.execute(HCALL).values())
    assert res and all(r == b"same" or r == "same" for r in res), res
