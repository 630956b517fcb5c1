"""The flows-table rows the fast path builds from the driver's exported records (engine/fastpath/flowrows.py
``stored``), checked against an independent decode of each record's raw 256 bytes with ``struct`` (the lp_flowrow
layout of engine/fastpath/flowrow.lua), for random records (hypothesis).  The store writer inserts these rows
without its per-row check (StoreWriter.write ``built``), so the test also holds that the check would return them
unchanged: exact Python types, no bytes."""
from __future__ import annotations

import struct
import types

import numpy as np
from hypothesis import given, settings, strategies as st

from luaprobe.engine.fastpath import flowrows
from luaprobe.engine.store import writer as W

#: lp_flowrow (engine/fastpath/flowrow.lua), little-endian, 256 bytes
RECORD = struct.Struct("<11d I i H H B B 2x 84s 32s 32s 4x")
STATES = ("OPEN", "TIMEOUT", "CLOSED", "RESET", "REUSED")          # docs/schema.md flows.state
KEY_CHARS = "0123456789ABCDEF.:_p-"

counts = st.integers(0, 2 ** 53)                                   # counters: doubles holding integers
record = st.fixed_dictionaries({
    "first_ts": st.floats(0, 4e9), "last_ts": st.floats(0, 4e9),
    "packets_az": counts, "packets_za": counts, "bytes_az": counts, "bytes_za": counts,
    "payload_az": counts, "payload_za": counts,
    "setup_rtt_us": st.one_of(st.just(-1), st.integers(0, 2 ** 40)), "retrans_az": counts, "retrans_za": counts,
    "flags": st.integers(0, 2 ** 32 - 1), "porta": st.integers(0, 65535), "portz": st.integers(0, 65535),
    "proto": st.integers(0, 255), "state": st.integers(0, 4),
    "key": st.sampled_from([41, 83]).flatmap(lambda n: st.text(KEY_CHARS, min_size=n, max_size=n)),
    "ipa": st.sampled_from([11, 32]).flatmap(lambda n: st.text(KEY_CHARS, min_size=n, max_size=n)),
    "ipz": st.sampled_from([11, 32]).flatmap(lambda n: st.text(KEY_CHARS, min_size=n, max_size=n)),
    "tag": st.integers(0, 3),
})
TAGS = ["NAT", "NAT RST", "x" * 64]


def _model(raw: bytes, tags: list[str]) -> tuple:
    """The stored row of one record from its bytes (docs/schema.md flows, writer.FLOW_COLUMNS order)."""
    (first, last, paz, pza, baz, bza, _plaz, _plza, rtt, raz, rza, _flags, tag, porta, portz, proto, state,
     key, ipa, ipz) = RECORD.unpack(raw)
    text = lambda b: b.rstrip(b"\0").decode("ascii")       # noqa: E731
    return (text(key), proto, text(ipa), porta, text(ipz), portz, first, last, int(paz), int(pza), int(baz),
            int(bza), STATES[state], tags[tag - 1] if tag else "", None if rtt < 0 else int(rtt), int(raz), int(rza))


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=40))
def test_stored_rows_match_a_struct_decode_of_the_records(recs_in):
    recs = np.zeros(len(recs_in), flowrows.ROW_DTYPE)
    for i, r in enumerate(recs_in):
        for name, v in r.items():
            if name == "tag":
                recs[i]["tags"] = v
            else:
                recs[i][name] = v.encode() if isinstance(v, str) else v
    assert RECORD.size == flowrows.ROW_DTYPE.itemsize
    want = [_model(recs[i:i + 1].tobytes(), TAGS) for i in range(len(recs))]
    got = flowrows.stored(recs, TAGS)
    assert got == want
    for g, w in zip(got, want):           # == would let 1 == 1.0 and True == 1 pass
        assert [type(v) for v in g] == [type(v) for v in w]
        assert [type(v) for v in g] == [str, int, str, int, str, int, float, float, int, int, int, int, str, str,
                                        type(w[14]), int, int]
    assert got == flowrows.stored_rows(flowrows.columns(recs, TAGS))   # the sg_monitor path's rows agree
    stub = types.SimpleNamespace(bad={"flows": 0}, note=lambda m: None)
    cleaned = W._Writer.clean(stub, "flows", len(W.FLOW_COLUMNS), got)  # the check the writer skips for them
    assert cleaned == got and all(c is g for c, g in zip(cleaned, got)) and stub.bad["flows"] == 0
