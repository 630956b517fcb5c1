"""Plug-in discovery and probing (what Trisul's `list lua` shows).

Discovery: the files and directories given on the command line, the
``--lua-path`` directories and ``TRISUL_LUA_PATHS``; every ``*.lua`` found
(recursively in directories) is inspected, and files that never mention
``TrisulPlugin`` are helper modules (loaded only through ``require``).

Probing loads each file once in a throw-away VM (no workers, no onload) to
learn its script types and countergroup definitions.
"""
from __future__ import annotations

import dataclasses
import json
import os

from luaprobe.shm import logs
from luaprobe.engine.plugins.errors import load_error
from luaprobe.engine.plugins.vm import PluginError, _text
from luaprobe.shm.searchpath import env_dirs, plugin_dirs

FRONTEND_TYPES = {"simplecounter", "countergroup", "filex_monitor", "reassembly_handler", "alertgroup",
                  "resourcegroup", "protocol_handler", "packet_storage", "inputfilter", "messagemonitor",
                  "flowmonitor", "channellistener"}
BACKEND_TYPES = {"engine_monitor", "sg_monitor", "resource_monitor", "fts_monitor", "cg_monitor",
                 "alert_monitor", "flowtracker"}
#: types luaprobe runs today; the others are detected and reported as not supported yet
SUPPORTED = {"simplecounter", "countergroup", "engine_monitor", "filex_monitor", "protocol_handler", "packet_storage",
             "reassembly_handler", "sg_monitor", "flowtracker", "alertgroup", "resourcegroup",
             "resource_monitor", "fts_monitor", "alert_monitor", "cg_monitor", "flowmonitor",
             "messagemonitor", "channellistener", "inputfilter"}
#: an inputfilter runs when it has step_alert (alerts polled beside the packet input, docs/plugins.md "inputfilter"),
#: or as the run's input (`run --lua-input FILE`: its step imports flow records and counters); otherwise its step is
#: not called, and without step_alert it is unsupported


@dataclasses.dataclass
class PluginInfo:
    """What probing learned about one plug-in file."""

    path: str
    name: str = ""
    types: list = dataclasses.field(default_factory=list)
    countergroup: dict | None = None
    protocol: dict | None = None      #: protocol_handler control: guid, name, host, ports
    errors: list = dataclasses.field(default_factory=list)        #: load failures (file:line text): it cannot run
    unsupported: list = dataclasses.field(default_factory=list)   #: detected script types luaprobe does not run
    declarations: list = dataclasses.field(default_factory=list)  #: [{kind, guid, name, description}]
    flowtracker: dict | None = None                                #: {name, bucketsize, count}
    legacy_onattribute: bool = False   #: reassembly_handler.onattribute named (engine, flow, ts, ...): legacy order
    old_onupdate: str | None = None    #: cg_monitor.onupdate's parameter names when they say (engine, key, ts, ...)
    inputfilter_step: bool = False     #: an inputfilter with step (called only in the run whose --lua-input it is)
    loaded: bool = True                #: False: the file did not load (syntax error, failed require, ...): types unknown
    #: problems a run finds only when it sets a type's walk up (a simplecounter's unknown protocol_guid, a
    #: packet_storage without filter: engine/plugins/host.lua simplecounter_problem, packetstore.lua problem), as
    #: "FILE: message" lines: that type's instances do not run (exit 4), the file's other types do.  Not in
    #: .errors / .problems (the run reports them at setup); `luaprobe check` lists them.
    setup_problems: list = dataclasses.field(default_factory=list)
    sc_guid: str | None = None         #: a simplecounter's protocol_guid luaprobe does not decode itself, upper case
    sc_handled: str | None = None      #:   and its setup problem when a protocol_handler declares that GUID (probe_all)

    @property
    def problems(self) -> list[str]:
        """Every problem as a line of text: the load errors, then one line per unsupported type."""
        return self.errors + [f"{self.path}: script type 'inputfilter' is not supported beside packet input; it runs "
                              "only as the run's input (luaprobe run --lua-input FILE)"
                              if t == "inputfilter" and self.inputfilter_step else
                              f"{self.path}: script type '{t}' is not supported; it will not run"
                              for t in self.unsupported]

    @property
    def runnable_types(self) -> list:
        """Detected types luaprobe instantiates (a file with no type gets one frontend instance)."""
        t = [x for x in self.types if x in SUPPORTED and x not in ("alertgroup", "resourcegroup")
             and x not in self.unsupported]
        return t or ([] if self.types else ["frontend"])


def discover(paths, lua_path=()) -> list[str]:
    """Plug-in files (absolute, sorted per source, de-duplicated) from paths and search dirs."""
    out, seen = [], set()

    def add(f):
        f = os.path.abspath(f)
        if f not in seen:
            seen.add(f)
            out.append(f)

    for p in list(paths) + list(lua_path) + env_dirs():
        if os.path.isdir(p):
            given = p in paths                   # a plug-in directory, not a search directory of helper modules
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    f = os.path.join(root, name)
                    if name.endswith(".lua") and _mentions_plugin(f, unreadable=given):
                        add(f)
        elif p in paths:
            if not os.path.exists(p):
                raise PluginError(f"{p}: no such plug-in file or directory")
            add(p)
    return out


_WARNED: set = set()   #: the non-regular *.lua names already reported by _mentions_plugin


def _mentions_plugin(path: str, unreadable: bool = True) -> bool:
    """``path`` (a ``*.lua`` name found in a plug-in or search directory) is a regular file that mentions
    TrisulPlugin.  Opened without blocking and looked at (fstat) before it is read: a FIFO named ``x.lua`` made
    `check` and `run` wait for a writer for ever, and a device (a link to /dev/zero) would be read without end;
    such a file is skipped with one warning naming it.  A name that cannot be opened (a symbolic link whose
    target is gone, no read permission) in a plug-in directory counts as a plug-in (``unreadable``): the probe then
    reports it as one that failed to load (``cannot open PATH: reason``, exit 4); before, it was passed over in
    silence and the run went on without it.  In a search directory (--lua-path, TRISUL_LUA_PATHS: helper modules)
    it is passed over, as before."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return unreadable
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
            if path not in _WARNED:          # discover() runs more than once in a run: one line per file
                _WARNED.add(path)
                logs.log.warning("%s: %s, not a plug-in file: skipped", logs.path_text(path), what)
            return False
        try:
            return b"TrisulPlugin" in f.read()
        except OSError:
            return unreadable                    # EIO: the probe's read says why


_PROBE = r"""
return function(path, log, budget, args)
  local host_mod = require("luaprobe.engine.plugins.host")
  local host, err = host_mod.boot({ path = path, instance = "probe", enginetype = "frontend", log = log,
                                     print = function() end, budget = budget, args = args })
  if not host then return nil, err end
  local types = host:types()
  local cg, problem = host:countergroup()
  local name = type(host.plugin.id) == "table" and host.plugin.id.name or nil
  local protocol, pproblem = nil, nil
  if host.plugin.protocol_handler ~= nil then protocol, pproblem = host:protocol_control() end
  local decls, dproblem = host:declarations()
  local ftc, fproblem = host:flowtracker_control()
  local rh = host.plugin.reassembly_handler
  local legacy = type(rh) == "table" and type(rh.onattribute) == "function"
                 and require("luaprobe.engine.streams.handler").legacy_attribute_order(rh.onattribute)
  -- cg_monitor.onupdate(engine, key, ts, metrics) (cgmon_2.lua): key and time swapped against the documented
  -- onupdate(engine, ts, key, metrics), told by the parameter names as for onattribute (host.swapped_order)
  local cgm, old_onupdate = host.plugin.cg_monitor, nil
  if type(cgm) == "table" and host_mod.swapped_order(cgm.onupdate, "key") then
    local names = {}
    for i = 1, 8 do local nm = debug.getlocal(cgm.onupdate, i); if not nm then break end; names[i] = nm end
    old_onupdate = table.concat(names, ", ")
  end
  -- what `run` refuses only when it sets a walk up (engine/fastpath/run.py _instantiate): asked here for check
  -- (a simplecounter's protocol_guid may be another plug-in's protocol_handler protocol, which a run registers in every
  -- VM first: probe_all takes sc_handled, the problem with that GUID known, when a plug-in probed with it declares it)
  local setup, sc, sc_guid, sc_handled = {}, host.plugin.simplecounter, nil, nil
  if type(sc) == "table" then
    setup[#setup + 1] = host:simplecounter_problem()
    local g = sc.protocol_guid
    if type(g) == "string" and require("luaprobe.engine.fastpath.decode").by_guid(g) == nil then
      sc_guid, sc_handled = g:upper(), host:simplecounter_problem({ [g:upper()] = true })
    end
  end
  if type(host.plugin.packet_storage) == "table" then
    setup[#setup + 1] = require("luaprobe.engine.plugins.packetstore").problem(host.plugin)
  end
  local inf = host.plugin.inputfilter
  local if_alerts = type(inf) == "table" and type(inf.step_alert) == "function"
  local if_step = type(inf) == "table" and type(inf.step) == "function"
  return { types = types, countergroup = cg, problem = problem or pproblem or dproblem or fproblem, name = name,
           protocol = protocol, declarations = decls, flowtracker = ftc, legacy_onattribute = legacy,
           old_onupdate = old_onupdate, setup_problems = setup, sc_guid = sc_guid, sc_handled = sc_handled,
           inputfilter_alerts = if_alerts, inputfilter_step = if_step }, nil
end
"""


def _to_py(x, keep_bytes: bool = False):
    """Lua tables/strings from a probe into plain Python values.  A string that is not UTF-8 becomes text with
    \\xNN escapes (docs/schema.md "Text vs binary": never U+FFFD, the bytes can be read back), or stays bytes with
    ``keep_bytes`` (the store keeps those as a BLOB of exactly those bytes)."""
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x if keep_bytes else x.decode("utf-8", "backslashreplace")
    if hasattr(x, "items"):
        items = list(x.items())
        if items and all(isinstance(k, int) for k, _ in items):
            return [_to_py(v, keep_bytes) for _, v in sorted(items)]
        return {_to_py(k): _to_py(v, keep_bytes) for k, v in items}
    return x


def probe(path: str, lua_path=(), budget: float = 0.0, step_input: bool = False, args: str | None = None) -> PluginInfo:
    """Load `path` once to learn its types; load errors land in .errors (file:line), unsupported types in .unsupported.
    ``budget``: seconds the file's top level may run (the hook budget, engine/plugins/host.lua boot; 0 = off): an
    endless loop there is a load error, or, compiled, ends the process (engine/plugins/loadwatch.py).
    ``step_input``: the file is the run's --lua-input (its inputfilter runs by its step; without one, an error);
    ``args``: its T.args (--args), which its top level sees in the probe as in the run."""
    from luaprobe.shm.luajit import new_runtime
    info = PluginInfo(path=path, name=os.path.basename(path))
    lua = new_runtime(plugin_dirs(path, lua_path))
    try:
        res, err = lua.execute(_PROBE)(os.fsencode(path), logs.lua_log, float(budget),
                                       None if args is None else os.fsencode(args))
    except Exception as e:  # noqa: BLE001 - a Lua error while probing is a plug-in problem
        from luaprobe.engine.plugins.errors import text
        info.errors.append(load_error(text(e), path))
        info.loaded = False
        return info
    if res is None:
        info.errors.append(load_error(_text(err), path))
        info.loaded = False
        return info
    raw_cg = res[b"countergroup"]
    res = _to_py(res)
    info.types = res.get("types") or []
    info.name = res.get("name") or info.name
    if res.get("problem"):
        info.errors.append(f"{path}: {res['problem']}")
    info.protocol = res.get("protocol")
    cg = res.get("countergroup")
    if cg:
        cg["meters"] = cg.get("meters") or []
        # keys and labels as given: a key that is not UTF-8 must join the counters of that key (a BLOB of the same
        # bytes, update_key_info's path), so it is not turned into text here
        cg["keyinfo"] = (_to_py(raw_cg[b"keyinfo"], keep_bytes=True) if raw_cg[b"keyinfo"] is not None else None) or []
        info.countergroup = cg
    info.declarations = res.get("declarations") or []
    info.flowtracker = res.get("flowtracker")
    info.legacy_onattribute = bool(res.get("legacy_onattribute"))
    info.old_onupdate = res.get("old_onupdate") or None
    info.inputfilter_step = bool(res.get("inputfilter_step"))
    runs_step = step_input and info.inputfilter_step
    info.unsupported = [t for t in info.types if t not in SUPPORTED
                        or (t == "inputfilter" and not res.get("inputfilter_alerts") and not runs_step)]
    if step_input and not runs_step:
        info.errors.append(f"{path}: --lua-input needs an inputfilter with step(packet, engine) (Trisul's input "
                           "script); this file has none")
    info.setup_problems = [f"{path}: {p}" for p in res.get("setup_problems") or []]
    info.sc_guid = res.get("sc_guid")
    info.sc_handled = f"{path}: {res['sc_handled']}" if res.get("sc_handled") else None
    return info


def probe_all(plugins, lua_path=(), budget: float = 0.0, before=None, lua_input: str | None = None,
              lua_args: str | None = None) -> list[PluginInfo]:
    """Discover and :func:`probe` every plug-in of ``plugins`` (files or directories) with their Lua search path
    (shm/searchpath.py ``search_path``) and top-level ``budget``: one :class:`PluginInfo` each, in discovery order
    ([] when none); ``before(file)`` is called before each probe (the fast path's heartbeat).  Raises PluginError
    as :func:`discover` does.  Used by `luaprobe check`, a run's load and both reloads.  ``lua_input``: the run's
    --lua-input file, probed last (once, also when a PLUGIN directory holds it) as the run's input, with ``lua_args``
    as its T.args."""
    from luaprobe.shm.searchpath import search_path
    path = search_path(plugins, lua_path)
    infos = []
    files = discover(plugins, lua_path)
    if lua_input is not None:
        step = os.path.realpath(lua_input)
        files = [f for f in files if os.path.realpath(f) != step] + [lua_input]
    for f in files:
        if before is not None:
            before(f)
        is_input = lua_input is not None and f is lua_input
        infos.append(probe(f, path, budget, step_input=is_input, args=lua_args if is_input else None))
    # a protocol_handler's protocol is registered in every VM of a run before the walks are set up
    # (engine/fastpath/run.py _load_plugins: self.protocols), so a simplecounter may count on it
    handled = {i.protocol["guid"].upper() for i in infos if i.protocol and not i.errors and "protocol_handler" in i.types}
    for i in infos:
        if i.sc_guid is not None and i.sc_guid in handled:      # its first problem was the GUID: what comes after it
            i.setup_problems = [i.sc_handled] + i.setup_problems[1:] if i.sc_handled else i.setup_problems[1:]
    return infos


def describe(infos) -> str:
    """A `list lua`-style text listing of probed plug-ins (those that loaded: a file that did not load has
    no types to list, only its error, which `luaprobe check` prints alone)."""
    lines = []
    for i in infos:
        if not i.loaded:
            continue
        kind = ", ".join(f"{t} ({'not supported' if t in i.unsupported else 'supported'})" for t in i.types) \
            if i.types else "(no script type: one frontend instance runs onload)"
        lines.append(f"{logs.one_line(i.path)}\n    name: {logs.one_line(str(i.name))}\n    types: {kind}")
        if i.countergroup:
            cg = i.countergroup
            lines.append(f"    countergroup: {cg['name']} {cg['guid']} bucket {cg['bucketsize']} s, "
                         f"{len(cg['meters'])} meter(s)")
        for d in i.declarations:
            lines.append(f"    {d['kind']}group: {d['name']} {d['guid']}")
        if i.flowtracker:
            ft = i.flowtracker
            lines.append(f"    flowtracker: {ft['name']} bucket {ft['bucketsize']} s, top {ft['count']}")
        if i.legacy_onattribute:
            lines.append("    reassembly_handler.onattribute: legacy argument order (engine, flow, ts, name, buffer), "
                         "from its parameter names")
        if i.old_onupdate:
            lines.append("    warning: " + old_onupdate_warning(i))
        if i.inputfilter_step:
            lines.append("    inputfilter.step: runs as the input of `luaprobe run --lua-input FILE --args TEXT` (the "
                         "frames, flow records and counters it gives); not called beside --pcap / --interface / --generate")
        for p in i.problems + i.setup_problems:
            lines.append(f"    problem: {logs.one_line(p)}")
    return "\n".join(lines)


def old_onupdate_warning(info) -> str:
    """The line for a cg_monitor.onupdate whose parameter names give the old order (cgmon_2.lua)."""
    return (f"{info.path}: cg_monitor.onupdate({info.old_onupdate}) names its parameters in the old order "
            "(engine, key, ts, metrics); Trisul documents onupdate(engine, ts, key, metrics) and luaprobe calls it "
            "so: the 2nd argument is the timestamp (docs/plugins.md \"Monitors\")")


def keyinfo_rows(infos) -> list[tuple]:
    """key_info rows from countergroup keyinfo tables: (group_guid, key, label, description)."""
    return [(i.countergroup["guid"], k[0], k[1], k[2] if len(k) > 2 else "")
            for i in infos if i.countergroup for k in i.countergroup.get("keyinfo", [])]


def group_names(infos) -> dict:
    """{kind: {name: guid}} for T.countergroups / alertgroups / resourcegroups / ftsgroups / sessiongroups:
    the well-known groups (docs/reference.md "Well-known groups") plus every declaration; a declaration wins over a built-in name."""
    from luaprobe.engine.store.writer import (WELL_KNOWN_ALERT_GROUPS, WELL_KNOWN_FTS_GROUPS, WELL_KNOWN_GROUPS,
                        WELL_KNOWN_RESOURCE_GROUPS, WELL_KNOWN_SESSION_GROUPS)
    out = {"counter": {n: g for g, n in WELL_KNOWN_GROUPS.items()},
           "alert": {n: g for g, n in WELL_KNOWN_ALERT_GROUPS.items()},
           "resource": {n: g for g, n in WELL_KNOWN_RESOURCE_GROUPS.items()},
           "fts": {n: g for g, n in WELL_KNOWN_FTS_GROUPS.items()},
           "session": {n: g for g, n in WELL_KNOWN_SESSION_GROUPS.items()}}
    for i in infos:
        if i.countergroup:
            out["counter"][i.countergroup["name"]] = i.countergroup["guid"]
        for d in i.declarations:
            out[d["kind"]][d["name"]] = d["guid"]
    return out


def decl_rows(infos) -> list[tuple]:
    """decl_groups rows (kind, guid, name, description): built-in alert/resource/fts/session groups, then
    the alertgroup / resourcegroup declarations (which replace a built-in row of the same GUID)."""
    from luaprobe.engine.store.writer import (WELL_KNOWN_ALERT_GROUPS, WELL_KNOWN_FTS_GROUPS, WELL_KNOWN_RESOURCE_GROUPS,
                        WELL_KNOWN_SESSION_GROUPS)
    rows = []
    for kind, table in (("alert", WELL_KNOWN_ALERT_GROUPS), ("resource", WELL_KNOWN_RESOURCE_GROUPS),
                        ("fts", WELL_KNOWN_FTS_GROUPS), ("session", WELL_KNOWN_SESSION_GROUPS)):
        rows += [(kind, g, n, "built-in") for g, n in table.items()]
    for i in infos:
        rows += [(d["kind"], d["guid"], d["name"], d["description"]) for d in i.declarations]
    return rows


def group_rows(infos) -> list[tuple]:
    """counter_groups rows for the store: (guid, name, description, bucketsize, meters_json)."""
    rows = []
    for i in infos:
        cg = i.countergroup
        if cg:
            rows.append((cg["guid"], cg["name"], cg.get("description", ""), int(cg["bucketsize"]),
                         json.dumps(cg["meters"])))
    return rows
