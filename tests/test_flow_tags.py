"""A flow's tags (engine:tag_flow, Flow:add_tag): each tag once, in tagging order, joined by spaces into at most
64 bytes, a tag that would pass 64 dropped (docs.trisul.org/docs/lua/obj_engine tag_flow: "all tags of a flow
together stay <64 bytes, excess dropped"; docs/plugins.md "Flow-record engine methods").  The same rule holds in
the fast path's Lua (engine/fastpath/flowrow.lua add_tag + join_tags, packet flows and script-made records) and in
the backend's Python (engine/plugins/flowmon.py _join_tags, sg_monitor / flowtracker records); both are checked
against the model below, written from the rule."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from luaprobe.engine.plugins.flowmon import _join_tags
from luaprobe.shm.luajit import new_runtime

TAG = st.text(alphabet="abcxyz-_.0123456789", min_size=1, max_size=40)


def model(tags: list[str]) -> str:
    kept: list[str] = []
    for t in tags:
        if t in kept:
            continue
        if len(" ".join(kept + [t]).encode()) <= 64:
            kept.append(t)
    return " ".join(kept)


_LUA = None


def lua_join():
    global _LUA
    if _LUA is None:
        lua = new_runtime()
        _LUA = lua.eval("""function(tags)
          local fr = require("luaprobe.engine.fastpath.flowrow")
          local list = {}
          for i = 1, #tags do fr.add_tag(list, tags[i]) end
          return fr.join_tags(list)
        end"""), lua
    return _LUA


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(TAG, st.sampled_from(["RST", "NAT", "oldmoz"])), max_size=30))
def test_tags_once_in_order_at_most_64_bytes(tags):
    want = model(tags)
    assert len(want.encode()) <= 64
    fn, lua = lua_join()
    got = fn(lua.table_from([t.encode() for t in tags]))
    assert (got.decode() if isinstance(got, bytes) else got) == want
    assert _join_tags(tags) == want
