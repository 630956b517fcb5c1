--[[
luaprobe.engine.plugins.gcpace — how often the garbage collector of a plug-in VM runs a cycle.

LuaJIT's incremental collector starts a cycle when the heap reaches `pause` % of the live heap the last cycle
left (Lua 5.1 manual section 2.10; LuaJIT's default pause is 200).  Each cycle marks every live object and
sweeps every allocated one, so the collector's work per allocated byte falls as the pause rises.  Hooks that
allocate per packet pay for it on the fast path: the Trisul idiom
`T.async:schedule{ data = d, onexecute = function ... end, onresult = function ... end }` allocates a table and
two closures per call (~300 bytes), and at pause 200 the collector took ~0.18 µs per task of it in-process
(issue 11; tools/bench/async_roundtrip.py; ~0.1 µs less at pause 400).

The pace: pause 400 while the VM's heap is below LARGE_KB, the default 200 above it, so memory grows to at most
~4x a small live heap and ~2x a large one.  `adjust()` runs when the VM boots and then every CHECK_EVERY
polls (engine/plugins/async.lua, between batches); a new pause takes effect from the collector's next cycle,
so the heap may reach 4x once when it first grows past LARGE_KB.
]]
local M = {}

M.PAUSE_SMALL = 400        -- % of the live heap: small heaps (most plug-ins)
M.PAUSE_LARGE = 200        -- LuaJIT's default, above LARGE_KB
M.LARGE_KB = 64 * 1024     -- heap size (KiB, collectgarbage "count") where the pace falls back to the default
M.CHECK_EVERY = 64         -- polls between checks

local current = nil        -- the pause this VM runs with (one module instance per VM)

--- Set this VM's pause from its heap size now; returns the pause (percent).
function M.adjust()
  local p = collectgarbage("count") < M.LARGE_KB and M.PAUSE_SMALL or M.PAUSE_LARGE
  if p ~= current then
    collectgarbage("setpause", p)
    current = p
  end
  return p
end

return M
