--- lp_flowrow: one exported flow record, 256 bytes (the layout only; engine/fastpath/driver.lua fills them,
--- engine/fastpath/flowrows.py reads them with numpy, engine/plugins/engine.lua flows_ended reads the key, state
--- and last packet time of ended records).  Defined here once so every VM that reads the array has the same
--- cdef (each LuaJIT VM has its own C declarations).
---   first_ts, last_ts                      packet time of the first / last packet (s, exact doubles)
---   packets_az, packets_za, bytes_az, bytes_za, payload_az, payload_za   counters (doubles holding integers)
---   setup_rtt_us                           TCP handshake RTT in whole µs, -1 when not measured
---   retrans_az, retrans_za                 TCP retransmissions (flowtable.lua tcp_track)
---   flags      lp_flow state flags, | TIMEDOUT (0x100) for an idle expiry, | TERMINATED (0x800) for a final record
---   tags       0, or the 1-based index of this flow's tags (joined by spaces) in Driver.exp_tags
---   porta, portz, proto                    the key's ports and IP protocol
---   state      0 OPEN, 1 TIMEOUT, 2 CLOSED, 3 RESET, 4 REUSED (docs/schema.md; flowrows.STATE_TEXT)
---   key        Trisul flow id, NUL-padded (41 bytes IPv4, 83 IPv6: decode.put_flowkey)
---   ipa, ipz   the A / Z address as in the key ("C0.A8.01.02" or 32 hex digits), NUL-padded
local ffi = require("ffi")

if not pcall(ffi.typeof, "lp_flowrow") then ffi.cdef [[
typedef struct {
  double first_ts, last_ts;
  double packets_az, packets_za, bytes_az, bytes_za;
  double payload_az, payload_za;
  double setup_rtt_us;
  double retrans_az, retrans_za;
  uint32_t flags;
  int32_t tags;
  uint16_t porta, portz;
  uint8_t proto, state;
  uint8_t pad_[2];
  char key[84];
  char ipa[32], ipz[32];
} lp_flowrow;
]] end

--- A flow's tags (engine:tag_flow, in tagging order; no tag twice: add_tag) joined by spaces, at most 64 bytes: a tag
--- that would take the line past 64 is dropped (docs.trisul.org/docs/lua/obj_engine tag_flow: "all tags of a flow
--- together stay <64 bytes, excess dropped").  Used for packet flows (driver.lua) and script-made records
--- (engine.lua) alike.
local function join_tags(list)
  local s = ""
  for _, t in ipairs(list) do
    local c = s == "" and t or s .. " " .. t
    if #c <= 64 then s = c end
  end
  return s
end

--- Append `tag` to a flow's tag list unless the list has it already (a hook that tags a flow at every packet or
--- every HTTP request gives it one tag, and the list of a long flow does not grow with its packets); true when
--- it was added.
local function add_tag(list, tag)
  for i = 1, #list do
    if list[i] == tag then return false end
  end
  list[#list + 1] = tag
  return true
end

return {
  SIZE = ffi.sizeof("lp_flowrow"),
  TERMINATED = 0x800,          --- flags bit of a final record (not an sg_monitor onnewflow peek)
  join_tags = join_tags,
  add_tag = add_tag,
}
