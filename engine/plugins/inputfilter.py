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


#: the range of each numeric field: a value outside it is a hook error naming the field (before, a Priority of 2^70
#: reached the store writer, which rejected the whole batch of alerts with it: exit 1)
RANGES = {"TimestampSecs": (0, 2**63 - 1), "TimestampUsecs": (0, 999_999), "Priority": (-2**63, 2**63 - 1),
          "Protocol": (0, 255), "SourcePort": (0, 65535), "DestPort": (0, 65535)}


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _int(a: dict, name: str, default: int | None = None) -> int:
    """Field `name` as an integer within RANGES[name] (a number, or text that is one; a fraction is cut off)."""
    v = a.get(name)
    if v is None and default is not None:
        return default
    if isinstance(v, (dict, list)):
        raise ValueError(f"{name} is a table, not a number")
    try:
        n = int(_text(v))                 # exact for integers beyond 2^53 given as text
    except ValueError:
        try:
            f = float(_text(v))
        except ValueError:
            raise ValueError(f"{name} {_text(v)!r} is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{name} {_text(v)!r} is not a number")
        n = int(f)
    lo, hi = RANGES[name]
    if not lo <= n <= hi:
        t = _text(v)
        raise ValueError(f"{name} {t if len(t) <= 24 else t[:20] + '...'} is out of range ({lo}..{hi})")
    return n


def _scalar(a: dict, name: str) -> str:
    """A text field: a string or a number; a table is an error naming the field."""
    v = a.get(name)
    if isinstance(v, (dict, list)):
        raise ValueError(f"{name} is a table, not text")
    return _text(v)


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
    return flow_key(_int(a, "Protocol", 0), s.version == 6, s.packed, _int(a, "SourcePort", 0),
                    d.packed, _int(a, "DestPort", 0))


def alert_row(a: dict, plugin: str) -> tuple:
    """One step_alert table (its keys as text) as an ``alerts`` row.  Raises ValueError naming the field when a
    mandatory one is missing, a number or address is not one or is out of its range (RANGES), or a text field is a
    table."""
    missing = [f for f in MANDATORY if a.get(f) is None]
    if missing:
        raise ValueError(f"alert without {', '.join(missing)} (mandatory: {', '.join(MANDATORY)})")
    label = a.get("SigIDKeyLabel", a.get("SigIDLabel"))
    if isinstance(label, (dict, list)):
        raise ValueError("SigIDKeyLabel is a table, not text")
    return (_int(a, "TimestampSecs"), _int(a, "TimestampUsecs", 0), _scalar(a, "AlertGroupGUID").upper(), _flowkey(a),
            _scalar(a, "SigIDKey"), _scalar(a, "ClassificationKey"), _int(a, "Priority", 3),
            _scalar(a, "AlertDetails") if a.get("AlertDetails") is not None else _text(label),
            _scalar(a, "AlertStatus"), plugin)
