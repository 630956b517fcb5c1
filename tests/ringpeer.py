"""A peer process for ring tests: a LuaJIT producer or consumer on a ring segment.

    python -m tests.ringpeer produce SEGMENT COUNT SEED   push COUNT checksummed records
    python -m tests.ringpeer consume SEGMENT COUNT        pop COUNT records, verify, print a digest
    python -m tests.ringpeer push-after SEGMENT DELAY_MS  push one record after a delay
    python -m tests.ringpeer idle-wait SEGMENT SECONDS    block in wait_data, print CPU seconds used
    python -m tests.ringpeer drain SEGMENT COUNT          once the producer sleeps on the space bell, pop COUNT
                                                          records, release once, print how many were popped
"""
from __future__ import annotations

import resource
import sys

from luaprobe.shm import segment
from luaprobe.shm.luajit import new_runtime

LUA = r"""
local ring = require("luaprobe.shm.ring")
local ffi = require("ffi")
local M = {}

-- Record i: 4-byte index, 4-byte checksum of the body, body of pseudo-random length/content.
local function body(i, seed)
  local n = (i * 7919 + seed) % 700
  local t = {}
  for k = 1, n do t[k] = string.char((i + k * 31 + seed) % 256) end
  return table.concat(t)
end

local function sum(s)
  local h = 0
  for k = 1, #s do h = (h * 31 + s:byte(k)) % 4294967291 end
  return h
end

function M.produce(addr, count, seed)
  local r = ring.attach(addr)
  local hdr = ffi.new("uint32_t[2]")
  local digest = 0
  for i = 1, count do
    local b = body(i, seed)
    hdr[0], hdr[1] = i, sum(b)
    digest = (digest * 33 + hdr[1]) % 4294967291      -- over what was pushed: the consumer must agree
    local rec = ffi.string(hdr, 8) .. b
    while not r:try_push(rec) do r:wait_space(#rec, 50e6) end
  end
  return digest
end

function M.consume(addr, count)
  local r = ring.attach(addr)
  local got, digest = 0, 0
  while got < count do
    local p, n = r:peek()
    if p == nil then
      r:release()
      r:wait_data(50e6)
    else
      local h = ffi.cast("uint32_t *", p)
      local b = ffi.string(p + 8, n - 8)
      if h[0] ~= got + 1 then error(("record %d arrived as #%d"):format(got + 1, h[0])) end
      if h[1] ~= sum(b) then error(("record %d: checksum mismatch"):format(got + 1)) end
      digest = (digest * 33 + h[1]) % 4294967291
      r:advance(n)
      got = got + 1
    end
  end
  r:release()
  return got, digest
end

function M.push_after(addr, delay_ms)
  local r = ring.attach(addr)
  local t0 = ring.now_ns()
  while ring.now_ns() - t0 < delay_ms * 1e6 do end
  assert(r:try_push("ping"))
end

function M.idle_wait(addr, seconds)
  local r = ring.attach(addr)
  local t0 = ring.now_ns()
  while ring.now_ns() - t0 < seconds * 1e9 do
    if r:wait_data((seconds * 1e9) - (ring.now_ns() - t0)) then return true end
  end
  return false
end
function M.drain(addr, count)
  local r = ring.attach(addr)
  while ring.lib.lp_load32(r.space_bell) == 0 do end     -- the producer is armed (it then sleeps or re-checks)
  local got = 0
  for _ = 1, count do
    local p, n = r:peek()
    if p == nil then break end
    r:advance(n)
    got = got + 1
  end
  r:release()
  return got
end
return M
"""


def main(argv) -> int:
    """Run one peer role (see module docstring)."""
    role, name = argv[0], argv[1]
    seg = segment.attach(name)
    lua = new_runtime()
    mod = lua.execute(LUA)
    if role == "produce":
        print(int(mod.produce(seg.address, int(argv[2]), int(argv[3]))))
    elif role == "consume":
        got, digest = mod.consume(seg.address, int(argv[2]))
        print(int(got), int(digest))
    elif role == "push-after":
        mod.push_after(seg.address, float(argv[2]))
    elif role == "drain":
        print(int(mod.drain(seg.address, int(argv[2]))))
    elif role == "idle-wait":
        woke = mod.idle_wait(seg.address, float(argv[2]))
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(int(bool(woke)), ru.ru_utime + ru.ru_stime)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
