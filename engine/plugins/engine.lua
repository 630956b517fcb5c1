--[[
luaprobe.engine.plugins.engine — the `engine` object passed to every hook (reference §6.1).

Output methods record into per-VM tables; the fast path collects them
between batches (take_outputs / take_counters) and hands them to the SQLite
writer process.  Counters are aggregated in Lua per (group, bucket, key,
meter), so a busy simplecounter costs a few table lookups per call and the
database sees one row per bucket.
]]
local M = {}
local Engine = {}

local VT = { COUNTER = 0, RATE_COUNTER = 1, GAUGE = 2, RUNNING_COUNTER = 3, AVERAGE = 4,
             DELTA_RATE_COUNTER = 5, MAXIMUM = 6, MINIMUM = 7 }
M.VT = VT

local norm_cache = {}
local upper = string.upper

--- GUIDs compare case-insensitively: upper-case once per distinct string.
local function norm(guid)
  local g = norm_cache[guid]
  if g == nil then
    if type(guid) ~= "string" then error(("GUID must be a string (got %s)"):format(type(guid)), 3) end
    g = upper(guid)
    norm_cache[guid] = g
  end
  return g
end
M.norm = norm

local function flowkey_of(x)
  if type(x) == "table" and x.id then return x:id() end
  if x == nil then return "" end
  return tostring(x)
end

--- opts: instance, pipeline ("frontend"|"backend"), plugin (file name),
--- groups {GUID = {bucketsize=, vartypes={[meter]=vt}}} shared by all VMs.
function M.new(opts)
  local self = setmetatable({
    _instance = opts.instance or "0",
    _pipeline = opts.pipeline or "frontend",
    _plugin = opts.plugin or "?",
    _groups = opts.groups or {},
    _now = 0, _usec = 0,
    _floor = 0,             -- engine time never goes below this (the last closed-bucket cut-off)
    _b = nil, _i = -1,       -- current packet: entry _i of batch _b (-1: none)
    counters = {},          -- [GUID][bucket][key][meter] = value ; [-1-meter] = sample count
    rows = { alerts = {}, resources = {}, key_info = {}, messages = {} },
    flow_counters = {},     -- [flowkey] = { {guid, key, meter, direction}, ... }
    nflow_counters = 0,
  }, Engine)
  return self
end

Engine.__index = Engine
setmetatable(Engine, { __index = function(_, name)      -- unknown methods fail loudly
  return function()
    error(("engine:%s() is not implemented by luaprobe"):format(tostring(name)), 2)
  end
end })

local function frontend_only(self, name)
  if self._pipeline ~= "frontend" then
    error(("ERR_NOTAVAIL: %s() is not available for backend scripts"):format(name), 3)
  end
end

--- Fast path: the packet the next hook sees (entry i of batch b).
--- A late packet (earlier than the engine's time: merged or reordered captures) counts in the current
--- bucket and window: engine time never goes backwards, a flushed bucket is never reopened.
function Engine:set_packet(b, i)
  self._b, self._i = b, i
  local t = b[i].ts_sec
  if t < self._floor then t = self._floor end
  self._now = t
end

local function pkt(self)
  if self._i < 0 then return nil end
  return self._b[self._i]
end

--- Backend (and ticks): the current time without a packet.
function Engine:set_time(sec, usec)
  self._i = -1
  self._now, self._usec = sec, usec or 0
end

function Engine:timestamp()
  local p = pkt(self)
  if p ~= nil then return p.ts_sec, math.floor(p.ts_nsec / 1000) end
  return self._now, self._usec
end
function Engine:instanceid() return self._instance end
function Engine:id() return self._instance end
function Engine:probeid() return "probe0" end

-- ------------------------------------------------------------------ counters

local function add(self, g, key, meter, value)
  local grp = self._groups[g]
  local bs = grp and grp.bucketsize or 60
  local now = self._now
  local b = now - now % bs
  local gt = self.counters[g]
  if gt == nil then gt = {}; self.counters[g] = gt end
  local bt = gt[b]
  if bt == nil then bt = {}; gt[b] = bt end
  local kt = bt[key]
  if kt == nil then kt = {}; bt[key] = kt end
  local vt = grp and grp.vartypes[meter] or 0
  local old = kt[meter]
  if vt == 2 then kt[meter] = value                                    -- GAUGE: last sample
  elseif vt == 6 then kt[meter] = (old == nil or value > old) and value or old
  elseif vt == 7 then kt[meter] = (old == nil or value < old) and value or old
  else
    kt[meter] = (old or 0) + value
    if vt == 4 then kt[-1 - meter] = (kt[-1 - meter] or 0) + 1 end      -- AVERAGE: count samples
  end
end

--- Keys may be strings or numbers (numbers become strings when written out).
function Engine:update_counter(guid, key, meter, value)
  add(self, norm(guid), key, tonumber(meter) or 0, tonumber(value) or 0)
end
Engine.update_counter_raw = Engine.update_counter

function Engine:update_counter_bytes(guid, key, meter)
  frontend_only(self, "update_counter_bytes")
  local p = pkt(self)
  add(self, norm(guid), key, tonumber(meter) or 0, p and p.wirelen or 0)
end

--- Counter rows of buckets that ended at or before `now` (all when now is nil):
--- {guid, bucket, key, meter, value}; RATE_COUNTER is per second, AVERAGE the mean.
function Engine:take_counters(now)
  local out, n = {}, 0
  if now ~= nil and now > self._floor then self._floor = now end
  for g, gt in pairs(self.counters) do
    local grp = self._groups[g]
    local bs = grp and grp.bucketsize or 60
    for b, bt in pairs(gt) do
      if now == nil or b + bs <= now then
        for key, kt in pairs(bt) do
          for meter, v in pairs(kt) do
            if meter >= 0 then
              local vt = grp and grp.vartypes[meter] or 0
              if vt == 1 or vt == 5 then v = v / bs
              elseif vt == 4 then v = v / kt[-1 - meter] end
              n = n + 1
              out[n] = { g, b, tostring(key), meter, v }
            end
          end
        end
        gt[b] = nil
      end
    end
  end
  return out
end

-- ------------------------------------------------------------------ other outputs

local function push(t, row) t[#t + 1] = row end

local function usec(self)
  local _, u = self:timestamp()
  return u
end

function Engine:update_key_info(guid, key, label, description)
  push(self.rows.key_info, { norm(guid), tostring(key), tostring(label or ""), description and tostring(description) or "" })
end

function Engine:add_alert(guid, flowkey, alert_key, priority, message)
  push(self.rows.alerts, { self._now, usec(self), norm(guid), flowkey_of(flowkey), tostring(alert_key or ""),
    "", tonumber(priority) or 3, tostring(message or ""), "", self._plugin })
end

function Engine:add_alert_full(guid, flowkey, alert_key, classification, priority, message, status)
  push(self.rows.alerts, { self._now, usec(self), norm(guid), flowkey_of(flowkey), tostring(alert_key or ""),
    tostring(classification or ""), tonumber(priority) or 3, tostring(message or ""), tostring(status or ""),
    self._plugin })
end

function Engine:add_alert_tca(guid, tca_id, status, message)
  push(self.rows.alerts, { self._now, usec(self), norm(guid), "", tostring(tca_id or ""), "TCA",
    1, tostring(message or ""), tostring(status or ""), self._plugin })
end

function Engine:add_resource(guid, flowkey, uri, contents)
  push(self.rows.resources, { self._now, usec(self), norm(guid), flowkey_of(flowkey), tostring(uri or ""),
    contents and tostring(contents) or "", self._plugin })
end

--- Every later packet of the flow adds its wire length to (guid, key, meter);
--- direction 0 both, 1 A->Z (the SYN side), 2 Z->A.
function Engine:add_flow_counter(flowkey, guid, key, meter, direction)
  frontend_only(self, "add_flow_counter")
  local fk = flowkey_of(flowkey)
  local list = self.flow_counters[fk]
  if list == nil then list = {}; self.flow_counters[fk] = list end
  list[#list + 1] = { norm(guid), tostring(key), tonumber(meter) or 0, tonumber(direction) or 0 }
  self.nflow_counters = self.nflow_counters + 1
end

function Engine:reset_flow_counter(flowkey)
  frontend_only(self, "reset_flow_counter")
  local fk = flowkey_of(flowkey)
  local list = self.flow_counters[fk]
  if list then self.nflow_counters = self.nflow_counters - #list; self.flow_counters[fk] = nil end
end

--- Apply registered flow counters to the current packet (fast path, when any exist).
function Engine:apply_flow_counters(flowkey, dir)
  local list = self.flow_counters[flowkey]
  if list == nil then return end
  local len = pkt(self).wirelen
  for i = 1, #list do
    local fc = list[i]
    if fc[4] == 0 or fc[4] == dir + 1 then add(self, fc[1], fc[2], fc[3], len) end
  end
end

--- post_message_frontend([msgid,] msg): to all onmessage holders (1 arg) or subscribers of msgid.
function Engine:post_message_frontend(a, b)
  if b == nil then push(self.rows.messages, { "frontend", "", tostring(a) })
  else push(self.rows.messages, { "frontend", norm(a), tostring(b) }) end
end

function Engine:post_message_backend(a, b)
  if b == nil then push(self.rows.messages, { "backend", "", tostring(a) })
  else push(self.rows.messages, { "backend", norm(a), tostring(b) }) end
end

-- accepted for compatibility; recorded nowhere yet (documented in docs/plugins.md)
function Engine:tag_flow() end
function Engine:disable_reassembly() frontend_only(self, "disable_reassembly") end
function Engine:set_flow_duration() end

--- Move out recorded rows (alerts, resources, key_info, messages).
function Engine:take_outputs()
  local r = self.rows
  self.rows = { alerts = {}, resources = {}, key_info = {}, messages = {} }
  return r
end

return M
