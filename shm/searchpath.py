"""Lua search directories for a plug-in (shared by its VM and its workers' VMs)."""
from __future__ import annotations

import os


def env_dirs() -> list[str]:
    """Directories named by TRISUL_LUA_PATHS (colon or semicolon separated)."""
    raw = os.environ.get("TRISUL_LUA_PATHS", "")
    return [d for d in raw.replace(";", ":").split(":") if d]


#: Trisul's plugins/lua/helpers equivalent: modules scripts require from the probe (`debugger`)
HELPERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "plugins", "helpers")


def plugin_dirs(script: str | None, lua_path=()) -> list[str]:
    """package.path directories: the script's own directory, --lua-path dirs, TRISUL_LUA_PATHS, then the
    helpers directory (engine/plugins/helpers: `debugger`; luaprobe/engine/plugins/helpers when installed)."""
    dirs = []
    if script:
        dirs.append(os.path.dirname(os.path.abspath(script)))
    dirs += [os.path.abspath(d) for d in lua_path]
    dirs += [os.path.abspath(d) for d in env_dirs()]
    dirs.append(HELPERS_DIR)
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out
