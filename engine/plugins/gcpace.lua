--[[
luaprobe.engine.plugins.gcpace — how often the garbage collector of a plug-in VM runs a cycle.

LuaJIT's incremental collector starts a cycle when the heap reaches `pause` % of the live heap the last cycle
left (Lua 5.1 manual section 2.10; LuaJIT's default pause is 200).  Each cycle marks every live object and
sweeps every allocated one.  Hooks that allocate per packet pay for it on the fast path: the Trisul idiom
`T.async:schedule{ data = d, onexecute = function ... end, onresult = function ... end }` allocates a table and
two closures per call (~300 bytes), and at pause 200 the collector took ~0.18 µs per task of it in-process
(issue 11; tools/bench/async_roundtrip.py; ~0.1 µs less at pause 400).  Marking is what grows with the live heap:
end to end the worker runs behind the fast path and tens of thousands of tasks are in flight (their onresult
closures and data live until their results come back), a live heap of several MiB that no longer fits the CPU's
cache, and every cycle marks it again.  In-process with 65 536 tasks in flight a fresh task cost 1.2 µs at pause
200, 0.77 at 400 and 0.60 at 1000 (docs/benchmarks.md, "The backlog and the collector").

The pace: a cycle starts when the heap reaches CEILING_KB, but no later than PAUSE_MAX % (10x) and no earlier than
PAUSE_MIN % (2x, LuaJIT's default) of the live heap:  pause = clamp(100 * CEILING_KB / live, PAUSE_MIN, PAUSE_MAX),
in steps of 50 (with a memory limit, --plugin-memory-mb, the ceiling is at most half the limit: LuaJIT does not
collect when an allocation fails, so garbage must not reach the limit).  So a VM's heap before a cycle is at most
max(CEILING_KB, 2 x its live heap): 10x a live heap below
6.4 MiB, 64 MiB for live heaps of 6.4-32 MiB, 2x above.  `live` is the heap size measured when the last cycle
finished (a finaliser that re-arms itself every cycle), or the heap size now when no cycle has finished since the
VM booted.  `adjust()` runs when the VM boots and then every CHECK_EVERY polls (engine/plugins/async.lua, between
batches); a new pause takes effect from the collector's next cycle.
]]
local M = {}
local newproxy, collectgarbage, getmetatable = newproxy, collectgarbage, getmetatable   -- a plug-in's globals aside

M.PAUSE_MAX = 1000         -- % of the live heap: small live heaps (most plug-ins)
M.PAUSE_MIN = 200          -- LuaJIT's default: live heaps above CEILING_KB / 2
M.CEILING_KB = 64 * 1024   -- the heap size (KiB, collectgarbage "count") a cycle starts at, within those bounds
M.CHECK_EVERY = 64         -- polls between checks

M.limit_kb = nil           -- the VM's memory limit (--plugin-memory-mb), when set: the ceiling is at most half of it

local current = nil        -- the pause this VM runs with (one module instance per VM)
local live_kb = nil        -- the heap when the last cycle finished (KiB)

-- A userdata without references: each cycle finds it dead and runs its finaliser, which records the heap (what the
-- cycle left, plus what was allocated since it swept) and makes the next one.  (newproxy: LuaJIT's Lua 5.1 __gc.)
local function sentinel()
  local p = newproxy(true)
  getmetatable(p).__gc = function()
    live_kb = collectgarbage("count")               -- first: allocates nothing
    sentinel()
  end
end

--- The pause for a live heap of `kb` KiB (percent).
function M.pause_for(kb)
  local ceiling = M.CEILING_KB
  if M.limit_kb and M.limit_kb / 2 < ceiling then ceiling = M.limit_kb / 2 end   -- garbage never fills the limit
  local p = math.floor(100 * ceiling / math.max(kb, 1) / 50) * 50
  if p > M.PAUSE_MAX then return M.PAUSE_MAX end
  if p < M.PAUSE_MIN then return M.PAUSE_MIN end
  return p
end

--- Set this VM's pause from its live heap (the heap now before the first cycle); returns the pause (percent).
function M.adjust()
  if current == nil then sentinel() end
  local p = M.pause_for(live_kb or collectgarbage("count"))
  if p ~= current then
    collectgarbage("setpause", p)
    current = p
  end
  return p
end

--- The live heap estimate in use (KiB; nil before the first cycle finished).
function M.live_kb() return live_kb end

return M
