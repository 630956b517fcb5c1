--[[
workers.fileops — T.async's file helpers (copy, cat, rm, copybuffer) with
confined, race-free path resolution.  Runs in a worker; names usually come
from packets, so they are untrusted.

The confinement rule (docs/async.md, "File helpers: where names may point"):
  * a name with a NUL byte, an empty name, or a name with a ".." component
    (relative or absolute) is refused;
  * without file roots (the default) a name may be relative (to the run's
    working directory) or absolute (Trisul scripts write to /tmp/...); its
    directory part is opened as named, and the last component is opened with
    O_NOFOLLOW relative to that directory's descriptor: a symbolic link there
    is refused, never followed out of the directory named;
  * with file roots (--file-root, [async] file_roots) the name, made absolute
    against the working directory, must lie beneath one of the roots; every
    component below the root is opened with openat(O_NOFOLLOW) from the
    root's descriptor, so no symbolic link beneath a root is followed and a
    concurrent rename cannot move the walk outside it.
Every failure is an error result naming the helper, the (escaped) name and
the reason (errno text); nothing is silently truncated or reported as done.
]]
local ffi = require("ffi")
local bit = require("bit")

ffi.cdef[[
int openat(int dirfd, const char *path, int flags, ...);
int close(int fd);
long read(int fd, void *buf, size_t n);
long write(int fd, const void *buf, size_t n);
long pwrite(int fd, const void *buf, size_t n, long off);
int unlinkat(int dirfd, const char *path, int flags);
char *strerror(int errnum);
char *getcwd(char *buf, size_t size);
int statx(int dirfd, const char *path, int flags, unsigned int mask, void *statxbuf);
int ftruncate(int fd, long length);
]]

local C = ffi.C
local bor = bit.bor

-- Linux x86_64 / aarch64 values (asm-generic/fcntl.h)
local O_RDONLY, O_WRONLY = 0, 1
local O_CREAT, O_TRUNC, O_APPEND = 64, 512, 1024
local O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC = 65536, 131072, 524288
local O_PATH = 2097152
local O_EXCL = 128
local O_NONBLOCK = 2048               -- the same on x86_64 and aarch64 (04000)
local AT_FDCWD = -100
local ENOENT, EINTR, EEXIST, EFBIG, EINVAL, ENXIO = 2, 4, 17, 27, 22, 6
if ffi.arch == "arm64" then O_DIRECTORY, O_NOFOLLOW = 16384, 32768 end

local M = { roots = {} }

--- A name for messages and logs: control characters and non-ASCII bytes escaped (\n, \x1b, ...).
function M.escape(s)
  return (s:gsub("[%z\1-\31\127-\255\\]", function(c)
    local map = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ["\\"] = "\\\\" }
    return map[c] or ("\\x%02x"):format(c:byte())
  end))
end

local function errno_text(name, e)
  e = e or ffi.errno()
  return nil, ("%s: %s"):format(M.escape(name), ffi.string(C.strerror(e))), e
end

local function split(path)
  local parts = {}
  for p in path:gmatch("[^/]+") do
    if p ~= "." then parts[#parts + 1] = p end
  end
  return parts
end

local function check_name(name)
  if name == "" then return nil, "empty file name" end
  if name:find("\0", 1, true) then return nil, M.escape(name) .. ": file name contains a NUL byte" end
  for _, p in ipairs(split(name)) do
    if p == ".." then return nil, M.escape(name) .. ": '..' is not allowed in file names" end
  end
  return true
end

--- Set the allow-list of directory roots (absolute, normalised).  An empty list: no roots.
function M.set_roots(roots)
  M.roots = {}
  for _, r in ipairs(roots or {}) do
    r = r:gsub("/+$", "")
    M.roots[#M.roots + 1] = r == "" and "/" or r
  end
end

local cwd
local function absolute(name)
  if name:sub(1, 1) == "/" then return name end
  if not cwd then
    local buf = ffi.new("char[4096]")
    cwd = C.getcwd(buf, 4096) ~= nil and ffi.string(buf) or "/"
  end
  return cwd .. "/" .. name
end

--- Open the directory that holds `name`'s last component; returns dirfd (caller closes), last, or nil, err.
local function open_parent(name)
  local ok, err = check_name(name)
  if not ok then return nil, err end
  local parts = split(name)
  if #parts == 0 then return nil, M.escape(name) .. ": names a directory, not a file" end
  if name:sub(-1) == "/" then return nil, M.escape(name) .. ": names a directory, not a file" end
  local last = table.remove(parts)
  if #M.roots == 0 then
    local dir = name:sub(1, 1) == "/" and "/" .. table.concat(parts, "/") or table.concat(parts, "/")
    if dir == "" then dir = "." end
    local fd = C.openat(AT_FDCWD, dir, bor(O_PATH, O_DIRECTORY, O_CLOEXEC))
    if fd < 0 then return errno_text(name) end
    return fd, last
  end
  local abs = split(absolute(name))
  table.remove(abs)
  for _, root in ipairs(M.roots) do
    local rparts = split(root)
    local beneath = #abs >= #rparts
    for i = 1, #rparts do
      if abs[i] ~= rparts[i] then beneath = false; break end
    end
    if beneath then
      local fd = C.openat(AT_FDCWD, root, bor(O_PATH, O_DIRECTORY, O_CLOEXEC))
      if fd < 0 then return errno_text(root) end
      for i = #rparts + 1, #abs do          -- below the root: one component at a time, no symlink followed
        local nfd = C.openat(fd, abs[i], bor(O_PATH, O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC))
        local e = ffi.errno()
        C.close(fd)
        if nfd < 0 then return errno_text(name, e) end
        fd = nfd
      end
      return fd, last
    end
  end
  return nil, M.escape(name) .. ": outside the allowed file roots (" .. table.concat(M.roots, ", ") .. ")"
end

-- statx(2) (struct statx is the same on every architecture, unlike struct stat): stx_mode is the uint16 at 28
local AT_EMPTY_PATH, STATX_TYPE = 0x1000, 1
local STX = ffi.new("uint8_t[256]")
local KINDS = { [0x1000] = "a FIFO", [0x2000] = "a character device", [0x4000] = "a directory",
                [0x6000] = "a block device", [0xC000] = "a socket" }

--- nil when fd is a regular file, else what it is ("a character device", ...).
local function not_regular(fd)
  if C.statx(fd, "", AT_EMPTY_PATH, STATX_TYPE, STX) ~= 0 then return "of unknown type" end
  local kind = bit.band(ffi.cast("uint16_t *", STX + 28)[0], 0xF000)
  if kind == 0x8000 then return nil end
  return KINDS[kind] or "not a regular file"
end

--- ENXIO from a write open with O_NONBLOCK: a FIFO with no reader (or a device with nothing behind it); the line
--- names what `last` in dfd is, looked at without opening it for I/O (O_PATH).
local function enxio_text(dfd, name, last)
  local pfd = C.openat(dfd, last, bor(O_PATH, O_NOFOLLOW, O_CLOEXEC))
  local kind = pfd >= 0 and not_regular(pfd) or nil
  if pfd >= 0 then C.close(pfd) end
  return ("%s: not a regular file (%s)"):format(M.escape(name), kind or ffi.string(C.strerror(ENXIO)))
end

--- open(2) of a confined name; returns fd or nil, err.
local function open_file(name, flags, mode)
  local dfd, last, e0 = open_parent(name)
  if not dfd then return nil, last, e0 end
  -- the mode goes through `...`: a plain Lua number would be passed as a double (garbage mode, 0000 seen);
  -- an int cdata is passed as the int open(2) reads.  0666 & ~umask for a new file, as cp/cat do.
  local fd = C.openat(dfd, last, bor(flags, O_NOFOLLOW, O_CLOEXEC), ffi.new("int", mode or 438))
  local e = ffi.errno()
  local nx = fd < 0 and e == ENXIO and enxio_text(dfd, name, last)
  C.close(dfd)
  if fd < 0 then
    if e == 40 then return nil, M.escape(name) .. ": is a symbolic link (not followed)", e end
    if nx then return nil, nx, e end
    return errno_text(name, e)
  end
  return fd
end

local BUF = ffi.new("uint8_t[?]", 1048576)

local function write_all(fd, p, n, name, off)
  local done = 0
  while done < n do
    local w
    if off then w = C.pwrite(fd, p + done, n - done, off + done) else w = C.write(fd, p + done, n - done) end
    if w < 0 then
      if ffi.errno() ~= EINTR then return errno_text(name) end
    else
      done = done + w
    end
  end
  return true
end

local function close_checked(fd, name)
  if C.close(fd) ~= 0 then return errno_text(name) end
  return true
end

--- The identity of the file open on fd: "dev_major:dev_minor:inode" (statx: stx_ino, the uint64 at 32;
--- stx_dev_major / stx_dev_minor, the uint32s at 136 / 140), or nil.
local function file_id(fd)
  if C.statx(fd, "", AT_EMPTY_PATH, 0x100, STX) ~= 0 then return nil end        -- STATX_INO
  local u32 = ffi.cast("uint32_t *", STX)
  return ("%d:%d:%s"):format(u32[34], u32[35], tostring(ffi.cast("uint64_t *", STX + 32)[0]))
end

--- copy / cat: the source must be a regular file, checked on its open descriptor before the target is created.
--- Before, /dev/zero (or /dev/urandom) wrote until the disk was full or the task timed out (4.6 GB in 10 s), a
--- FIFO held the worker until the task timeout (open and read wait for a writer), and a directory left an empty
--- target behind ("Is a directory" at the first read).  O_NONBLOCK: opening a FIFO does not wait.
--- The target must not be the source (the same name, another spelling of it, a hard link): the target is opened
--- without O_TRUNC, compared with the source by device and inode, and only then cut to 0 for copy (`cp a a`
--- refuses, "are the same file"; GNU cat, "input file is output file").  Before, copy(a, a) emptied a and
--- reported ok, and cat(a, a) appended a to itself until the disk was full (200 MB in 10 s under ulimit -f).
--- The target must be a regular file (or a new one): opened with O_NONBLOCK, so a FIFO with no reader is an error
--- at once (ENXIO), and a FIFO, device or socket that opened is refused before a byte is written.  Before, a FIFO
--- target held the worker until the task timeout, and the tasks queued behind it on that worker were lost.
local open_target, file_size                -- below (shared with copybuffer)
local function copy_file(from, to, flags)
  local src, err = open_file(from, bor(O_RDONLY, O_NONBLOCK))
  if not src then return nil, err end
  local kind = not_regular(src)
  if kind then
    C.close(src)
    return nil, ("%s: not a regular file (%s)"):format(M.escape(from), kind)
  end
  local dst, dfd, last, created = open_target(to, flags == O_TRUNC and 0 or flags)
  if not dst then C.close(src); return nil, dfd end
  local sid = file_id(src)
  if sid == nil or sid == file_id(dst) then
    C.close(src); C.close(dst); C.close(dfd)
    if sid == nil then return errno_text(from) end
    return nil, ("%s and %s are the same file"):format(M.escape(from), M.escape(to))
  end
  local size = flags == O_TRUNC and 0 or (not created and file_size(dst))
  -- a failure leaves no half file (as copybuffer): a target this call created is removed, an existing one cut back to
  -- the size it had (copy: 0, the size it was given before the first byte)
  local function fail(e)
    if created then C.unlinkat(dfd, last, 0) elseif size then C.ftruncate(dst, size) end
    C.close(src); C.close(dst); C.close(dfd)
    return nil, e
  end
  if flags == O_TRUNC and C.ftruncate(dst, 0) ~= 0 then
    local _, e = errno_text(to)
    return fail(e)
  end
  while true do
    local n = C.read(src, BUF, 1048576)
    if n < 0 then
      if ffi.errno() ~= EINTR then
        local _, e = errno_text(from)
        return fail(e)
      end
    elseif n == 0 then
      break
    else
      local ok, werr = write_all(dst, BUF, tonumber(n), to)
      if not ok then return fail(werr) end
    end
  end
  C.close(src)
  if C.close(dst) ~= 0 then                 -- a delayed write error (NFS, ...): the bytes may not all be there
    local _, e = errno_text(to)
    if created then C.unlinkat(dfd, last, 0) end
    C.close(dfd)
    return nil, e
  end
  C.close(dfd)
  return true
end

--- copy(from, to): `to` truncated and overwritten.
function M.copy(from, to) return copy_file(from, to, O_TRUNC) end

--- cat(from, to): appended to `to` (created).
function M.cat(from, to) return copy_file(from, to, O_APPEND) end

--- rm(file): a missing file is not an error; every other failure is.
function M.rm(name)
  local dfd, last, e0 = open_parent(name)
  if not dfd then
    if e0 == ENOENT then return true end          -- its directory is missing: so is the file
    return nil, last
  end
  local r = C.unlinkat(dfd, last, 0)
  local e = ffi.errno()
  C.close(dfd)
  if r ~= 0 then
    if e == ENOENT then return true end
    return errno_text(name, e)
  end
  return true
end

--- The byte offsets off_t holds: pwrite(2) at 2^63 or beyond cannot even be asked for (EINVAL).
local MAX_OFFSET = 2 ^ 63

--- The one line of a write past the largest file the file system allows (EFBIG, or an offset off_t cannot hold).
local function past_limit(name, n, pos, e)
  local at = pos < 0 and "appended" or ("at byte offset %.0f"):format(pos)
  return ("%s: %d bytes %s: past the largest file the file system allows (%s)"):format(M.escape(name), n, at,
    ffi.string(C.strerror(e)))
end

--- copybuffer's target opened for writing (`flags`: O_APPEND or 0) in its confined directory: fd, dirfd (the caller
--- closes both), its last component, and whether this call created it (O_EXCL first; an existing file is opened
--- without O_CREAT, a symbolic link refused as open_file refuses it); or nil, err.
function open_target(name, flags)
  local dfd, last = open_parent(name)
  if not dfd then return nil, last end
  local mode, base = ffi.new("int", 438), bor(O_WRONLY, flags, O_NOFOLLOW, O_CLOEXEC, O_NONBLOCK)
  local fd = C.openat(dfd, last, bor(base, O_CREAT, O_EXCL), mode)
  if fd >= 0 then return fd, dfd, last, true end
  local e = ffi.errno()
  if e == EEXIST then fd = C.openat(dfd, last, base); e = ffi.errno() end
  if fd >= 0 then
    local kind = not_regular(fd)
    if not kind then return fd, dfd, last, false end
    C.close(fd); C.close(dfd)
    return nil, ("%s: not a regular file (%s)"):format(M.escape(name), kind)
  end
  local nx = e == ENXIO and enxio_text(dfd, name, last)
  C.close(dfd)
  if e == 40 then return nil, M.escape(name) .. ": is a symbolic link (not followed)" end
  if nx then return nil, nx end
  local _, err = errno_text(name, e)
  return nil, err
end

--- The size of the file open on fd (statx, stx_size: the uint64 at 40), or nil.
function file_size(fd)
  if C.statx(fd, "", AT_EMPTY_PATH, 0x200, STX) ~= 0 then return nil end       -- STATX_SIZE
  return tonumber(ffi.cast("uint64_t *", STX + 40)[0])
end

--- copybuffer(bytes, file, pos): appended (pos < 0) or written at byte offset pos.  A failed write leaves no half
--- file: a file this call created is removed again, an existing one cut back to the size it had (bytes it held are
--- not restored where a pwrite overwrote them before failing).  An offset past the largest file the file system
--- allows (EFBIG; 2^63 and beyond, which off_t cannot hold, refused before the file is touched) is that one line.
function M.copybuffer(bytes, name, pos)
  if pos >= MAX_OFFSET then return nil, past_limit(name, #bytes, pos, EINVAL) end
  local fd, dfd, last, created = open_target(name, pos < 0 and O_APPEND or 0)
  if not fd then return nil, dfd end
  local size = not created and file_size(fd)
  local ok, werr, e = write_all(fd, ffi.cast("const uint8_t *", bytes), #bytes, name, pos >= 0 and pos or nil)
  if not ok then
    if created then C.unlinkat(dfd, last, 0) elseif size then C.ftruncate(fd, size) end
    C.close(fd); C.close(dfd)
    local limit = e == EFBIG or (e == EINVAL and pos >= 0)      -- EINVAL: pos + bytes past what off_t holds
    return nil, limit and past_limit(name, #bytes, pos, e) or werr
  end
  C.close(dfd)
  return close_checked(fd, name)
end

return M
