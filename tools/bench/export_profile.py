"""Where the end-of-run flow export's time goes (issue 10): one ``luaprobe run`` in this process with timers
around the export's stages, and the store writer's own CPU and I/O.

    .venv/bin/python tools/bench/export_profile.py run PLUGINS --pcap CAPTURE --out OUT -q

(the arguments are ``luaprobe``'s).  Prints, after the run, process CPU and wall seconds of each fast-path stage
summed over its calls -- the driver's Lua export (``flush_flows``), the rows built with numpy
(``flowrows.stored``, or ``columns`` + ``stored_rows`` in older checkouts), msgpack and the pipe
(``StoreWriter._ship``), the wait for the writer at the end (``StoreWriter.close``) -- then the fast-path
process's user / sys seconds, and the writer process's user / sys seconds, bytes written and read
(``/proc/self/io``: SQLite's WAL, checkpoints and temporary files) and its wall time from start to exit.
"""
from __future__ import annotations

import functools
import os
import resource
import sys
import tempfile
import time

from luaprobe.engine.fastpath import flowrows, run as fastpath_run
from luaprobe.engine.store import writer as store_writer

#: run by the writer's interpreter instead of ``-m luaprobe.engine.store.writer``: the module, then its report
WRITER_MAIN = r'''
import atexit, resource, runpy, sys, time
t0, report = time.monotonic(), sys.argv[1]
def done():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    with open(report, "w") as f:
        f.write(f"store writer: user {ru.ru_utime:.2f} s, sys {ru.ru_stime:.2f} s, written "
                f"{int(io['wchar']) >> 20} MiB, read {int(io['rchar']) >> 20} MiB, {time.monotonic() - t0:.2f} s wall\n")
atexit.register(done)
sys.argv = ["writer"] + sys.argv[4:]          # drop the report path and "-m luaprobe.engine.store.writer"
runpy.run_module("luaprobe.engine.store.writer", run_name="__main__")
'''

totals: dict[str, list] = {}


def timed(name: str, fn):
    """fn, adding its process CPU and wall seconds per call to totals[name]."""
    @functools.wraps(fn)
    def call(*a, **k):
        c0, t0 = time.process_time(), time.monotonic()
        try:
            return fn(*a, **k)
        finally:
            t = totals.setdefault(name, [0.0, 0.0, 0])
            t[0] += time.process_time() - c0
            t[1] += time.monotonic() - t0
            t[2] += 1
    return call


def main(argv: list[str]) -> int:
    work = tempfile.mkdtemp(prefix="lp-export-profile-")
    report = os.path.join(work, "writer.txt")
    script = os.path.join(work, "writer_main.py")
    with open(script, "w") as f:
        f.write(WRITER_MAIN)
    wrapper = os.path.join(work, "python")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} {script} {report} "$@"\n')
    os.chmod(wrapper, 0o700)
    init = store_writer.StoreWriter.__init__
    store_writer.StoreWriter.__init__ = lambda self, path, **kw: init(self, path, **{**kw, "python": wrapper})
    for name in ("stored", "columns", "stored_rows"):
        if hasattr(flowrows, name):
            setattr(flowrows, name, timed(name, getattr(flowrows, name)))
    method = fastpath_run.method
    fastpath_run.method = lambda lua, name: timed("lua flush_flows", method(lua, name)) \
        if name == "flush_flows" else method(lua, name)
    store_writer.StoreWriter._ship = timed("ship (msgpack + pipe)", store_writer.StoreWriter._ship)
    store_writer.StoreWriter.close = timed("close (wait for the writer)", store_writer.StoreWriter.close)
    fastpath_run.FastPath._end_flows = timed("_end_flows (whole export)", fastpath_run.FastPath._end_flows)
    from luaprobe.engine.daemon import cli
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    for name, (cpu, wall, calls) in totals.items():
        print(f"{name:30s} {cpu:7.3f} s CPU {wall:7.3f} s wall  {calls} calls", file=sys.stderr)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"fast-path process: user {ru.ru_utime:.2f} s, sys {ru.ru_stime:.2f} s", file=sys.stderr)
    if os.path.exists(report):
        print(open(report).read().strip(), file=sys.stderr)
    for p in (report, script, wrapper):
        if os.path.exists(p):
            os.unlink(p)
    os.rmdir(work)
    return rc or 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
