"""One plug-in instance in its own LuaJIT VM, with its T.async worker pool."""
from __future__ import annotations

import os

from luaprobe.shm.luajit import new_runtime, table
from luaprobe.workers.pool import AsyncConfig, WorkerPool

from luaprobe.shm import logs
from luaprobe.shm.searchpath import plugin_dirs
from luaprobe.workers.limits import MAX_WORKERS


class PluginError(Exception):
    """A plug-in that cannot be loaded; the message names file:line."""


def _text(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _names_async(path: str) -> bool:
    """The plug-in file names ``async`` (``T.async``, ``request_async_workers``), as engine/fastpath/run.py
    ``mentions_async`` asks for the warm spare; an unreadable file counts as naming it."""
    try:
        with open(path, "rb") as f:
            return b"async" in f.read()
    except OSError:
        return True


class PluginVM:
    """Load ``path`` into a fresh VM (T and T.async ready before the chunk runs) and start its workers."""

    def __init__(self, path: str, *, instance: str = "0", enginetype: str = "frontend", lua_path=(),
                 async_config: AsyncConfig | None = None, bell=None, start_workers: bool | str = True,
                 pipeline: str | None = None, groups: dict | None = None, protocols=(),
                 group_names: dict | None = None, contextid: int = 0, max_memory: int | None = None,
                 load_budget: float = 0.0, spare=None, args: str | None = None):
        self._spare = spare              # workers/spare.py: the run's warm worker process, for the first worker
        self.path = os.path.abspath(path)
        self.instance = instance
        self.lua_path = list(lua_path)
        self.config = async_config or AsyncConfig()
        self.lua = new_runtime(plugin_dirs(self.path, self.lua_path))
        self._limit = None
        if max_memory:                   # LuaJIT's allocator with a byte count (engine/plugins/_lpwatch.c)
            self._limit = self.lua.eval("function(n) return require('luaprobe.engine.plugins.watchdog')"
                                        ".limit_memory(n) end")
            self.set_memory_limit(max_memory)
        boot = self.lua.eval("function(o) return require('luaprobe.engine.plugins.host').boot(o) end")
        host, err = boot(table(self.lua, {
            "path": self.path, "instance": instance, "enginetype": enginetype,
            "log": logs.lua_log, "print": logs.lua_print, "overflow_limit": self.config.overflow_limit,
            "max_record": self.config.ring_size // 2 - 8,          # shm/ring.lua: a record fits half the ring
            "pipeline": pipeline, "groups": self._groups_table(groups) if pipeline else None,
            "protocols": self.lua.table_from([table(self.lua, {"guid": g, "name": nm}) for g, nm in protocols]),
            "group_names": self._names_table(group_names) if group_names else None,
            "contextid": contextid, "budget": float(load_budget),     # the top level's budget (s, 0 = off)
            "args": args,                                              # T.args (run --args, the --lua-input's)
            "config": table(self.lua, self.config.env) if self.config.env else None,   # T.env (tenv.py)
        }))
        if host is None:
            raise PluginError(_text(err))
        self.host = host
        self.async_obj = host[b'async']
        self.pool = None
        self.nworkers = self.config.workers or self._requested_workers(host)
        self._poll = self.lua.eval("function(a, n, pace) return a:poll(n, pace) end")
        self._has = self.lua.eval("function(a) return a:has_results() end")
        self._pending = self.lua.eval("function(a) return a:pending() end")
        self._call = self.lua.eval("function(h, sub, name, ...) return h:call(sub, name, ...) end")
        self._bell = bell
        #: the pool started here, at load (not on the first task); the fast path waits for its workers before
        #: the packet loop (AsyncRuntime.wait_workers).  Not for a file that never names ``async``: `--workers N`
        #: / `[async] workers` apply to every plug-in, and started N idle processes for each instance of one that
        #: cannot schedule (a countergroup, an engine_monitor without T.async); it stays lazy instead
        self.eager = start_workers is True or (start_workers == "lazy" and self.nworkers > 1
                                               and _names_async(self.path))
        if self.eager:
            self._start_at_load()
        elif start_workers == "lazy":
            self.lua.eval("function(a, f) a:set_starter(f) end")(self.async_obj, self.start_workers)

    def _start_at_load(self) -> None:
        """Start the pool now.  "lazy" (the fast path) with more than one worker starts here too: a pool of N
        started by the first task spawned N processes inside that hook (64 workers: 1.7 s) and their start-up CPU
        (~60 ms each) then fell in the packet loop.  One worker stays lazy: the warm spare serves it (issue 11).
        Raises PluginError naming the plug-in when the channels or processes cannot be made."""
        try:
            self.start_workers()
        except Exception as e:  # noqa: BLE001 - OSError (segments, fork) or a LuaError (the VM's memory limit)
            self.close()
            why = e.strerror if isinstance(e, OSError) and e.strerror else _text(e.args[0] if e.args else e)
            raise PluginError(f"{self.path}: cannot start its {self.nworkers} T.async workers: {why}") from None

    def set_memory_limit(self, nbytes: int) -> None:
        """Allocations of this VM above `nbytes` fail with LUA_ERRMEM ("not enough memory") (a VM created
        with max_memory; the function is made before the limit, so raising it needs no new memory)."""
        self._limit(nbytes)

    def start_workers(self) -> None:
        """Start this VM's worker pool (called at load, or on the first task when lazy and one worker; again after
        a start a Lua error interrupted, which it completes)."""
        if self.pool is None:
            remote = self.lua.eval("function(h) return h.plugin.async_remote ~= false end")(self.host)
            self.pool = WorkerPool(self.lua, self.async_obj, nworkers=self.nworkers, script=self.path,
                                   lua_path=self.lua_path, bell=self._bell, config=self.config,
                                   remote=bool(remote), spare=self._spare)
        self.pool.start()      # held before it starts: an interrupted start's channels are closed at stop

    def _groups_table(self, groups):
        """{GUID: {bucketsize, vartypes}} as a Lua table for the engine object."""
        out = self.lua.table()
        for guid, g in (groups or {}).items():
            vt = self.lua.table_from({int(m["id"]): int(m["vartype"]) for m in g["meters"]})
            out[guid.upper().encode()] = table(self.lua, {"bucketsize": g["bucketsize"], "vartypes": vt})
        return out

    def _names_table(self, names):
        """{kind: {name: guid}} as Lua tables (T.countergroups, T.alertgroups, ...)."""
        out = self.lua.table()
        for kind, m in names.items():
            out[kind.encode()] = self.lua.table_from({n.encode(): g.encode() for n, g in m.items()})
        return out

    def call(self, sub: str | None, name: str, *args):
        """Call a hook with error isolation; returns (ok, result)."""
        # hook names as Lua strings: a Python str reaches Lua as userdata and never matches a key
        sub = sub.encode() if isinstance(sub, str) else sub
        name = name.encode() if isinstance(name, str) else name
        return self._call(self.host, sub, name, *args)

    def exec(self, code: str):
        """Run Lua code in this VM (tests, tools)."""
        return self.lua.eval("function(h, c) return h:exec(c) end")(self.host, code.encode())

    def poll(self, max_results: int = 4096, pace: bool = False) -> int:
        """Deliver ready async results (onresult runs here); returns how many.  ``pace``: check the collector's
        pace now (engine/plugins/gcpace.lua) instead of at every 64th poll."""
        return int(self._poll(self.async_obj, max_results, pace))

    def has_results(self) -> bool:
        """True if a worker has published a result not yet delivered."""
        return bool(self._has(self.async_obj))

    def async_stats(self) -> dict:
        """The accounting counters (scheduled, ok, nil_result, error, timeout, dropped, pending, ...)."""
        snap = self.lua.eval("function(a) return a:snapshot() end")(self.async_obj)
        out = {_text(k): v for k, v in snap.items()}
        pool = self.pool
        out["worker_deaths"] = pool.deaths if pool else 0
        out["worker_recycles"] = pool.recycles if pool else 0
        out["worker_timeouts"] = pool.timeouts if pool else 0
        out["worker_stalls"] = pool.stalls if pool else 0
        return out

    def _requested_workers(self, host) -> int:
        """TrisulPlugin.request_async_workers (default 1), at most MAX_WORKERS (each worker is a process with its
        own rings): a value above it, not a number or below 1 runs MAX_WORKERS or 1 workers with one WARNING line
        naming the plug-in and the value (engine/plugins/host.lua Host:requested_workers)."""
        got = host.requested_workers(host, MAX_WORKERS)
        n, problem = got if isinstance(got, tuple) else (got, None)
        if problem is not None:
            logs.log.warning("%s: %s", self.path, _text(problem))
        return int(n)

    def pending(self) -> int:
        """Tasks scheduled and not finished."""
        return int(self._pending(self.async_obj))

    def set_origin(self, tus: int) -> None:
        """The run's first packet time (µs since the epoch): the time of tasks scheduled before the engine had one
        (onload); their results wait for it (engine/plugins/async.lua Async:set_origin, docs/async.md "Time")."""
        self.lua.eval("function(a, t) a:set_origin(t) end")(self.async_obj, int(tus))

    def stop_accepting(self) -> None:
        """Refuse new tasks from now on (they count as dropped)."""
        self.lua.eval("function(a) a:stop_accepting() end")(self.async_obj)

    def cut_off(self, reason: str, counter: str = "lost_at_deadline") -> None:
        """Fail every pending task as timeout with ``reason``, counted in the async stats' ``counter``
        (``lost_at_deadline`` or ``lost_at_stop``)."""
        self.lua.eval("function(a, r, c) a:cut_off(r, c) end")(self.async_obj, reason.encode(), counter.encode())

    def close(self) -> None:
        """Stop the workers and unlink their channels (no drain: see EngineRuntime.shutdown)."""
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
