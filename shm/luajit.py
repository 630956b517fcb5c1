"""LuaJIT 2.1 runtimes (lupa.luajit21) that can ``require`` luaprobe's own Lua modules.

Lua modules ship inside the Python packages (``shm/ring.lua``,
``workers/worker.lua``, ``engine/lua/*.lua``) and are required by dotted name
(``require "shm.ring"``).  ``luaprobe.config`` is preloaded with the path of
the _lpsync library that the Lua side loads with ``ffi.load``.
"""
from __future__ import annotations

import importlib.util
import os

from lupa import luajit21

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lpsync_path() -> str:
    """Path of the compiled _lpsync shared library."""
    spec = importlib.util.find_spec("shm._lpsync")
    if spec is None or not spec.origin:
        raise RuntimeError("shm._lpsync is not built: run `pip install -e .`")
    return spec.origin


def lua_path(dirs=()) -> str:
    """A package.path: the given directories first, then luaprobe's own modules."""
    parts = []
    for d in dirs:
        parts += [os.path.join(d, "?.lua"), os.path.join(d, "?", "init.lua")]
    parts.append(os.path.join(ROOT, "?.lua"))
    return ";".join(parts)


def new_runtime(search_dirs=(), encoding: str | None = None) -> luajit21.LuaRuntime:
    """A fresh LuaJIT VM with package.path set and luaprobe.config preloaded.

    With the default ``encoding=None`` Lua strings reach Python as bytes.
    """
    lua = luajit21.LuaRuntime(unpack_returned_tuples=True, register_eval=False, encoding=encoding)
    setup = lua.eval(
        "function(path, lpsync) package.path = path .. ';' .. package.path;"
        " package.loaded['luaprobe.config'] = {lpsync = lpsync} end"
    )
    setup(lua_path(search_dirs).encode(), lpsync_path().encode())
    return lua


def table(lua, mapping: dict):
    """A Lua table from a dict, with str keys and values encoded as UTF-8 Lua strings."""
    enc = {(k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
           for k, v in mapping.items() if v is not None}
    return lua.table_from(enc)


def method(lua, name: str):
    """A Python callable ``f(obj, *args)`` that runs ``obj:name(...)`` in ``lua``."""
    return lua.eval(f"function(o, ...) return o:{name}(...) end")
