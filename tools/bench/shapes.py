"""Plug-in shapes of the benchmark (issue 10): what real Trisul scripts do per packet.

Each shape is a set of plug-in files (name -> Lua source) written into one directory:

==============  ==========================================================================
empty           simplecounter on TCP whose onpacket does nothing (the engine's own cost)
hval            ``layer:rawbytes():hval_16(2)`` (TCP destination port) counted in a Lua table
counter         ``engine:update_counter`` per TCP destination port (a countergroup)
flowstate       ``layer:packet():flowid():id()`` keyed per-flow state in a Lua table
five-layers     five simplecounters: Ethernet, IPv4, IPv6, TCP, UDP, each update_counter
filex           a filex_monitor whose onfile_http counts files (like file_sha256.lua, no hashing)
fresh-task      ``T.async:schedule{ data, onexecute = function ... end, onresult = function ... end }`` per TCP
                packet, closures written inline as Trisul's documentation does (issue 11); not in ORDER: it
                measures T.async as well (tools/bench/async_roundtrip.py)
==============  ==========================================================================

The light shapes (empty, hval, counter, flowstate, fresh-task) hook TCP by default.  ``write(..., layer="udp")``
hooks UDP instead, for traffic that carries no TCP (the corpus's ``dns``: ``layer`` in tools/bench/corpus.py):
a hook that is never called measures nothing.  Destination port at offset 2 is the same in both headers
(RFC 793 / RFC 768).
"""
from __future__ import annotations

import os

G = {"eth": "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}", "ipv4": "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
     "ipv6": "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}", "tcp": "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
     "udp": "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"}
GROUP = "{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}"


def _simple(name: str, layer: str, body: str, prelude: str = "", group: str = "") -> str:
    cg = (f'  countergroup = {{ control = {{ guid = "{group}", name = "{name}", bucketsize = 60 }},\n'
          f'                   meters = {{ {{ 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" }} }} }},\n'
          if group else "")
    return (f"{prelude}\nTrisulPlugin = {{ id = {{ name = \"{name}\" }},\n{cg}"
            f"  simplecounter = {{ protocol_guid = \"{G[layer]}\",\n"
            f"    onpacket = function(engine, layer)\n{body}\n    end }} }}\n")


def _counter(layer: str, k: int) -> str:
    guid = GROUP[:-3] + f"{k:02X}" + "}"                 # a group per layer
    return _simple(f"{layer} counter", layer, f'      engine:update_counter("{guid}", "{layer}", 0, 1)',
                   group=guid)


def _shapes(t: str) -> dict:
    """The shapes with their light hooks on transport layer `t` ("tcp" or "udp")."""
    return {
        "empty": {"empty.lua": _simple("empty", t, "")},
        "hval": {"hval.lua": _simple("hval", t, "      local k = layer:rawbytes():hval_16(2)\n"
                                     "      seen[k] = (seen[k] or 0) + 1", prelude="local seen = {}")},
        "counter": {"counter.lua": _simple("counter", t, f'      engine:update_counter("{GROUP}", '
                                           "layer:getbyte(2) * 256 + layer:getbyte(3), 0, 1)", group=GROUP)},
        "flowstate": {"flowstate.lua": _simple("flowstate", t, "      local id = layer:packet():flowid():id()\n"
                                               "      state[id] = (state[id] or 0) + 1", prelude="local state = {}")},
        "five-layers": {f"{ly}.lua": _counter(ly, k) for k, ly in enumerate(("eth", "ipv4", "ipv6", "tcp", "udp"))},
        "filex": {"filex.lua": 'local files = 0\nTrisulPlugin = { id = { name = "filex count" },\n'
                               '  filex_monitor = { onfile_http = function(engine, ts, flow, path, req, resp, length)\n'
                               '    files = files + 1 end } }\n'},
        "fresh-task": {"fresh-task.lua": _simple(
            "fresh task", t, "      T.async:schedule({ data = tostring(layer:getbyte(3)),\n"
            "        onexecute = function(d) return PREFIX .. d end,\n"
            "        onresult = function(e, d, r) results = results + 1 end })",
            prelude='local PREFIX, results = "port ", 0')},
    }


SHAPES = _shapes("tcp")
ORDER = [s for s in SHAPES if s != "fresh-task"]


def write(shape: str, directory: str, layer: str = "tcp") -> str:
    """Write the plug-in files of `shape` into `directory` (created), its light hooks on transport `layer`
    ("tcp" or "udp"); returns the directory."""
    os.makedirs(directory, exist_ok=True)
    for name, src in _shapes(layer)[shape].items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(src)
    return directory
