--- An inputfilter's step as the run's input (`luaprobe run --lua-input FILE --args TEXT`; Trisul's
--- `trisul -mode lua -in FILE -args TEXT`, docs.trisul.org/docs/lua/inputfilter; docs/plugins.md "inputfilter").
---
--- Trisul calls `inputfilter.step(packet, engine)` in a loop; it returns true to be called again and false at the end
--- of its input.  Two ways to feed the run, in any mix (Trisul's "construct a real packet and use set_packet", "just
--- call methods on the Engine object"):
--- * records: `packet:set_timestamp(sec[, usec])` moves the engine's clock, then `engine:update_counter`, `update_flow`,
---   `new_flow_record`, `set_flow_duration`, `tag_flow`, `update_key_info` write at that time (the real scripts:
---   trisul-scripts lua/frontend_scripts/inputfilter: flowimport, kiwisyslog, silk, lanl-cyber, fortigate-log, vast);
--- * frames: `packet:set_packet(sec, usec, dlt, bytes)` gives the frame of this call; once the call returns it goes
---   into the packet ring as a captured packet would (the capture process's record, engine/capture/capture.lua), and
---   the fast path decodes it, tracks its flow and runs every plug-in's hooks on it.
--- The step packet's other methods (rawbytes, flowid, layers: reading a frame) raise an error naming the method.
local ffi = require("ffi")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")

local REC, recp = packet.REC_SIZE, packet.recp
local copy = ffi.copy
local now_ns = require("luaprobe.shm.clock").now_ns
local M = {}

local floor = math.floor

local NO_FRAME = "packet:%s(): an inputfilter's step packet is written, not read: set_timestamp and set_packet "
  .. "(a frame set_packet gives is decoded once step returns, and the other plug-ins' hooks read it)"

local StepPacket = setmetatable({}, { __index = function(_, name)     -- any other Packet method: one clear error
  return function() error(NO_FRAME:format(tostring(name)), 2) end
end })
StepPacket.__index = StepPacket

--- The latest time set_timestamp takes, in seconds: 2^32 - 1 (2106-02-07, the pcap header's range).  A larger number
--- is not a Unix time in seconds (FortiGate's nanosecond eventtime, a millisecond SiLK time not divided by 1000).
M.MAX_SEC = 4294967295

--- set_timestamp(sec[, usec]): the engine's time for what step writes next (numbers, or text that is one; seconds
--- with a fraction and no usec: the fraction is the microseconds, as SiLK's millisecond times divided by 1000 give).
--- A time before the current second counts in the current second's buckets, as a late packet does.  Errors: seconds
--- that are not a number in 0 .. MAX_SEC, microseconds not in 0 .. 999999.
-- (seconds, microseconds) of a packet time given as set_timestamp / set_packet take it (`what` names the method in the
-- errors): seconds a number in 0 .. MAX_SEC (with a fraction and usec nil: the fraction is the microseconds),
-- microseconds in 0 .. 999999.
local function packet_time(what, sec, usec)
  local s, us = tonumber(sec), tonumber(usec)
  if s == nil or s ~= s or s < 0 or s > M.MAX_SEC then
    error(("%s: seconds %s is not a Unix time in seconds (0..%d)"):format(what, tostring(sec), M.MAX_SEC), 3)
  end
  if usec == nil then
    us = floor((s - floor(s)) * 1e6 + 0.5)
    if us >= 1e6 then us = 999999 end
  elseif us == nil or us ~= us or us < 0 or us >= 1e6 then
    error(("%s: microseconds %s is not one of 0..999999"):format(what, tostring(usec)), 3)
  end
  return floor(s), floor(us)
end

function StepPacket:set_timestamp(sec, usec)
  self._engine:set_time(packet_time("set_timestamp", sec, usec))
  self._timed = true
end

--- The longest frame set_packet takes whole, bytes: libpcap's MAXIMUM_SNAPLEN (pcap-int.h); a longer one is cut to it
--- (wirelen keeps its length, as a capture with that snaplen; counted in the summary's `clipped`), and to what the
--- packet ring holds when that is less (--packet-ring-mb 1).
M.MAX_FRAME = 262144

--- set_packet(sec, usec, dlt, bytes): the frame of this step call (docs.trisul.org obj_packet "set_packet"): its time
--- (as set_timestamp: seconds 0 .. MAX_SEC, microseconds 0 .. 999999, nil: the seconds' fraction), its pcap link
--- type (`dlt`: the decoder's, decode.LINKTYPES: 1 Ethernet, 101 / 12 / 14 raw IP, 228 IPv4, 229 IPv6, 113 / 276
--- Linux cooked, 0 / 108 null / loopback) and its bytes (a Lua string, at least one byte).  A second call in the
--- same step replaces the first (the packet holds one frame); the frame is processed after the call returns, also
--- when it returns false (the script's last frame), and not when it raised an error (that record is skipped).  Its
--- time is the packet's time, as set_timestamp's: engine methods called after it in the step write at it.  Errors
--- name the argument.
function StepPacket:set_packet(sec, usec, dlt, bytes)
  if not self._in then
    error("set_packet: called outside inputfilter.step (a frame is given by the step call it belongs to)", 2)
  end
  local s, us = packet_time("set_packet", sec, usec)
  local lt = tonumber(dlt)
  if lt == nil or decode.LINKTYPES[lt] == nil then
    local known = {}
    for k in pairs(decode.LINKTYPES) do known[#known + 1] = k end
    table.sort(known)
    error(("set_packet: dlt %s is not a link type luaprobe decodes (%s)"):format(tostring(dlt),
          table.concat(known, ", ")), 2)
  end
  if type(bytes) ~= "string" or #bytes == 0 then
    error(("set_packet: bytes must be a non-empty string (got %s)"):format(
          type(bytes) == "string" and "an empty string" or type(bytes)), 2)
  end
  self._fsec, self._fusec, self._fdlt, self._frame = s, us, lt, bytes
  self._engine:set_time(s, us)                   -- the packet's time, as set_timestamp: what step writes next is at it
  self._timed = true
end

function StepPacket:timestamp() return self._engine:timestamp() end
function StepPacket:set_packetstore_policy() end

--- The packet object step gets, bound to `engine`.
function M.step_packet(engine)
  -- no nil fields: a missing one reads as StepPacket's error method
  return setmetatable({ _engine = engine, _timed = false, _frame = false, _in = false }, StepPacket)
end

--- The packet ring at `addr` (shm/ring.lua), as the producer of `host`'s set_packet frames: the fast path's ring,
--- which it drains before each round of step calls (the capture process's place; none runs with --lua-input).
function M.attach_ring(host, addr)
  local r = require("luaprobe.shm.ring").attach(addr)
  host.step_ring = r
  host.step_max_frame = math.min(M.MAX_FRAME, r.max_record - REC)
  host.step_room = 2 * (8 + REC + host.step_max_frame + 8)   -- a record's worst case: the ring's end padded first
  host.step_frames, host.step_clipped = 0, 0
end

-- The frame pk holds into ring r as a packet record (committed; published at the round's end), counted in host.
local function put_frame(host, r, pk)
  local bytes = pk._frame
  local wirelen = #bytes
  local caplen = wirelen > host.step_max_frame and host.step_max_frame or wirelen
  local p = r:reserve(REC + caplen)                -- never nil: the round checked step_room before the call
  local h = ffi.cast(recp, p)
  h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = packet.PKT, pk._fsec, pk._fusec * 1000, wirelen, caplen
  h.linktype, h.ifindex = pk._fdlt, 0
  copy(p + REC, bytes, caplen)
  r:commit()
  pk._frame = false
  host.step_frames = host.step_frames + 1
  if caplen < wirelen then host.step_clipped = host.step_clipped + 1 end
end

--- The longest a round of step calls goes on (ns of the monotonic clock, checked after each call): 50 ms.
M.ROUND_NS = 50e6
--- A step call this long (ns) waited for its input.  1 ms: a call that reads a record from a buffered file takes ~1 us.
M.SLOW_NS = 1e6
--- Calls in a row that must come back within SLOW_NS before rounds are longer than one call: 64.
M.FAST_CALLS = 64

--- Call `host`'s inputfilter.step up to `max` times, and no more once a call moved the engine's clock to a later
--- second: the fast path then ticks that second as a packet's would (buckets close, flows expire, backends get
--- onmetronome), so a slow input (a FIFO, a UDP socket) has its seconds ticked as they come; a frame (set_packet)
--- moves the clock as set_timestamp does.  A round also ends when the ring has no room left for the largest frame;
--- its frames are published to the fast path at the round's end.
--- A step that waits for its input (a FIFO, a socket) cannot be interrupted to walk what it gave before, so a round
--- is one call (its frame walked, T.async results and messages served, before the next call, which may wait) until
--- FAST_CALLS calls in a row came back within SLOW_NS (an input read at full speed, a file): then rounds double, 2,
--- 4, 8, ... up to `max` calls, end after ROUND_NS, and end after a call that took SLOW_NS or more, which makes them
--- one call long again.  (A burst of more than FAST_CALLS frames followed by a pause: the frames its last round got
--- before the call that waits, fewer than half of those after the first FAST_CALLS, wait for that call to return.)
--- No hook budget (--hook-budget) for step: it is the input and may block waiting for it (fortigate-log.lua's
--- recvfrom; a stop signal interrupts such a wait).
--- Returns: calls made, whether the input goes on (the last call returned a true value), the clock's second (nil
--- until the script set a time), the message of a call that raised an error (the round ends there; the next call
--- reads the script's next record), and the line saying why the instance stopped running (its memory limit) or nil.
function M.run(host, max)
  local eng = host.engine
  local pk = host.step_packet
  if pk == nil then pk = M.step_packet(eng); host.step_packet = pk end
  local c = eng._t
  local sec = c.now
  local wd = host.watchdog
  host.watchdog = nil
  local n, more, err = 0, true, nil
  local r, put = host.step_ring, false
  local last = now_ns()
  local due, slow = last + M.ROUND_NS, M.SLOW_NS
  local fast = host.step_fast or 0                 -- calls in a row that came back within SLOW_NS
  if fast < M.FAST_CALLS then                      -- an input that waits: each call's frame walked before the next
    max = 1
  elseif fast - M.FAST_CALLS + 2 < max then         -- then rounds of 2, 4, 8, ... calls (each adds its calls to
    max = fast - M.FAST_CALLS + 2                   -- `fast`): a burst that ends in a wait holds few frames back
  end
  while n < max do
    if r ~= nil and r:free_bytes() < host.step_room then break end   -- the fast path drains it first
    n = n + 1
    pk._frame, pk._in = false, true
    local ok, res = host:call("inputfilter", "step", pk, eng)
    pk._in = false
    if not ok then err = tostring(res); pk._frame = false; break end
    if pk._frame then put_frame(host, r, pk); put = true end
    if not res then more = false; break end
    local t = now_ns()                 -- before the breaks below: a call that waited (a pause of a second or more
    local waited = t - last >= slow    -- returns a frame of a later second) makes the next rounds one call again
    if waited then fast = 0 else fast = fast + 1 end
    if c.now > sec and pk._timed then break end        -- a later second (one before it needs no tick)
    if waited or t >= due then break end
    last = t
  end
  host.step_fast = fast
  if put then r:publish() end
  host.watchdog = wd
  local why = host.memory_exceeded or host.budget_exceeded or nil     -- the line that disabled the instance
  if why then more = false end
  return n, more, pk._timed and c.now or nil, err, why
end

return M
