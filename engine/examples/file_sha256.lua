-- file_sha256.lua: like Trisul's SHA256 sample. Every file extracted from HTTP is hashed in a
-- T.async worker (so hashing never stalls the packet path), copied to ./extracted/, and
-- recorded as a FileHash resource on its flow.
--
-- Two safe patterns to copy:
-- * The hash streams: OpenSSL's libcrypto (a maintained library, through LuaJIT's ffi) digests the file
--   64 KiB at a time, so a 2 GB download never sits in memory and no hand-written SHA-256 is trusted.
-- * The task's data is length-prefixed fields ("<length>:<bytes>" each): the URI comes from the packet and
--   may hold any byte, so fields are never joined with a separator and split back.
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
      local fields = { path, flow:id(), tostring(length), req_header:get_path() or "" }
      for i, f in ipairs(fields) do fields[i] = #f .. ":" .. f end
      T.async:schedule {
        data = table.concat(fields),
        onexecute = function(data)                  -- in the worker: stream the file through SHA-256
          local n, at = data:match("^(%d+):()")
          local path = data:sub(at, at + tonumber(n) - 1)
          local ffi = require("ffi")
          pcall(ffi.cdef, [[
            typedef struct evp_md_ctx_st EVP_MD_CTX; typedef struct evp_md_st EVP_MD;
            EVP_MD_CTX *EVP_MD_CTX_new(void); void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
            const EVP_MD *EVP_sha256(void);
            int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, void *engine);
            int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
            int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);]])
          local ok, crypto = pcall(ffi.load, "libcrypto.so.3")
          if not ok then crypto = ffi.load("crypto") end
          local f = assert(io.open(path, "rb"))
          local ctx = ffi.gc(crypto.EVP_MD_CTX_new(), crypto.EVP_MD_CTX_free)
          assert(crypto.EVP_DigestInit_ex(ctx, crypto.EVP_sha256(), nil) == 1)
          while true do
            local block = f:read(65536)
            if not block then break end
            assert(crypto.EVP_DigestUpdate(ctx, block, #block) == 1)
          end
          f:close()
          local md, len = ffi.new("unsigned char[32]"), ffi.new("unsigned int[1]")
          assert(crypto.EVP_DigestFinal_ex(ctx, md, len) == 1)
          return (ffi.string(md, len[0]):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
        end,
        onresult = function(engine, data, sha)
          local out, pos = {}, 1
          while pos <= #data do                      -- the four fields back, by their lengths
            local n, at = data:match("^(%d+):()", pos)
            out[#out + 1] = data:sub(at, at + tonumber(n) - 1)
            pos = at + tonumber(n)
          end
          local _, flowkey, len, uri = out[1], out[2], out[3], out[4]
          engine:add_resource(FILEHASH, flowkey, sha, ("%s bytes %s"):format(len, uri))
        end,
      }
    end,
  },
}
