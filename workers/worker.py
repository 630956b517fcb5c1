"""Entry point of one async worker process: build the LuaJIT VM, then hand control to workers/worker.lua.

Started by :class:`luaprobe.workers.pool.WorkerPool` as ``python -m luaprobe.workers.worker ...``.
The VM gets the same ``T`` and ``package.path`` as the plug-in that owns the
pool, so ``require`` works inside onexecute; it never runs the plug-in chunk.
Exit codes: 0 asked to exit or parent gone, 75 recycled after max tasks.

``python -m luaprobe.workers.worker --spare --ppid PID`` is a warm spare (workers/spare.py): it does its imports,
then reads its arguments as one line (a JSON array) from stdin and runs as a worker with them; EOF instead: exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from luaprobe.shm.exits import EXIT_RECYCLE, die_with_parent, ignore_stop_signals


def parse_args(argv=None) -> argparse.Namespace:
    """Command line given by the pool."""
    p = argparse.ArgumentParser(prog="luaprobe-worker")
    p.add_argument("--channel", required=True, help="channel segment name")
    p.add_argument("--bell", default="", help="doorbell segment name of the fast path")
    p.add_argument("--req-capacity", type=int, required=True)
    p.add_argument("--script", default="")
    p.add_argument("--lua-path", action="append", default=[])
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="T.env.get_config answer (engine/plugins/tenv.py)")
    p.add_argument("--slot", type=int, default=0)
    p.add_argument("--ppid", type=int, required=True)
    p.add_argument("--max-tasks", type=int, default=0)
    p.add_argument("--max-rss-mb", type=float, default=0.0, help="recycle after a task that left RSS above this")
    p.add_argument("--max-memory-mb", type=int, default=0,
                   help="MiB of Lua memory the VM may hold (0 = no limit): an onexecute above it fails")
    p.add_argument("--file-root", action="append", default=[], help="confine the file helpers beneath DIR")
    p.add_argument("--spin-us", type=float, default=0.0, help="poll this long after a task before sleeping")
    return p.parse_args(argv)


def build_vm(script: str, lua_path, slot: int, env=(), max_memory_mb: int = 0):
    """A LuaJIT VM with T (T.util, T.log*, T.K, T.host) and the plug-in's package.path; with
    ``max_memory_mb`` its allocations above that many MiB fail with "not enough memory" (the fast path's
    --plugin-memory-mb per plug-in VM, engine/plugins/_lpwatch.c), so an onexecute allocating without bound
    fails as a task error instead of growing the worker until task_timeout or the machine's OOM killer."""
    from luaprobe.shm import logs
    from luaprobe.shm.searchpath import plugin_dirs
    from luaprobe.shm.luajit import new_runtime, table

    lua = new_runtime(plugin_dirs(script or None, lua_path))
    install = lua.eval("function(opts) local tlib = require('luaprobe.engine.plugins.tlib');"
                       " local T = tlib.install(opts); tlib.wrap_print(opts); return T end")
    opts = table(lua, {
        "script": script or "worker",
        "instance": f"worker-{slot}",
        "enginetype": "worker",
        "log": logs.lua_log,
        "print": logs.lua_print,
    })
    conf = dict(p.split("=", 1) for p in env)       # --env KEY=VALUE: T.env.get_config (AsyncConfig.env)
    if conf:
        opts[b"config"] = table(lua, conf)
        opts[b"datapath"] = conf.get("App>DataDirectory", "").encode() or None
    install(opts)
    if max_memory_mb:
        lua.eval("function(n) return require('luaprobe.engine.plugins.watchdog').limit_memory(n) end")(
            max_memory_mb * 1048576)
    return lua


def wait_as_spare(argv) -> list | None:
    """A spare (``--spare --ppid PID``): the imports a worker needs, then its arguments from stdin (one line, a
    JSON array of strings; None at EOF: the run ended without using it).  stdin is /dev/null afterwards, as for a
    worker started directly."""
    die_with_parent(int(argv[argv.index("--ppid") + 1]))
    ignore_stop_signals()               # the parent decides when we stop (main())
    from luaprobe.shm import logs, segment, luajit, searchpath  # noqa: F401  (warm: the slow part of a start)
    luajit.new_runtime([])
    line = sys.stdin.buffer.readline()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    if not line:
        return None
    return [str(a) for a in json.loads(line)]


def main(argv=None, remote=None) -> int:
    """Run the worker until told to exit, recycled, or orphaned.  ``remote(args)`` (the Ray bridge,
    workers/raybridge.py) returns the function worker.lua hands DEFINE and EXEC requests to."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--spare":
        argv = wait_as_spare(argv)
        if argv is None:
            return 0
    args = parse_args(argv)
    die_with_parent(args.ppid)
    # the parent decides when we stop (it ends us by SIGKILL, pool.py; so does its death, PR_SET_PDEATHSIG): a
    # terminal's Ctrl-C or hangup, or a SIGTERM to the whole process group (`timeout`, systemd's control-group
    # stop), is the fast path's to handle.  Before, a group SIGTERM killed the workers ("async worker 1 killed by
    # SIGTERM; restarting") while the fast path was draining their tasks.
    ignore_stop_signals()     # and unblocked: we are born with them blocked (shm/exits.py, pool.py, spare.py)
    from luaprobe.shm import logs
    from luaprobe.shm import segment

    logs.setup()
    channel = segment.attach(args.channel)
    bell = segment.attach(args.bell) if args.bell else None
    lua = build_vm(args.script, args.lua_path, args.slot, args.env, args.max_memory_mb)
    from luaprobe.shm.luajit import table

    serve = lua.eval("function(o) return require('luaprobe.workers.worker').serve(o) end")
    try:
        reason = _serve(serve, table, lua, args, channel, bell, remote)
    except Exception as e:  # noqa: BLE001 - a fault of the loop itself: one log line, not a Python traceback
        from luaprobe.shm.luajit import error_text
        logs.log.error("async worker %s: %s (the worker ends; its task is reported as an error)", args.slot,
                       error_text(e))
        return 1
    sys.stdout.flush()
    return EXIT_RECYCLE if reason == b"recycle" else 0


def _serve(serve, table, lua, args, channel, bell, remote):
    """workers/worker.lua serve with this process's options; returns its reason to stop."""
    return serve(table(lua, {
        "channel": channel.address,
        "bell": bell.address if bell else None,
        "req_capacity": args.req_capacity,
        "ppid": args.ppid,
        "max_tasks": args.max_tasks,
        "max_rss": args.max_rss_mb * 1e6,
        "slot": args.slot,
        "spin_ns": args.spin_us * 1e3,
        "file_roots": lua.table_from([os.fsencode(r) for r in args.file_root]),
        "remote": remote(args) if remote else None,
    }))


if __name__ == "__main__":
    sys.exit(main())
