-- file_sha256.lua: like Trisul's SHA256 sample. Every file extracted from HTTP is hashed in a
-- T.async worker (so hashing never stalls the packet path), copied to ./extracted/, and
-- recorded as a FileHash resource on its flow.
local FILEHASH = "{9781DB2C-F78A-4F7F-A7E8-2B1A9A7BE71A}"
local DEST = "extracted"
local ffi = require("ffi")
pcall(ffi.cdef, "int mkdir(const char *path, unsigned int mode);")
local made = false

TrisulPlugin = {
  id = { name = "File SHA256", description = "SHA256 of every HTTP file, in an async worker" },
  request_async_workers = 1,

  filex_monitor = {
    onfile_http = function(engine, timestamp, flow, path, req_header, resp_header, length, is_chunk)
      if length == 0 then return end
      if not made then ffi.C.mkdir(DEST, 493); made = true end   -- 0755, once
      T.async:copy(path, DEST .. "/" .. path:match("[^/]+$"))
      T.async:schedule {
        data = path .. "|" .. flow:id() .. "|" .. tostring(length) .. "|" .. (req_header:get_path() or ""),
        onexecute = function(data)
          local sha2 = require("luaprobe.engine.plugins.sha256")
          local p = T.util.splitm(data, "|")
          local f = assert(io.open(p, "rb"))
          local body = f:read("*a")
          f:close()
          return sha2.hex(body)
        end,
        onresult = function(engine, data, sha)
          local _, flowkey, len, uri = T.util.splitm(data, "|")
          engine:add_resource(FILEHASH, flowkey, sha, ("%s bytes %s"):format(len, uri))
        end,
      }
    end,
  },
}
