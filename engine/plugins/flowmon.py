"""Backend flow script types: sg_monitor (docs.trisul.org/docs/lua/sg_monitor) and flowtracker (docs.trisul.org/docs/lua/flow_tracker), Python side.

Flow records reach the backend when their flow ends in the fast path's flow table (idle or active timeout,
end of input) or when a script-made record is terminated.  They are held until the backend window ends
(``window`` seconds of packet time, like Trisul's 60 s flush); then, per window:

1. each record is assigned to one backend instance (crc32 of the flow key modulo the number of instances);
2. every sg_monitor instance runs ``onterminate(engine, flow)`` for its records, then ``flushfilter`` votes:
   a record is stored unless every sg_monitor script that has a flushfilter votes false (a script without one
   does not vote: engine/plugins/monitors.py ``kept``, Trisul's rule for every backend flushfilter);
3. ``onflush(engine, flow)`` runs for the kept records; tags added with ``flow:add_tag`` (and
   ``engine:tag_flow`` calls made meanwhile) are written with the record;
4. every flowtracker instance ranks its records with ``getmetric``; per tracker and ``bucketsize`` bucket
   (by the record's last packet time) the top ``count`` flows are written when the bucket closes (metric 0 / nil
   excludes a flow; Trisul's flow_tracker page is ambiguous, scripts return the metric).  They are this fast
   path's (shard's) part of the bucket: the store ranks every shard's part into ``flow_toppers``
   (engine/store/writer.py ``_rank_toppers``); a flow is on one shard, so the top ``count`` of the parts is the
   top ``count`` of all flows.

Lua side: engine/plugins/flowmon.lua (Flow object, hook phases).  Nothing here runs when no sg_monitor or
flowtracker is loaded: records are then written as soon as the flow ends.
"""
from __future__ import annotations

import heapq
import zlib

from luaprobe.engine.plugins.monitors import kept

TOPPER_HORIZON = 12     #: closed flowtracker buckets kept for late records (a flow's record comes idle/active timeout
                        #: after its last packet: 120 s / 1800 s, within 12 buckets of 300 s)
_SCRIPT_PAD = [0x800, 0, 0, None, 0, 0]   #: a script-made record's flags, payloads, setup RTT, retransmissions
#: fields of a full record (engine/fastpath/flowrows.py FIELDS: the 14 of a script-made record and the pad above);
#: not imported from there, which imports numpy: every `luaprobe run` imports this module before it starts its
#: capture process (tests/test_startup_order.py checks the two agree)
FLOW_ROW_FIELDS = 14 + len(_SCRIPT_PAD)


def stored(r) -> tuple:
    """The flows-table columns (docs/schema.md) of a full record: fields 0-13, then setup_rtt_us, retrans_az,
    retrans_za (fields 17-19); fields 14-16 (state flags, payload bytes) only feed the Flow object."""
    return tuple(r[:14]) + tuple(r[17:20])


def full_row(r) -> list:
    """A record with all FLOW_ROW_FIELDS fields: a 14-field script-made record (engine.lua take_open_flows,
    terminate_flow, expire_script_flows) gets state TERMINATED (and TIMEDOUT when it ended idle), no payload, no
    setup RTT (None) and no retransmissions."""
    r = list(r)
    if len(r) >= FLOW_ROW_FIELDS:
        return r
    pad = _SCRIPT_PAD[len(r) - 14:]
    if len(r) == 14 and _text(r[12]) == "TIMEOUT":    # ended idle (engine.lua expire_script_flows): TIMEDOUT too
        pad = [0x800 | 0x100] + pad[1:]
    return r + pad


def _text(x):
    return x.decode("utf-8", "backslashreplace") if isinstance(x, bytes) else x


class FlowBackends:
    """The sg_monitor / flowtracker instances of a run and the records held for the current window."""

    def __init__(self, write, trackers: dict, shard: int = 0):
        self.write = write                       #: write(kind, rows) to the store
        self.shard = shard                       #: this fast path's shard number (its part of each bucket)
        self.sg = []                             #: instances (kind sg_monitor)
        self.ft = []                             #: instances (kind flowtracker)
        self.trackers = trackers                 #: path -> {name, bucketsize, count}
        self.held: list[list] = []
        self.by_key: dict[str, list] = {}
        self.buckets: dict[tuple, list] = {}     #: (tracker name, bucket_ts) -> [(metric, flowkey)]
        #: (tracker name, bucket_ts) -> its written top-K, kept TOPPER_HORIZON buckets after it closed: a record
        #: whose last packet falls in a closed bucket (a flow ends idle_timeout after its last packet, often after
        #: its bucket closed) is ranked with them and the bucket's ranks are written again
        self.closed: dict[tuple, list] = {}
        #: tracker name -> the start of the newest bucket ended by the last window end (packet time: every shard
        #: ends the same windows, so every shard calls the same records late)
        self.closed_upto: dict[str, int] = {}
        self.stats = {"flows_flushed": 0, "flows_filtered_out": 0, "toppers_written": 0, "toppers_rewritten": 0,
                      "toppers_late": 0}

    @property
    def active(self) -> bool:
        return bool(self.sg or self.ft)

    @property
    def wants_new(self) -> list:
        """sg_monitor instances that define onnewflow."""
        return [i for i in self.sg if i.has_newflow]

    def new_flows(self, rows, now: int) -> None:
        """onnewflow(engine, flow) for flows created by the last batch, in the instance owning each flow."""
        if not rows:
            return
        by_path: dict[str, list] = {}
        for inst in self.wants_new:
            by_path.setdefault(inst.vm.path, []).append(inst)
        for insts in by_path.values():
            insts.sort(key=lambda i: i.vm.instance)
            for k, inst in enumerate(insts):
                mine = [r for r in rows if zlib.crc32(r[0].encode()) % len(insts) == k]
                if mine:
                    lua = inst.vm.lua
                    inst.vm.set_time(inst.vm.host.engine, now, 0)
                    inst.fm["newflow"](inst.vm.host, lua.table_from(
                        [lua.table_from([x.encode() if isinstance(x, str) else x for x in r]) for r in mine]))

    def add(self, inst) -> None:
        (self.sg if inst.kind == "sg_monitor" else self.ft).append(inst)
        lua = inst.vm.lua
        fm = lua.eval("require('luaprobe.engine.plugins.flowmon')")
        inst.fm = {k: fm[k.encode()] for k in ("begin", "newflow", "terminate", "filter", "flush", "metric", "tags")}
        inst.has_newflow = inst.kind == "sg_monitor" and bool(lua.eval(
            "function(h) return type(h.plugin.sg_monitor.onnewflow) == 'function' end")(inst.vm.host))

    def remove_vm(self, vm) -> None:
        self.sg = [i for i in self.sg if i.vm is not vm]
        self.ft = [i for i in self.ft if i.vm is not vm]

    def hold(self, rows) -> None:
        """Records of flows that ended (full rows, FLOW_ROW_FIELDS fields); written at the window end."""
        for r in rows:
            r = list(r)
            self.held.append(r)
            self.by_key[r[0]] = r

    def tag(self, flowkey: str, tag: str) -> bool:
        """tag_flow on a held record; False when the flow is not held here."""
        r = self.by_key.get(flowkey)
        if r is None:
            return False
        r[13] = _join_tags((r[13] + " " + tag).split())
        return True

    def _share(self, instances):
        """{instance: [records]}: each record to one instance per script (crc32 of the flow key)."""
        by_path: dict[str, list] = {}
        for inst in instances:
            by_path.setdefault(inst.vm.path, []).append(inst)
        out = []
        for path, insts in by_path.items():
            insts.sort(key=lambda i: i.vm.instance)
            parts = [[] for _ in insts]
            for idx, r in enumerate(self.held):
                parts[zlib.crc32(r[0].encode()) % len(insts)].append(idx)
            out += [(inst, part) for inst, part in zip(insts, parts) if part]
        return out

    def flush(self, window_end: int, final: bool = False) -> None:
        """The window ended at `window_end`: run the hooks on the held records, write them."""
        held, keep = self.held, [True] * len(self.held)
        if held:
            shares = self._share(self.sg)
            for inst, idxs in shares:
                self._begin(inst, idxs, window_end)
                inst.fm["terminate"](inst.vm.host)
            if self.sg:
                votes = [[] for _ in held]         # per record: one vote per sg_monitor script (None: no filter)
                for inst, idxs in shares:
                    res = inst.fm["filter"](inst.vm.host)
                    for j, idx in enumerate(idxs):
                        votes[idx].append({1: True, 0: False}.get(res[j + 1]))
                keep = [kept(v) for v in votes]
            for inst, idxs in shares:
                inst.fm["flush"](inst.vm.host, inst.vm.lua.table_from([keep[i] for i in idxs]))
                self._take_tags(inst, idxs)
            for inst, idxs in self._share(self.ft):
                self._begin(inst, idxs, window_end)
                res = inst.fm["metric"](inst.vm.host)
                info = self.trackers[inst.vm.path]
                for j, idx in enumerate(idxs):
                    m = res[j + 1]
                    if m:
                        b = int(held[idx][7]) - int(held[idx][7]) % int(info["bucketsize"])
                        self.buckets.setdefault((info["name"], b), []).append((m, held[idx][0]))
                inst.fm["tags"](inst.vm.host)
        rows = [stored(r) for r, k in zip(held, keep) if k]
        self.stats["flows_flushed"] += len(rows)
        self.stats["flows_filtered_out"] += len(held) - len(rows)
        self.write("flows", rows)
        self.held, self.by_key = [], {}
        self._close_buckets(None if final else window_end)

    def _begin(self, inst, idxs, window_end) -> None:
        lua = inst.vm.lua
        inst.vm.set_time(inst.vm.host.engine, window_end, 0)
        rows = lua.table_from([lua.table_from([x.encode() if isinstance(x, str) else x for x in self.held[i]])
                               for i in idxs])
        inst.fm["begin"](inst.vm.host, rows)

    def _take_tags(self, inst, idxs) -> None:
        for k, v in inst.fm["tags"](inst.vm.host).items():
            r = self.held[idxs[k - 1]]
            r[13] = _join_tags((r[13] + " " + _text(v)).split())

    def _close_buckets(self, now) -> None:
        """Top-K rows of flowtracker buckets that ended by `now` (all when None).  A bucket that receives records
        after it closed is ranked again with its earlier top-K and all its ranks are rewritten (the rows are
        keyed by rank: writing only the late records would replace the best flows); records for a bucket that
        ended more than TOPPER_HORIZON buckets before the last window end are counted in toppers_late and not
        ranked.  Rows: (tracker, bucket_ts, rank, flowkey, metric, shard, count), this shard's part."""
        out = []
        counts = {info["name"]: int(info["count"]) for info in self.trackers.values()}
        sizes = {info["name"]: int(info["bucketsize"]) for info in self.trackers.values()}
        for key in sorted(self.buckets):
            name, b = key
            if now is not None and b + sizes[name] > now:
                continue
            new = self.buckets.pop(key)
            if b < self.closed_upto.get(name, b) - TOPPER_HORIZON * sizes[name]:
                self.stats["toppers_late"] += len(new)
                continue
            before = self.closed.get(key, [])
            top = heapq.nlargest(counts[name], before + new, key=lambda x: (x[0], x[1]))
            self.stats["toppers_rewritten"] += len(before)
            self.stats["toppers_written"] += len(top) - len(before)
            self.closed[key] = top
            out += [(name, b, rank, fk, m, self.shard, counts[name]) for rank, (m, fk) in enumerate(top, 1)]
        if now is not None:
            for name, size in sizes.items():
                self.closed_upto[name] = max(self.closed_upto.get(name, 0), now - now % size - size)
        for key in [k for k in self.closed if k[1] < self.closed_upto.get(k[0], k[1]) - TOPPER_HORIZON * sizes[k[0]]]:
            del self.closed[key]
        self.write("flow_toppers", out)


def _join_tags(tags) -> str:
    """Tags joined by spaces, each once, at most 64 bytes (excess tags dropped, docs.trisul.org/docs/lua/obj_engine
    tag_flow; engine/fastpath/flowrow.lua join_tags / add_tag, the same rule for the fast path's flows)."""
    s, seen = "", set()
    for t in tags:
        if t in seen:
            continue
        c = t if not s else s + " " + t
        if len(c.encode()) <= 64:
            s = c
            seen.add(t)
    return s
