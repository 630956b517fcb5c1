"""Turn Lua error values into (offset/location, message) for clear user-facing errors."""
from __future__ import annotations

import re

from luaprobe.shm.luajit import error_text

_OFFSET = re.compile(r"offset (\d+): (.*)", re.S)
#: Lua 5.1's `require` failure (loadlib.c ll_require): "<where>: module 'name' not found:" then one "\n\tno ..." per try
_NOT_FOUND = re.compile(r"^(?:(?P<where>[^\n]*?): )?module '(?P<name>[^']+)' not found:(?P<tries>.*)$", re.S)
_TRIED = re.compile(r"no file '([^']*)'")
#: Lua 5.1's Lua-file loader failing on a module it found (loadlib.c loaderror: a syntax error, an unreadable file):
#: "error loading module 'name' from file 'F':" then "\n\t" and luaL_loadfile's message ("F:2: ..." for a syntax error)
_LOADING = re.compile(r"error loading module '(?P<name>[^']+)' from file '(?P<file>[^']+)':\n\t(?P<msg>.*)$", re.S)


text = error_text      #: the first line-block of a LuaError as str (shm/luajit.py, which workers/ may import)


def split_lua_error(e) -> tuple[int, str]:
    """(byte offset, message) from a pcapfile header error "offset N: message"; offset 0 otherwise."""
    t = text(e)
    m = _OFFSET.search(t)
    if m:
        return int(m.group(1)), m.group(2)
    return 0, t


def same_chunk(name: str, path: str) -> bool:
    """The chunk name ``name`` in a Lua message or traceback is the file ``path``: the same, or LuaJIT's
    shortening of a name longer than LUA_IDSIZE (60): "..." and a tail of ``path``.  (errlog.lua has the Lua twin.)"""
    return name == path or (name.startswith("...") and path.endswith(name[3:]))


def full_path(msg: str, path: str | None) -> str:
    """A message located in a chunk whose name LuaJIT shortened (:func:`same_chunk`): put ``path`` back
    ("...est/x.lua:3: boom" -> "/very/long/test/x.lua:3: boom")."""
    if path and msg.startswith("..."):
        for m in re.finditer(r":\d+:", msg):      # the name may hold ':' or a newline itself (a directory name)
            if same_chunk(msg[:m.start()], path):
                return path + msg[m.start():]
    return msg


def load_error(msg: str, path: str | None = None) -> str:
    """A plug-in's load error as a person reads it: the traceback dropped, and a failed `require` (Lua 5.1
    loadlib.c: one "no file '...'" line per path tried, ~20 lines) folded into one line naming the file and
    line of the `require` and the module, plus one indented line with the directories searched::

        /p/x.lua:1: require "no_such_mod": module not found
            searched: /p, /usr/local/share/lua/5.1, ...

    Any other error is returned without its traceback; with ``path`` (the plug-in file) a chunk name LuaJIT
    shortened is made whole again (:func:`full_path`)."""
    head, _, tb = msg.partition("\nstack traceback:")
    msg = full_path(head.rstrip(), path)
    return _through_plugin(_fold_loading(_fold_not_found(msg)), tb, path)


def _fold_loading(msg: str) -> str:
    """A module that was found but does not load (a syntax error in a helper) in one line: Lua's two-line
    "error loading module 'm' from file '/p/m.lua':\\n\\t/p/m.lua:2: <name> expected near 'return'" becomes
    "/p/m.lua:2: <name> expected near 'return'" (the module's own file and line; a name LuaJIT shortened is made
    whole from the file Lua names), and any other reason is kept after the file: "error loading module 'm' from
    file '/p/m.lua': cannot read /p/m.lua"."""
    m = _LOADING.search(msg)
    if not m:
        return msg
    inner, file = " ".join(m.group("msg").split()), m.group("file")
    located = re.match(r"([^\n]*?):(\d+): ", inner)
    if located and same_chunk(located.group(1), file):
        inner = file + inner[len(located.group(1)):]
    else:
        inner = f"error loading module '{m.group('name')}' from file '{file}': {inner}"
    return msg[:m.start()] + inner


def _frame_line(tb: str, path: str) -> tuple[int, bool] | None:
    """(line, called require) of the plug-in's main-chunk frame in a Lua traceback, None when absent (LuaJIT may
    shorten the chunk name to "..." and its tail)."""
    frames = [f.strip() for f in tb.splitlines() if f.strip()]
    for k, f in enumerate(frames):
        m = re.match(r"(.*):(\d+): in main chunk$", f)
        if m and same_chunk(m.group(1), path):
            return int(m.group(2)), k > 0 and frames[k - 1] == "[C]: in function 'require'"
    return None


def _required_name(path: str, line: int) -> str | None:
    """The first module name `require`d on ``line`` of the plug-in file, None when it cannot be read there."""
    try:
        with open(path, "rb") as f:
            text_ = f.read().decode("utf-8", "replace").splitlines()[line - 1]
    except (OSError, IndexError):
        return None
    m = re.search(r"""\brequire\s*\(?\s*(?:"([^"]+)"|'([^']+)'|\[\[([^\]]+)\]\])""", text_)
    return m and (m.group(1) or m.group(2) or m.group(3))


def _through_plugin(msg: str, tb: str, path: str | None) -> str:
    """An error raised in a helper module while the plug-in's main chunk ran (a `require` chain: ssh-spy.lua
    requires ssh-dissect, which requires md5ffi, which raises) names the plug-in first::

        /p/ssh-spy.lua:10: require "ssh-dissect" failed: /p/md5ffi.lua:10: Cant load FFI libcrypto version

    An error located in the plug-in itself, or with no plug-in frame in the traceback, is left as it is."""
    if not path or not tb or msg.startswith(path + ":"):
        return msg
    frame = _frame_line(tb, path)
    if frame is None:
        return msg
    line, via_require = frame
    name = _required_name(path, line) if via_require else None
    return f'{path}:{line}: ' + (f'require "{name}" failed: ' if name else "") + msg


def _fold_not_found(msg: str) -> str:
    """Lua 5.1's "module 'x' not found:" and its "no file" lines as one line plus the directories searched."""
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
