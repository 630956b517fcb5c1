--[[
luaprobe.engine.plugins.monitor — the backend item objects (docs.trisul.org/docs/lua/resource_monitor, fts_monitor, alert_monitor) and the hook
calls of resource_monitor, fts_monitor, alert_monitor and cg_monitor inside
one plug-in VM.  engine/plugins/monitors.py decides which VM sees which item and when.

Objects (plain value objects: a script may keep them):
  Resource  timestamp()->sec,usec  flow()->FlowID  source_ip() source_port() destination_ip()
            destination_port()  uri()  label()  set_uri(s)  set_label(s)
  FTS       timestamp()->sec,usec  key()  flow()->FlowID  text()
  Alert     timestamp()->sec,usec  flow()->FlowID or nil  source_ip() source_port() destination_ip()
            destination_port()  sigid()  classification()  priority()  set_priority(n)  message()
            set_message(s)  extra_message()  set_extra_message(s)  status()  ack_flag()
Endpoints come from the flow key: source = the A end, destination = the Z end (the lower
port, usually the server), in key format ("C0.A8.01.02", "p-0050"); "" without a flow.
]]
local packet = require("luaprobe.engine.plugins.packet")
local finite = require("luaprobe.engine.plugins.engine").finite

local M = {}

local function flow_of(self)
  if self._flowkey == nil or self._flowkey == "" then return nil end
  return packet.flowid_from_key(self._flowkey)
end
local function ep(self, which)
  local f = flow_of(self)
  if f == nil then return "" end
  return f[which](f)
end

--- A monitored item's class: timestamp() and flow() for every kind; with `endpoints`, the flow's
--- source/destination ip and port too (Resource and Alert objects have them, FTS documents do not).
local function item_class(endpoints)
  local C = {}
  C.__index = C
  function C:timestamp() return self._ts, self._usec end
  C.flow = flow_of
  if endpoints then
    function C:source_ip() return ep(self, "ipa") end
    function C:source_port() return ep(self, "porta") end
    function C:destination_ip() return ep(self, "ipz") end
    function C:destination_port() return ep(self, "portz") end
  end
  return C
end

local Resource = item_class(true)
function Resource:uri() return self._uri end
function Resource:label() return self._label end
function Resource:set_uri(s) self._uri = tostring(s) end
function Resource:set_label(s) self._label = tostring(s) end

local FTS = item_class(false)
function FTS:key() return self._key end
function FTS:text() return self._text end

local Alert = item_class(true)
function Alert:sigid() return self._sigid end
function Alert:classification() return self._classification end
function Alert:priority() return self._priority end
function Alert:set_priority(n) self._priority = finite(n, self._priority) end   -- NaN, inf: kept (engine.lua)
function Alert:message() return self._message end
function Alert:set_message(s) self._message = tostring(s) end
function Alert:extra_message() return self._extra end
function Alert:set_extra_message(s) self._extra = tostring(s or "") end
function Alert:status() return self._status end
function Alert:ack_flag() return 0 end

M.Resource, M.FTS, M.Alert = Resource, FTS, Alert

--- Build the object for a store row (the row layouts of docs/schema.md).
--- kind "resources": ts, usec, guid, flowkey, uri, contents, plugin
--- kind "fts":       ts, usec, guid, flowkey, text, plugin, key
--- kind "alerts":    ts, usec, guid, flowkey, sigid, classification, priority, message, status, plugin
function M.object(kind, r)
  if kind == "resources" then
    return setmetatable({ _ts = r[1], _usec = r[2], _guid = r[3], _flowkey = r[4], _uri = r[5] or "",
                          _label = r[6] or "" }, Resource)
  elseif kind == "fts" then
    return setmetatable({ _ts = r[1], _usec = r[2], _guid = r[3], _flowkey = r[4], _text = r[5] or "",
                          _key = r[7] or "" }, FTS)
  end
  return setmetatable({ _ts = r[1], _usec = r[2], _guid = r[3], _flowkey = r[4], _sigid = r[5] or "",
                        _classification = r[6] or "", _priority = r[7] or 3, _message = r[8] or "",
                        _status = r[9] or "", _extra = "" }, Alert)
end

--- Fields a hook may have changed: resources -> uri, label; alerts -> priority, message, extra.
function M.changed(kind, o)
  if kind == "resources" then return o._uri, o._label end
  if kind == "alerts" then return o._priority, o._message, o._extra end
  return nil
end

local SUB = { resources = "resource_monitor", fts = "fts_monitor", alerts = "alert_monitor" }
local NEW = { resources = "onnewresource", fts = "onnewfts", alerts = "onnewalert" }

--- Run the item hook `which` ("new" | "filter" | "flush") for a list of rows of one kind.
--- Returns {vote, changed fields...} per row (vote: 1 keep, 0 drop from the flushfilter; -1 when the
--- script has no flushfilter: no vote, engine/plugins/monitors.py kept()).
function M.run_items(host, kind, which, rows, ts)
  local sub = SUB[kind]
  local t = host.plugin[sub]
  local hook = which == "new" and NEW[kind] or (which == "filter" and "flushfilter" or "onflush")
  local eng = host.engine
  eng:set_time(ts, 0)
  local out = {}
  local has = type(t) == "table" and type(t[hook]) == "function"
  for i = 1, #rows do
    local o = M.object(kind, rows[i])
    local vote = -1                                                  -- -1: no vote (no hook)
    if has then
      local ok, res = host:call(sub, hook, eng, o)
      if which == "filter" then vote = (not ok or res ~= false) and 1 or 0 end   -- an error keeps the item
    end
    out[i] = { vote, M.changed(kind, o) }
  end
  return out
end

--- cg_monitor: per key {key, {m0, m1, ...}} rows of one bucket at time ts.
--- Returns {vote (1 keep, 0 drop, -1 no onflushfilter), overrides or nil} per row, after onnewkey /
--- onflushfilter; the caller decides the vote across scripts.
function M.cg_filter(host, ts, rows, newkeys)
  local t = host.plugin.cg_monitor
  local eng = host.engine
  eng:set_time(ts, 0)
  local out = {}
  local has_new = type(t.onnewkey) == "function"
  local has_filter = type(t.onflushfilter) == "function"
  for i = 1, #rows do
    local key, metrics = rows[i][1], rows[i][2]
    if has_new and newkeys[i] then host:call("cg_monitor", "onnewkey", eng, ts, key) end
    local vote, ov = -1, nil
    if has_filter then
      local m = {}
      for j = 1, #metrics do m[j] = metrics[j] end
      local ok, res, overrides = host:call3("cg_monitor", "onflushfilter", eng, ts, key, m)
      vote = (not ok or res ~= false) and 1 or 0
      if ok and type(overrides) == "table" then ov = overrides end
    end
    out[i] = { vote, ov }
  end
  return out
end

--- cg_monitor onupdate and onflush for the kept rows.
function M.cg_flush(host, ts, rows)
  local t = host.plugin.cg_monitor
  local eng = host.engine
  eng:set_time(ts, 0)
  local upd, fl = type(t.onupdate) == "function", type(t.onflush) == "function"
  for i = 1, #rows do
    local key, metrics = rows[i][1], rows[i][2]
    if upd then local m = {}; for j = 1, #metrics do m[j] = metrics[j] end
      host:call("cg_monitor", "onupdate", eng, ts, key, m) end
    if fl then local m = {}; for j = 1, #metrics do m[j] = metrics[j] end
      host:call("cg_monitor", "onflush", eng, ts, key, m) end
  end
end

--- cg_monitor toppers for one meter: `top` = {{key, value}, ...} sorted by value, largest first.
function M.cg_toppers(host, ts, meter, top)
  local t = host.plugin.cg_monitor
  if type(t.onbegintopperflush) ~= "function" and type(t.ontopperflush) ~= "function" then return end
  local eng = host.engine
  eng:set_time(ts, 0)
  local go = true
  if type(t.onbegintopperflush) == "function" then
    local ok, res = host:call("cg_monitor", "onbegintopperflush", eng, ts, meter)
    if ok and type(res) ~= "boolean" then
      host.errors:report("cg_monitor.onbegintopperflush", "returned a non-boolean (counted as true)")
    end
    go = ok and res ~= false
    -- Trisul: true enables the calls; scripts that return nothing (cgmon_3.lua) still get them
  end
  if go then
    for i = 1, #top do
      local key, v = top[i][1], top[i][2]
      local keep = true
      if type(t.ontopperflushfilter) == "function" then
        local ok, res = host:call("cg_monitor", "ontopperflushfilter", eng, key, v)
        keep = not ok or res ~= false
      end
      if keep then host:call("cg_monitor", "ontopperflush", eng, key, v) end
    end
  end
  host:call("cg_monitor", "onendtopperflush", eng, meter)
end

--- Resolve an attachment field (string, function returning a string, or an array of those).
function M.resolve(v)
  local out = {}
  local function one(x)
    if type(x) == "function" then
      local ok, r = pcall(x)
      if ok then x = r else return end
    end
    if type(x) == "string" then out[#out + 1] = x end
  end
  if type(v) == "table" then for _, x in ipairs(v) do one(x) end else one(v) end
  return out
end

return M
