--[[
luaprobe.engine.plugins.async — T.async inside a plug-in VM.

schedule / copy / cat / rm / copybuffer snapshot their arguments at call time
and hand a request record to one of the plug-in's workers; poll() (called by
the fast path between hooks) pops result records and runs onresult /
onerror in this VM.  Everything per task happens here and in the worker, in
LuaJIT; Python only manages processes (workers/pool.py).

Per worker, tasks live in one FIFO with three cursors:
    head <= sent <= tail
    [head, sent)  in the request ring or being run: results come back in this order
    [sent, tail)  overflow backlog, waiting for ring space (bounded in total)
Results of one worker arrive in request order, so the head of the FIFO is
always the task a result belongs to; no lookup table is needed.

schedule() only stages: it checks the call, identifies onexecute's prototype
and snapshots its upvalues, and appends the task to the FIFO as backlog.  The
tasks reach the request ring in one compiled loop per batch (flush(), called by
poll() between batches and before the fast path sleeps) with one publication
and at most one doorbell per worker.  Upvalues cross only when they differ from
the values last shipped for the same prototype (string.buffer serialisation);
the worker keeps them set on its copy of the function.

Accounting (per VM, at every moment):
    scheduled == ok + nil_result + error + timeout + dropped + pending
]]
local ffi = require("ffi")
local ring = require("luaprobe.shm.ring")
local P = require("luaprobe.workers.protocol")
local errlog = require("luaprobe.engine.plugins.errlog")
local sbuf = require("string.buffer")
local config = require("luaprobe.config")
local gcpace = require("luaprobe.engine.plugins.gcpace")

local C = ring.lib
local cast, fstring, copy = ffi.cast, ffi.string, ffi.copy
local floor = math.floor
local REQ, RES = P.REQ_SIZE, P.RES_SIZE

local M = {}
local Async = {}
Async.__index = Async

local NOOP = function() end
local NO_TIME = 0           -- a task's ts when the engine had no time yet (docs/async.md "Time")
-- onexecute functions a VM keeps before it forgets the ones no pending task uses (their fids are reused, and a
-- worker's copy is replaced by the DEFINE of the next function given that fid): a plug-in making a new function per
-- task (`load` per call) kept every one of them, in its VM and in each worker (100 000: 145 MB of Lua heap in the
-- VM, 79 MB in the worker; now 9-36 and 19-28 MB: tools/bench/async_closures_rss.py, docs/async.md)
local FN_CACHE = 4096
local HIST = 256            -- latency histogram: bucket = floor(4 * log2(ns))

-- floor(4 * log2(x)) for x > 1 without math.log per result: it is the binary exponent of x^4 (IEEE 754 bits)
local dbits = ffi.new("union { double d; uint64_t u; }")
local rshift = require("bit").rshift
local function bucket(x)
  x = x * x
  dbits.d = x * x
  return tonumber(rshift(dbits.u, 52)) - 1023
end

-- ------------------------------------------------------------------ queue

-- t0: clock when the task entered the request ring (latency); ts: engine time (µs) at schedule, the time its
-- onresult / onerror runs at (NO_TIME: the engine had none yet, onload: the run's first packet time; nil: not
-- stamped, a test VM); aux: for onexecute, the upvalue blob the task needs ("" when none)
local FIELDS = { "id", "kind", "fid", "data", "aux", "arg", "onres", "onerr", "t0", "files", "ts" }

-- the slot arrays are preallocated (table.new): slots are filled from any index on, which in a table
-- without an array part goes to the hash part, rehashed again and again as the queue fills
local new_table = require("table.new")

-- FIFO position i lives in chunk rshift(i, CHUNK_BITS), slot band(i, CHUNK - 1) + 1 of its arrays (one array per
-- field).  A chunk is made when the tail enters it and released when the head leaves it, so a queue that grows
-- (a worker far behind: end to end on a busy machine 65 000-260 000 tasks in flight, issue 11) never copies what
-- it holds, and its memory follows what is in flight (plus SPARE_CHUNKS kept for reuse) instead of the largest
-- backlog it ever had.  Before, one array per field doubled and was copied whole: growing to 262 144 slots cost
-- ~36 ms (11 arrays), and in `luaprobe run` with the worker lagging grow() took a fifth of the plug-in VM's
-- jit.profile samples.  Chunks live in a ring of chunk slots (ring index: band(chunk number, rmask) + 1) that
-- doubles (a copy of chunk references only) when the queue spans more chunks than it has slots.
local band = require("bit").band      -- band(i, m) + 1 = i % (m + 1) + 1 without a float `%` (a division, a floor)
local CHUNK_BITS = 10
local CHUNK = 2 ^ CHUNK_BITS
local CMASK = CHUNK - 1
local SPARE_CHUNKS = 16     -- released chunks kept for reuse (16 384 positions, ~1.4 MB)

local function new_chunk()
  local c = {}
  for _, f in ipairs(FIELDS) do c[f] = new_table(CHUNK, 0) end
  return c
end

--- The chunk holding FIFO position i of q (it exists for head <= i <= tail).
--- The per-task paths do not call this for every task: each cursor has its chunk in a field of the queue (tc: the
--- tail's, made as soon as the tail enters it; hc: the head's; dc: drain's), set when the cursor enters a chunk.
--- A field written only on that rare path lets LuaJIT hoist its load, and the loads of the chunk's arrays, out of
--- the per-task loops, as with one array per field (a chunk looked up per task, or a per-task branch before the
--- slot stores, cost 20-40 ns per task in-process).
local function chunk(q, i)
  return q.ring[band(rshift(i, CHUNK_BITS), q.rmask) + 1]
end

--- Make the chunk for position q.tail (the tail just entered it) and point q.tc at it.
local function chunk_for_tail(q)
  local tail = q.tail
  local ci = rshift(tail, CHUNK_BITS)
  local ring, rmask = q.ring, q.rmask
  local first = rshift(q.head, CHUNK_BITS)
  if ci - first > rmask then                                   -- more chunks than ring slots: double the ring
    local n = 2 * (rmask + 1)
    while ci - first >= n do n = 2 * n end
    local ring2 = new_table(n, 0)
    for cj = first, ci - 1 do ring2[band(cj, n - 1) + 1] = ring[band(cj, rmask) + 1] end
    q.ring, q.rmask, ring, rmask = ring2, n - 1, ring2, n - 1
  end
  if ring[band(ci, rmask) + 1] ~= nil then q.tc = ring[band(ci, rmask) + 1]; return end  -- kept (rolled back)
  local spare, c = q.spare, nil
  if #spare > 0 then c = spare[#spare]; spare[#spare] = nil else c = new_chunk() end
  ring[band(ci, rmask) + 1] = c
  q.tc = c
  q.nchunks = q.nchunks + 1
  if q.nchunks > q.peak_chunks then q.peak_chunks = q.nchunks end
end

--- The head just left chunk c (number ci): release it (kept as a spare, or left to the collector).
local function release_chunk(q, ci, c)
  q.ring[band(ci, q.rmask) + 1] = nil
  q.nchunks = q.nchunks - 1
  local spare = q.spare
  if #spare < SPARE_CHUNKS then spare[#spare + 1] = c end
end

local function new_queue()
  -- maxts: the largest ts queued on this FIFO (tasks queued with a smaller one are listed in Async.ooo)
  local q = { head = 0, sent = 0, tail = 0, ring = new_table(4, 0), rmask = 3, spare = {}, nchunks = 0,
              peak_chunks = 0, tc = false, hc = false, dc = false, maxts = 0 }
  chunk_for_tail(q)
  return q
end

-- ------------------------------------------------------------------ prototype identity

--- fninfo(fn) -> key, nups, up1 .. up8 (nil when fn is not a Lua function).
--- `key` is equal for closures of one prototype.  The C version (shm/_lpsync.c
--- lp_fninfo) reads the closure; it is used only after it gave the right answers
--- on closures made here.  The fallback uses string.dump and debug.getupvalue.
local function fninfo_lua(fn)
  if type(fn) ~= "function" then return nil end
  local ok, bc = pcall(string.dump, fn)
  if not ok then return nil end
  local n = debug.getinfo(fn, "u").nups
  local u = {}
  for i = 1, math.min(n, 8) do local _, v = debug.getupvalue(fn, i); u[i] = v end
  return bc, n, u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8]
end

local function load_fninfo()
  if not ffi.abi("gc64") then return fninfo_lua, "not a GC64 LuaJIT" end
  local f, err = package.loadlib(config.lpsync, "lp_fninfo")
  if not f then return fninfo_lua, tostring(err) end
  local a, b, c = "s", 7, {}
  local function make() return function() return a, b, c end end
  local f1, f2, g = make(), make(), function() return b end
  local k1, n1, x1, x2, x3 = f(f1)
  local k2, n2 = f(f2)
  local k3, n3, y1 = f(g)
  local ok = type(k1) == "number" and k1 == k2 and k1 ~= k3 and n1 == 3 and n2 == 3 and n3 == 1
             and x1 == a and x2 == b and x3 == c and y1 == b and f(print) == nil and f(1) == nil
  a = "t"                                                   -- a closed upvalue is read, not a copy
  ok = ok and select(3, f(f1)) == "t"
  if not ok then return fninfo_lua, "layout check failed" end
  return f, nil
end
local fninfo, fninfo_fallback = load_fninfo()
M.fninfo, M.fninfo_fallback = fninfo, fninfo_fallback

-- The upvalue check of a closure seen before (shm/_lpsync.c lp_uvc_same): nil unless lp_fninfo is in use and the
-- check gives the right answers on closures made here (then schedule falls back to fninfo for every call).
pcall(ffi.cdef, [[
typedef struct { uint64_t fn; uint64_t bits[4]; int32_t n; } lp_uvc;
int lp_uvc_same(const lp_uvc *c);
void lp_uvc_take(lp_uvc *c);
]])
local UVC_UPS = 4
local function load_uvc()
  if fninfo_fallback then return nil, "no lp_fninfo" end
  local addr = package.loadlib(config.lpsync, "lp_fnaddr")
  if not addr then return nil, "no lp_fnaddr" end
  local ok, res = pcall(function()
    local a, b, c = "s", 7, true
    local f = function() return a, b, c end
    local u = ffi.new("lp_uvc")
    u.fn, u.n = addr(f), 3
    C.lp_uvc_take(u)
    local same1 = C.lp_uvc_same(u) == 1
    b = 8
    local differs = C.lp_uvc_same(u) == 0
    b = 7
    a = ("S"):lower()                                        -- an equal string made afresh: the same object
    local same2 = C.lp_uvc_same(u) == 1
    c = false
    local differs2 = C.lp_uvc_same(u) == 0
    c = true
    return same1 and differs and same2 and differs2 and addr(print) == nil and addr(1) == nil
  end)
  if not (ok and res) then return nil, "layout check failed" end
  return addr
end
local fnaddr = load_uvc()
M.uvc = fnaddr ~= nil

-- ------------------------------------------------------------------ upvalues

--- Raise an error naming upvalue `name` unless v is plain: nil, boolean,
--- number, string, or a table without metatable or cycles holding those.
local function check_plain(v, seen, name)
  local t = type(v)
  if t == "nil" or t == "boolean" or t == "number" or t == "string" then return end
  if t == "table" and getmetatable(v) == nil then
    if seen[v] then error(("upvalue '%s' of onexecute is a cyclic table"):format(name), 0) end
    seen[v] = true
    for k, val in pairs(v) do
      check_plain(k, seen, name)
      check_plain(val, seen, name)
    end
    seen[v] = nil
    return
  end
  local what = t == "table" and "table with a metatable" or t
  error(("upvalue '%s' of onexecute is a %s; only nil, booleans, numbers, strings and plain "
         .. "acyclic tables of those cross to the worker"):format(name, what), 0)
end

local encoder = sbuf.new()

--- The upvalue blob for the worker: string.buffer encoding of n, v1 .. vn.
local function encode_upvalues(vals, n)
  encoder:reset()
  encoder:encode(n)
  for i = 1, n do encoder:encode(vals[i]) end
  return encoder:tostring()
end

-- ------------------------------------------------------------------ object

--- Create the T.async state for one plug-in VM.
--- opts: script, log(level, msg), overflow_limit, engine (first onresult arg).
function M.new(opts)
  local self = setmetatable({
    script = opts.script or "?",
    logf = opts.log or function() end,
    overflow_limit = opts.overflow_limit or 100000,
    engine = opts.engine,
    accepting = true,
    workers = {},
    nworkers = 0,
    backlog = 0,
    next_id = 0,
    fid_by_key = {},        -- prototype key (fninfo) -> fid
    keep_fn = {},           -- fid -> one closure: keeps the prototype (and so its key) alive
    bytecode = {},
    fname = {},
    nups = {},
    upnames = {},           -- fid -> upvalue names
    up_last = {},           -- fid -> values last snapshot (scalars compared, tables re-sent)
    up_tables = {},         -- fid -> true when some upvalue is a table (snapshot every call)
    up_blob = {},           -- fid -> string.buffer blob of the last snapshot (interned: equal values, same string)
    max_record = opts.max_record or 1e300,   -- request-ring record limit (the pool's ring size)
    nfids = 0,              -- fids allocated (the largest)
    live_fids = 0,          -- fids in use (new_fid, forget_fids)
    fn_sweep_at = FN_CACHE, -- live_fids at which new_fid forgets the unused ones
    free_fids = {},         -- forgotten fids, reused first
    key_of = {},            -- fid -> its prototype key
    polls = 0,              -- poll() calls: the collector's pace is checked every gcpace.CHECK_EVERY
    stats = { scheduled = 0, ok = 0, nil_result = 0, error = 0, timeout = 0, dropped = 0,
              onresult_errors = 0, redispatched = 0, lost_at_deadline = 0, lost_at_stop = 0,
              dropped_overflow = 0, dropped_stopping = 0, dropped_start = 0, dropped_no_workers = 0 },
    hist = ffi.new("double[?]", HIST),
    stamp = false,          -- packet-time stamping (a real engine: set_engine)
    origin = false,         -- the run's first packet time (µs): the time of NO_TIME tasks (set_origin)
    in_result = false,      -- an onresult / onerror runs (call_hook)
    rings_full = false,     -- the overflow queue was full and a flush found no ring space: no flush before a poll
    await_origin = false,   -- a NO_TIME task with hooks is pending and origin is not known: results wait (poll)
    ooo = {},               -- tasks queued behind one with a later ts: worker, FIFO position, ts (hold_sec)
    errors = nil,
    live_files = {},        -- path -> references (filex files kept for tasks naming them)
    file_done = NOOP,       -- filex installs its own: then tasks may name live files
    last_drop_log = -1e18,
    drops_unlogged = 0,
    drops_why = {},                        -- reason -> drops since the last drop log line
  }, Async)
  -- with the plug-in file: an error without "file:line" (error(), error({...})) is named by its plug-in frame
  self.errors = errlog.new(function(level, msg) self.logf(level, "T.async " .. msg) end, opts.script)
  self:set_engine(opts.engine)
  self.api = self:make_api()
  return self
end

--- Attach worker slot k's channel (rings formatted by the pool).
function Async:add_worker(k, channel_addr, req_capacity)
  local base = cast("uint8_t *", channel_addr)
  local w = self.workers[k] or new_queue()
  w.k = k
  w.ctl = cast(P.ctlp, base)
  w.req = ring.attach(base + P.CONTROL)
  w.ret = ring.attach(base + P.CONTROL + ring.region_size(req_capacity))
  w.defined = {}
  w.up_sent = {}            -- fid -> upvalue blob this worker holds
  w.alive = true
  self.workers[k] = w
  if k > self.nworkers then self.nworkers = k end
  self.max_record = math.min(self.max_record, w.req.max_record)
end

--- The engine onresult gets.  A real engine (its clock an FFI struct) stamps tasks with its time, and keeps the
--- counter buckets of pending tasks' times open (engine._hold, Engine:take_counters: docs/async.md "Time").
function Async:set_engine(engine)
  self.engine = engine
  self.stamp = engine ~= nil and type(rawget(engine, "_t")) == "cdata"
  if self.stamp and rawget(engine, "_hold") ~= nil then
    engine._hold = function() return self:hold_sec() end
  end
end

--- The time (µs since the epoch) of the run's first packet: tasks scheduled before the engine had a time (onload)
--- carry it; their results wait for it (poll).  Set once, by the fast path after its first batch is read
--- (engine/fastpath/run.py _set_origin).
function Async:set_origin(tus)
  if not self.origin and tus >= 0 then self.origin = tus end     -- (a capture at time 0: 0, a true value in Lua)
end

--- The engine time a task scheduled now carries (µs), NO_TIME before the engine has one, nil when not stamping.
function Async:now_ts()
  if not self.stamp then return nil end
  local ts = self.engine._t.tus
  if ts <= 0 then return NO_TIME end
  return ts
end

--- The earliest second a pending task's onresult / onerror may write in (nil: no pending stamped task).  The engine
--- closes no counter bucket at or after it (Engine:take_counters), so the update lands in the bucket of its time.
--- A FIFO's ts never decrease except for tasks listed in self.ooo (scheduled from onresult, or at an event time
--- behind the packets'), so the minimum is over the FIFO heads and those; entries already retired are pruned here.
function Async:hold_sec()
  local min = nil
  for k = 1, self.nworkers do
    local w = self.workers[k]
    if w.head < w.tail then
      local ts = chunk(w, w.head).ts[band(w.head, CMASK) + 1]
      if ts ~= nil then
        if ts == NO_TIME then ts = self.origin or 0 end
        if min == nil or ts < min then min = ts end
      end
    end
  end
  local o, j = self.ooo, 0
  for i = 1, #o, 3 do
    local w, pos, ts = o[i], o[i + 1], o[i + 2]
    if pos >= w.head and pos < w.tail then
      o[j + 1], o[j + 2], o[j + 3] = w, pos, ts
      j = j + 3
      if ts == NO_TIME then ts = self.origin or 0 end
      if min == nil or ts < min then min = ts end
    end
  end
  for i = #o, j + 1, -1 do o[i] = nil end
  return min and floor(min / 1e6)
end

--- Start workers lazily: `fn` (called once, on the first task) must attach them.
function Async:set_starter(fn) self.starter = fn end

function Async:log(level, msg) self.logf(level, msg) end

-- ------------------------------------------------------------------ sending

local function put_record(r, kind, id, fid, arg, data, aux)
  local p = r:reserve(REQ + #data + #aux)
  if p == nil then return false end
  local h = cast(P.reqp, p)
  h.task_id, h.arg, h.kind, h.fid, h.data_len, h.aux_len = id, arg, kind, fid, #data, #aux
  copy(p + REQ, data, #data)
  if #aux > 0 then copy(p + REQ + #data, aux, #aux) end
  r:commit()
  return true
end

--- Move w's backlog [sent, tail) into its request ring while it fits, then
--- publish once (one doorbell at most).  Upvalues travel only when this worker
--- does not hold the blob a task needs.  Returns how many tasks moved.
function Async:drain(w)
  local r, defined, up_sent = w.req, w.defined, w.up_sent
  local sent, tail = w.sent, w.tail
  local t0 = 0
  local moved = 0
  w.dc = chunk(w, sent)
  while sent < tail do
    local s = band(sent, CMASK) + 1
    if s == 1 then w.dc = chunk(w, sent) end
    local c = w.dc
    local kind, fid, aux = c.kind[s], c.fid[s], c.aux[s]
    if kind == P.EXEC then
      if not defined[fid] then
        if not put_record(r, P.DEFINE, 0, fid, 0, self.bytecode[fid], self.fname[fid]) then break end
        defined[fid] = true
      end
      local blob = aux
      if up_sent[fid] == blob then aux = "" end
      if not put_record(r, kind, c.id[s], fid, -1, c.data[s], aux) then break end
      up_sent[fid] = blob
    elseif not put_record(r, kind, c.id[s], fid, c.arg[s], c.data[s], aux) then
      break
    end
    if t0 == 0 then t0 = C.lp_now_ns() end              -- one clock read per flush
    c.t0[s] = t0
    sent = sent + 1
    moved = moved + 1
  end
  if moved > 0 then
    w.sent = sent
    self.backlog = self.backlog - moved
    r:publish()
  end
  return moved
end

--- Write every staged task (and older backlog) that fits into the request rings.
function Async:flush()
  for k = 1, self.nworkers do
    local w = self.workers[k]
    if w.alive and w.sent < w.tail then self:drain(w) end
  end
end

local function target_slot(self, target)
  local h = 5381
  for i = 1, #target do h = (h * 33 + target:byte(i)) % 4294967296 end
  return h % self.nworkers + 1
end

--- Stage a task for worker k (or the least busy one); flush() sends it.
--- Returns true when accepted, false when dropped.  The overflow queue is the
--- backlog, staged tasks included: at the limit the backlog is flushed first,
--- and a task is dropped only if the rings are still full.
function Async:enqueue(kind, fid, data, aux, arg, onres, onerr, target, ts)
  -- scheduled is counted where the task's fate is decided (queued: next to w.tail's increment; dropped: in drop),
  -- so an error raised asynchronously in between (the hook budget's interrupt, e.g. while the workers start)
  -- leaves the identity scheduled = ok + ... + dropped + pending exact: the task then was never scheduled
  local st = self.stats
  if self.starter and self.accepting then
    local ok, err = pcall(self.starter)     -- workers start on first use (Python: PluginVM.start_workers)
    if not ok then                          -- e.g. the hook budget interrupted the start: this task is dropped,
      self:drop("the workers' start was interrupted")   -- the error still ends the hook, and the next task
      error(err, 0)                         -- completes the start
    end
    self.starter = nil
  end
  -- after the end of input only an onresult / onerror of the drain schedules (a follow-up of a task of the input:
  -- accepted whenever its parent's result came, so the run does not depend on the workers' speed); not while the
  -- pending tasks are being cut off
  if not self.accepting and (not self.in_result or self.cutting) then return self:drop("engine is stopping") end
  if self.nworkers == 0 then return self:drop("no async workers could be started") end
  local w
  if target then
    w = self.workers[target_slot(self, target)]
  elseif self.nworkers == 1 then
    w = self.workers[1]
  else
    local best = 1e300
    for k = 1, self.nworkers do
      local c = self.workers[k]
      local load = c.tail - c.head
      if not c.alive then load = load + 1e9 end
      if load < best then best, w = load, c end
    end
  end
  local full = self.backlog >= self.overflow_limit
  if full then
    -- the rings are written to once until the next poll: a hook scheduling past the limit paid a pass over every
    -- worker's ring per dropped call (8 workers: 430 ns a call, 80 with one; tools/bench/async_drop_cost.py)
    if not self.rings_full then
      self:flush()
      full = self.backlog >= self.overflow_limit
      self.rings_full = full
    end
    if full and (w.sent < w.tail or not w.alive) then return self:drop("overflow queue full") end
  end
  local s = band(w.tail, CMASK) + 1
  local c = w.tc
  local id = self.next_id + 1
  self.next_id = id
  c.id[s], c.kind[s], c.fid[s], c.data[s], c.aux[s], c.arg[s] = id, kind, fid, data, aux, arg
  c.onres[s], c.onerr[s], c.ts[s] = onres, onerr, ts
  if ts then
    if ts >= w.maxts then w.maxts = ts
    else local o = self.ooo; local j = #o; o[j + 1], o[j + 2], o[j + 3] = w, w.tail, ts end
    if ts == NO_TIME and (onres or onerr) and not self.origin then self.await_origin = true end
  end
  if self.file_done ~= NOOP and next(self.live_files) ~= nil then c.files[s] = self:files_named(data, aux) end
  w.tail = w.tail + 1; st.scheduled = st.scheduled + 1
  if s == CHUNK then chunk_for_tail(w) end          -- the next task's chunk
  self.backlog = self.backlog + 1
  if full then                               -- limit 0: only straight into the ring
    self:drain(w)
    if w.sent < w.tail then
      w.tail = w.tail - 1; st.scheduled = st.scheduled - 1     -- (drop counts it, as dropped)
      self.backlog = self.backlog - 1
      w.tc = c                             -- (the next chunk, made if s == CHUNK, stays for the next task)
      self:clear_slot(c, s)
      return self:drop("overflow queue full")
    end
  end
  return true
end

--- Drop slot s of chunk c's references (its files released).
function Async:clear_slot(c, s)
  c.data[s], c.aux[s], c.onres[s], c.onerr[s] = nil, nil, nil, nil
  local files = c.files[s]
  if files then
    c.files[s] = nil
    for _, path in ipairs(files) do self.file_done(path) end
  end
end

--- Live extracted files (filex) that a task's data or arguments name; each
--- gets one more reference until the task finishes (see engine/streams/filex.lua).
function Async:files_named(data, aux)
  local out
  for path in pairs(self.live_files) do
    if data:find(path, 1, true) or aux:find(path, 1, true) then
      out = out or {}
      out[#out + 1] = path
      self.live_files[path] = self.live_files[path] + 1
    end
  end
  return out
end

--- Why a task is dropped -> its counter in stats: dropped == the sum of these four (docs/async.md "Accounting").
local DROP_KEY = {
  ["overflow queue full"] = "dropped_overflow",
  ["engine is stopping"] = "dropped_stopping",
  ["the workers' start was interrupted"] = "dropped_start",
  ["no async workers could be started"] = "dropped_no_workers",
}
M.DROP_KEY = DROP_KEY

--- Count a dropped task under its reason `why` (a DROP_KEY key); log the drops at most once a second, each
--- reason with its own count (before, one line gave every drop since the last line the last drop's reason,
--- and always "(limit N queued tasks)").  Returns false (schedule's value).
function Async:drop(why)
  local st = self.stats
  local key = DROP_KEY[why]
  st.scheduled, st.dropped, st[key] = st.scheduled + 1, st.dropped + 1, st[key] + 1
  self.drops_unlogged = self.drops_unlogged + 1
  self.drops_why[why] = (self.drops_why[why] or 0) + 1
  local now = C.lp_now_ns()
  if now - self.last_drop_log >= 1e9 then
    local parts, kinds = {}, 0
    for reason, n in pairs(self.drops_why) do
      kinds = kinds + 1
      parts[#parts + 1] = ("%s%s (%d)"):format(reason, reason == "overflow queue full"
        and (" at the limit of %d queued tasks"):format(self.overflow_limit) or "", n)
    end
    table.sort(parts)
    if kinds == 1 then parts[1] = parts[1]:gsub(" %(%d+%)$", "") end
    self:log(5, ("T.async: dropped %d task(s): %s"):format(self.drops_unlogged, table.concat(parts, "; ")))
    self.last_drop_log = now
    self.drops_unlogged = 0
    self.drops_why = {}
  end
  return false
end

-- ------------------------------------------------------------------ the API

--- A new function id for the prototype `key` of closure fn (bytecode shipped
--- once per worker, then referenced by id).
function Async:new_fid(fn, key, nups)
  if self.live_fids >= self.fn_sweep_at then self:forget_fids() end
  local free = self.free_fids
  local fid = free[#free]
  if fid then free[#free] = nil else fid = self.nfids + 1; self.nfids = fid end
  self.live_fids = self.live_fids + 1
  self.key_of[fid] = key
  self.fid_by_key[key] = fid
  self.keep_fn[fid] = fn
  self.bytecode[fid] = string.dump(fn)
  local info = debug.getinfo(fn, "S")
  self.fname[fid] = "=" .. info.short_src .. ":" .. info.linedefined
  self.nups[fid] = nups
  local names = {}
  for i = 1, nups do names[i] = debug.getupvalue(fn, i) end
  self.upnames[fid] = names
  return fid
end

--- Forget every function no pending task uses (the pending tasks are looked at, one pass: a sweep comes after
--- thousands of new functions, each of which costs a string.dump): its fid goes to free_fids, and each worker gets
--- the bytecode of the function that gets the fid next (DEFINE, replacing what it held under that number).  The next
--- sweep comes at FN_CACHE or twice the functions still in use, whichever is more.
function Async:forget_fids()
  local used = {}
  for k = 1, self.nworkers do
    local w = self.workers[k]
    local c
    for i = w.head, w.tail - 1 do
      local s = band(i, CMASK) + 1
      if c == nil or s == 1 then c = chunk(w, i) end
      used[c.fid[s]] = true
    end
  end
  local free = self.free_fids
  for fid, key in pairs(self.key_of) do
    if not used[fid] then
      self.fid_by_key[key] = nil
      self.key_of[fid], self.keep_fn[fid], self.bytecode[fid], self.fname[fid] = nil, nil, nil, nil
      self.nups[fid], self.upnames[fid], self.up_last[fid], self.up_tables[fid], self.up_blob[fid] = nil, nil, nil, nil, nil
      for k = 1, self.nworkers do
        local w = self.workers[k]
        w.defined[fid], w.up_sent[fid] = nil, nil
      end
      free[#free + 1] = fid
      self.live_fids = self.live_fids - 1
    end
  end
  self.fn_sweep_at = math.max(FN_CACHE, 2 * self.live_fids)
end

--- Snapshot onexecute's upvalues (u1 .. u8 from fninfo): returns the blob the
--- task needs, or nil and a message naming a non-plain upvalue.  (schedule
--- first compares up to four scalars with the last snapshot; a new value, or
--- any table (it may have been mutated), makes a new blob.)
function Async:upvalues(fid, fn, n, u1, u2, u3, u4, u5, u6, u7, u8)
  local vals = { u1, u2, u3, u4, u5, u6, u7, u8 }
  for i = 9, n do local _, v = debug.getupvalue(fn, i); vals[i] = v end
  local names, tables = self.upnames[fid], false
  for i = 1, n do
    local v = vals[i]
    local t = type(v)
    if t == "table" then tables = true end
    if t ~= "nil" and t ~= "boolean" and t ~= "number" and t ~= "string" then
      local ok, err = pcall(check_plain, v, {}, names[i])
      if not ok then return nil, err end
    end
  end
  local blob = encode_upvalues(vals, n)
  self.up_blob[fid], self.up_last[fid], self.up_tables[fid] = blob, vals, tables
  return blob
end

local function check_string(v, what, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(("T.async:%s: %s must be a string (got %s)"):format(fname, what, t), 3)
end

--- A request must fit one request-ring record (the ring's limit, known before any worker starts):
--- a Lua error at the call site naming the limit, never a failure later in the fast path.
local function check_size(self, fname, what, data, aux)
  if REQ + #data + #aux > self.max_record then
    error(("T.async:%s: %s of %d bytes exceeds the request ring's record limit of %d bytes "
           .. "(raise --ring-size)"):format(fname, what, #data, self.max_record - REQ - #aux), 3)
  end
end

function Async:make_api()
  local self_ = self
  local api = {}
  local EXEC = P.EXEC
  local up_last, up_tables, up_blob = self.up_last, self.up_tables, self.up_blob
  local function args(a, b, c, d)      -- accept both T.async:f(...) and T.async.f(...)
    if a == api then return b, c, d end
    return a, b, c
  end

  --- The part of schedule after fninfo, a function of its own: fninfo is a classic C function, and LuaJIT cannot
  --- carry a trace across it back into the hook's frames (the trace stops there, "return to lower frame" below
  --- a pcall), so the code after it would run interpreted.  Here it is entered by a call, and LuaJIT compiles it
  --- as a trace of its own.  Error levels: stage is tail-called, so level 2 is still schedule's caller.
  local last_fn, last_key = nil, nil     -- the last onexecute without upvalues and its prototype key
  -- The last closure with 1-4 upvalues met twice in a row (a task table written once, hoisted), its prototype key,
  -- upvalue count and the blob of the values recorded in `uvc`: while lp_uvc_same says they still hold those values,
  -- schedule reuses the blob without fninfo (SAME in stage's u1).  prev_fn: the closure of the previous snapshot.
  local up_fn, up_key, up_nups, up_aux, prev_fn = nil, nil, 0, "", nil
  local uvc = fnaddr and ffi.new("lp_uvc") or nil
  local SAME = {}

  local function stage(task, key, nups, u1, u2, u3, u4, u5, u6, u7, u8)
    local data = task.data
    if type(data) ~= "string" then
      if type(data) ~= "number" then
        error(("T.async:schedule: data must be a string (got %s)"):format(type(data)), 2)
      end
      data = tostring(data)
    end
    local fn, onres, onerr = task.onexecute, task.onresult, task.onerror
    if onres ~= nil and type(onres) ~= "function" then error("T.async:schedule: onresult must be a function", 2) end
    if onerr ~= nil and type(onerr) ~= "function" then error("T.async:schedule: onerror must be a function", 2) end
    if key == nil then
      if type(fn) ~= "function" then error("T.async:schedule: onexecute must be a function", 2) end
      error("T.async:schedule: onexecute must be a Lua function, not a C function", 2)
    end
    local fid = self_.fid_by_key[key]
    if fid == nil then fid = self_:new_fid(fn, key, nups) end
    check_size(self_, "schedule", "onexecute's bytecode", self_.bytecode[fid], self_.fname[fid])
    local aux = ""
    if nups == 0 then
      last_fn, last_key = fn, key
    elseif u1 == SAME then
      aux = up_aux                                            -- the same closure, its upvalues unchanged
    else
      local last = up_last[fid]
      if last and nups <= 4 and not up_tables[fid]
         and u1 == last[1] and u2 == last[2] and u3 == last[3] and u4 == last[4]
         and (u1 ~= 0 or 1 / u1 == 1 / last[1]) and (u2 ~= 0 or 1 / u2 == 1 / last[2])   -- 0 == -0, but
         and (u3 ~= 0 or 1 / u3 == 1 / last[3]) and (u4 ~= 0 or 1 / u4 == 1 / last[4]) then  -- tostring differs
        aux = up_blob[fid]                                    -- unchanged: the worker may hold it
      else
        local err
        aux, err = self_:upvalues(fid, fn, nups, u1, u2, u3, u4, u5, u6, u7, u8)
        if aux == nil then error("T.async:schedule: " .. err, 2) end
      end
      if uvc and nups <= UVC_UPS and not up_tables[fid] then
        if fn == prev_fn then                                 -- twice in a row: record its values with the blob
          if fn ~= up_fn then
            up_fn, up_key, up_nups = fn, key, nups
            uvc.fn, uvc.n = fnaddr(fn), nups
          end
          C.lp_uvc_take(uvc)
          up_aux = aux
        end
        prev_fn = fn
      end
    end
    if REQ + #aux > self_.max_record then
      -- the upvalues alone do not fit: say so (check_size named "data of 1 bytes" and a negative limit)
      error(("T.async:schedule: onexecute's upvalues, %d bytes encoded, exceed the request ring's record limit of %d "
             .. "bytes (raise --ring-size, or build the values inside onexecute)"):format(#aux, self_.max_record - REQ),
            2)
    end
    check_size(self_, "schedule", "data", data, aux)
    -- the result's time: the engine's now (docs/async.md "Time"); before the first packet (onload) NO_TIME
    return self_:enqueue(EXEC, fid, data, aux, -1, onres, onerr, nil, self_:now_ts())
  end

  --- Runs interpreted in most hooks (LuaJIT does not compile closure creation), so it does
  --- little: the prototype and upvalues of onexecute through fninfo, then stage (checks, enqueue).
  --- The same closure without upvalues as last time (a task written once, hoisted) needs no fninfo:
  --- its prototype is the same and it has nothing to snapshot, and the hook's trace goes on compiled.
  --- Nor does the same closure with 1-4 upvalues whose values are those of its last snapshot (lp_uvc_same, an FFI
  --- call that LuaJIT compiles into the hook's trace, compares their raw values).
  function api.schedule(a, b)
    local task = b
    if a ~= api then task = a end
    if type(task) ~= "table" then
      error(("T.async:schedule expects a task table {data=, onexecute=, onresult=} (got %s)"):format(type(task)), 2)
    end
    local fn = task.onexecute
    if fn == last_fn and fn ~= nil then return stage(task, last_key, 0) end
    if fn == up_fn and fn ~= nil and C.lp_uvc_same(uvc) ~= 0 then return stage(task, up_key, up_nups, SAME) end
    return stage(task, fninfo(fn))
  end

  local function file_op(kind, from, to)
    local r = self_:enqueue(kind, 0, from, to, -1, nil, nil, to, self_:now_ts())
    return r
  end

  --- T.async:copy(from, to) and T.async:cat(from, to): the same checks (an error names `name` and the plug-in's
  --- line: the returned function is the one the plug-in calls), then one file request of `kind`
  local function from_to(kind, name)
    return function(a, b, c)
      local from, to = args(a, b, c)
      from, to = check_string(from, "from", name), check_string(to, "to", name)
      check_size(self_, name, "request", from, to)
      return file_op(kind, from, to)
    end
  end
  api.copy, api.cat = from_to(P.COPY, "copy"), from_to(P.CAT, "cat")

  function api.rm(a, b)
    local file = args(a, b)
    file = check_string(file, "file", "rm")
    check_size(self_, "rm", "file name", file, "")
    local r = self_:enqueue(P.RM, 0, file, "", -1, nil, nil, file, self_:now_ts())
    return r
  end

  function api.copybuffer(a, b, c, d)
    local buf, file, pos = args(a, b, c, d)
    local bytes
    if type(buf) == "string" then bytes = buf
    elseif type(buf) == "table" or type(buf) == "userdata" then bytes = buf:tostring()
    else error(("T.async:copybuffer: buffer must be a Buffer or a string (got %s)"):format(type(buf)), 2) end
    file = check_string(file, "file", "copybuffer")
    if pos ~= nil and (type(pos) ~= "number" or not (pos >= 0) or pos == math.huge) then   -- NaN, inf refused too
      error("T.async:copybuffer: pos must be a non-negative number (a byte offset)", 2)
    end
    check_size(self_, "copybuffer", "buffer", bytes, file)
    local r = self_:enqueue(P.COPYBUF, 0, bytes, file, pos or -1, nil, nil, file, self_:now_ts())
    return r
  end

  function api.pending_items()
    return self_:pending()
  end

  return api
end

-- ------------------------------------------------------------------ results

function Async:pending()
  local n = 0
  for k = 1, self.nworkers do local w = self.workers[k]; n = n + (w.tail - w.head) end
  return n
end

-- not debug.traceback(msg, 2) (a tail call, hence level 3 here): LuaJIT cuts msg at its first NUL byte
local function traceback(msg) return tostring(msg) .. debug.traceback("", 3) end

--- Run onresult / onerror.  With a packet-time stamp `ts` (µs) the engine's
--- clock reads ts for the hook (docs/async.md "Time"), then is restored.
function Async:call_hook(kind, fn, data, arg, ts)
  local e = self.engine
  local b, i, now, usec, tus
  if ts then
    local c = e._t
    b, i, now, usec, tus = c.b, c.i, c.now, c.usec, c.tus
    local sec = floor(ts / 1e6)
    c.i, c.now, c.usec, c.tus = -1, sec, ts - sec * 1e6, ts
    e._result = true
  end
  local was = self.in_result
  self.in_result = true
  local ok, err = xpcall(fn, traceback, e, data, arg)
  self.in_result = was
  if ts then
    local c = e._t
    c.b, c.i, c.now, c.usec, c.tus = b, i, now, usec, tus
    e._result = false
  end
  if not ok then
    self.stats.onresult_errors = self.stats.onresult_errors + 1
    self.errors:report(kind, err)
  end
end

--- Retire the task at the head of w's FIFO with a result status; `now` is the
--- poll's clock (latency).
function Async:complete(w, status, payload, now)
  local head = w.head
  local s = band(head, CMASK) + 1
  if s == 1 then w.hc = chunk(w, head) end
  local c = w.hc
  local data, onres, onerr, t0, files, ts = c.data[s], c.onres[s], c.onerr[s], c.t0[s], c.files[s], c.ts[s]
  c.files[s], c.ts[s] = nil, nil   -- files released after the hooks below (onresult may read the file)
  self:clear_slot(c, s)
  w.head = head + 1
  if s == CHUNK then release_chunk(w, rshift(head, CHUNK_BITS), c) end
  -- latency: only of a task that completed in the worker (ok, nil_result, a file helper's ok) and whose result the
  -- poll just read (now); a task failed by the engine (lost at the deadline, timed out, worker died) has none,
  -- so latency_samples == ok + nil_result
  if t0 and now and (status == P.OK or status == P.NIL or status == P.FILE_OK) then
    local lat = now - t0
    local b = lat > 1 and bucket(lat) or 0
    if b >= HIST then b = HIST - 1 end
    self.hist[b] = self.hist[b] + 1
  end
  -- the schedule time, never the delivery time nor the run time (both vary from run to run: docs/async.md "Time")
  if ts == NO_TIME then ts = self.origin or self:no_origin() end
  local st = self.stats
  if status == P.OK then
    st.ok = st.ok + 1
    -- an empty string travels as a zero-length record: onresult still gets "" (docs/async.md)
    if onres then self:call_hook("onresult", onres, data, payload or "", ts) end
  elseif status == P.NIL then
    st.nil_result = st.nil_result + 1
  elseif status == P.FILE_OK then
    st.ok = st.ok + 1
  else
    if status == P.TIMEOUT then st.timeout = st.timeout + 1 else st.error = st.error + 1 end
    local kind = status == P.FILE_ERROR and "file helper error" or self.cutting or "onexecute error"
    if not self.unlogged then self.errors:report(kind, payload or "?") end
    if onerr then self:call_hook("onerror", onerr, data, payload, ts) end
  end
  if files then
    for _, path in ipairs(files) do self.file_done(path) end
  end
end

--- The time of a NO_TIME task completed while the run has no packet time: the wall clock (µs, whole seconds), as a live capture
--- would stamp it.  Only a run that ends without any packet, or a worker lost before the first packet, gets here.
function Async:no_origin()
  return os.time() * 1e6
end

--- Pop up to `max` results from one worker; returns how many.
function Async:poll_worker(w, max)
  local got, r = 0, w.ret
  local now
  while got < max do
    local p, n = r:peek()
    if p == nil then break end
    if now == nil then now = C.lp_now_ns() end          -- one clock read per poll
    local h = cast(P.resp, p)
    local id, status, len = h.task_id, h.status, h.len
    local payload = len > 0 and fstring(p + RES, len) or nil
    r:advance(n)
    got = got + 1
    local head, expect = w.head, nil
    if head < w.sent then
      local s = band(head, CMASK) + 1
      if s == 1 then w.hc = chunk(w, head) end
      expect = w.hc.id[s]
    end
    if expect ~= id then
      self:log(3, ("T.async: worker %d returned task %d out of order; expected %s"):format(
        w.k, id, tostring(expect)))
    else
      self:complete(w, status, payload, now)
    end
  end
  if got > 0 then r:release() end
  return got
end

--- True while results must wait for the run's first packet time: a task scheduled before it (NO_TIME) has an
--- onresult / onerror, and the engine still accepts tasks (at the end of input they are delivered: no_origin).
function Async:awaiting()
  if self.origin or not self.accepting then
    self.await_origin = false
    return false
  end
  return true
end

--- Send staged tasks, deliver ready results of every worker (at most `max`
--- each) and move backlog into freed ring space.  Returns the number of
--- results delivered.  `pace`: check the collector's pace now (the fast path polls a VM with no worker only
--- every gcpace.CHECK_EVERY-th time and asks for the check then: engine/plugins/asyncruntime.py).
function Async:poll(max, pace)
  max = max or 4096
  local total = 0
  self.rings_full = false
  local polls = self.polls + 1
  self.polls = polls
  if polls % gcpace.CHECK_EVERY == 0 or pace then gcpace.adjust() end
  if self.await_origin and self:awaiting() then     -- before the first packet: results of onload tasks wait
    self:flush()
    return 0
  end
  for k = 1, self.nworkers do
    local w = self.workers[k]
    if w.ret then
      if w.alive and w.sent < w.tail then self:drain(w) end
      total = total + self:poll_worker(w, max)
      if w.alive and w.sent < w.tail then self:drain(w) end
    end
  end
  return total
end

--- Flush staged tasks (the fast path calls this before it sleeps), then
--- true when some worker has a published result waiting.
function Async:has_results()
  self.rings_full = false
  if self.backlog > 0 then self:flush() end
  if self.await_origin and self:awaiting() then return false end
  for k = 1, self.nworkers do
    local w = self.workers[k]
    if w.ret and C.lp_load_sc(w.ret.tail_p) ~= w.ret.head_local then return true end
  end
  return false
end

-- ------------------------------------------------------------------ faults

--- Worker k is gone (dead, killed for a timeout, recycled).  Results it
--- published are delivered; the task it was running (cur_task) fails with
--- `reason`; tasks it never started go back to its backlog for the next worker.
--- `logged`: the pool logs the death in one line of its own (workers/pool.py _lost), so the failed task is
--- counted and its onerror called but not logged again as an onexecute error.  Returns true when a task failed.
function Async:worker_lost(k, reason, cur_task, is_timeout, logged)
  local w = self.workers[k]
  self:poll_worker(w, 1e300)
  local failed = false
  if cur_task ~= 0 and w.head < w.sent and chunk(w, w.head).id[band(w.head, CMASK) + 1] == cur_task then
    self.unlogged = logged or nil
    self:complete(w, is_timeout and P.TIMEOUT or P.ERROR, reason)
    self.unlogged = nil
    failed = true
  end
  local unstarted = w.sent - w.head
  self.stats.redispatched = self.stats.redispatched + unstarted
  self.backlog = self.backlog + unstarted
  w.sent = w.head
  w.defined = {}
  w.up_sent = {}
  w.alive = false
  w.req:reset()
  w.ret:reset()
  return failed
end

--- A fresh worker process serves slot k.
function Async:worker_ready(k)
  local w = self.workers[k]
  w.alive = true
  self:drain(w)
end

--- Stop accepting new tasks (shutdown): later calls are counted as dropped.
function Async:stop_accepting() self.accepting = false end

--- Fail every task still pending as `timeout` (shutdown deadline passed, or the run stopped by a signal during
--- the drain); they are counted in stats[counter] ("lost_at_deadline", the default, or "lost_at_stop").
function Async:cut_off(reason, counter)
  counter = counter or "lost_at_deadline"
  local lost = self:pending()
  self.cutting = "task lost"             -- logged as lost, not as an onexecute error
  for k = 1, self.nworkers do
    local w = self.workers[k]
    self.backlog = self.backlog - (w.tail - w.sent)
    w.sent = w.tail
    while w.head < w.tail do self:complete(w, P.TIMEOUT, reason) end
  end
  self.cutting = nil
  self.stats[counter] = self.stats[counter] + lost
end

--- Counters, the accounting identity's terms, and latency percentiles (ns).
function Async:snapshot()
  local st = self.stats
  local out = {}
  for k, v in pairs(st) do out[k] = v end
  out.pending = self:pending()
  out.backlog = self.backlog
  out.workers = self.nworkers
  local total = 0
  for i = 0, HIST - 1 do total = total + self.hist[i] end
  local function pct(p)
    if total == 0 then return 0 end
    local want, acc = p * total, 0
    for i = 0, HIST - 1 do
      acc = acc + self.hist[i]
      if acc >= want then return 2 ^ ((i + 1) / 4) end
    end
    return 2 ^ (HIST / 4)
  end
  out.latency_p50_ns = pct(0.5)
  out.latency_p99_ns = pct(0.99)
  out.latency_samples = total          -- = ok + nil_result: the completed tasks (complete)
  return out
end

M.Async = Async
M.latency_bucket = bucket        -- (tests)
return M
