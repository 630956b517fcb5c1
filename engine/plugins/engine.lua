--[[
luaprobe.engine.plugins.engine — the `engine` object passed to every hook (docs.trisul.org/docs/lua/obj_engine).

Output methods record into per-VM tables; the fast path collects them
between batches (take_outputs / take_counters) and hands them to the SQLite
writer process.  Counters are aggregated in Lua per (group, bucket, key,
meter), so a busy simplecounter costs a few table lookups per call and the
database sees one row per bucket.
]]
local ffi = require("ffi")
local packetmod = require("luaprobe.engine.plugins.packet")   -- lp_pkt, lp_engine_clock
local flowrow = require("luaprobe.engine.fastpath.flowrow")    -- lp_flowrow, join_tags, add_tag
local M = {}
local Engine = {}
local new_clock = ffi.typeof("lp_engine_clock")

local norm_cache = {}
local upper = string.upper
local floor = math.floor

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
    -- the engine's clock and current packet, per packet (set_packet): one FFI struct (lp_engine_clock,
    -- engine/plugins/packet.lua) rather than Lua fields, so that a hook's store into its own table with a
    -- string key (LuaJIT cannot tell it from these fields) does not make the walk redo their lookups per packet
    -- (issue 10, docs/benchmarks.md 2026-12-01).  Fields: now, usec (engine time: s, µs), floor (engine time never
    -- goes below this: the last closed-bucket cut-off), tus (engine time in µs since the epoch: T.async stamps
    -- tasks with it), b, i (current packet: entry i of batch b, i = -1: none), pos (index in the batch under way
    -- of the packet whose hooks run, -1: before its packets), nfc (nflow_counters below, read per packet by the
    -- walks: host.lua sc_pick).
    _t = new_clock({ i = -1, pos = -1 }),
    _result = false,        -- true while an onresult / onerror hook runs (Async:call_hook): rows keep its time
    _hold = false,          -- function() -> the earliest second a pending T.async task's onresult may write in, or
                            -- nil (Async:set_engine: Async:hold_sec); take_counters closes no bucket holding it
    _closed = 0,            -- counter buckets ending at or before this second are written out (take_counters)
    counters = {},          -- [GUID][bucket][meter][key] = value ; [-1-meter][key] = the meter's second value
    _cur = {},              -- [GUID] = { now, bt = counters[GUID][bucket of now], vt = the group's vartypes }
    rows = nil,
    sflows = {},            -- script-made flow records [flowkey] = {fk, first, last, v[0..3], tags}
    flow_counters = {},     -- [flowkey] = { {guid, key, meter, direction, ...}, ... } (add_flow_counter)
    flow_records = false,   -- address of the flow table's lp_flow_cold array (the fast path sets it: new_connection)
    nflow_counters = 0,     -- flow counters registered (add_flow_counter); kept in _t.nfc too (set_nflow)
    _fcbatch = 0,           -- flow_counter_batch calls so far (a flow counter records the value when added)
    own_pending = false,    -- messages to this VM's own pipeline waiting for Host:deliver_own (a list), or false
    wants_flowrecords = false,  -- a messagemonitor with onnewflowrecord is loaded (new_flow_record announces to it)
    on_post = false,        -- function telling the fast path a message was posted (set after onload: run.py); until
                            -- then (onload's posts and broadcasts) the rows wait for the first collection
    on_flow_counters = false,   -- function called at the VM's first flow counter (a VM without a packet walk:
                                -- engine/fastpath/run.py _flow_counter_runner), or false; a field, so reading it
                                -- never reaches the unknown-method __index (which raises)
  }, Engine)
  self.rows = M.new_rows()
  return self
end

Engine.__index = Engine
--- Edit distance of two short strings (a misspelled method name's suggestion).
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

--- "did you mean X?" for an unknown method name: the closest public method within a third of its length.
local function suggestion(name)
  local best, bestd = nil, math.max(2, math.floor(#name / 3)) + 1
  for k, v in pairs(Engine) do
    if type(k) == "string" and type(v) == "function" and k:sub(1, 1) ~= "_" then
      local d = distance(name, k)
      if d < bestd or (d == bestd and best and k < best) then best, bestd = k, d end
    end
  end
  return best and (" (did you mean engine:%s?)"):format(best) or ""
end

--- Trisul engine methods (Trisul's engine object reference) that luaprobe does not implement (yet).
local TRISUL_ONLY = { update_counter_raw = true, add_alert_ids = true, update_flow = true, update_flow_raw = true,
                      terminate_flow = true, new_flow_record = true, add_edge = true, add_flow_edges = true,
                      set_key_attribute = true, add_flow_attribute = true }

setmetatable(Engine, { __index = function(_, name)      -- unknown methods fail loudly, with a suggestion
  return function()
    name = tostring(name)
    if TRISUL_ONLY[name] and rawget(Engine, name) == nil then
      error(("engine:%s() is a Trisul engine method that luaprobe does not implement yet"):format(name), 2)
    end
    error(("engine:%s() is not a method of the engine object%s (docs/reference.md lists them)")
      :format(name, suggestion(name)), 2)
  end
end })

local function frontend_only(self, name)
  if self._pipeline ~= "frontend" then
    error(("ERR_NOTAVAIL: %s() is not available for backend scripts"):format(name), 3)
  end
end

--- Fast path: the packet the next hook sees (entry i of batch b), on the engine's clock struct c (engine._t):
--- Engine:set_packet(b, i), or M.set_clock(c, b, i) with the struct the simplecounter walk keeps (host.lua sc_pick:
--- one Lua table lookup fewer per packet).
--- A late packet (earlier than the engine's time: merged or reordered captures) counts in the current
--- bucket and window: engine time never goes backwards, a flushed bucket is never reopened.
--- Called by the walks as a plain function (M.set_packet, M.set_clock), not through the object's __index.
local function set_clock(c, b, i)
  c.b, c.i, c.pos = b, i, i
  local p = b[i]
  local t = p.ts_sec
  if t < c.floor then
    t = c.floor
    c.tus = t * 1e6
  else
    c.tus = t * 1e6 + floor(p.ts_nsec / 1000)
  end
  c.now = t
end
M.set_clock = set_clock

function Engine:set_packet(b, i) set_clock(self._t, b, i) end
M.set_packet = Engine.set_packet

local function pkt(self)
  local c = self._t
  if c.i < 0 then return nil end
  return c.b[c.i]
end

--- Backend (and ticks): the current time without a packet.
function Engine:set_time(sec, usec)
  local c = self._t
  c.i, c.pos = -1, -1
  c.now, c.usec = sec, usec or 0
  c.tus = sec * 1e6 + (usec or 0)
end

function Engine:timestamp()
  local p = pkt(self)
  if p ~= nil then return p.ts_sec, math.floor(p.ts_nsec / 1000) end
  return self._t.now, self._t.usec
end
function Engine:instanceid() return self._instance end
function Engine:id() return self._instance end
function Engine:probeid() return "probe0" end

-- ------------------------------------------------------------------ counters

local NO_VARTYPES = {}

-- The group's bucket table for engine time `now` (created if needed), remembered in self._cur[g] with the time it
-- is for: the next update in the same second (nearly every update of a busy hook) finds it with one lookup and one
-- comparison instead of five lookups and a modulo.  take_counters forgets them when it closes buckets.
local function open_bucket(self, g, now)
  local grp = self._groups[g]
  local bs = grp and grp.bucketsize or 60
  local b = now - now % bs
  local gt = self.counters[g]
  if gt == nil then gt = {}; self.counters[g] = gt end
  local bt = gt[b]
  if bt == nil then bt = {}; gt[b] = bt end
  local c = self._cur[g]
  if c == nil then
    c = { now = now, bt = bt, vt = grp and grp.vartypes or NO_VARTYPES }
    self._cur[g] = c
  else
    c.now, c.bt = now, bt
  end
  return c
end

-- A bucket holds one table per meter, keyed by counter key (bt[meter][key] = value), and per meter type that
-- needs a second value one more at bt[-1 - meter] (GAUGE: the sample's time in µs; AVERAGE: the sample count;
-- DELTA_RATE: the bucket's first sample).  Meter-major, not key-major: a key's first update in a bucket stores a
-- number in the meter's table instead of making a table for the key (issue 10: a hook counting by port or host
-- on 100 000 flows made a table per key and bucket).
local function meter_table(bt, m)
  local mt = bt[m]
  if mt == nil then mt = {}; bt[m] = mt end
  return mt
end

local function add(self, g, key, meter, value)
  local c = self._t
  local now, fl = c.now, c.floor
  if now < fl then                  -- a hook's time before the current second: an async result's or an event's
    if not self._result then now = fl             -- (reassembly, filex): in the current bucket, as late packets
    elseif now < self._closed then now = self._closed end   -- an async result: its own bucket, held open for it
  end                                             -- (take_counters); one already written is never reopened
  local c = self._cur[g]
  if c == nil or c.now ~= now then c = open_bucket(self, g, now) end
  local bt = c.bt
  local mt = bt[meter]
  if mt == nil then mt = meter_table(bt, meter) end
  local vt = c.vt[meter] or 0
  local old = mt[key]
  if vt == 2 then                                                      -- GAUGE: last sample, and its time (µs)
    local s, us = self:timestamp()
    us = s * 1000000 + us
    local at = meter_table(bt, -1 - meter)
    local t = at[key]
    -- a later sample replaces it; of one µs the larger is kept, as parts of several VMs merge (engine/store/meters.py),
    -- so the value does not depend on how samples of one µs (a window's flow flushes) are spread over VMs; an earlier
    -- one (a late packet's) replaces it from a hook, never from an async result (its schedule time: any order)
    if old == nil or us > t or (us == t and value > old) or (us < t and not self._result) then
      mt[key] = value
      at[key] = us
    end
  elseif vt == 6 then mt[key] = (old == nil or value > old) and value or old
  elseif vt == 7 then mt[key] = (old == nil or value < old) and value or old
  elseif vt == 5 then                                                  -- DELTA_RATE: samples of a running total
    mt[key] = value                                                    -- last sample
    local first = meter_table(bt, -1 - meter)                          -- first sample of the bucket
    if first[key] == nil then first[key] = value end
  else
    mt[key] = (old or 0) + value
    if vt == 4 then                                                    -- AVERAGE: count samples
      local n = meter_table(bt, -1 - meter)
      n[key] = (n[key] or 0) + 1
    end
  end
end

M.add = add     -- (engine, GUID upper case, key, meter, value): the built-in analysers' direct path

--- The meter id of a counter call `fn` (update_counter, update_counter_bytes, add_flow_counter): an integer 0..15, a
--- counter group having at most 16 meters (Trisul's countergroup, docs/schema.md `counters.meter`); nil or a text that
--- is not a number is meter 0, as before.  Another number is a Lua error at the caller's line (`level`): before,
--- a meter 1.5, inf or >= 2^63 reached the store writer, which rejected the row and ended the run with exit 1 (an
--- "internal" error), a negative one was dropped without a word, and a cg_monitor of the group built a list of
--- (highest meter + 1) values per key (engine/plugins/monitors.py), 8 GB and no end for a meter 2^40.
local huge = math.huge
local function meter_id(fn, meter, level)
  local m = tonumber(meter)
  if m == nil then return 0 end
  if m ~= m or m < 0 or m > 15 or m % 1 ~= 0 then
    error(("%s: meter %s is not one of 0..15 (a counter group has at most 16 meters)"):format(fn, tostring(meter)),
          level + 1)
  end
  return m
end

--- Keys may be strings or numbers (numbers become strings when written out); nil (or NaN) is an error at the
--- caller's line, as a value that is not a finite number is (the store has no NaN, and inf + -inf in one bucket
--- is NaN: such a row was rejected at the end, exit 1).
local function counter_key(fn, key, level)
  if key == nil or key ~= key then error(("%s: key is %s"):format(fn, tostring(key)), level + 1) end
  return key
end

function Engine:update_counter(guid, key, meter, value)
  local v = tonumber(value) or 0
  if v ~= v or v == huge or v == -huge then
    error(("update_counter: value %s is not a finite number"):format(tostring(v)), 2)
  end
  add(self, norm(guid), counter_key("update_counter", key, 2), meter_id("update_counter", meter, 2), v)
end
Engine.update_counter_raw = Engine.update_counter

function Engine:update_counter_bytes(guid, key, meter)
  frontend_only(self, "update_counter_bytes")
  local p = pkt(self)
  add(self, norm(guid), counter_key("update_counter_bytes", key, 2), meter_id("update_counter_bytes", meter, 2),
      p and p.wirelen or 0)
end

--- Carried state of RUNNING_COUNTER and DELTA_RATE_COUNTER meters: [GUID][key][meter] = value.
local function carried(self, name, g)
  local c = rawget(self, name)
  if c == nil then c = {}; rawset(self, name, c) end
  local t = c[g]
  if t == nil then t = {}; c[g] = t end
  return t
end

--- The stored value of one meter of a closing bucket (T.K.vartype, docs.trisul.org/docs/lua/obj_globalt):
--- COUNTER the sum; RATE_COUNTER sum / bucket seconds; GAUGE the last sample;
--- RUNNING_COUNTER the running total (carried over from earlier buckets);
--- AVERAGE the mean; DELTA_RATE_COUNTER (c2 - c1) / bucket seconds where c2 is
--- the last sample of this bucket and c1 the last sample of the previous
--- bucket (the first sample of this bucket when there is none); MAXIMUM / MINIMUM the extreme.
--- Every type but COUNTER and RUNNING_COUNTER also returns what merging parts of the counter from several
--- VMs, shards or runs needs (engine/store/meters.py): vartype, total, divisor, sample_us.
local function closed_value(self, g, key, aux, meter, v, vt, bs)
  if vt == 1 then return v / bs, vt, v, bs, 0 end
  if vt == 4 then return v / aux[key], vt, v, aux[key], 0 end
  if vt == 2 then return v, vt, 0, 0, aux[key] end
  if vt == 6 or vt == 7 then return v, vt, 0, 0, 0 end
  if vt == 3 then
    local run = carried(self, "_running", g)
    local rk = run[key]
    if rk == nil then rk = {}; run[key] = rk end
    rk[meter] = (rk[meter] or 0) + v
    return rk[meter]
  end
  if vt == 5 then
    local last = carried(self, "_delta_last", g)
    local lk = last[key]
    if lk == nil then lk = {}; last[key] = lk end
    local c1 = lk[meter] or aux[key]
    lk[meter] = v
    return (v - c1) / bs, vt, v - c1, bs, 0
  end
  return v
end

--- The bucket of second `now` (empty if new) in each group that declares a RUNNING_COUNTER meter, so take_counters
--- writes this VM's running totals there when it closes (oldest bucket first: the totals of the buckets before),
--- whether or not this VM updates the group in it: a running total carries over (docs/plugins.md "Counters"), and
--- with several VMs (plug-ins, a script's frontend and backend instances, shards) feeding one key, the parts add up
--- to the total only if each VM writes its own in every bucket.  Which buckets open depends on packet time only:
--- every declared group, not the groups updated so far (a T.async result may arrive before or after the second
--- ticks).  A bucket that closes while the VM carries no total of the group writes nothing.
local function open_running(self, now)
  for g, grp in pairs(self._groups) do
    for _, vt in pairs(grp.vartypes or NO_VARTYPES) do
      if vt == 3 then
        local bs = grp.bucketsize or 60
        local b = now - now % bs
        local gt = self.counters[g]
        if gt == nil then gt = {}; self.counters[g] = gt end
        if gt[b] == nil and b + bs > self._closed then gt[b] = {} end    -- a written bucket is never reopened
        break
      end
    end
  end
end

--- Counter rows of buckets that ended at or before `now` (all when now is nil):
--- {guid, bucket, key, meter, value}, and for meter types other than COUNTER and RUNNING_COUNTER
--- {guid, bucket, key, meter, value, vartype, total, divisor, sample_us} (engine/store/meters.py), oldest bucket first (RUNNING_COUNTER and
--- DELTA_RATE_COUNTER depend on the previous bucket).  A RUNNING_COUNTER key
--- that was not updated in a closing bucket of its group still gets a row
--- (its carried total).
--- The buckets a pending T.async task's result may still write in stay open (self._hold: docs/async.md "Time"):
--- they close at a later call, once those results came, whenever they come, so what the buckets hold does not
--- depend on how fast the workers were.  A call with `now` nil (all buckets) also moves self._closed and the floor past
--- every bucket it wrote, so an update that still comes (a result, a hook) lands in a bucket never written, not in a
--- second part of a written one
--- (a RUNNING_COUNTER part holds the VM's whole running total: two parts of one VM would count it twice).  The runs
--- take all only when no result can come any more (engine/fastpath/run.py: after the drain, a retired backend).
--- `tick` true (the call of a packet-time second's tick, engine/fastpath/run.py _tick, with `now` that second): also
--- opens the bucket of `now` in every group with a RUNNING_COUNTER meter (open_running): every VM ticks every
--- packet-time second with packets (every shard too: TIME records, docs/scale.md), so each writes its totals for
--- every bucket any VM updates, and the parts' sum is the total; never in a bucket without packets of a file or
--- generated input (a window end's call is no tick; a live run ticks its clock's seconds without packets too:
--- engine/fastpath/run.py _live_idle).
function Engine:take_counters(now, tick)
  local out, n = {}, 0
  local cut = now
  if now ~= nil then
    if now > self._t.floor then self._t.floor = now end
    local hold = self._hold and self._hold() or nil
    if hold ~= nil and hold < cut then cut = hold end
    if cut > self._closed then self._closed = cut end
  end
  if next(self.counters) ~= nil then self._cur = {} end   -- buckets may close below: forget the current ones
  for g, gt in pairs(self.counters) do
    local grp = self._groups[g]
    local bs = grp and grp.bucketsize or 60
    local buckets = {}
    for b in pairs(gt) do
      if now == nil or b + bs <= cut then buckets[#buckets + 1] = b end
    end
    table.sort(buckets)
    for _, b in ipairs(buckets) do
      local bt = gt[b]
      for meter, mt in pairs(bt) do
        if meter >= 0 then
          local vt = grp and grp.vartypes[meter] or 0
          local aux = bt[-1 - meter]
          for key, v in pairs(mt) do
            n = n + 1
            out[n] = { g, b, tostring(key), meter, closed_value(self, g, key, aux, meter, v, vt, bs) }  -- 5 or 9
          end
        end
      end
      local run = rawget(self, "_running")
      run = run and run[g]
      if run then                                        -- RUNNING_COUNTER keys idle in this bucket
        for key, rk in pairs(run) do
          for meter, total in pairs(rk) do
            local mt = bt[meter]
            if mt == nil or mt[key] == nil then
              n = n + 1
              out[n] = { g, b, tostring(key), meter, total }
            end
          end
        end
      end
      gt[b] = nil
      if now == nil and b + bs > self._closed then self._closed = b + bs end
    end
  end
  if now == nil and self._closed > self._t.floor then self._t.floor = self._closed end
  if tick then open_running(self, now) end
  return out
end

-- ------------------------------------------------------------------ other outputs

local function push(t, row) t[#t + 1] = row end

local function usec(self)
  local _, u = self:timestamp()
  return u
end

-- the second an alert or resource is stamped with: the engine's time, never below the last closed bucket's cut-off
-- (a late packet's hook, also a reassembly_handler or filex_monitor hook run for it by time rather than by packet,
-- writes in the current second, as its counters do; docs/plugins.md "Time never goes backwards")
-- (an onresult / onerror hook is the exception: its rows carry the result's time, docs/async.md "Time"; only its
-- counter updates move to the current bucket, in add())
local function now(self)
  local t = self._t.now
  if t < self._t.floor and not self._result then return self._t.floor end
  return t
end

function Engine:update_key_info(guid, key, label, description)
  push(self.rows.key_info, { norm(guid), tostring(key), tostring(label or ""), description and tostring(description) or "" })
end

--- A number a plug-in passes for a stored number (an alert's priority, a flow record's bytes, packets or duration):
--- a finite number, else `default`, as a value that is not a number always was.  NaN and +-inf were stored as they
--- came: a priority or byte count NULL or Infinity, which `luaprobe query --json` printed as the non-JSON
--- `Infinity` [test_counter_call_args.py].
local function finite(v, default)
  local n = tonumber(v)
  if n == nil or n ~= n or n == huge or n == -huge then return default end
  return n
end
M.finite = finite

function Engine:add_alert(guid, flowkey, alert_key, priority, message)
  push(self.rows.alerts, { now(self), usec(self), norm(guid), flowkey_of(flowkey), tostring(alert_key or ""),
    "", finite(priority, 3), tostring(message or ""), "", self._plugin })
end

function Engine:add_alert_full(guid, flowkey, alert_key, classification, priority, message, status)
  push(self.rows.alerts, { now(self), usec(self), norm(guid), flowkey_of(flowkey), tostring(alert_key or ""),
    tostring(classification or ""), finite(priority, 3), tostring(message or ""), tostring(status or ""),
    self._plugin })
end

function Engine:add_alert_tca(guid, tca_id, status, message)
  push(self.rows.alerts, { now(self), usec(self), norm(guid), "", tostring(tca_id or ""), "TCA",
    1, tostring(message or ""), tostring(status or ""), self._plugin })
end

function Engine:add_resource(guid, flowkey, uri, contents)
  push(self.rows.resources, { now(self), usec(self), norm(guid), flowkey_of(flowkey), tostring(uri or ""),
    contents and tostring(contents) or "", self._plugin })
end

--- Every later packet of the flow adds its wire length to (guid, key, meter);
--- direction 0 both, 1 A->Z (the SYN side), 2 Z->A.  "Later": after the packet whose hook (or whose
--- reassembly event) made the call; a call between batches counts from the next batch's first packet.
--- A simplecounter VM applies its flow counters in its own packet walk (Host sc_pick); every other
--- frontend VM in flow_counter_batch, once per batch after all hooks of the batch ran.
--- The counter's state lives until its flow record ends (a row of the `flows` table: idle or active timeout, a
--- new connection on the same 5-tuple, end of input): the fast path then drops it (flows_ended), so it never
--- outlives its flow; a new connection on the 5-tuple drops it at its SYN (new_connection), so it is not counted.
--- The real time (µs) of the engine's current packet, or of the event or tick when there is none: a flow counter's
--- time of addition and the SYN it is compared with (new_connection, flows_ended) are both packet times as
--- captured.  Not _t.tus, which a late packet's walk clamps to the engine's time (set_packet) while a
--- reassembly event's time (set_time) is not clamped: mixed, a counter added for a late flow's later packet
--- looked older than that flow's own SYN and was dropped there (two --pcap files out of time order).
local function real_tus(self)
  local p = pkt(self)
  if p ~= nil then return p.ts_sec * 1e6 + floor(p.ts_nsec / 1000) end
  return self._t.tus
end

--- The count of registered flow counters: the field nflow_counters and its copy in the clock struct (_t.nfc), which
--- the walks read per packet (a Lua field there is looked up again per packet after a hook's own table store).
local function set_nflow(self, n)
  self.nflow_counters = n
  self._t.nfc = n
end

function Engine:add_flow_counter(flowkey, guid, key, meter, direction)
  frontend_only(self, "add_flow_counter")
  local fk = flowkey_of(flowkey)
  local list = self.flow_counters[fk]
  if list == nil then list = {}; self.flow_counters[fk] = list end
  -- { guid, key, meter, direction, batch position, batch number, packet time in µs when added (real_tus) }
  list[#list + 1] = { norm(guid), tostring(key), meter_id("add_flow_counter", meter, 2), tonumber(direction) or 0,
                      self._t.pos, self._fcbatch, real_tus(self) }
  if self.nflow_counters == 0 and self.on_flow_counters then self.on_flow_counters() end   -- the fast path now
  set_nflow(self, self.nflow_counters + 1)                         -- calls flow_counter_batch every batch
end

--- Remove the flow's counters of group `guid` (all its counters when guid is nil); with `key`, then attach the
--- counter (guid, key, meter, both directions) in their place, as add_flow_counter does.  Trisul's httpsvr.lua:
--- "reset flow counter attaches a counter to flow so each packet is automatically metered with this info until
--- the next reset flow counter is called for that flow" (it passes flowkey, guid, key, meter).
function Engine:reset_flow_counter(flowkey, guid, key, meter)
  frontend_only(self, "reset_flow_counter")
  if guid ~= nil and key ~= nil then meter_id("reset_flow_counter", meter, 2) end   -- before anything is removed
  local fk = flowkey_of(flowkey)
  local list = self.flow_counters[fk]
  if list then
    local g, kept = guid and norm(guid), {}
    for i = 1, #list do
      if g ~= nil and list[i][1] ~= g then kept[#kept + 1] = list[i] end
    end
    set_nflow(self, self.nflow_counters - (#list - #kept))
    self.flow_counters[fk] = #kept > 0 and kept or nil
  end
  if guid ~= nil and key ~= nil then self:add_flow_counter(flowkey, guid, key, meter, 0) end
end

local flowp, band = nil, require("bit").band

--- Keep the flow fk's counters (list) added after engine time t (µs, field 7) and drop the others from the engine's
--- table and count (new_connection, flows_ended).  Returns the list left (nil when none is) and how many were dropped.
local function keep_added_after(self, fk, list, t)
  local keep = {}
  for i = 1, #list do
    if list[i][7] > t then keep[#keep + 1] = list[i] end
  end
  local dropped = #list - #keep
  set_nflow(self, self.nflow_counters - dropped)
  list = #keep > 0 and keep or nil
  self.flow_counters[fk] = list
  return list, dropped
end

--- The engine's current packet p is a SYN without ACK that starts its flow record: the flow table created the record
--- at it or started it again (a new connection on the 5-tuple, engine/fastpath/flowtable.lua "Port reuse"; the record
--- array's address is engine.flow_records, set by the fast path).  The flow's counters added before this packet
--- belong to the earlier connection and are dropped now (flows_ended drops them only when that record is exported,
--- at the next packet-time second).  Returns the flow's list left (nil when none is).
local function new_connection(self, fk, list, p)
  if band(p.d.tcp_flags, 0x12) ~= 0x02 or not self.flow_records then return list end
  local ffi = require("ffi")
  if flowp == nil then
    require("luaprobe.engine.fastpath.flowtable")          -- the lp_flow_cold layout
    flowp = ffi.typeof("lp_flow_cold *")
  end
  if ffi.cast(flowp, self.flow_records)[p.flow].first_ts ~= p.ts_sec + p.ts_nsec * 1e-9 then return list end
  -- added at this packet (its hook or event) or later (times are whole µs; 1 µs slack: an event's time, e.ts
  -- a double, may round down a microsecond)
  return keep_added_after(self, fk, list, real_tus(self) - 2)
end

--- Apply registered flow counters to the current packet (fast path, when any exist).
function Engine:apply_flow_counters(flowkey, dir)
  local list = self.flow_counters[flowkey]
  if list == nil then return end
  local p = pkt(self)
  list = new_connection(self, flowkey, list, p)
  if list == nil then return end
  local len = p.wirelen
  for i = 1, #list do
    local fc = list[i]
    if fc[4] == 0 or fc[4] == dir + 1 then add(self, fc[1], fc[2], fc[3], len) end
  end
end

local rowp, TERMINATED = nil, nil

--- Fast path, after each export of flow records (engine/fastpath/run.py _exported): the n lp_flowrow records at
--- address addr (engine/fastpath/flowrow.lua); the flow counters of every final record among them (idle or active
--- timeout, port reuse, end of input) are dropped: those added at or before the engine time of its last packet.
--- One added later for the same 5-tuple belongs to a newer record (a reused 5-tuple) and stays.  Returns how many were
--- dropped.  Without it this table grew by every flow that ever had a counter (a long run of short flows).
function Engine:flows_ended(addr, n)
  if self.nflow_counters == 0 then return 0 end
  local ffi = require("ffi")
  if rowp == nil then
    rowp, TERMINATED = ffi.typeof("lp_flowrow *"), flowrow.TERMINATED
  end
  local rows, fcs, dropped = ffi.cast(rowp, addr), self.flow_counters, 0
  for i = 0, n - 1 do
    local r = rows[i]
    if band(r.flags, TERMINATED) ~= 0 then
      local fk = ffi.string(r.key)
      local list = fcs[fk]
      if list then
        local _, d = keep_added_after(self, fk, list, math.floor(r.last_ts * 1e6 + 0.5))
        dropped = dropped + d
      end
    end
  end
  return dropped
end

local pktp, batch_flowkey = nil, nil

--- Fast path, once per batch (n packets at address addr), after every hook of the batch ran, for a frontend VM
--- without a packet walk of its own (reassembly_handler, filex_monitor, ...): its flow counters get the
--- batch's packets of their flows, each packet at its time (bucket).  A counter added during this batch by the
--- hook of packet k (self._t.pos = k: set_packet, or the stage event's packet index) counts from packet k + 1.
--- Afterwards the engine's position is "before the next batch" (-1).  Returns the number of packets counted.
function Engine:flow_counter_batch(addr, n)
  local counted = 0
  if self.nflow_counters > 0 then
    if pktp == nil then
      pktp = packetmod.pktp
      batch_flowkey = require("luaprobe.engine.fastpath.decode").flowkey
    end
    local batch = require("ffi").cast(pktp, addr)
    local fcs, this = self.flow_counters, self._fcbatch
    for k = 0, n - 1 do
      local p = batch[k]
      local fk = p.flow >= 0 and batch_flowkey(p.d)
      local list = fk and fcs[fk]
      if list then
        self:set_packet(batch, k)
        list = new_connection(self, fk, list, p)
      end
      if list then
        local len, dir = p.wirelen, p.dir + 1
        for i = 1, #list do
          local fc = list[i]
          if (fc[6] ~= this or fc[5] < k) and (fc[4] == 0 or fc[4] == dir) then add(self, fc[1], fc[2], fc[3], len) end
        end
        counted = counted + 1
      end
    end
  end
  self._fcbatch = self._fcbatch + 1
  self._t.pos = -1
  return counted
end

-- A posted message: a row {pipeline, msgid ("" = broadcast), msg} in rows.messages; the fast path delivers it
-- between batches (engine/fastpath/run.py _deliver_messages, told by on_post) to every instance of the pipeline.
-- One for this VM's own pipeline is also queued in own_pending: Host:call delivers it to this VM as soon as the posting
-- hook returns (Host:deliver_own, which marks the row [4] = true so the fast path skips this VM).
local function post(self, pipeline, a, b)
  local row
  if b == nil then row = { pipeline, "", tostring(a) } else row = { pipeline, norm(a), tostring(b) } end
  local rows = self.rows.messages
  push(rows, row)
  if pipeline == self._pipeline then
    local q = self.own_pending
    if not q then q = {}; self.own_pending = q end
    q[#q + 1] = row
  end
  local f = self.on_post
  if f and #rows == 1 then f() end     -- the first row since the fast path took them (a Python call per message
end                                    -- cost a lupa call each for a plug-in posting per packet)

--- post_message_frontend([msgid,] msg): to all onmessage holders (1 arg) or subscribers of msgid.
function Engine:post_message_frontend(a, b) post(self, "frontend", a, b) end

--- post_message_backend([msgid,] msg): the same for the backend pipeline's instances.
function Engine:post_message_backend(a, b) post(self, "backend", a, b) end

--- T.host:broadcast(msgid, classid, msg) (tlib.lua; Trisul's legacy channel): a row {"channel", msgid, msg, false,
--- classid} the fast path delivers between batches to the channellistener instances of the plug-ins whose
--- id.clsid is classid (all of them when classid is nil), as onchannelmessage(msgid, buffer)
--- (engine/fastpath/run.py _dispatch, Host:deliver_channel).  msgid is passed on as given; classid compares
--- case-insensitively.
function Engine:broadcast(msgid, classid, msg)
  local rows = self.rows.messages
  push(rows, { "channel", tostring(msgid), tostring(msg), false, classid ~= nil and norm(tostring(classid)) or "" })
  local f = self.on_post
  if f and #rows == 1 then f() end
end

-- ------------------------------------------------------------------ flows and edges

--- tag_flow(flowkey, tag): a searchable tag on a flow (docs.trisul.org/docs/lua/obj_engine).  Tags of packet
--- flows reach the fast path's flow table between batches and are written with
--- the flow's `flows` row (and seen by sg_monitor's Flow:tags()); tags of a
--- script-made flow record (new_flow_record / update_flow) go on that record.
--- The 64-byte limit per flow is applied where the tags are joined.
function Engine:tag_flow(flowkey, tag)
  local fk = flowkey_of(flowkey)
  local sf = self.sflows[fk]
  if sf then flowrow.add_tag(sf.tags, tostring(tag)); return end
  push(self.rows.flow_tags, { fk, tostring(tag) })
end

--- disable_reassembly(flowkey): this VM gets no more reassembly_handler events
--- for the flow (engine/streams/handler.lua); reassembly stops when every
--- handler disabled it.  Outside reassembly_handler VMs it has no effect.
function Engine:disable_reassembly(flowkey)
  frontend_only(self, "disable_reassembly")
  if self.on_disable_reassembly then self.on_disable_reassembly(flowkey_of(flowkey)) end
end

--- add_edge(s_guid, s_key, t_guid, t_key): one directed edge (graph stream), stored in `edges`.
function Engine:add_edge(sg, sk, tg, tk)
  push(self.rows.edges, { now(self), norm(sg), tostring(sk or ""), norm(tg), tostring(tk or ""), "", self._plugin })
end

local HOSTS, HOSTS6, APPS = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", "{9807E97A-6CD2-442F-BB18-8C104C8EB204}",
  "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}"

--- add_flow_edges(flowkey, guid, key): edges both ways between the vertex
--- (guid, key) and the flow's two addresses (Hosts group, HostsIPv6 for IPv6
--- flows) and its Z port (Apps group, the server port by the flow-key rule).
function Engine:add_flow_edges(flowkey, guid, key)
  local fk = flowkey_of(flowkey)
  local f = packetmod.flowid_from_key(fk)
  local ok, ipa, ipz, portz = pcall(function() return f:ipa(), f:ipz(), f:portz() end)
  if not ok or ipa == nil then error(("add_flow_edges: %q is not a flow key"):format(fk), 2) end
  local hosts = #ipa > 11 and HOSTS6 or HOSTS
  local g, k = norm(guid), tostring(key or "")
  for _, v in ipairs({ { hosts, ipa }, { hosts, ipz }, { APPS, portz } }) do
    push(self.rows.edges, { now(self), g, k, v[1], v[2], fk, self._plugin })
    push(self.rows.edges, { now(self), v[1], v[2], g, k, fk, self._plugin })
  end
end

--- add_alert_ids(guid, flowkey, sigid, classification, priority, message): an
--- IDS-style alert (socialalert.lua), stored like add_alert_full without status.
function Engine:add_alert_ids(guid, flowkey, sigid, classification, priority, message)
  self:add_alert_full(guid, flowkey, sigid, classification, priority, message, "")
end

-- Script-made flow records (flow import, NAT syslog): kept in this VM until
-- terminate_flow or the end of the run, then written to `flows`.
local function sflow(self, flowkey, create)
  local fk = flowkey_of(flowkey)
  local f = self.sflows[fk]
  if f == nil and create then
    local t = self._t.tus / 1e6                       -- the clock with its microseconds (set_timestamp, a packet)
    f = { fk = fk, first = t, last = t, v = { [0] = 0, 0, 0, 0 }, tags = {} }
    self.sflows[fk] = f
  end
  return f
end

--- new_flow_record(flowkey, bytes_az, bytes_za, packets_az, packets_za): announce a flow record (Trisul: "metrics
--- unchanged"; update_flow changes them): the script-made record of the key exists from here on (created with zero
--- totals when it did not), and every messagemonitor's onnewflowrecord(engine, flow, bytes_az, bytes_za, packets_az,
--- packets_za) gets these numbers, between batches (rows "flowrecord": engine/fastpath/run.py _dispatch; pushed only
--- while a messagemonitor with onnewflowrecord is loaded, wants_flowrecords).  Before 2026-12-03 it set the record's
--- totals, so flowimport.lua (update_flow, then new_flow_record) kept only a repeated key's last record.
function Engine:new_flow_record(flowkey, baz, bza, paz, pza)
  frontend_only(self, "new_flow_record")
  local f = sflow(self, flowkey, true)
  if self.wants_flowrecords then
    local rows = self.rows.messages
    push(rows, { "flowrecord", f.fk, ("%.17g %.17g %.17g %.17g %.17g"):format(self._t.tus / 1e6, finite(baz, 0),
                 finite(bza, 0), finite(paz, 0), finite(pza, 0)), false, "" })
    local cb = self.on_post
    if cb and #rows == 1 then cb() end
  end
end

--- update_flow(flowkey, meter, value): add to a flow record's meter 0 bytes
--- a->z, 1 bytes z->a, 2 packets a->z, 3 packets z->a (docs.trisul.org/docs/lua/obj_engine); the record is
--- created on first use.  Other meters raise an error.
function Engine:update_flow(flowkey, meter, value)
  frontend_only(self, "update_flow")
  meter = tonumber(meter)
  if meter == nil or meter < 0 or meter > 3 or meter % 1 ~= 0 then
    error(("update_flow: meter %s is not one of 0..3 (bytes a>z, bytes z>a, packets a>z, packets z>a)")
      :format(tostring(meter)), 2)
  end
  local f = sflow(self, flowkey, true)
  f.v[meter] = f.v[meter] + finite(value, 0)
  f.last = math.max(f.last, self._t.tus / 1e6)
end
Engine.update_flow_raw = Engine.update_flow

--- set_flow_duration(flowkey, secs): last_ts = first_ts + secs, never earlier than it was (a key imported again
--- later: update_flow moved last_ts to that record's time, and its own duration does not move it back).
function Engine:set_flow_duration(flowkey, secs)
  local f = sflow(self, flowkey, true)
  f.last = math.max(f.last, f.first + finite(secs, 0))
end

local function sflow_row(f, state)
  local id = packetmod.flowid_from_key(f.fk)
  local ok, proto, ipa, porta, ipz, portz = pcall(function()
    return tonumber(id:protocol(), 16), id:ipa(), tonumber(id:porta():sub(3), 16), id:ipz(),
      tonumber(id:portz():sub(3), 16)
  end)
  if not ok then proto, ipa, porta, ipz, portz = 0, "", 0, "", 0 end
  return { f.fk, proto or 0, ipa or "", porta or 0, ipz or "", portz or 0, f.first, f.last,
           f.v[2], f.v[3], f.v[0], f.v[1], state, flowrow.join_tags(f.tags) }
end

--- terminate_flow(flowkey): the script-made record ends and is written (state TERMINATED).
function Engine:terminate_flow(flowkey)
  frontend_only(self, "terminate_flow")
  local f = sflow(self, flowkey, false)
  if f == nil then return end
  self.sflows[f.fk] = nil
  push(self.rows.flows, sflow_row(f, "TERMINATED"))
end

--- Script-made records idle `idle` seconds of engine time by `now` (their last_ts + idle <= now) end and are written
--- (state TIMEOUT), as a packet flow's idle timeout ends it: a long flow import (--lua-input) does not keep every
--- record it made until the end of the run.  The records are scanned at most every idle / 4 s of engine time
--- (at least 1 s), so a record may end up to that much later than its timeout.  Returns the number ended.
function Engine:expire_script_flows(now, idle)
  if next(self.sflows) == nil or now < (rawget(self, "_sflow_scan_at") or 0) then return 0 end
  self._sflow_scan_at = now + math.max(1, floor(idle / 4))
  local n = 0
  for fk, f in pairs(self.sflows) do
    if f.last + idle <= now then
      self.sflows[fk] = nil          -- (clearing a field during pairs() is allowed: next() goes on)
      push(self.rows.flows, sflow_row(f, "TIMEOUT"))
      n = n + 1
    end
  end
  return n
end

--- End of the run: every script-made record still open, as flows rows (state OPEN).
function Engine:take_open_flows()
  local out = {}
  for fk, f in pairs(self.sflows) do out[#out + 1] = sflow_row(f, "OPEN") end
  self.sflows = {}
  return out
end

local ROWS = { "alerts", "resources", "key_info", "messages", "edges", "flow_tags", "flows" }

local function new_rows()
  local r = {}
  for _, k in ipairs(ROWS) do r[k] = {} end
  return r
end
M.new_rows = new_rows

--- Move out recorded rows (alerts, resources, key_info, messages, edges, flow_tags, flows).
function Engine:take_outputs()
  local r = self.rows
  self.rows = new_rows()
  self.own_pending = false
  return r
end

--- Move out the posted messages only ({pipeline, msgid, msg[, true when already delivered to this VM]} rows).
function Engine:take_messages()
  local m = self.rows.messages
  if #m == 0 then return m end
  self.rows.messages = {}
  self.own_pending = false
  return m
end

return M
