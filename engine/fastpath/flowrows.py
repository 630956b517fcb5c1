"""Flow records exported by the driver VM, read with numpy.

The driver (engine/fastpath/driver.lua, "Exported flow records") copies the records of ended flows (idle or
active timeout, end of input) and of new flows (sg_monitor onnewflow) into a contiguous array of ``lp_flowrow``
structs, 256 bytes each; :data:`ROW_DTYPE` is the same layout as a numpy structured dtype, so a chunk of n
records is read as columns with no per-field conversion in Python.  Only the text columns (flow key, addresses)
and the assembly of rows cost per-flow Python work, and both run in C (``tolist``, ``zip``).

A record as the rest of the fast path sees it (a "full row", :data:`FIELDS` = 20 fields): the first 14 columns
of the flows table (docs/schema.md: flowkey, proto, ipa, porta, ipz, portz, first_ts, last_ts, packets_az,
packets_za, bytes_az, bytes_za, state, tags), then the state flags and the L4 payload bytes a->z and z->a
that only the sg_monitor / flowtracker Flow object reads (engine/plugins/flowmon.py), then the stored
setup_rtt_us (int µs, None when not measured), retrans_az, retrans_za.
"""
from __future__ import annotations

import ctypes

import numpy as np


def flow_key(proto: int, v6: bool, ip1: bytes, port1: int, ip2: bytes, port2: int) -> str:
    """The Trisul flow id of a conversation (the rules of engine/fastpath/decode.lua put_flowkey): the Z end has the
    lower port; equal ports: the lower address; endpoint 2 is treated as the destination.  ``ip1``/``ip2``: 4 or 16
    address bytes (the first 4 or 16 used).  "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016"."""
    n = 16 if v6 else 4
    a, b = bytes(ip1[:n]), bytes(ip2[:n])
    src_is_a = port1 > port2 if port1 != port2 else a >= b
    (ia, pa), (iz, pz) = ((a, port1), (b, port2)) if src_is_a else ((b, port2), (a, port1))

    def ip(x):
        return x.hex().upper() if v6 else ".".join(f"{c:02X}" for c in x)
    return f"{proto & 255:02X}{'B' if v6 else 'A'}:{ip(ia)}:p-{pa:04X}_{ip(iz)}:p-{pz:04X}"

FIELDS = 20                      #: fields of a full row
STATE_TEXT = np.array(["OPEN", "TIMEOUT", "CLOSED", "RESET", "REUSED"], dtype=object)   #: lp_flowrow.state -> flows.state

#: lp_flowrow (driver.lua), field for field; tests/test_flowrows.py checks it against LuaJIT's offsets.
ROW_DTYPE = np.dtype([
    ("first_ts", "<f8"), ("last_ts", "<f8"),
    ("packets_az", "<f8"), ("packets_za", "<f8"), ("bytes_az", "<f8"), ("bytes_za", "<f8"),
    ("payload_az", "<f8"), ("payload_za", "<f8"),
    ("setup_rtt_us", "<f8"), ("retrans_az", "<f8"), ("retrans_za", "<f8"),
    ("flags", "<u4"), ("tags", "<i4"), ("porta", "<u2"), ("portz", "<u2"), ("proto", "u1"), ("state", "u1"),
    ("pad_", "V2"), ("key", "S84"), ("ipa", "S32"), ("ipz", "S32"),
    ("end_", "V4"),
])
assert ROW_DTYPE.itemsize == 256


def view(addr: int, n: int) -> np.ndarray:
    """The first n records of the driver's export array at address ``addr`` (no copy: valid until the
    driver's next export call)."""
    if n <= 0:
        return np.zeros(0, ROW_DTYPE)
    return np.frombuffer((ctypes.c_char * (n * ROW_DTYPE.itemsize)).from_address(addr), ROW_DTYPE)


def _ints(col: np.ndarray) -> list:
    return col.astype(np.int64).tolist()


def _text(col: np.ndarray) -> list[str]:
    """A NUL-padded ASCII column (key, ipa, ipz: hex digits, dots, colons) as str: numpy's ``tolist`` strips the
    padding into bytes, ``bytes.decode`` runs per item in C (~40 % cheaper than ``astype("U84")``, issue 10)."""
    return list(map(bytes.decode, col.tolist()))


def _tags(recs: np.ndarray, tags) -> list[str]:
    tag_col = [""] * len(recs)
    if tags:
        texts = [t.decode("utf-8", "backslashreplace") if isinstance(t, bytes) else t for t in _lua_list(tags)]
        for i in np.flatnonzero(recs["tags"]).tolist():
            tag_col[i] = texts[int(recs["tags"][i]) - 1]
    return tag_col


def _rtt(recs: np.ndarray) -> list:
    rtt = recs["setup_rtt_us"]
    rtt_col = _ints(rtt)
    if (rtt < 0).any():
        rtt_col = [None if v < 0 else v for v in rtt_col]
    return rtt_col


def columns(recs: np.ndarray, tags) -> list[list]:
    """The FIELDS columns of the records as Python lists (str, int, float; setup_rtt_us None when not
    measured).  ``tags``: the driver's exp_tags (1-based sequence of strings, Lua table or list)."""
    return [
        _text(recs["key"]), recs["proto"].tolist(), _text(recs["ipa"]),
        recs["porta"].tolist(), _text(recs["ipz"]), recs["portz"].tolist(),
        recs["first_ts"].tolist(), recs["last_ts"].tolist(),
        _ints(recs["packets_az"]), _ints(recs["packets_za"]), _ints(recs["bytes_az"]), _ints(recs["bytes_za"]),
        STATE_TEXT[recs["state"]].tolist(), _tags(recs, tags),
        recs["flags"].tolist(), _ints(recs["payload_az"]), _ints(recs["payload_za"]),
        _rtt(recs), _ints(recs["retrans_az"]), _ints(recs["retrans_za"]),
    ]


def _lua_list(t) -> list:
    if isinstance(t, list):
        return t
    return [t[i] for i in range(1, len(t) + 1)]


def full_rows(cols: list[list]) -> list[list]:
    """Full rows (lists of FIELDS values) from :func:`columns`."""
    return list(map(list, zip(*cols)))


def stored_rows(cols: list[list]) -> list[tuple]:
    """The flows-table rows (docs/schema.md, 17 columns) from :func:`columns`: fields 0-13, then
    setup_rtt_us, retrans_az, retrans_za (fields 17-19); same as flowmon.stored of each full row."""
    return list(zip(*(cols[:14] + cols[17:])))


def stored(recs: np.ndarray, tags) -> list[tuple]:
    """The flows-table rows of the records (``stored_rows(columns(recs, tags))`` without the three columns only
    sg_monitor reads): 17-tuples whose values are str, int, float or None by construction, so the store writer
    inserts them unchecked (StoreWriter.write ``built``; tests/test_flowrows_stored.py checks both against a
    struct decode of the raw records)."""
    return list(zip(
        _text(recs["key"]), recs["proto"].tolist(), _text(recs["ipa"]),
        recs["porta"].tolist(), _text(recs["ipz"]), recs["portz"].tolist(),
        recs["first_ts"].tolist(), recs["last_ts"].tolist(),
        _ints(recs["packets_az"]), _ints(recs["packets_za"]), _ints(recs["bytes_az"]), _ints(recs["bytes_za"]),
        STATE_TEXT[recs["state"]].tolist(), _tags(recs, tags),
        _rtt(recs), _ints(recs["retrans_az"]), _ints(recs["retrans_za"])))
