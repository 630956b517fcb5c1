"""LuaJIT 2.1 runtimes (lupa.luajit21) that can ``require`` luaprobe's own Lua modules.

Lua modules ship inside the Python packages (``shm/ring.lua``,
``workers/worker.lua``, ``engine/lua/*.lua``) and are required by dotted name
(``require "luaprobe.shm.ring"``).  ``luaprobe.config`` is preloaded with the path of
the _lpsync library that the Lua side loads with ``ffi.load``.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import struct

from lupa import luajit21

# C Lua modules (lsqlite3, luasocket, ...) are shared objects that expect the Lua C API (lua_pushinteger, ...) in
# the process's global symbol namespace, as a `lua` executable provides it.  lupa statically links LuaJIT into
# its extension module, which Python dlopens RTLD_LOCAL; re-opening it RTLD_GLOBAL | RTLD_NOLOAD promotes its
# exported lua_* / luaL_* symbols to global, so `require "lsqlite3"` resolves against this very VM library.
ctypes.CDLL(luajit21.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)

PACKAGES = ("engine", "workers", "shm")    #: luaprobe.<name> packages that hold Lua modules

_LOADER = r"""
local roots = ...
table.insert(package.loaders, 2, function(name)
  local top, rest = name:match("^luaprobe%.([%w_]+)%.(.+)$")
  local dir = top and roots[top]
  if not dir then return nil end
  local path = dir .. "/" .. rest:gsub("%.", "/") .. ".lua"
  local f = io.open(path, "rb")
  if not f then return "\n\tno file '" .. path .. "'" end
  f:close()
  return assert(loadfile(path))
end)
"""


def package_dirs() -> dict[str, str]:
    """{package: folder} for luaprobe.engine / luaprobe.workers / luaprobe.shm, wherever installed."""
    out = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(f"luaprobe.{name}")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"luaprobe.{name} is not installed: run `pip install -e .`")
        out[name] = list(spec.submodule_search_locations)[0]
    return out


EXTENSIONS = ("luaprobe.shm._lpsync", "luaprobe.engine.plugins._lpwatch", "luaprobe.engine.plugins._lpre2")
#: the compiled modules of setup.py, each built from the .c / .cc file of its name beside it in a source tree


def stale_extensions() -> list[str]:
    """"BUILT.so is older than SOURCE.c" for each compiled module of :data:`EXTENSIONS` whose source beside it
    (a source tree with an editable install; an installed wheel has none) was modified after the build: a `git
    pull` that changed shm/_lpsync.c without `pip install -e .`.  Such a tree ran on until LuaJIT met a new
    symbol, and then failed far from the cause (`luaprobe demo` after a pull: exit 3 "input error: sample.pcap:
    byte offset 0: ... undefined symbol: lp_cutguard_arm")."""
    out = []
    for name in EXTENSIONS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        built = spec.origin
        stem = os.path.join(os.path.dirname(built), name.rsplit(".", 1)[1])
        for src in (stem + ".c", stem + ".cc"):
            try:
                if os.stat(src).st_mtime > os.stat(built).st_mtime:
                    out.append(f"{built} is older than {src}")
            except OSError:
                continue
    return out


def lpsync_path() -> str:
    """Path of the compiled _lpsync shared library."""
    spec = importlib.util.find_spec("luaprobe.shm._lpsync")
    if spec is None or not spec.origin:
        raise RuntimeError("luaprobe.shm._lpsync is not built: run `pip install -e .`")
    return spec.origin


class AhoCorasick:
    """Multi-pattern search for T.ac (engine/plugins/ac.lua) on the maintained ahocorasick-rs library.

    ``patterns`` is a Lua array of strings.  :meth:`find` returns, packed as little-endian uint32 pairs, the
    1-based index of each pattern found and the 1-based position of its match's last byte (Trisul's obj_ac
    ``pos``), the first occurrence of each pattern, in the order the matches end; ``one`` stops at the first."""

    def __init__(self, patterns):
        import ahocorasick_rs
        pats = [bytes(patterns[k]) for k in range(1, len(patterns) + 1)]
        self._ac = ahocorasick_rs.BytesAhoCorasick(pats) if pats else None

    def find(self, text: bytes, one: bool) -> bytes:
        if self._ac is None:
            return b""
        seen: dict[int, int] = {}
        for idx, _start, end in self._ac.find_matches_as_indexes(bytes(text), overlapping=True):
            if idx not in seen:
                seen[idx] = end
                if one:
                    break
        return struct.pack(f"<{2 * len(seen)}I", *(v for kv in seen.items() for v in (kv[0] + 1, kv[1])))


@functools.cache
def _native_path(module: str) -> bytes | None:
    """Path of a compiled helper library named by its module (e.g. luaprobe.engine.plugins._lpre2), or None when
    it was not built (RE2 is optional)."""
    spec = importlib.util.find_spec(module)
    return os.fsencode(spec.origin) if spec is not None and spec.origin else None


def lua_path(dirs=()) -> str:
    """A package.path fragment for the given plug-in directories (luaprobe's own modules come from the loader)."""
    parts = []
    for d in dirs:
        parts += [os.path.join(d, "?.lua"), os.path.join(d, "?", "init.lua")]
    return ";".join(parts)


def lua_cpath(dirs=()) -> str:
    """A package.cpath fragment: C modules (``?.so``) in the given plug-in directories, before the system ones."""
    return ";".join(os.path.join(d, "?.so") for d in dirs)


def new_runtime(search_dirs=(), encoding: str | None = None) -> luajit21.LuaRuntime:
    """A fresh LuaJIT VM with package.path set and luaprobe.config preloaded.

    With the default ``encoding=None`` Lua strings reach Python as bytes.
    """
    lua = luajit21.LuaRuntime(unpack_returned_tuples=True, register_eval=False, encoding=encoding)
    setup = lua.eval(
        "function(path, cpath, lpsync, lpre2, ac, lpwatch) package.path = path .. ';' .. package.path;"
        " package.cpath = cpath .. ';' .. package.cpath;"
        " package.loaded['luaprobe.config'] = {lpsync = lpsync, lpre2 = lpre2, ac = ac, lpwatch = lpwatch} end"
    )
    setup(os.fsencode(lua_path(search_dirs)), os.fsencode(lua_cpath(search_dirs)), os.fsencode(lpsync_path()),
          _native_path("luaprobe.engine.plugins._lpre2"), AhoCorasick, _native_path("luaprobe.engine.plugins._lpwatch"))
    lua.execute(_LOADER, table(lua, package_dirs()))
    return lua


def error_text(e) -> str:
    """The first line-block of a LuaError (without the stack traceback) as str; any other exception with several
    arguments as Python shows it (an OSError's reason and file: before, its errno alone, "internal error:
    PermissionError: 13")."""
    args = getattr(e, "args", None)
    msg = args[0] if args and len(args) == 1 else str(e)
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg).split("\nstack traceback:", 1)[0]


def table(lua, mapping: dict):
    """A Lua table from a dict, with str keys and values encoded as UTF-8 Lua strings (surrogate escapes, as in
    file names from argv, back to their original bytes: ``os.fsencode``)."""
    enc = {(os.fsencode(k) if isinstance(k, str) else k): (os.fsencode(v) if isinstance(v, str) else v)
           for k, v in mapping.items() if v is not None}
    return lua.table_from(enc)


def method(lua, name: str):
    """A Python callable ``f(obj, *args)`` that runs ``obj:name(...)`` in ``lua``."""
    return lua.eval(f"function(o, ...) return o:{name}(...) end")
