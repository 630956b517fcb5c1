--[[
luaprobe.engine.streams.handler — the reassembly_handler script type (docs.trisul.org/docs/lua/reassembly)
inside one plug-in VM.  The reassembly itself is shared (luaprobe.engine.streams.stage
in the driver VM); this module votes on new flows and turns the stage's
events into hooks:

  filter(engine, ts, flow)              once per new TCP flow; the flow is reassembled unless every
                                        handler returns false (a handler without filter votes yes)
  onnewflow(engine, ts, flow)           a reassembled flow starts (every handler sees every
                                        reassembled flow, as with Trisul's shared reassembly)
  onpayload(engine, ts, flow, dir, seekpos, buffer)
                                        new in-order bytes; dir 0 = server->client, 1 = client->server;
                                        seekpos = stream offset of buffer's first byte in that direction
  onattribute(engine, ts, flow, name, value)
                                        HTTP-Header, Content-Type, User-Agent, Host, URI, TLS:RECORD,
                                        TLS:O, TLS:CA:ROOT, TLS:CA:INTER, TLS:CIPHER, "" and "^D";
                                        value is a Lua string.  The legacy order
  onattribute(engine, flow, ts, name, buffer)
                                        (older Trisul scripts; value a Buffer) is used when the hook's
                                        parameter names say so (legacy_attribute_order below)
  onterminateflow(engine, ts, flow)     FIN both ways, RST, idle timeout or end of input

`flow` is a FlowID.  engine:disable_reassembly(flow) stops this VM's events
for the flow; the stage stops delivering bytes when every handler disabled it.

The legacy flowmonitor script type (Trisul's older form of onattribute, as trisul-scripts'
techniques/httplog.lua, tagflow.lua and frontend_scripts/httpserver/httpsvr.lua use it) is served
by the same module with opts.table = "flowmonitor": its one hook

  onflowattribute(engine, flow, ts, name, buffer)
                                        the same attributes, in the legacy order, value a Buffer

gets every attribute of every TCP flow (a flowmonitor has no filter: it votes yes) and nothing else.
]]
local ffi = require("ffi")
local bit = require("bit")
local buffer = require("luaprobe.engine.plugins.buffer")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")
local stage = require("luaprobe.engine.streams.stage")

local band, bor, lshift = bit.band, bit.bor, bit.lshift
local cast, fstring = ffi.cast, ffi.string
local TCP = decode.PROTO.TCP
local NEWFLOW, DATA, ATTR, CLOSE = stage.NEWFLOW, stage.DATA, stage.ATTR, stage.CLOSE
local ATTRS = stage.ATTRS
local TO_H = stage.TO_HANDLER

local M = {}
local H = {}
H.__index = H

--- True when hook f declares the legacy onattribute order (engine, flow, ts, name, buffer) by its
--- parameter names: the 2nd names a flow (contains "flow") and the 3rd a time (host.lua swapped_order).
--- Both orders have five parameters and live in the same reassembly_handler table, so the names
--- are the only sign; any other naming, a vararg hook or stripped bytecode (no names) gets the
--- documented order (engine, ts, flow, name, string).  docs/plugins.md "reassembly_handler".
local function legacy_attribute_order(f)
  return require("luaprobe.engine.plugins.host").swapped_order(f, "flow")
end
M.legacy_attribute_order = legacy_attribute_order

--- The attribute hook of each script type this module serves, and the other hooks it calls (flowmonitor: none).
local ATTR_HOOK = { reassembly_handler = "onattribute", flowmonitor = "onflowattribute" }
local OTHER_HOOKS = { reassembly_handler = true, flowmonitor = false }
M.ATTR_HOOK = ATTR_HOOK

--- opts: votes (address of the stage's lp_svote array), slot (0..31: this handler's vote bit), table (the script
--- type: "reassembly_handler", the default, or "flowmonitor").
function M.new(host, opts)
  local tbl = opts.table or "reassembly_handler"
  local rh, ahook, others = host.plugin[tbl], ATTR_HOOK[tbl], OTHER_HOOKS[tbl]
  local self = setmetatable({
    host = host, rh = rh, engine = host.engine, tbl = tbl, ahook = ahook, others = others,
    votes = cast("lp_svote *", opts.votes), bit = lshift(1, opts.slot),
    has_filter = others and type(rh.filter) == "function",
    flows = {}, bykey = {}, buf = buffer.new(nil, 0),
    -- onattribute(engine, flow, ts, name, buffer); a flowmonitor's hook always has that order
    legacy = not others or legacy_attribute_order(rh.onattribute),
    want = { payload = others and type(rh.onpayload) == "function", attribute = type(rh[ahook]) == "function" },
  }, H)
  host.engine.on_disable_reassembly = function(fk) self:disable(fk) end
  return self
end

function H:hook(name, ...)
  if not self.others or type(self.rh[name]) ~= "function" then return true, true end
  return self.host:call(self.tbl, name, ...)
end

--- Vote on the TCP flows of the batch this handler has not seen yet.
function H:vote(addr, n)
  local batch = cast(packet.pktp, addr)
  local votes, mybit, eng = self.votes, self.bit, self.engine
  for i = 0, n - 1 do
    local p = batch[i]
    if p.flow >= 0 and p.d.first[TCP] >= 0 then
      local v = votes[p.flow]
      if v.uid ~= p.flow_uid then v.uid, v.asked, v.yes, v.disabled = p.flow_uid, 0, 0, 0 end
      if band(v.asked, mybit) == 0 then
        v.asked = bor(v.asked, mybit)
        local yes = true
        if self.has_filter then
          eng:set_packet(batch, i)
          local ok, res = self.host:call(self.tbl, "filter", eng, p.ts_sec, packet.flowid(p.d))
          yes = ok and res and true or false
        end
        if yes then v.yes = v.yes + 1 end
      end
    end
  end
end

function H:disable(fk)
  local uid = self.bykey[fk]
  local st = uid and self.flows[uid]
  if st == nil or st.disabled then return end
  st.disabled = true
  local v = self.votes[st.idx]
  if v.uid == uid then v.disabled = v.disabled + 1 end
end

--- Run the hooks for the stage's events (address, count) addressed to handlers.
function H:run_events(addr, n)
  local ev = cast("lp_sev *", addr)
  for i = 0, n - 1 do
    local e = ev[i]
    if band(e.to, TO_H) ~= 0 then self:event(e) end
  end
  self.engine._t.pos = -1     -- between batches (flow_counter_batch, which also resets it, runs only for VMs
  return n                    -- that added a flow counter)
end

--- One event: NEWFLOW, DATA, ATTR or CLOSE.
function H:event(e)
  local eng, flows = self.engine, self.flows
  local uid = e.uid
  local sec = math.floor(e.ts)
  eng:set_time(sec, math.floor((e.ts - sec) * 1e6))
  eng._t.pos = e.bi           -- the batch packet that caused the event: add_flow_counter counts the ones after it
  local kind = e.kind
  if kind == NEWFLOW then
    local key = fstring(e.p, e.len)
    local st = { flow = packet.flowid_from_key(key), key = key, idx = e.idx, disabled = false }
    flows[uid] = st
    self.bykey[key] = uid
    self:hook("onnewflow", eng, sec, st.flow)
    return
  end
  local st = flows[uid]
  if st == nil then return end
  if kind == DATA then
    if not st.disabled and self.want.payload then
      buffer.rebind(self.buf, e.p, e.len)
      self.host:call(self.tbl, "onpayload", eng, sec, st.flow, e.dir, e.off, self.buf)
      buffer.invalidate(self.buf)
    end
  elseif kind == ATTR then
    if not st.disabled and self.want.attribute then
      local v = fstring(e.p, e.len)
      if self.legacy then
        buffer.rebind(self.buf, v, #v, v)
        self.host:call(self.tbl, self.ahook, eng, st.flow, sec, ATTRS[e.attr], self.buf)
        buffer.invalidate(self.buf)
      else
        self.host:call(self.tbl, self.ahook, eng, sec, st.flow, ATTRS[e.attr], v)
      end
    end
  elseif kind == CLOSE then
    flows[uid] = nil
    self.bykey[st.key] = nil
    self:hook("onterminateflow", eng, sec, st.flow)
  end
end

return M
