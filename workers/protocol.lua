--[[
luaprobe.workers.protocol — the records exchanged between a plug-in VM and its async
workers, and the layout of a worker's channel segment.

Channel segment (one per worker slot, created by the fast path, reused when
the worker is restarted):

    0      control block (CONTROL bytes)
           0  magic f64            8  worker pid f64
           16 cur_task f64  (task id being executed, 0 = idle)
           24 cur_start_ns f64     32 tasks_done f64
           40 exit_request u32     44 state u32 (0 starting, 1 running)
    CONTROL                          request ring  (fast path -> worker)
    CONTROL + ring.region(req_cap)   return ring   (worker -> fast path)

Request record: lp_req header, then `data_len` bytes of data, then `aux_len`
bytes of aux.  Result record: lp_res header (exec_ns: how long the task ran in the
worker), then `len` bytes.
]]
local ffi = require("ffi")

ffi.cdef[[
typedef struct { double task_id; double arg; uint32_t kind; uint32_t fid; uint32_t data_len; uint32_t aux_len; } lp_req;
typedef struct { double task_id; uint32_t status; uint32_t len; double exec_ns; } lp_res;
typedef struct { double magic; double pid; double cur_task; double cur_start_ns; double tasks_done;
                 uint32_t exit_request; uint32_t state; } lp_ctl;
]]

return {
  CONTROL = 4096,
  CTL_MAGIC = 0x4C5043544C,         -- "LPCTL"
  REQ_SIZE = ffi.sizeof("lp_req"),
  RES_SIZE = ffi.sizeof("lp_res"),
  -- request kinds
  DEFINE = 1,    -- fid: data = bytecode, aux = chunk name
  EXEC = 2,      -- fid: data = task data, aux = the function's new upvalues (string.buffer: n, v1..vn),
                 --      "" when the worker already holds them
  COPY = 3,      -- data = from, aux = to
  CAT = 4,       -- data = from, aux = to
  RM = 5,        -- data = file
  COPYBUF = 6,   -- data = bytes, aux = file, arg = byte offset or -1 to append
  -- result statuses
  OK = 1,        -- payload: the string onexecute returned
  NIL = 2,       -- onexecute returned nil / nothing
  ERROR = 3,     -- payload: error message with traceback
  FILE_OK = 4,   -- a file helper finished
  FILE_ERROR = 5,-- payload: what went wrong
  TIMEOUT = 6,   -- never sent: the fast path's verdict for a task that ran too long
  KIND_NAME = { [3] = "copy", [4] = "cat", [5] = "rm", [6] = "copybuffer" },
  reqp = ffi.typeof("lp_req *"),
  resp = ffi.typeof("lp_res *"),
  ctlp = ffi.typeof("lp_ctl *"),
}
