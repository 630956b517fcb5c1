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

A heap that grows with live data (issue 10): on traffic with many new flows every flow leaves objects that stay
(its flow id string and FlowID in engine/plugins/packet.lua, a script's `state[id]` entry), and a cycle then
marks and sweeps the whole heap to free next to nothing (flows-100k with a `flowid():id()`-keyed script: one
cycle over ~9 MB of live objects, ~40 ns per packet of the capture; docs/benchmarks.md, "Where flowstate's
time goes").  So the pace also looks at what each cycle left: a sentinel userdata whose finalizer runs at the
end of every cycle (LuaJIT runs finalizers in the cycle's last phase, before it sets the next start from the
pause: lj_gc.c `GCSfinalize`) compares the heap then with the heap at the end of the cycle before.  When it
grew to at least GREW x the pause that set this cycle's start (the cycle found the heap mostly live, the
allocations made while it ran included), the next cycle starts at BOOST x the size-based pause (800 / 400); a
cycle that freed more brings the size-based pause back.  Memory: a heap that is mostly live is not much larger
for it; a script that turns from growing to making garbage holds at most BOOST x as much garbage once, until
its next cycle ends.  LuaJIT runs no finalizer from compiled code: a collector step in a trace that reaches the
finalizer phase leaves the trace (lj_gc.c `lj_gc_step_jit`), and the interpreter runs the finalizer at its next
allocation, so the cycle ends as it did without the sentinel.  `stats()` returns the cycles seen and the pause
now (tests/test_gcpace.py).
]]
local M = {}

M.PAUSE_SMALL = 400        -- % of the live heap: small heaps (most plug-ins)
M.PAUSE_LARGE = 200        -- LuaJIT's default, above LARGE_KB
M.LARGE_KB = 64 * 1024     -- heap size (KiB, collectgarbage "count") where the pace falls back to the default
M.CHECK_EVERY = 64         -- polls between checks
M.BOOST = 2                -- pause multiplier after a cycle that found the heap mostly live
M.GREW = 0.75              -- "mostly live": heap at a cycle's end >= GREW x pause x heap at the end of the one before

local current = nil        -- the pause this VM runs with (one module instance per VM)
local boosted = false      -- the last cycle found the heap mostly live
local last_end = nil       -- collectgarbage("count") at the end of the last cycle (KiB; at boot before the first)
local cycles = 0           -- cycles ended since the VM booted (sentinel finalizers run)

local large = nil          -- the heap was >= LARGE_KB when `current` was set

-- The pause from the heap size and the last cycle's verdict.  A script's own collectgarbage("setpause", n) holds
-- until its heap crosses LARGE_KB (docs/plugins.md): when the pause in force is not the one set here last and the
-- heap is on the same side of LARGE_KB, it is put back (setpause returns the pause in force: the only way to read
-- it) and returned.  Without that check a boost verdict flipping overrode a script's pause at any heap size.
local function set_pause()
  local big = collectgarbage("count") >= M.LARGE_KB
  local p = big and M.PAUSE_LARGE or M.PAUSE_SMALL
  if boosted then p = p * M.BOOST end
  if p ~= current then
    local was = collectgarbage("setpause", p)
    if big == large and was ~= current then
      collectgarbage("setpause", was)
      return was
    end
    current, large = p, big
  end
  return p
end

-- The end of a cycle: the sentinel's finalizer.  The pause is set before the next sentinel is made, so an
-- allocation failure there (the VM at its memory limit) leaves a pace that is already right.
local proto = newproxy(true)          -- kept: its metatable is every sentinel's (newproxy(proto))
getmetatable(proto).__gc = function()
  local now, prev, p = collectgarbage("count"), last_end, current or M.PAUSE_SMALL
  cycles, last_end = cycles + 1, now
  if prev then boosted = now * 100 >= M.GREW * p * prev end
  set_pause()
  pcall(newproxy, proto)              -- unreferenced: finalized at the end of the next cycle
end

--- Set this VM's pause from its heap size now (and the last cycle's verdict); returns the pause (percent).
function M.adjust()
  if last_end == nil then               -- first call (boot): the baseline, and the first sentinel
    last_end = collectgarbage("count")
    newproxy(proto)
  end
  return set_pause()
end

--- {cycles = cycles ended since boot, pause = the pause now, boosted = the last cycle found the heap mostly live}.
function M.stats()
  return { cycles = cycles, pause = current, boosted = boosted }
end

return M
