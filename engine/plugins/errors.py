"""Turn Lua error values into (offset/location, message) for clear user-facing errors."""
from __future__ import annotations

import re

_OFFSET = re.compile(r"offset (\d+): (.*)", re.S)
#: Lua 5.1's `require` failure (loadlib.c ll_require): "<where>: module 'name' not found:" then one "\n\tno ..." per try
_NOT_FOUND = re.compile(r"^(?:(?P<where>[^\n]*?): )?module '(?P<name>[^']+)' not found:(?P<tries>.*)$", re.S)
_TRIED = re.compile(r"no file '([^']*)'")


def text(e) -> str:
    """The first line-block of a LuaError (without the stack traceback) as str."""
    msg = e.args[0] if getattr(e, "args", None) else str(e)
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg).split("\nstack traceback:", 1)[0]


def split_lua_error(e) -> tuple[int, str]:
    """(byte offset, message) from a pcapfile header error "offset N: message"; offset 0 otherwise."""
    t = text(e)
    m = _OFFSET.search(t)
    if m:
        return int(m.group(1)), m.group(2)
    return 0, t


def full_path(msg: str, path: str | None) -> str:
    """LuaJIT shortens a chunk name longer than LUA_IDSIZE (60) to "..." and its tail: put ``path`` back
    ("...est/x.lua:3: boom" -> "/very/long/test/x.lua:3: boom")."""
    if path and msg.startswith("..."):
        m = re.match(r"\.\.\.([^\n:]*):(\d+):", msg)
        if m and path.endswith(m.group(1)):
            return path + msg[3 + len(m.group(1)):]
    return msg


def load_error(msg: str, path: str | None = None) -> str:
    """A plug-in's load error as a person reads it: the traceback dropped, and a failed `require` (Lua 5.1
    loadlib.c: one "no file '...'" line per path tried, ~20 lines) folded into one line naming the file and
    line of the `require` and the module, plus one indented line with the directories searched::

        /p/x.lua:1: require "no_such_mod": module not found
            searched: /p, /usr/local/share/lua/5.1, ...

    Any other error is returned without its traceback; with ``path`` (the plug-in file) a chunk name LuaJIT
    shortened is made whole again (:func:`full_path`)."""
    msg = full_path(msg.split("\nstack traceback:", 1)[0].rstrip(), path)
    m = _NOT_FOUND.match(msg)
    if not m:
        return msg
    name = m.group("name")
    modpath = name.replace(".", "/")
    dirs: list[str] = []
    for path in _TRIED.findall(m.group("tries")):
        for tail in (f"{modpath}/init.lua", f"{modpath}.lua", f"{modpath}.so", f"{modpath.split('/')[0]}.so",
                     "loadall.so"):
            if path.endswith(tail):
                d = path[:-len(tail)].rstrip("/") or ("/" if path.startswith("/") else ".")
                if d not in dirs:
                    dirs.append(d)
                break
    line = (f'{m.group("where")}: ' if m.group("where") else "") + f'require "{name}": module not found'
    return line + (f"\n    searched: {', '.join(dirs)}" if dirs else "")


def first_line(msg: str) -> str:
    """The first line of ``msg``, or the two lines :func:`load_error` makes of a failed `require`."""
    lines = msg.splitlines() or [""]
    return "\n".join(lines[:2]) if len(lines) > 1 and lines[1].startswith("    searched: ") else lines[0]
