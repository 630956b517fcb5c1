"""Lua search directories for a plug-in (shared by its VM and its workers' VMs)."""
from __future__ import annotations

import os


def env_dirs() -> list[str]:
    """Directories named by TRISUL_LUA_PATHS (colon or semicolon separated)."""
    raw = os.environ.get("TRISUL_LUA_PATHS", "")
    return [d for d in raw.replace(";", ":").split(":") if d]


#: Trisul's plugins/lua/helpers equivalent: modules scripts require from the probe (`debugger`)
HELPERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "plugins", "helpers")


def search_path(plugins, lua_path=()) -> list[str]:
    """The search directories a run's plug-in VMs get as ``lua_path``: the ``--lua-path`` directories, then the
    PLUGIN arguments that are directories (absolute).  A plug-in found under one of them gets it on package.path
    as its parent search directory (Trisul: a script requires modules of its own directory, of the search
    directory it was found in, and of plugins/lua/helpers)."""
    out = [os.path.abspath(d) for d in lua_path]
    for p in plugins:
        a = os.path.abspath(p)
        if os.path.isdir(a) and a not in out:
            out.append(a)
    return out


def parent_search_dir(script: str, roots) -> str | None:
    """The deepest of ``roots`` that holds ``script`` in a subdirectory (None when the script sits at a root's top
    or under none): the plug-in's parent search directory."""
    here = os.path.dirname(os.path.abspath(script))
    best = None
    for r in roots:
        r = os.path.abspath(r)
        if here != r and here.startswith(r.rstrip(os.sep) + os.sep) and (best is None or len(r) > len(best)):
            best = r
    return best


def plugin_dirs(script: str | None, lua_path=()) -> list[str]:
    """package.path directories: the script's own directory, its parent search directory (the deepest
    --lua-path / PLUGIN directory / TRISUL_LUA_PATHS entry above it: :func:`search_path`), the --lua-path dirs,
    TRISUL_LUA_PATHS, then the helpers directory (engine/plugins/helpers: `debugger`, `JSON`;
    luaprobe/engine/plugins/helpers when installed)."""
    dirs = []
    if script:
        dirs.append(os.path.dirname(os.path.abspath(script)))
        parent = parent_search_dir(script, list(lua_path) + env_dirs())
        if parent:
            dirs.append(parent)
    dirs += [os.path.abspath(d) for d in lua_path]
    dirs += [os.path.abspath(d) for d in env_dirs()]
    dirs.append(HELPERS_DIR)
    return list(dict.fromkeys(dirs))            # each once, where it first comes
