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
