"""luaprobe's built-in analysers (Trisul's own counter groups, resources and FTS documents).

:class:`Analysers` owns one LuaJIT VM running ``engine/analysers/run.lua`` over the fast path's
batches.  It exists only when a monitor script or ``--analysers`` asks for an analyser, so a run
without them pays nothing per packet (docs/benchmarks.md).  Outputs are rows in the store's
``counters``, ``resources`` and ``fts`` tables (docs/schema.md); certificate chains are formatted
in Python with ``cryptography`` (engine/analysers/certs.py).
"""
from __future__ import annotations

from luaprobe.shm.luajit import method, new_runtime

#: analyser name -> what it produces (docs/plugins.md "Built-in analysers")
NAMES = ("counters", "dns", "http", "tls")

#: built-in groups: guid -> (name, [(meter id, name, units)]), stored in counter_groups
GROUPS = {
    "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}": ("Hosts", [(0, "Total", "bytes"), (1, "Received", "bytes"),
                                                         (2, "Transmit", "bytes"), (3, "Total", "packets")]),
    "{6CD742B1-C1CA-4708-BE78-0FCA2EB01A86}": ("HostsIPv6", [(0, "Total", "bytes"), (1, "Received", "bytes"),
                                                             (2, "Transmit", "bytes"), (3, "Total", "packets")]),
    "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}": ("Apps", [(0, "Total", "bytes")]),
    "{4B09BD22-3B99-40FC-8215-94A430EA0A35}": ("Mac", [(0, "Transmit", "bytes"), (1, "Receive", "bytes")]),
    "{E89BCD56-30AD-40F5-B1C8-8B7683F440BD}": ("NetworkLayerStats", [(0, "Total", "bytes"),
                                                                     (1, "Total", "packets")]),
    "{393B5EBC-AB41-4387-8F31-8077DB917336}": ("Aggregates", [(0, "Total", "bytes"), (1, "Packets", "packets")]),
}
#: resource and FTS groups each analyser feeds
RESOURCE_GROUPS = {"DNS": "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}", "URL": "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}",
                   "SSL Certs": "{5AEE3F0B-9304-44BE-BBD0-0467052CF468}",
                   "FileHash": "{9781DB2C-F78A-4F7F-A7E8-2B1A9A7BE71A}"}
FTS_GROUPS = {"SSL Certs": "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}", "HTTP Headers": "{28217924-E7A5-4523-993C-44B52758D5A8}",
              "DNS": "{09B305DF-078C-4B9E-8E2F-EA64B7326880}"}
PRODUCER = {RESOURCE_GROUPS["DNS"]: "dns", RESOURCE_GROUPS["URL"]: "http", RESOURCE_GROUPS["SSL Certs"]: "tls",
            FTS_GROUPS["DNS"]: "dns", FTS_GROUPS["HTTP Headers"]: "http", FTS_GROUPS["SSL Certs"]: "tls",
            **{g: "counters" for g in GROUPS}}


def parse_names(spec: str) -> set:
    """`--analysers` value: "all", "none" or a comma list of NAMES.  Raises ValueError naming the bad word ("all" or
    "none" inside a list, an empty name, an unknown one)."""
    spec = (spec or "").strip().lower()
    if spec in ("", "none"):
        return set()
    if spec == "all":
        return set(NAMES)
    out = set()
    for w in spec.split(","):
        w = w.strip()
        if w in ("all", "none"):          # words for the whole value, not names of analysers
            raise ValueError(f"--analysers {spec}: '{w}' stands alone; give it by itself, or a comma list of "
                             f"{', '.join(NAMES)}")
        if not w:
            raise ValueError(f"--analysers {spec}: an empty name (names are separated by single commas: "
                             f"{', '.join(NAMES)})")
        if w not in NAMES:
            raise ValueError(f"--analysers: unknown analyser '{w}' (known: all, none, {', '.join(NAMES)})")
        out.add(w)
    return out


def group_rows() -> list[tuple]:
    """counter_groups rows for the built-in groups (meters with luaprobe's units: totals per bucket)."""
    import json
    rows = []
    for guid, (name, meters) in GROUPS.items():
        m = [{"id": i, "vartype": 0, "topn": 10, "bottomn": 0, "name": n, "description": n, "units": u}
             for i, n, u in meters]
        rows.append((guid, name, f"luaprobe built-in analyser ({name})", 60, json.dumps(m)))
    return rows


class Analysers:
    """The analysers VM.  ``names``: the subset of NAMES to run."""

    def __init__(self, names, idle_timeout: float = 120.0):
        self.names = set(names)
        self.lua = new_runtime()
        mod = self.lua.eval("require('luaprobe.engine.analysers.run')")
        opts = self.lua.table_from({n.encode(): True for n in self.names})
        opts[b"idle_timeout"] = idle_timeout
        self.obj = mod.new(opts)
        self.engine = self.obj.engine
        self.run_batch = self.lua.eval("function(a) return function(addr, n) return a:run_batch(addr, n) end end")(
            self.obj)
        self._take_counters = method(self.lua, "take_counters")
        self._take_outputs = method(self.lua, "take_outputs")
        self._take_docs = method(self.lua, "take_docs")
        self._tick = method(self.lua, "tick")
        self.cert_errors: list[str] = []

    def take(self, now) -> dict:
        """Rows ready now: counters of buckets closed by `now` (all when None), resources, fts."""
        counters = _rows(self._take_counters(self.engine, now))
        out = self._take_outputs(self.engine)
        resources = _rows(out[b"resources"])
        docs = self._take_docs(self.obj)
        fts = _rows(docs[b"fts"])
        for row in _rows(docs[b"certs"], text=False):
            from .certs import chain_outputs    # here, not at the top: cryptography costs every run ~20-50 ms of
            res, doc, err = chain_outputs(row)  # start-up (cli imports this package), only a TLS run needs it
            if err:
                self.cert_errors.append(err)
                continue
            resources.append(res)
            fts.append(doc)
        return {"counters": counters, "resources": resources, "fts": fts}

    def tick(self, sec: int, usec: int) -> None:
        """Packet time reached second `sec`, opened by a packet at `usec` µs: idle TCP flows end (every 10 s)."""
        self._tick(self.obj, sec, usec)

    def finish(self, sec: int, usec: int) -> None:
        """End of input: close the TCP flows still open, their items stamped `sec`.`usec` (the last tick's time)."""
        self.lua.eval("function(a, s, u) a:finish(s, u) end")(self.obj, sec, usec)

    def stats(self) -> dict:
        st = self.lua.eval("function(a) return a:get_stats() end")(self.obj)
        out = {k.decode(): v for k, v in st.items()}
        out["names"] = sorted(self.names)
        out["cert_errors"] = len(self.cert_errors)
        return out


def _rows(t, text: bool = True) -> list[tuple]:
    """Lua array of arrays -> list of tuples (Lua strings decoded as UTF-8 text when `text`; bytes that are not
    UTF-8, e.g. a Latin-1 header value, as \\xNN escapes: docs/schema.md "Text vs binary", never U+FFFD)."""
    out = []
    for r in t.values():
        vals = list(r.values())
        if text:
            vals = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v for v in vals]
        else:
            vals = [v for v in vals]
        out.append(tuple(vals))
    return out
