--[[
luaprobe.engine.plugins.watchdog — the hook budget of a plug-in VM (issue 13.3; docs/operations.md).

    local wd = require("luaprobe.engine.plugins.watchdog")
    wd.arm(seconds, message); ...plug-in code...; local fired = wd.disarm()

A hook still running `seconds` after arm() is interrupted with a Lua error carrying `message` at the next
instruction the interpreter runs (engine/plugins/_lpwatch.c): the hook's xpcall counts and logs it and the run goes
on.  Code compiled into a LuaJIT trace is not interruptible; the daemon's heartbeat covers that case.
wd.xpcall(f, msgh, ...) is xpcall made by a C function: the per-packet walker (host.lua) calls hooks LuaJIT cannot
compile through it, so that LuaJIT stitches traces around them instead of blacklisting the walk loop;
wd.hcall(msgh, f, ...) is the same with the handler first (fewer stack moves in C; host.lua's walk_direct).
]]
local config = require("luaprobe.config")
if not config.lpwatch then return nil end
local open = package.loadlib(config.lpwatch, "luaopen_lpwatch")
if not open then return nil end
return open()
