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

--- set_timestamp(sec[, usec]): the engine's time for what step writes next (numbers, or text that is one; seconds
--- with a fraction and no usec: the fraction is the microseconds, as SiLK's millisecond times divided by 1000 give).
--- A time before the current second counts in the current second's buckets, as a late packet does.
function StepPacket:set_timestamp(sec, usec)
  local s, us = tonumber(sec), tonumber(usec)
  if s == nil or s ~= s or s == math.huge or s < 0 then
    error(("set_timestamp: seconds %s is not a time (a number >= 0)"):format(tostring(sec)), 2)
  end
  if usec == nil then
    us = floor((s - floor(s)) * 1e6 + 0.5)
    if us >= 1e6 then us = 999999 end
  elseif us == nil or us ~= us or us < 0 or us >= 1e6 then
    error(("set_timestamp: microseconds %s is not one of 0..999999"):format(tostring(usec)), 2)
  end
  self._engine:set_time(floor(s), floor(us))
end

function StepPacket:timestamp() return self._engine:timestamp() end
function StepPacket:set_packetstore_policy() end

--- The packet object step gets, bound to `engine`.
function M.step_packet(engine)
  return setmetatable({ _engine = engine }, StepPacket)
end

--- Call `host`'s inputfilter.step up to `max` times, without the hook budget (--hook-budget: step is the input and may
--- block waiting for it, as fortigate-log.lua's recvfrom does; a stop signal interrupts such a wait) (the fast path ticks the second the engine's clock reached after
--- them: buckets close, flows expire, backends get their metronome; what step wrote counts at its own time).
--- Returns: calls made, whether the input goes on (the last call returned a true value), the clock's second, and
--- for a call that raised an error its message (the input goes on: the next call reads the script's next record).
function M.run(host, max)
  local eng = host.engine
  local pk = host.step_packet
  if pk == nil then pk = M.step_packet(eng); host.step_packet = pk end
  local c = eng._t
  local wd = host.watchdog        -- step may wait for its input (a socket, a FIFO): no hook budget for it
  host.watchdog = nil
  for n = 1, max do
    local ok, more = host:call("inputfilter", "step", pk, eng)
    if not ok or not more then
      host.watchdog = wd
      if not ok then return n, true, c.now, tostring(more) end
      return n, false, c.now, nil
    end
  end
  host.watchdog = wd
  return max, true, c.now, nil
end

return M
