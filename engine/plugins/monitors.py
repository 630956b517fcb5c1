"""Backend monitors (docs.trisul.org/docs/lua/resource_monitor, fts_monitor, alert_monitor, cg_monitor): resource_monitor, fts_monitor, alert_monitor, cg_monitor.

Which VM sees which item, and when (docs/plugins.md "Monitors"):

* Attachment.  ``resource_guid`` / ``fts_guid`` / ``alert_guid`` / ``counter_guid`` are a string, a
  function returning one, or an array of those (resolved in the script's VM, where ``T.resourcegroups``
  and ``T.ftsgroups`` name the built-in groups).  cg_monitor also matches ``counter_name_match``
  (case-insensitive substring of the group name) and ``counter_name_regex`` (a regular expression on the
  group name, Python ``re`` syntax, which covers the RE2 subset scripts use); the union is
  de-duplicated and every matched group gets its own VMs with ``T.monitor_group_name`` /
  ``T.monitor_group_guid`` set before ``onload``.  alert_monitor accepts ``alert_name_match`` /
  ``alert_name_regex`` the same way.  A monitor that matches nothing is not loaded.
* Instances.  Each (script, group) runs in ``backend_instances`` VMs ("0", "1", ...), like
  engine_monitor.  Every item is handled by exactly one of them: resources, FTS documents and alerts by
  arrival order (item n goes to instance n mod N), counter keys by ``crc32(key) mod N`` so a key always
  meets the same VM.
* Timing.  ``onnew*`` runs when the item reaches the backend (between batches, within the packet-time
  second that produced it).  ``flushfilter`` and ``onflush`` run at the end of the item's backend window
  (``--window`` / ``[fastpath] window`` seconds of packet time, 60 by default, aligned on multiples of it; the
  last, unfinished one at the end of input), before ``onendflush``; then the kept items are written.
  cg_monitor hooks run when a counter bucket closes (``onnewkey``, ``onflushfilter``, ``onupdate``, ``onflush``
  per key, the ``SYS:GROUP_TOTALS`` key, then toppers per meter).
* Votes (:func:`kept`).  ``flushfilter`` votes on storing an item: it is stored unless every attached script
  that has the filter hook returns false; a script without the hook does not vote (an item no script votes on
  is stored), a filter that raised an error votes to keep.  cg_monitor ``onflushfilter`` overrides
  (``overrides[i]`` replaces meter i-1 when >= 0) apply to the stored row.
* Changes.  ``set_uri`` / ``set_label`` (Resource) and ``set_priority`` / ``set_message`` /
  ``set_extra_message`` (Alert) made in any hook are carried to the next script and to the store.
"""
from __future__ import annotations

import collections
import re
import zlib

from luaprobe.engine.analysers import FTS_GROUPS, GROUPS, PRODUCER, RESOURCE_GROUPS
from luaprobe.engine.plugins.vm import _text

KINDS = {"resource_monitor": "resources", "fts_monitor": "fts", "alert_monitor": "alerts"}
TYPES = set(KINDS) | {"cg_monitor"}
ALERT_GROUPS = {"External IDS": "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", "Blacklist": "{5E97C3A3-41DB-4E34-92C3-87C904FAB83E}",
                "Threshold Crossing": "{03AC6B72-FDB7-44C0-9B8C-7A1975C1C5BA}",
                "Flow Tracker": "{18CE5961-38FF-4AEA-BAF8-2019F3A09063}",
                "System": "{F69C2462-ECEA-45B8-B1CB-F90342D37A4F}",
                "User Alerts": "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}"}
TOTALS_KEY = "SYS:GROUP_TOTALS"


def _lua_groups(lua, d: dict):
    return lua.table_from({k.encode(): v.encode() for k, v in d.items()})


def kept(votes) -> bool:
    """Trisul's flushfilter rule (reference: "kept unless all attached scripts return false"; the filter is
    what votes): ``votes`` holds one entry per attached script, True / False from its filter, None when it has
    no filter hook (no vote).  True unless at least one script voted and every vote was False."""
    cast = [v for v in votes if v is not None]
    return not cast or any(cast)


class Script:
    """One monitor script attached to one group: its VMs (one per backend instance)."""

    def __init__(self, kind: str, path: str, guid: str, name: str):
        self.kind, self.path, self.guid, self.name = kind, path, guid.upper(), name
        self.vms: list = []
        self.seen_keys: set = set()      # cg_monitor onnewkey (exact; Trisul uses a Bloom filter)
        self.topn: dict = {}


class Monitors:
    """All monitor scripts of a run.  FastPath calls attach() while loading, items() between batches,
    counters() when buckets close and flush() at each window end."""

    def __init__(self, backend_instances: int):
        self.n = max(1, int(backend_instances))
        self.scripts: list[Script] = []
        self.queue: dict[str, list] = {"resources": [], "fts": [], "alerts": []}
        self.seq = 0
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def prepare_vm(vm) -> None:
        """T.resourcegroups / T.ftsgroups / T.alertgroups also name the built-in groups (scripts resolve GUIDs
        through them, e.g. ``T.ftsgroups['SSL Certs']``); names already there (declared groups) are kept."""
        vm.lua.eval("function(r, f, a) local function merge(name, t) local g = T[name] or {}; T[name] = g "
                    "for k, v in pairs(t) do if g[k] == nil then g[k] = v end end end "
                    "merge('resourcegroups', r); merge('ftsgroups', f); merge('alertgroups', a) end")(
            _lua_groups(vm.lua, RESOURCE_GROUPS), _lua_groups(vm.lua, FTS_GROUPS), _lua_groups(vm.lua, ALERT_GROUPS))

    @staticmethod
    def attachments(vm, kind: str, groups: dict) -> list[tuple[str, str]]:
        """(guid, name) pairs the script in `vm` attaches to.  groups: known counter groups {GUID: name}."""
        Monitors.prepare_vm(vm)
        field = {"resource_monitor": "resource_guid", "fts_monitor": "fts_guid", "alert_monitor": "alert_guid",
                 "cg_monitor": "counter_guid"}[kind]
        get = vm.lua.eval("function(sub, f) local t = TrisulPlugin[sub]; return require('luaprobe.engine.plugins.monitor')"
                          ".resolve(t and t[f]) end")
        guids = [_text(g).upper() for g in get(kind.encode(), field.encode()).values()]
        names = {"resource_monitor": {v: k for k, v in RESOURCE_GROUPS.items()},
                 "fts_monitor": {v: k for k, v in FTS_GROUPS.items()},
                 "alert_monitor": {v: k for k, v in ALERT_GROUPS.items()},
                 "cg_monitor": dict(groups)}[kind]
        out = [(g, names.get(g, g)) for g in guids]
        if kind in ("cg_monitor", "alert_monitor"):
            pre = "counter" if kind == "cg_monitor" else "alert"
            match = [_text(x).lower() for x in get(kind.encode(), f"{pre}_name_match".encode()).values()]
            regex = [_text(x) for x in get(kind.encode(), f"{pre}_name_regex".encode()).values()]
            for g, name in names.items():
                if any(m in name.lower() for m in match) or any(re.search(r, name) for r in regex):
                    out.append((g, name))
        seen, uniq = set(), []
        for g, name in out:
            if g not in seen:
                seen.add(g)
                uniq.append((g, name))
        return uniq

    def add(self, script: Script) -> None:
        self.scripts.append(script)

    def producers(self) -> set:
        """Analysers the attached scripts need (engine.analysers.PRODUCER)."""
        return {PRODUCER[s.guid] for s in self.scripts if s.guid in PRODUCER}

    def _for(self, kind: str, guid: str) -> list[Script]:
        return [s for s in self.scripts if s.kind == kind and s.guid == guid.upper()]

    # ------------------------------------------------------------------ resources, FTS, alerts
    def items(self, table: str, rows: list, ts: int) -> list:
        """New rows of one table: watched ones run onnew* and wait for the window flush; the
        unwatched ones are returned to be written now."""
        kind = {v: k for k, v in KINDS.items()}[table]
        free = []
        for row in rows:
            scripts = self._for(kind, row[2])
            if not scripts:
                free.append(row)
                continue
            self.seq += 1
            row = list(row)
            if table == "fts":
                row.append(str(self.seq))           # FTS:key(): the document's number in this run
            k = self.seq % self.n
            item = {"row": row, "k": k, "scripts": scripts}
            for s in scripts:
                self._run(s, table, "new", item, ts)
            self.stats[f"{table}_watched"] += 1
            self.queue[table].append(item)
        return free

    def _run(self, s: Script, table: str, which: str, item: dict, ts: int):
        vm = s.vms[item["k"]]
        row = item["row"]
        res = vm.run_items(vm.host, table.encode(), which.encode(), vm.lua.table_from(
            [vm.lua.table_from([x.encode() if isinstance(x, str) else x for x in row])]), ts)
        r = list(res[1].values()) if res[1] is not None else []
        vote = {1: True, 0: False}.get(r[0]) if r else None
        if table == "resources" and len(r) >= 3:
            row[4], row[5] = _text(r[1]), _text(r[2])
        elif table == "alerts" and len(r) >= 4:
            row[6], row[7] = int(r[1]), _text(r[2])
            item["extra"] = _text(r[3])
        return vote

    def flush(self, ts: int) -> dict:
        """Window end: flushfilter votes, onflush for the kept items; returns {table: rows to write}."""
        out = {}
        for table, q in self.queue.items():
            self.queue[table] = []
            keep_rows = []
            for item in q:
                votes = [self._run(s, table, "filter", item, ts) for s in item["scripts"]]
                if not kept(votes):
                    self.stats[f"{table}_filtered"] += 1
                    continue
                for s in item["scripts"]:
                    self._run(s, table, "flush", item, ts)
                row = item["row"]
                if table == "fts":
                    row = row[:6]
                if table == "alerts" and item.get("extra"):
                    row[7] = f"{row[7]}\n{item['extra']}"    # extra_message is stored after the message
                keep_rows.append(tuple(row))
            out[table] = keep_rows
        return out

    # ------------------------------------------------------------------ counters
    def counters(self, rows: list, groups: dict) -> list:
        """Closed-bucket counter rows (guid, bucket, key, meter, value): cg_monitor hooks for watched
        groups; returns the rows to store (filtered, overrides applied)."""
        by_group = collections.defaultdict(list)
        free = []
        watched = {s.guid for s in self.scripts if s.kind == "cg_monitor"}
        for r in rows:
            g = r[0].upper() if isinstance(r[0], str) else _text(r[0]).upper()
            (by_group[g] if g in watched else free).append(r)
        for g, grows in by_group.items():
            free += self._cg_group(g, grows, groups)
        return free

    def _cg_group(self, guid: str, rows: list, groups: dict) -> list:
        scripts = self._for("cg_monitor", guid)
        buckets = collections.defaultdict(lambda: collections.defaultdict(dict))
        state = {}     # (bucket, key, meter) -> the row's merge state (engine/store/meters.py), when it has one
        for r in rows:
            g, b, key, meter, value = r[:5]
            buckets[b][_text(key)][int(meter)] = value
            if len(r) > 5:
                state[(b, _text(key), int(meter))] = r[5:]
        out = []
        nmeters = max([m for b in buckets.values() for k in b.values() for m in k] + [0]) + 1
        meters = (groups.get(guid) or {}).get("meters") or []
        topn = {int(m["id"]): int(m.get("topn") or 10) for m in meters if isinstance(m, dict)}
        # the group's bucket size, as the engine buckets it (engine/plugins/engine.lua open_bucket: 60 for a group
        # not declared); before, ts was b + 60 for every group, so a 30 s group's hooks got the next bucket's end
        bucketsize = (groups.get(guid) or {}).get("bucketsize") or 60
        for b in sorted(buckets):
            keys = buckets[b]
            ts = b + bucketsize
            shard = collections.defaultdict(list)
            for key in sorted(keys):
                shard[zlib.crc32(key.encode()) % self.n].append(key)
            verdict = {}
            overrides = {}
            for s in scripts:
                for k, klist in shard.items():
                    vm = s.vms[k]
                    lrows = vm.lua.table_from([vm.lua.table_from([key.encode(), vm.lua.table_from(
                        [keys[key].get(m, 0) for m in range(nmeters)])]) for key in klist])
                    newk = vm.lua.table_from([key not in s.seen_keys for key in klist])
                    s.seen_keys.update(klist)
                    res = vm.cg_filter(vm.host, ts, lrows, newk)
                    for key, r in zip(klist, res.values()):
                        v = list(r.values())
                        vote = {1: True, 0: False}.get(v[0]) if v else None
                        verdict.setdefault(key, []).append(vote)
                        if len(v) > 1 and v[1] is not None:
                            overrides[key] = [x for x in v[1].values()]
            kept_keys = [key for key in sorted(keys) if kept(verdict.get(key, ()))]
            self.stats["counter_keys_filtered"] += len(keys) - len(kept_keys)
            for key, ov in overrides.items():
                # the row's meters only (the metrics the filter was given): before, an overrides list longer than
                # the row stored meters the group does not have, past 15 too (20 entries: meters 0..19)
                for i, x in enumerate(ov[:nmeters]):
                    if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0:
                        keys[key][i] = x
            totals = [sum(keys[k].get(m, 0) for k in keys) for m in range(nmeters)]
            kept_set = set(kept_keys)
            for s in scripts:
                for k, klist in shard.items():
                    vm = s.vms[k]
                    mine = [key for key in klist if key in kept_set]
                    if k == 0:
                        mine = mine + [TOTALS_KEY]
                    vals = {**keys, TOTALS_KEY: dict(enumerate(totals))}
                    vm.cg_flush(vm.host, ts, vm.lua.table_from([vm.lua.table_from([key.encode(), vm.lua.table_from(
                        [vals[key].get(m, 0) for m in range(nmeters)])]) for key in mine]))
                vm0 = s.vms[0]
                for m in range(nmeters):
                    top = sorted(((keys[k].get(m, 0), k) for k in kept_keys if keys[k].get(m, 0) > 0), reverse=True)
                    top = top[:topn.get(m, 10)]
                    vm0.cg_toppers(vm0.host, ts, m, vm0.lua.table_from(
                        [vm0.lua.table_from([k.encode(), v]) for v, k in top]))
            for key in kept_keys:
                for m, v in keys[key].items():
                    st = state.get((b, key, m))
                    out.append((guid, b, key, m, v) if st is None else (guid, b, key, m, v, *_rescaled(st, v)))
        return out


def _rescaled(state: tuple, value) -> tuple:
    """A row's merge state (vartype, total, divisor, sample_us; engine/store/meters.py) after a cg_monitor
    override set its value: a mean or rate keeps its divisor and gets total = value * divisor, so a later
    merge (another shard's part) weighs the overridden value as the original."""
    vt, total, divisor, us = state
    if divisor:
        total = value * divisor
    return vt, total, divisor, us


def group_names(declared: dict) -> dict:
    """{GUID: name} of every counter group a cg_monitor can attach to: built-in and declared."""
    out = {g: n for g, (n, _) in GROUPS.items()}
    out.update({g.upper(): c.get("name", g) for g, c in declared.items()})
    return out


__all__ = ["Monitors", "Script", "TYPES", "group_names"]
