--[[
luaprobe.shm.clock — CLOCK_MONOTONIC for the LuaJIT loops that pace themselves: the generator's sender
(engine/gen/stream.lua) and a paced replay of files (engine/capture/capture.lua, --speed).

  now_ns()         monotonic clock, ns (a double: exact to 2^53 ns, ~104 days of uptime per ns)
  sleep_until(t)   sleep until monotonic time t ns (clock_nanosleep TIMER_ABSTIME); a signal ends it early
                   (EINTR): the caller's loop looks at its stop flag and the clock again
]]
local ffi = require("ffi")

pcall(ffi.cdef, "struct lp_timespec { long tv_sec; long tv_nsec; };")
for _, decl in ipairs({
  "int clock_nanosleep(int clockid, int flags, const struct lp_timespec *req, struct lp_timespec *rem);",
  "int clock_gettime(int clockid, struct lp_timespec *ts);",
}) do pcall(ffi.cdef, decl) end

local C = ffi.C
local floor = math.floor
local CLOCK_MONOTONIC, TIMER_ABSTIME = 1, 1

local M = {}

local tsbuf = ffi.new("struct lp_timespec")
function M.now_ns()
  C.clock_gettime(CLOCK_MONOTONIC, tsbuf)
  return tonumber(tsbuf.tv_sec) * 1e9 + tonumber(tsbuf.tv_nsec)
end

local sleepts = ffi.new("struct lp_timespec")
function M.sleep_until(t)
  local s = floor(t / 1e9)
  sleepts.tv_sec, sleepts.tv_nsec = s, t - s * 1e9
  C.clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, sleepts, nil)
end

return M
