"""The capture process: fills the packet ring from capture files (``python -m engine.capture``).

Started by the fast path (:mod:`engine.fastpath`) with the packet ring's
segment name and the files to read, in order.  Each file ends with an EOF
record, or an ERROR record naming the byte offset of the corruption (the
packets before it have been pushed); an END record closes the input.  The
per-packet loop is engine/lua/capture.lua.
"""
from __future__ import annotations

import argparse
import signal
import sys

from shm import segment
from shm.luajit import new_runtime

from .pcapfile import InputError, open_capture
from .lua_errors import split_lua_error

EXIT_INPUT = 3


def main(argv=None) -> int:
    """Read every file into the ring; exit 0, or 3 if some file had an input error."""
    ap = argparse.ArgumentParser(prog="luaprobe-capture")
    ap.add_argument("--ring", required=True)
    ap.add_argument("--ppid", type=int, required=True)
    ap.add_argument("--bell", default="", help="doorbell segment the consumer sleeps on")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    from workers.worker import _die_with_parent
    _die_with_parent(args.ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seg = segment.attach(args.ring)
    lua = new_runtime()
    cap = lua.eval("require('engine.lua.capture')")
    attach = lua.eval("function(a) return require('shm.ring').attach(a) end")
    ring = attach(seg.address)
    bell = segment.attach(args.bell) if args.bell else None
    if bell is not None:
        lua.eval("function(r, a) r.data_bell = require('ffi').cast('uint32_t *', a) end")(ring, bell.address)
    pkt = lua.eval("require('engine.lua.packet')")
    control = lua.eval("function(r, k, t) require('engine.lua.capture').control(r, k, t) end")
    run_file = lua.eval("function(r, a, s) return require('engine.lua.capture').file(r, a, s, function() return false end) end")
    failed = False
    for path in args.files:
        try:
            with open_capture(path) as c:
                try:
                    n, nbytes, err, off = run_file(ring, c.address, c.size)
                except Exception as e:                      # a bad file header raises in Lua
                    off, msg = split_lua_error(e)
                    raise InputError(path, off, msg) from None
            if err is not None:
                raise InputError(path, int(off), err.decode("utf-8", "replace"))
            control(ring, pkt.EOF, path.encode())
        except InputError as e:
            failed = True
            control(ring, pkt.ERROR, f"{e.offset}\t{e.message}\t{e.path}".encode())
    control(ring, pkt.END, b"")
    del cap
    return EXIT_INPUT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
