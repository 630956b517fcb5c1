--[[
luaprobe.engine.plugins.jitprof — developer aid: LUAPROBE_JIT_PROFILE=prefix samples a VM
with jit.profile (and records trace aborts) and writes the hottest lines to
`<prefix>.<tag>.txt` when stopped.  Off (a no-op) unless the variable is set.
]]
local M = {}

--- Start profiling this VM; returns a function that stops and writes the report.
function M.start(tag)
  local prefix = os.getenv("LUAPROBE_JIT_PROFILE")
  if not prefix or prefix == "" then return function() end end
  local prof, jutil, counts = require("jit.profile"), require("jit.util"), {}
  jit.attach(function(what, _, func, pc, code, info)
    if what == "abort" then
      local key = ("trace abort at %s: error %s %s"):format(jutil.funcinfo(func, pc).loc or "?",
        tostring(code), tostring(info))
      counts[key] = (counts[key] or 0) + 1
    end
  end, "trace")
  prof.start("li1", function(th, samples, vmstate)
    local key = prof.dumpstack(th, "pl", 1) .. " [" .. vmstate .. "]"
    counts[key] = (counts[key] or 0) + samples
  end)
  return function()
    prof.stop()
    jit.attach(function() end)
    local rows = {}
    for k, v in pairs(counts) do rows[#rows + 1] = { k, v } end
    table.sort(rows, function(a, b) return a[2] > b[2] end)
    local f = io.open(("%s.%s.txt"):format(prefix, tag), "w")
    if not f then return end
    for i = 1, math.min(40, #rows) do f:write(rows[i][2], "  ", rows[i][1], "\n") end
    f:close()
  end
end

return M
