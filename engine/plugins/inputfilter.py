"""The inputfilter script type's alerts (Trisul: docs.trisul.org/docs/lua/inputfilter; docs/plugins.md "inputfilter").

An inputfilter's ``step_alert()`` returns nil when it has no alert, otherwise a table of Trisul's alert fields;
luaprobe polls it beside the packet input (engine/plugins/host.lua ``Host:poll_alerts``, engine/fastpath/run.py)
and :func:`alert_row` turns each table into an ``alerts`` row (docs/schema.md), the layout ``engine:add_alert_full``
writes: (ts_sec, ts_usec, alert_guid, flowkey, sigid, classification, priority, message, status, plugin).

Fields (* mandatory, Trisul's names): AlertGroupGUID*, TimestampSecs*, TimestampUsecs, SigIDKey*, SigIDKeyLabel
(trisul-scripts also spell it SigIDLabel), ClassificationKey, Priority, AlertDetails, AlertStatus, and the flow:
Protocol, SourceIP, SourcePort, DestIP, DestPort (IP addresses as text, IPv4 or IPv6).  SensorID, ProtocolFamily,
SigGenerator, SigRev, EventID and AcknowledgeFlag have no column and are not stored.
"""
from __future__ import annotations

import ipaddress
import math

from luaprobe.engine.fastpath.flowrows import flow_key

MANDATORY = ("AlertGroupGUID", "TimestampSecs", "SigIDKey")


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _int(a: dict, name: str, default: int | None = None) -> int:
    v = a.get(name)
    if v is None and default is not None:
        return default
    try:
        f = float(_text(v))
    except ValueError:
        raise ValueError(f"{name} {_text(v)!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} {_text(v)!r} is not a number")
    return int(f)


def _flowkey(a: dict) -> str:
    """The alert's flow as a Trisul flow id, "" when it names no two addresses of one IP version."""
    if a.get("SourceIP") is None or a.get("DestIP") is None:
        return ""
    try:
        s, d = ipaddress.ip_address(_text(a["SourceIP"])), ipaddress.ip_address(_text(a["DestIP"]))
    except ValueError:
        raise ValueError(f"SourceIP / DestIP {_text(a['SourceIP'])!r} / {_text(a['DestIP'])!r} are not IP "
                         "addresses") from None
    if s.version != d.version:
        raise ValueError(f"SourceIP {s} and DestIP {d} are not of one IP version")
    return flow_key(_int(a, "Protocol", 0), s.version == 6, s.packed, _int(a, "SourcePort", 0) & 0xFFFF,
                    d.packed, _int(a, "DestPort", 0) & 0xFFFF)


def alert_row(a: dict, plugin: str) -> tuple:
    """One step_alert table (its keys as text) as an ``alerts`` row.  Raises ValueError naming the field when a
    mandatory one is missing or a number or address is not one."""
    missing = [f for f in MANDATORY if a.get(f) is None]
    if missing:
        raise ValueError(f"alert without {', '.join(missing)} (mandatory: {', '.join(MANDATORY)})")
    label = a.get("SigIDKeyLabel", a.get("SigIDLabel"))
    return (_int(a, "TimestampSecs"), _int(a, "TimestampUsecs", 0), _text(a["AlertGroupGUID"]).upper(), _flowkey(a),
            _text(a["SigIDKey"]), _text(a.get("ClassificationKey")), _int(a, "Priority", 3),
            _text(a.get("AlertDetails", label)), _text(a.get("AlertStatus")), plugin)
