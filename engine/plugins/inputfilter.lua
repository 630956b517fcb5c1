--- An inputfilter's step as the run's input (`luaprobe run --lua-input FILE --args TEXT`; Trisul's
--- `trisul -mode lua -in FILE -args TEXT`, docs.trisul.org/docs/lua/inputfilter; docs/plugins.md "inputfilter").
---
--- Trisul calls `inputfilter.step(packet, engine)` in a loop; it returns true to be called again and false at the end
--- of its input.  The real scripts (trisul-scripts lua/frontend_scripts/inputfilter: flowimport, kiwisyslog, silk,
--- lanl-cyber, fortigate-log, vast) import flow records and counters: `packet:set_timestamp(sec[, usec])` moves the
--- engine's clock, then `engine:update_counter`, `update_flow`, `new_flow_record`, `set_flow_duration`, `tag_flow`,
--- `update_key_info` write at that time.  The packet they get carries no frame: `packet:set_packet` (a raw frame for
--- the decoder) is refused with an error naming it, and so is every method that reads a frame.
local M = {}

local floor = math.floor

local NO_FRAME = "packet:%s(): an inputfilter's step packet carries no frame; luaprobe's --lua-input imports flow "
  .. "records and counters (packet:set_timestamp, engine methods); frames come from --pcap / --interface"

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
function StepPacket:set_timestamp(sec, usec)
  local s, us = tonumber(sec), tonumber(usec)
  if s == nil or s ~= s or s < 0 or s > M.MAX_SEC then
    error(("set_timestamp: seconds %s is not a Unix time in seconds (0..%d)"):format(tostring(sec), M.MAX_SEC), 2)
  end
  if usec == nil then
    us = floor((s - floor(s)) * 1e6 + 0.5)
    if us >= 1e6 then us = 999999 end
  elseif us == nil or us ~= us or us < 0 or us >= 1e6 then
    error(("set_timestamp: microseconds %s is not one of 0..999999"):format(tostring(usec)), 2)
  end
  self._engine:set_time(floor(s), floor(us))
  self._timed = true
end

function StepPacket:timestamp() return self._engine:timestamp() end
function StepPacket:set_packetstore_policy() end

--- The packet object step gets, bound to `engine`.
function M.step_packet(engine)
  return setmetatable({ _engine = engine, _timed = false }, StepPacket)
end

--- Call `host`'s inputfilter.step up to `max` times, and no more once a call moved the engine's clock to another
--- second: the fast path then ticks that second as a packet's would (buckets close, flows expire, backends get
--- onmetronome), so a slow input (a FIFO, a UDP socket) has its seconds ticked as they come.  No hook budget
--- (--hook-budget) for step: it is the input and may block waiting for it (fortigate-log.lua's recvfrom; a stop
--- signal interrupts such a wait).
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
  while n < max do
    n = n + 1
    local ok, res = host:call("inputfilter", "step", pk, eng)
    if not ok then err = tostring(res); break end
    if not res then more = false; break end
    if c.now ~= sec and pk._timed then break end
  end
  host.watchdog = wd
  local why = host.memory_exceeded or host.budget_exceeded or nil     -- the line that disabled the instance
  if why then more = false end
  return n, more, pk._timed and c.now or nil, err, why
end

return M
