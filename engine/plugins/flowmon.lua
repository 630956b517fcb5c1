--[[
engine.plugins.flowmon — the backend flow script types sg_monitor (docs.trisul.org/docs/lua/sg_monitor) and
flowtracker (docs.trisul.org/docs/lua/flow_tracker) inside one plug-in VM, and the Flow object (docs/plugins.md).

Flow records come from the fast path's flow table when a flow ends (idle or
active timeout, end of input); Python hands each backend VM its share of
the window's records once per window (rows as below), then calls the phases
in order: begin (build Flow objects), terminate (sg_monitor.onterminate),
filter (sg_monitor.flushfilter votes), flush (sg_monitor.onflush for the
records kept), metric (flowtracker.getmetric), tags (tags added with
Flow:add_tag, to be written with the record).

Row (1-based): flowkey, proto, ipa, porta, ipz, portz, first_ts, last_ts,
packets_az, packets_za, bytes_az, bytes_za, state text, tags (space
separated), state flags (bits in docs/plugins.md, Flow state()), payload_az, payload_za,
setup RTT (µs, nil when not measured), retransmissions a->z, z->a
(engine/fastpath/flowtable.lua tcp_track; docs/plugins.md "Setup RTT and retransmissions").
]]
local packet = require("luaprobe.engine.plugins.packet")
local flowrow = require("luaprobe.engine.fastpath.flowrow")

local M = {}
local Flow = {}
Flow.__index = Flow
M.Flow = Flow

--- A Flow object for a row (see above).
function M.new_flow(row)
  local tags = {}
  for t in tostring(row[14] or ""):gmatch("%S+") do tags[#tags + 1] = t end
  return setmetatable({ _r = row, _tags = tags, _added = {} }, Flow)
end

function Flow:key() return self._r[1] end
Flow.id = Flow.key
function Flow:flow()
  if self._fid == nil then self._fid = packet.flowid_from_key(self._r[1]) end
  return self._fid
end
function Flow:time_window() return self._r[7], self._r[8] end
function Flow:state() return self._r[15] or 0 end
function Flow:az_bytes() return self._r[11] end
function Flow:za_bytes() return self._r[12] end
function Flow:az_packets() return self._r[9] end
function Flow:za_packets() return self._r[10] end
function Flow:az_payload_bytes() return self._r[16] or 0 end
function Flow:za_payload_bytes() return self._r[17] or 0 end
--- Tags, pipe separated (docs/plugins.md, Flow tags()): the tags the flows row stores (flowrow.join_tags: each once,
--- at most 64 bytes), so the sg_monitor sees what is written; a tag made of words reads as those words.
function Flow:tags()
  local out, seen = {}, {}
  for w in flowrow.join_tags(self._tags):gmatch("%S+") do
    if not seen[w] then seen[w] = true; out[#out + 1] = w end
  end
  return table.concat(out, "|")
end
--- Add a tag; it is written with the flow record (the 64-byte limit applies when tags are joined); a tag the flow
--- has already is not added again (engine/fastpath/flowrow.lua add_tag).
function Flow:add_tag(s)
  s = tostring(s)
  if flowrow.add_tag(self._tags, s) then self._added[#self._added + 1] = s end
end
--- TCP setup RTT in µs: the latest client SYN to the client's ACK completing the handshake; 0 when
--- not measured (not TCP, or no SYN / SYN-ACK / ACK seen in the record).  docs/plugins.md "Setup RTT
--- and retransmissions".
function Flow:setup_rtt() return self._r[18] or 0 end
--- Retransmitted TCP segments in both directions (docs/plugins.md for the rule); 0 for other protocols.
function Flow:retransmissions() return (self._r[19] or 0) + (self._r[20] or 0) end

-- ------------------------------------------------------------------ phases (called from Python)

function M.begin(host, rows)
  local objs = {}
  for i, row in ipairs(rows) do objs[i] = M.new_flow(row) end
  host._flows = objs
  return #objs
end

--- sg_monitor.onnewflow(engine, flow) for each row (flows created by the last batch).
function M.newflow(host, rows)
  local eng = host.engine
  for _, row in ipairs(rows) do host:call("sg_monitor", "onnewflow", eng, M.new_flow(row)) end
end

--- sg_monitor.onterminate(engine, flow) for each record.
function M.terminate(host)
  local eng = host.engine
  for _, f in ipairs(host._flows) do host:call("sg_monitor", "onterminate", eng, f) end
end

--- flushfilter votes: an array of 1 (keep: the hook returned non-false, or raised an error, so nothing is lost by
--- a broken filter), 0 (drop) or -1 (no flushfilter hook: no vote; engine/plugins/monitors.py kept()).
function M.filter(host)
  local out, eng = {}, host.engine
  local has = type(host.plugin.sg_monitor.flushfilter) == "function"
  for i, f in ipairs(host._flows) do
    if has then
      local ok, res = host:call("sg_monitor", "flushfilter", eng, f)
      out[i] = (not ok or res ~= false) and 1 or 0
    else
      out[i] = -1
    end
  end
  return out
end

--- sg_monitor.onflush(engine, flow) for the records whose keep[i] is true.
function M.flush(host, keep)
  local eng = host.engine
  for i, f in ipairs(host._flows) do
    if keep[i] then host:call("sg_monitor", "onflush", eng, f) end
  end
end

--- flowtracker.getmetric(engine, flow): an array of numbers (0 when nil, not a number, NaN, +-inf or an error).  NaN
--- is 0: before, it reached the ranking (engine/plugins/flowmon.py) as a flow's metric, and one NaN among a bucket's
--- metrics made heapq.nlargest keep lower metrics and drop higher ones (every comparison with NaN is false), and
--- wrote a topper row whose metric is NULL; an infinite one ranked first and `query toppers --json` printed it as the
--- non-JSON Infinity [test_flowmon.py].
local finite = require("luaprobe.engine.plugins.engine").finite
function M.metric(host)
  local out, eng = {}, host.engine
  for i, f in ipairs(host._flows) do
    local ok, res = host:call("flowtracker", "getmetric", eng, f)
    out[i] = ok and finite(res, 0) or 0
  end
  return out
end

--- Tags added with Flow:add_tag: {index = "tag tag"}; the objects are released.
function M.tags(host)
  local out = {}
  for i, f in ipairs(host._flows or {}) do
    if #f._added > 0 then out[i] = table.concat(f._added, " ") end
  end
  host._flows = nil
  return out
end

return M
