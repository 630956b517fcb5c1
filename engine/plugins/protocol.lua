--[[
luaprobe.engine.plugins.protocol — protocol_handler scripts (docs.trisul.org/docs/lua/protocol_handler): a Lua dissector that adds a
layer of its own protocol to packets, so that simplecounter scripts attach to it by its GUID.

    protocol_handler = {
      control = { guid = "{...}", name = "SYSLOG",
                  host_protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",   -- UDP
                  host_protocol_ports = { 514 } },                                 -- optional
      parselayer = function(layer) return layer:layer_bytes(), nil end }

How it runs (choices where the reference is silent, docs/plugins.md):
* Every VM of a run registers the run's protocol_handler protocols in the same order (decode.register_protocol),
  so a custom protocol has one enum in the whole fast-path process.
* Per batch, protocol_handler instances run before every other frontend instance.  For each packet with the host
  protocol (and, when host_protocol_ports is given and the host is TCP or UDP, one of those ports at either end) the
  candidate layer starts where the host layer's header ends and runs to the end of the captured bytes; parselayer
  sees it as `layer` (layer_bytes() = its length).  Returning nil means "not this protocol"; returning n >= 0 adds
  a layer of the handler's protocol, n bytes long (clamped to what was captured), to the decoded packet in the
  batch, where every later VM's simplecounter, Packet:find_layer and Layer:protocol_id see it.  Any other value
  (a string that is not a number, a table, a boolean, NaN) adds no layer and is a hook error (counted, logged
  naming the hook's file and line).
* The second return value (the next protocol's GUID) is honoured when it is another registered protocol_handler
  protocol that has this one as host (a chain); otherwise it is counted as `next_unknown` and ignored (luaprobe
  does not decode NetFlow/sFlow, which Trisul's redirectors hand packets to).
* A handler without host_protocol_guid is attached through Trisul's UI "access points", which luaprobe has not:
  `luaprobe check` reports it and it never runs.
]]
local ffi = require("ffi")
local decode = require("luaprobe.engine.fastpath.decode")
local packet = require("luaprobe.engine.plugins.packet")

local M = {}
-- a handler's counters (Host:protocol_stats; bad_returns: this batch's, moved to the hook errors after each batch)
if not pcall(ffi.typeof, "lp_phcount") then
  ffi.cdef "typedef struct { double added, declined, full, next_unknown, bad_returns; } lp_phcount;"
end
local counters = ffi.typeof("lp_phcount")
local TCP, UDP = decode.PROTO.TCP, decode.PROTO.UDP

--- The handler's control block, validated: {guid, name, host, ports} or nil, problem.
function M.control(plugin)
  local ph = plugin.protocol_handler
  local c = type(ph) == "table" and ph.control or nil
  if type(c) ~= "table" then return nil, "protocol_handler.control is missing" end
  if type(c.guid) ~= "string" then return nil, "protocol_handler.control.guid is missing" end
  if type(ph.parselayer) ~= "function" then return nil, "protocol_handler.parselayer is not a function" end
  if type(c.host_protocol_guid) ~= "string" then
    return nil, "protocol_handler without host_protocol_guid is attached through Trisul's access points, " ..
                "which luaprobe has not; it will not run"
  end
  local ports = {}
  for _, p in ipairs(type(c.host_protocol_ports) == "table" and c.host_protocol_ports or {}) do
    ports[#ports + 1] = tonumber(p)
  end
  return { guid = c.guid, name = tostring(c.name or c.guid), host = c.host_protocol_guid, ports = ports }
end

-- The walk's invariants (host.lua w.inv: read once per batch, passed to pick, invoke and done after their own
-- arguments): the hook, the Layer object, the host protocol, the port set, the handler's protocol, the FFI structs of
-- the Packet and the Layer (the Layer is bound to the Packet once, in setup), the counters.  A field of the walk
-- state read or written per packet is looked up again on every packet once a hook stores a new key into a table of
-- its own (issue 10, tests/test_walk_fields.py); the candidate layer's index is the Layer's own lc.i and its start
-- that layer's offset, so nothing of the walk state is written per packet either.
local PH_INV = { "fn", "lobj", "parent", "ports", "proto", "pc", "lc", "cnt" }
local function invoke(_, fn, lobj) return fn(lobj) end
local function invoke_args(_, fn, lobj) return 1, fn, lobj end      -- invoke's call (host.lua walk_direct)

local find, append_layer, by_guid, MAX_LAYERS = decode.find, decode.append_layer, decode.by_guid, decode.MAX_LAYERS
local layer_end, bind_struct = packet.layer_end, packet.bind_struct
local tonumber, max, min = tonumber, math.max, math.min

local function candidate(d, p, parent, ports)
  local li = find(d, parent)
  if li < 0 then return nil end
  if ports ~= nil and not (ports[d.sport] or ports[d.dport]) then return nil end
  local l = d.layer[li]
  local off = l.offset + l.length
  if off > layer_end(p, off) then return nil end
  return off
end

-- the walk (host.lua, Host:walk_batch): parselayer on each candidate packet
local function pick(_, batch, k, _, _, parent, ports, proto, pc, lc, cnt)
  local p = batch[k]
  local d = p.d
  local off = candidate(d, p, parent, ports)
  if off == nil then return nil end
  if d.nlayers >= MAX_LAYERS then
    cnt.full = cnt.full + 1
    return nil
  end
  -- the candidate layer, appended tentatively so that Layer methods read it; kept only if accepted
  append_layer(d, proto, off, layer_end(p, off) - off)
  bind_struct(pc, batch, k)
  lc.i = d.nlayers - 1
  return invoke
end

local function done(ph, batch, k, ok, nbytes, nxt, _, _, _, _, proto, _, lc, cnt)
  local p = batch[k]
  local d, li = p.d, lc.i
  if not ok or nbytes == nil then                -- an error or "not this protocol": the layer goes
    d.nlayers, d.first[proto] = li, -1
    if ok then cnt.declined = cnt.declined + 1 end
    return
  end
  local n = tonumber(nbytes)
  if n == nil or n ~= n then                     -- not a number of bytes (a table, true, NaN...): the layer goes
    d.nlayers, d.first[proto] = li, -1
    cnt.bad_returns = cnt.bad_returns + 1
    ph.errors:report(ph.error_label, ("%s returned %s; expected a number of bytes or nil"):format(
      ph.where, n ~= n and "NaN" or type(nbytes) == "string" and ("the string %q"):format(nbytes:sub(1, 40))
      or "a " .. type(nbytes)))
    return
  end
  local l = d.layer[li]
  local off = l.offset
  l.length = max(0, min(n, layer_end(p, off) - off))
  cnt.added = cnt.added + 1
  if nxt ~= nil and by_guid(nxt) == nil then cnt.next_unknown = cnt.next_unknown + 1 end
end

--- Prepare a handler instance on `host` (a Host): its walk state host.ph.  Returns nil or a problem description.
function M.setup(host)
  local c, problem = M.control(host.plugin)
  if not c then return problem end
  local proto, parent = decode.by_guid(c.guid), decode.by_guid(c.host)
  if proto == nil then return "protocol " .. c.guid .. " is not registered" end
  if parent == nil then return ("host_protocol_guid %s is not a protocol luaprobe decodes"):format(c.host) end
  local portset = nil
  if #c.ports > 0 and (parent == TCP or parent == UDP) then
    portset = {}
    for _, p in ipairs(c.ports) do portset[p] = true end
  end
  local fn = host.plugin.protocol_handler.parselayer
  local info = debug.getinfo(fn, "S")
  local where = ("parselayer (%s:%d)"):format(info.source:gsub("^[=@]", ""), info.linedefined)
  local pobj, lobj = packet.new_packet(), packet.new_layer()
  packet.bind_layer(lobj, pobj, -1)          -- for good: pick sets the Packet's entry and the layer index (lc.i)
  host.ph = host:new_walk({ per = 1, pick = pick, done = done, invokes = { invoke }, args = { [invoke] = invoke_args },
                            hook = "protocol_handler.parselayer",
                            error_label = "protocol_handler.parselayer error", proto = proto, parent = parent,
                            ports = portset, fn = fn, pobj = pobj, lobj = lobj, pc = pobj._c, lc = lobj._c,
                            cnt = counters(), errors = host.errors, where = where, inv = PH_INV }, { fn })
  return nil
end

return M
