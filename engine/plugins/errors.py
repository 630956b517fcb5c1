"""Turn Lua error values into (offset/location, message) for clear user-facing errors."""
from __future__ import annotations

import re

_OFFSET = re.compile(r"offset (\d+): (.*)", re.S)


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
