"""The walk does not redo the bindings' field lookups per packet when a hook stores into its own table (issue 10).

A hook that counts into a Lua table with a string key (``state[id] = (state[id] or 0) + 1``, the way real
scripts keep per-flow state) makes a store LuaJIT's alias analysis cannot tell apart from any other Lua table
field with a string key.  Every such field the walk and the object bindings read or write per packet
(Engine:set_packet's clock and position, bind_packet's and bind_layer's batch entry and layer index, the
``set_packet`` method found through ``__index``) is then looked up again on every packet: an HREFK (and its
load or store) after the trace's LOOP instruction.  engine/plugins/engine.lua and packet.lua keep that state in
one FFI struct per object (FFI loads and stores do not alias Lua table stores) and the walk calls set_packet as
a plain function, so at most one lookup per object is left.

The truth is LuaJIT's own IR of the compiled walk loop (``jit.util.traceir`` through tools/bench/walkir.py, on
the small-few --quick corpus capture): deterministic, measures no time.  The old bindings redid 12 such lookups
per packet (``set_packet _pos _i _b _floor _tus _now``, ``_i _b _flowid``, ``_i _packet``), then 6
(``_t _c _c _packet _c _flowid``), these 3 (``_packet _c _flowid``: the hook's own calls Layer:packet and
Packet:flowid).  The walk keeps the engine's and the objects' structs itself (host.lua sc_pick), reads the flow
counter count from the engine's struct (``nflow_counters`` was a lookup per packet), and the Packet and Layer
objects carry their methods as fields of their own: ``layer:packet()`` is one HREFK, where it was a lookup that
missed the object (an HREF: a hash search per packet) and then ``__index`` and the class table.
"""
from __future__ import annotations

import os

from tools.bench import corpus, shapes, walkir

#: HREFKs per packet of the walk loop on the bindings' and engine's private fields (keys starting with one "_")
#: and the set_packet method; the script's own method lookups (``__index``, ``packet``, ``flowid``, ``id``) and
#: the walk's per-batch state are not counted.
MAX_BINDING_LOOKUPS = 4

FLOWSTATE = ("      local id = layer:packet():flowid():id()\n"
             "      state[id] = (state[id] or 0) + 1")


def _binding_lookups(ir: list) -> list:
    names = [op for op, _ in ir]
    assert "LOOP" in names, "no compiled walk loop"
    return [k for op, k in ir[names.index("LOOP") + 1:] if op == "HREFK" and k is not None
            and ((k.startswith("_") and not k.startswith("__")) or k == "set_packet")]


def test_string_keyed_state_keeps_binding_lookups_out_of_the_loop(tmp_path):
    capture = corpus.make("small-few", True)
    with open(os.path.join(tmp_path, "flowstate.lua"), "w") as f:
        f.write(shapes._simple("flowstate", "tcp", FLOWSTATE, prelude="local state = {}"))
    ir = walkir.walk_ir(capture, str(tmp_path))
    keys = _binding_lookups(ir)
    assert len(keys) <= MAX_BINDING_LOOKUPS, f"walk loop redoes {len(keys)} binding lookups per packet: {keys}"
    assert "set_packet" not in keys, "set_packet is looked up through __index on every packet"


def _per_packet(ir: list) -> list:
    names = [op for op, _ in ir]
    assert "LOOP" in names, "no compiled walk loop"
    return ir[names.index("LOOP") + 1:]


def test_walk_reads_no_engine_field_and_misses_no_method(tmp_path):
    """The flowstate hook's walk loop: no Lua field of the engine read per packet (its clock struct and the flow
    counter count come from the walk state), and no method looked up by a miss in the object's own table (an HREF by
    a constant key: ``packet``, ``flowid``); the hook's own ``state[id]`` is an HREF by a variable key."""
    capture = corpus.make("small-few", True)
    with open(os.path.join(tmp_path, "flowstate.lua"), "w") as f:
        f.write(shapes._simple("flowstate", "tcp", FLOWSTATE, prelude="local state = {}"))
    part = _per_packet(walkir.walk_ir(capture, str(tmp_path)))
    hrefk = [k for op, k in part if op == "HREFK"]
    misses = [k for op, k in part if op == "HREF" and k is not None]
    assert not {"nflow_counters", "_t"} & set(hrefk), f"engine fields looked up per packet: {hrefk}"
    assert misses == [], f"methods looked up by a miss per packet: {misses}"


def test_new_flows_path_looks_up_no_global_or_module_field(tmp_path):
    """flows-100k (a third of the TCP packets start a flow): the flowstate walk's loop trace, recorded on a new
    flow's path (the key formatted and interned, decode.flowkey), looks up no global (``setmetatable``) and no
    module field (``ffi.string``) per packet: packet.lua and decode.lua hold them in locals.  After the script's
    ``state[id]`` store (a new key: NEWREF) LuaJIT redoes every constant-key lookup of the loop per packet, so
    each such lookup was a load and a guard per packet (walkir: 437 -> 423 IR per packet)."""
    capture = corpus.make("flows-100k", True)
    with open(os.path.join(tmp_path, "flowstate.lua"), "w") as f:
        f.write(shapes._simple("flowstate", "tcp", FLOWSTATE, prelude="local state = {}"))
    hrefk = [k for op, k in _per_packet(walkir.walk_ir(capture, str(tmp_path))) if op == "HREFK"]
    assert not {"setmetatable", "string"} & set(hrefk), f"global / module fields looked up per packet: {hrefk}"


#: The simplecounter walk state's own fields (host.lua setup_simplecounter, Host:new_walk, the list walk's twin).
WALK_STATE_FIELDS = {"per", "pick", "done", "invokes", "args", "hook", "error_label", "fn", "eng", "proto", "pobj",
                     "lobj", "tc", "pc", "lc", "l4", "mixed", "batches", "inv", "traceback", "call", "stitched",
                     "walker", "twin", "sel", "sel_cap"}
#: HREFKs per packet left in that loop: the hook's own calls (``packet``, ``flowid``, ``id`` and their objects'
#: ``_packet``, ``_c``, ``__index``).  The walk's bookkeeping read in the loop made it 15.
MAX_HREFK_NEW_FLOW = 6


def test_new_flow_trace_reads_no_walk_state_field(tmp_path):
    """flows-100k: the flowstate walk's loop trace is recorded on a new flow's packet, where the hook's
    ``state[id]`` store is a new key (NEWREF).  After it LuaJIT cannot keep a Lua table field it loaded in the loop,
    so every field of the walk state sc_pick, sc_pick_sel and sc_invoke read (``sel tc proto l4 pc lc fn eng lobj``)
    was an HREFK, its load and guards again on every packet (walkir: 425 IR per packet, 15 HREFK).  The walker
    reads them once per batch into locals (w.inv) and passes them in: none is looked up per packet."""
    capture = corpus.make("flows-100k", True)
    with open(os.path.join(tmp_path, "flowstate.lua"), "w") as f:
        f.write(shapes._simple("flowstate", "tcp", FLOWSTATE, prelude="local state = {}"))
    part = _per_packet(walkir.walk_ir(capture, str(tmp_path)))
    assert "NEWREF" in {op for op, _ in part}, "the loop trace was not recorded on a new flow's packet"
    hrefk = [k for op, k in part if op == "HREFK"]
    walk = [k for k in hrefk if k in WALK_STATE_FIELDS]
    assert walk == [], f"walk state fields looked up per packet: {walk}"
    assert len(hrefk) <= MAX_HREFK_NEW_FLOW, f"{len(hrefk)} table lookups by a constant key per packet: {hrefk}"


TCP_GUID = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"
PH_GUID = "{6A0C1F2B-7E3D-4C55-9A10-2B8E4F9D3C11}"
#: a protocol_handler on every TCP packet's payload whose parselayer keeps per-flow state as real scripts do
FLOWSTATE_HANDLER = """local state = {}
TrisulPlugin = { id = { name = "flowstate handler" },
  protocol_handler = {
    control = { guid = "%s", name = "FLOWSTATE", host_protocol_guid = "%s" },
    parselayer = function(layer)
      local id = layer:packet():flowid():id()
      state[id] = (state[id] or 0) + 1
      return layer:layer_bytes()
    end } }
""" % (PH_GUID, TCP_GUID)
#: a packet_storage script whose two hooks keep per-flow state
FLOWSTATE_STORAGE = """local state = {}
TrisulPlugin = { id = { name = "flowstate storage" },
  packet_storage = {
    filter = function(engine, ts, flow)
      local id = flow:id()
      state[id] = (state[id] or 0) + 1
      return -1
    end,
    filter_payload = function(engine, ts, flow, dir, seekpos, buf)
      local id = flow:id()
      state[id] = (state[id] or 0) + 1
      return -1
    end } }
"""
#: what protocol.lua's pick, invoke and done read from the walk state per packet before (setup), and wrote into it
#: (li, off, the counters)
PH_FIELDS = {"proto", "parent", "ports", "fn", "pobj", "lobj", "pc", "lc", "cnt", "li", "off", "added", "declined",
             "full", "next_unknown", "bad_returns"}
#: what packetstore.lua's pick reads from the walk state for every call position (the call's own k, slot, uid, ts,
#: flow, dir and buf are written only for a call, at a flow's first packet or a direction's first payload)
PS_PER_PACKET = {"eng", "tc", "store", "capacity", "filter", "filter_payload", "seen", "dirs"}


SHAPE = "small-few"


def _walk_ir(tmp_path, kind, text, protocols=()):
    """The walk loop's per-packet IR, then its side traces' (walkir.walk_ir side=True): whichever path the loop
    trace was recorded on (a flow's first packet or a later one), the other runs in a side trace."""
    plugs = tmp_path / "plugins"
    plugs.mkdir()
    (plugs / f"{kind}.lua").write_text(text)
    return _per_packet(walkir.walk_ir(corpus.make(SHAPE, True), str(plugs), kind, protocols, side=True))


def test_protocol_handler_walk_reads_and_writes_no_walk_state_field(tmp_path):
    """A protocol_handler's walk (protocol.lua pick / invoke / done), its parselayer counting into a table of its own
    per flow: that store (HSTORE by a variable key) may alias any Lua table field, so each field of the walk state
    read per packet was loaded again on every packet (``parent ports proto pobj lobj fn li off added``) and pick /
    done wrote ``li``, ``off``, ``added`` into it.  Now the walker passes them in (w.inv), the candidate layer's
    index is the Layer's own FFI struct and the counters an FFI struct: no field of the walk state, no global and no
    ``math`` field is looked up per packet."""
    part = _walk_ir(tmp_path, "protocol_handler", FLOWSTATE_HANDLER, [(PH_GUID, "FLOWSTATE")])
    keyed = [(op, k) for op, k in part if op in ("HREFK", "HLOAD", "HSTORE") and k is not None]
    walk = [(op, k) for op, k in keyed if k in PH_FIELDS | {"tonumber", "math", "max", "min"}]
    assert walk == [], f"walk state / global fields per packet: {walk}"


def test_packet_storage_walk_reads_no_walk_state_field(tmp_path):
    """packet_storage (packetstore.lua pick, two call positions per packet): the fields of the walk state it reads
    for every position (``capacity seen dirs store filter filter_payload eng``) come from the walker (w.inv), the
    engine's clock is set on its struct by the plain set_clock (``set_packet`` was a method lookup per call), and
    done's ``tonumber`` is a local: none of them is loaded in the loop trace."""
    part = _walk_ir(tmp_path, "packet_storage", FLOWSTATE_STORAGE)
    keyed = [(op, k) for op, k in part if op in ("HREFK", "HLOAD") and k is not None]
    walk = [(op, k) for op, k in keyed if k in PS_PER_PACKET | {"set_packet", "tonumber", "_t"}]
    assert walk == [], f"walk state / engine fields read per packet: {walk}"
