"""Flow-sharded fast paths: N fast-path processes share one probe's input (``--shards N``, docs/scale.md).

    coordinator (this module, in the CLI / supervisor child)
      ├─ capture process(es): files and --generate: one process hashes every packet into the shards'
      │    packet rings (engine/capture/capture.lua sharder); live: one process per shard, each with its own
      │    AF_PACKET socket in one fanout group (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG)
      └─ shard k = ``python -m luaprobe.engine.fastpath.shards SPEC``: a whole FastPath (decoder, flow table, plug-in VMs
           with ``T.contextid = k``, async workers, store writer) on packet ring k

The hash is symmetric: files and --generate hash the IP address pair (so both directions of a flow and
every fragment of a datagram go to one shard; non-IP goes to shard 0); live capture uses the kernel's
symmetric flow hash after defragmentation.  A shard therefore sees whole flows and produces exactly
the flow rows one fast path would.  Outputs merge in the store: counters are upserted per
(group, bucket, key, meter), the shards' parts combined by meter type (engine/store/meters.py), flows / alerts / resources are
produced by exactly one shard each.  Backend ``engine_monitor`` instances run in shard 0 only, so
windows and metronome fire once for the probe; TIME records (a new packet-time second, sent by the
capture process to the shards the opening packet did not go to) keep every shard's clock, bucket
closing and flow expiry on the global packet time.

The coordinator owns the rings and doorbells, so a shard that crashes is restarted on its ring and
continues where its last released batch ended (the batch in progress is processed again; the
crashed process's unflushed counters, live flows and in-flight tasks are lost, as with a fast-path
restart).  Other shards keep running.  Statistics: the merged snapshot has totals plus ``shards``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import shutil
import sys
import time
from contextlib import contextmanager

from luaprobe.engine.capture.process import PUSHED_OFFSET
from luaprobe.engine.daemon.control import write_json
from luaprobe.engine.fastpath.run import RunConfig, capture_socket_args, close_fds, file_args, file_sizes, shrunk_file
from luaprobe.engine.plugins.asyncruntime import BELL_SIZE
from luaprobe.engine.plugins.vm import PluginError
from luaprobe.shm import logs, segment
from luaprobe.shm.exits import EXIT_STOPPED, STOP_SIGNALS, describe_exit, early_stop
from luaprobe.shm.luajit import new_runtime
from luaprobe.shm.ring import region_size

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_PLUGIN = 0, 1, 3, 4
DIED = ".died"      #: beside a shard's summary file: {store_rows_lost, error} of a shard whose store writer died
MAX_RESTARTS = 5            #: restarts of one shard within RESTART_WINDOW s before the run fails
RESTART_WINDOW = 60.0
PROGRESS_OFFSET = 64        #: byte offset in a shard's doorbell segment of a uint64: packets its process has
                            #: released from its ring (written after every fill, read when the process dies);
                            #: the capture side's count is at capture.process.PUSHED_OFFSET
#: a shard's control signals, blocked until shard_main handles them: SIGUSR1 stop (files / --generate: the walk
#: ends after the batch under way, the rest of the ring is not_walked_at_stop), SIGTERM stop and end the T.async
#: drain (the input was all read, or the coordinator is gone), SIGHUP reload the backends
SHARD_SIGNALS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP}


def progress_word(bell_address: int):
    """The shard's packet counter in its doorbell segment (ctypes c_uint64 over shared memory)."""
    import ctypes
    return ctypes.c_uint64.from_address(bell_address + PROGRESS_OFFSET)


@contextmanager
def private_dir():
    """The coordinator's directory for shard specs, summaries and stats files: a luaprobe segment name under
    /dev/shm (``luaprobe-<pid>-shards.<n>.ns<tag>``, mode 0700), removed at the end; after a ``kill -9`` of the
    coordinator the next run, ``luaprobe start`` or ``luaprobe shm clean`` removes it with the other segments of
    dead owners (shm/segment.py ``sweep``: this user's only, pid reuse recognised)."""
    path = os.path.join(segment.SHM_DIR, segment.make_name("shards"))
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ShardError(RuntimeError):
    """A shard failed beyond restarting (crash loop)."""


def loaded_problems(cfg: RunConfig) -> list[str]:
    """The problem lines one fast path hands to ``cfg.on_loaded`` once its plug-ins are loaded (run.py FastPath.run,
    which `luaprobe start` refuses, exit 4): each file's load errors, unsupported script types and setup problems,
    and run.NOTHING_RUNS when no file has a type luaprobe runs.  A sharded run's shards load their plug-ins with no
    on_loaded, so the coordinator finds these once, before any shard starts (:meth:`ShardedRun.run`).  Each file is
    named in ``cfg.heartbeat_file`` before it loads (the supervisor's stall rule names it); a top level stuck in code
    the hook budget cannot interrupt ends the process with exit 4 (LoadWatch; ``cfg.on_fatal`` first)."""
    from luaprobe.engine.fastpath.run import NOTHING_RUNS
    from luaprobe.engine.plugins.discovery import probe_all
    from luaprobe.engine.plugins.loadwatch import LoadWatch

    def before(path):
        if cfg.heartbeat_file:
            from luaprobe.engine.daemon.control import open_private
            with open_private(cfg.heartbeat_file, "w") as f:
                f.write(path)
    on_stuck = (lambda line: cfg.on_fatal(EXIT_PLUGIN, line)) if cfg.on_fatal is not None else None
    try:
        with LoadWatch("luaprobe", EXIT_PLUGIN, on_stuck=on_stuck):
            infos = probe_all(cfg.plugins, cfg.lua_path, cfg.hook_budget, before=before)
    except PluginError as e:
        return [str(e)]
    if not infos:
        return ["no plug-in files found in " + ", ".join(cfg.plugins)] if cfg.plugins else []
    problems = [p for i in infos for p in i.problems + i.setup_problems]
    unsupported = [p for p in problems if "not supported" in p]
    if unsupported and not any(i.runnable_types for i in infos if not i.errors):
        problems.append(NOTHING_RUNS.format(n=len(unsupported), where="listed by luaprobe check"))
    return problems


def _spec(cfg: RunConfig, shard: dict) -> dict:
    d = dataclasses.asdict(dataclasses.replace(cfg, progress=None, on_loaded=None, capture_fds=None))
    d["shard"] = shard
    return d


def _config(spec: dict) -> RunConfig:
    from luaprobe.workers.pool import AsyncConfig
    spec = dict(spec)
    spec["async_config"] = AsyncConfig(**spec["async_config"])
    return RunConfig(**spec)


class ShardedRun:
    """Run ``cfg.shards`` fast paths over one input; :meth:`run` returns the merged summary
    (the layout of FastPath.run's, plus ``shards``: per-shard figures)."""

    def __init__(self, cfg: RunConfig):
        if cfg.shards < 2:
            raise ValueError("ShardedRun needs shards >= 2")
        self.cfg = cfg
        self.n = cfg.shards
        self._stop = False
        self.stopped_by = None
        self._reload = False
        self.procs: list = [None] * self.n
        self.restarts = [0] * self.n
        self.restart_times: list[list] = [[] for _ in range(self.n)]
        self.done = [False] * self.n
        self.deaths: list[dict] = []   #: shard processes that died: their unwritten results are lost
        self.captures: list[subprocess.Popen] = []
        self.capture_errors: list[str] = []
        #: a capture process killed or crashed (not an input error): {pid, status, how}, as FastPath.capture_death
        self.capture_death: dict | None = None
        self._live_stopped = False             # the other live capture processes were sent SIGTERM after a death
        self._last_stats = -1e9
        self._last_progress = -1e9
        self.pushed = None          #: files / --generate: packets the capture process committed to each ring

    # ------------------------------------------------------------ control (signal-safe)
    def request_stop(self) -> None:
        """Stop the input (the capture processes push END); the shards drain and finish normally."""
        self._stop = True
        self.stopped_by = self.stopped_by or "request"

    def request_reload_backends(self) -> None:
        """Backends live in shard 0: it reloads them (SIGHUP)."""
        self._reload = True

    # ------------------------------------------------------------ processes
    def _start_shard(self, k: int) -> None:
        path = os.path.join(self.tmp, f"shard{k}.json")
        with open(path, "w") as f:
            json.dump(self.specs[k], f, default=str)
        for stale in (self.specs[k]["shard"]["summary_file"], self.specs[k]["stats_file"]):
            if os.path.exists(stale):
                os.unlink(stale)
        # SIGTERM / SIGHUP blocked until shard_main has its handlers: one sent while the shard still starts up (a stop
        # before any input, PDEATHSIG) waits for them instead of killing it, which looked like a crash (restarted)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SHARD_SIGNALS)
        try:
            # the out_dir claim's descriptor (RunConfig.out_lock_fd, in the spec too): a shard finishing after our
            # death (PDEATHSIG: SIGTERM) and its store writer keep out_dir locked until they have exited
            lock = () if self.cfg.out_lock_fd is None else (self.cfg.out_lock_fd,)
            self.procs[k] = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.fastpath.shards", path],
                                             stdin=subprocess.DEVNULL, pass_fds=lock)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        logs.log.debug("shard %d: pid %d", k, self.procs[k].pid)
        if self._stop and not self.cfg.interface:     # restarted after a stop: it stops walking too
            self.procs[k].send_signal(signal.SIGUSR1)

    def _start_captures(self) -> None:
        cfg, me = self.cfg, str(os.getpid())
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # unblocked by the capture process
        try:
            if cfg.interface:
                group = os.getpid() & 0xFFFF
                for k in range(self.n):
                    self.captures.append(subprocess.Popen(
                        [sys.executable, "-m", "luaprobe.engine.capture.process", "--ring", self.rings[k].name,
                         "--bell", self.bells[k].name, "--ppid", me, "--interface", cfg.interface,
                         "--fanout", str(group), *(["--bpf", cfg.bpf] if cfg.bpf else []),
                         *capture_socket_args(cfg, k)],
                        stdin=subprocess.DEVNULL, pass_fds=cfg.capture_fds[k:k + 1] if cfg.capture_fds else ()))
            else:
                self.input_sizes = {} if cfg.generate else file_sizes(cfg.files)      # a file cut while read: run.py
                args = ["--generate", cfg.generate] if cfg.generate else \
                    file_args(cfg)
                self.captures.append(subprocess.Popen(
                    [sys.executable, "-m", "luaprobe.engine.capture.process",
                     "--ring", ",".join(r.name for r in self.rings),
                     "--bell", ",".join(b.name for b in self.bells), "--ppid", me, *args],
                    stdin=None if "-" in (cfg.files or ()) else subprocess.DEVNULL))   # --pcap -: our stdin
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            close_fds(cfg)

    def _captures_done(self) -> bool:
        return all(c.poll() is not None for c in self.captures)

    def _push_end(self, k: int) -> None:
        """Become ring k's producer (only once every capture process has exited) and push END."""
        self.lua.eval("function(a, k) local c = require('luaprobe.engine.capture.capture'); "
                      "c.control(require('luaprobe.shm.ring').attach(a), k, '') end")(self.rings[k].address, 3)

    def _check_shard(self, k: int) -> None:
        p = self.procs[k]
        rc = p.poll()
        if rc is None or self.done[k]:
            return
        summ = self.specs[k]["shard"]["summary_file"]
        if os.path.exists(summ):
            self.done[k] = True
            with open(summ) as f:
                self.summaries[k] = json.load(f)
            if self.summaries[k].get("plugin_error"):
                raise PluginError(self.summaries[k]["plugin_error"])
            return
        now = time.monotonic()
        self.restart_times[k] = [t for t in self.restart_times[k] if now - t < RESTART_WINDOW] + [now]
        if len(self.restart_times[k]) > MAX_RESTARTS:
            raise ShardError(f"shard {k} crashed {MAX_RESTARTS + 1} times within {RESTART_WINDOW:.0f} s "
                             f"(last exit status {rc})")
        self.restarts[k] += 1
        word = progress_word(self.bells[k].address)
        packets, word.value = int(word.value), 0
        death = {"shard": k, "pid": p.pid, "status": rc, "packets": packets, "store_rows_lost": 0}
        try:                               # its store writer died (shard_main): the rows it lost
            with open(summ + DIED) as f:
                note = json.load(f)
            os.unlink(summ + DIED)
            death.update(store_rows_lost=int(note["store_rows_lost"]), error=note["error"])
        except (OSError, ValueError, KeyError):
            pass
        self.deaths.append(death)
        logs.log.warning("shard %d (pid %d) ended with status %s after %d packets: restarting it on its packet "
                         "ring (the run's last line states the loss)", k, p.pid, rc, packets)
        time.sleep(min(5.0, 0.05 * 2 ** (len(self.restart_times[k]) - 1)))
        if self._captures_done():          # its END may have been consumed by the dead process
            self._push_end(k)
        self._start_shard(k)

    def _check_captures(self) -> None:
        """A capture process that died without END: count it and end the rings it fed.  Live, the first of the N
        that dies ends the run, as one fast path's capture death does: the others are stopped (each walks what it
        captured and pushes END)."""
        if self.cfg.interface and not self._ended_rings:
            self._stop_live_after_death()
        if self._ended_rings or not self._captures_done():
            return
        self._ended_rings = True
        bad = [c for c in self.captures if c.returncode not in (0, EXIT_INPUT)]
        if bad:
            cut = shrunk_file(getattr(self, "input_sizes", {}), bad[0].returncode)
            if cut:                        # the file was cut while it was read: an input error (exit 3)
                self.capture_errors.append(cut)
            else:                          # killed or crashed: a process of the run died (exit 1), as one fast path
                rc = bad[0].returncode
                self.capture_death = {"pid": bad[0].pid, "status": rc, "how": describe_exit(rc),
                                      "ring": self.captures.index(bad[0])}
            for k in range(self.n):
                if not self.done[k]:
                    self._push_end(k)

    def _stop_live_after_death(self) -> None:
        """Live: SIGTERM the capture processes still running once one of them died (killed or crashed)."""
        if not self._live_stopped and any(c.poll() not in (None, 0, EXIT_INPUT) for c in self.captures):
            self._live_stopped = True
            for c in self.captures:
                if c.poll() is None:
                    c.send_signal(signal.SIGTERM)

    # ------------------------------------------------------------ run
    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.monotonic()
        if cfg.on_loaded is not None:    # the daemon: what one fast path reports once loaded, found once, before any
            cfg.on_loaded(loaded_problems(cfg))   # shard starts (the shards are given no on_loaded; see _spec)
        os.makedirs(cfg.out_dir, exist_ok=True)
        rows_before = table_rows(cfg.out_dir, COMBINED_TABLES)
        self.flow_id_base = _max_flow_id(cfg.out_dir)
        segment.sweep()
        self.rings, self.bells, self.summaries = [], [], [None] * self.n
        self._ended_rings = False
        self.lua = new_runtime()
        fmt = self.lua.eval("function(a, c) require('luaprobe.shm.ring').format(a, c, true) end")
        # a stop while starting up is graceful too; taken before the private directory (a segment) exists: the CLI's
        # start-up handler raised between its mkdir and the try that removes it (test_stop_startup, --shards 2)
        old_handlers = self._catch_stop_signals()
        try:
            with private_dir() as tmp:
                self._run_in(tmp, fmt, old_handlers)
        finally:
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        summary = merge_summaries(self.summaries, time.monotonic() - t0, self.restarts, cfg)
        summary["input_errors"] += self.capture_errors
        if self.capture_death is not None:     # every packet it had put in the rings was walked (their END came after)
            death = dict(self.capture_death)   # live: its own shard's ring; files, --generate: every ring
            k = death.pop("ring")
            summary["capture_death"] = dict(death, packets=summary["shards"][k]["packets"] if cfg.interface
                                            else summary["packets"])
        summary["shard_deaths"] = self.deaths
        summary["store_rows_lost"] = sum(d["store_rows_lost"] for d in self.deaths)   # rows dead writers lost
        combined_rows(summary, rows_before, table_rows(cfg.out_dir, COMBINED_TABLES))
        if self.pushed is not None:
            summary.update(packet_accounting(self.pushed, summary["shards"]))
        summary["stopped_by"] = self.stopped_by
        from luaprobe.engine.store.writer import StoreWriter
        path = os.path.join(cfg.out_dir, "luaprobe.sqlite")
        store = StoreWriter(path, lock_fd=cfg.out_lock_fd)
        store.write("run", [(k, json.dumps(v, default=str)) for k, v in summary.items()])
        summary["store"] = merge_store(path, store.close(), self.summaries)
        summary["closed_s"] = round(time.monotonic() - t0, 3)   # as one fast path's: until the database is closed
        return summary

    def _run_in(self, tmp: str, fmt, old_handlers: dict) -> None:
        """The run proper, in the private directory ``tmp``: rings, shards, captures, until every shard is done;
        the finally kills what is left and unlinks every segment (stop signals ignored meanwhile)."""
        cfg = self.cfg
        self.tmp = tmp
        try:
            for k in range(self.n):
                self.rings.append(segment.create(f"pkt{k}", region_size(cfg.packet_ring_size, hints=True)))
                fmt(self.rings[k].address, cfg.packet_ring_size)
                self.bells.append(segment.create(f"bell{k}", BELL_SIZE))
            self.specs = [_spec(cfg, {"index": k, "count": self.n, "ring": self.rings[k].name,
                                      "bell": self.bells[k].name, "coordinator": os.getpid(),
                                      "flow_id_base": self.flow_id_base,
                                      "summary_file": os.path.join(tmp, f"summary{k}.json")})
                          | {"stats_file": os.path.join(tmp, f"stats{k}.json"),
                             "stats_interval": min(cfg.stats_interval, 0.25)}
                          for k in range(self.n)]
            for k in range(self.n):
                self._start_shard(k)
            if cfg.interface:                 # hooks ready (first snapshot written) before packets flow
                while not all(os.path.exists(s["stats_file"]) for s in self.specs) and not self._stop:
                    for k in range(self.n):
                        self._check_shard(k)
                    time.sleep(0.02)
            if self._stop:                    # stopped before any input: the rings just end
                self._ended_rings = True
                for k in range(self.n):
                    self._push_end(k)
            else:
                self._start_captures()
            stopping = False
            while not all(self.done):
                if self._stop and not stopping:
                    stopping = True
                    src = f"live capture on {cfg.interface}" if cfg.interface else \
                        "the generator" if cfg.generate else "reading the capture files"
                    logs.log.info("stop requested (%s): stopping %s, then draining %d shards (send the signal "
                                  "again to stop hard)", self.stopped_by, src, self.n)
                    for c in self.captures:
                        if c.poll() is None:
                            c.send_signal(signal.SIGTERM)
                    if not cfg.interface:                   # files / --generate: each shard ends its walk after
                        for k, p in enumerate(self.procs):  # the batch under way, as one fast path does (live:
                            if not self.done[k] and p is not None and p.poll() is None:   # the ring is walked)
                                p.send_signal(signal.SIGUSR1)
                    if self.stopped_by in EXIT_STOPPED and self._captures_done() \
                            and not self.capture_errors and self.capture_death is None:   # the whole input read:
                        for k, p in enumerate(self.procs):      # the shards end their T.async drain
                            if not self.done[k] and p is not None and p.poll() is None:
                                p.send_signal(signal.SIGTERM)
                if self._reload:
                    self._reload = False
                    if self.procs[0].poll() is None:
                        self.procs[0].send_signal(signal.SIGHUP)
                for k in range(self.n):
                    self._check_shard(k)
                self._check_captures()
                self._maybe_stats()
                time.sleep(0.02)
            for c in self.captures:
                c.wait(timeout=30)
            if not cfg.interface:
                import ctypes
                self.pushed = [int(ctypes.c_uint64.from_address(b.address + PUSHED_OFFSET).value)
                               for b in self.bells]
        finally:
            for signum in old_handlers:     # the clean-up is not cut short by a late stop signal; run() gives the
                signal.signal(signum, signal.SIG_IGN)   # handlers back once the private directory is gone too
            self._kill_all()
            segment.sweep()          # a hard stop SIGKILLs the shards: their files/worker rings are ours to unlink
            close_fds(cfg)
            for s in self.rings + self.bells:
                s.close()

    def _catch_stop_signals(self) -> dict:
        """SIGINT / SIGTERM stop the input cleanly, a second one interrupts (as FastPath does); only signals
        nobody else handles are taken (the supervised child keeps its own).  Returns the previous handlers."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            self.stopped_by = signal.Signals(signum).name
        return {s: signal.signal(s, handler) for s in STOP_SIGNALS
                if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, early_stop)}

    def _kill_all(self) -> None:
        for p in [*self.procs, *self.captures]:
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait()

    # ------------------------------------------------------------ statistics
    def shard_snapshots(self) -> list:
        out = []
        for k, spec in enumerate(self.specs):
            try:
                with open(spec["stats_file"]) as f:
                    snap = json.load(f)
            except (OSError, ValueError):
                snap = {}
            out.append(snap)
        return out

    def snapshot(self) -> dict:
        """Totals over the shards plus ``shards`` (each shard's FastPath.snapshot with shard/pid/restarts)."""
        snaps = self.shard_snapshots()
        tot = {"time": time.time(), "packet_time": max((s.get("packet_time") or 0 for s in snaps), default=0)}
        for key in ("packets", "bytes", "flows", "flows_live"):
            tot[key] = sum(s.get(key, 0) or 0 for s in snaps)
        tot["rings"] = {"packet": {f: sum(s.get("rings", {}).get("packet", {}).get(f, 0) for s in snaps)
                                   for f in ("records", "bytes", "capacity")}}
        tot["drops"] = _sum_dicts([s.get("drops", {}) for s in snaps])
        if self.cfg.interface:                 # every capture socket is set up (in the fanout group)
            tot["capturing"] = all(s.get("capturing") for s in snaps)
        tot["shard_deaths"] = list(self.deaths)
        tot["store_rows_lost"] = sum(d["store_rows_lost"] for d in self.deaths)
        procs = {"fastpath": os.getpid(), "shards": [p.pid if p else None for p in self.procs]}
        live = [c.pid for c in self.captures if c.poll() is None]
        if live:
            procs["capture"] = live[0] if len(live) == 1 else live
        stores = [s.get("processes", {}).get("store") for s in snaps]   # each shard's SQLite writer: the daemon's
        if any(stores):                                                  # stall rule looks for stopped ones too
            procs["store"] = [p for p in stores if p]
        tot["processes"] = procs
        tot["plugins"] = [dict(p, shard=k) for k, s in enumerate(snaps) for p in s.get("plugins", [])]
        tot["shards"] = [{"shard": k, "pid": self.procs[k].pid if self.procs[k] else None,
                          "restarts": self.restarts[k],
                          **{f: s.get(f, 0) for f in ("packets", "bytes", "flows", "flows_live")},
                          "packet_time": s.get("packet_time"), "rings": s.get("rings", {}),
                          "drops": s.get("drops", {})} for k, s in enumerate(snaps)]
        return tot

    def _maybe_stats(self) -> None:
        cfg, now = self.cfg, time.monotonic()
        if cfg.progress is not None and now - self._last_progress >= 0.25:
            self._last_progress = now
            snaps = self.shard_snapshots()
            cfg.progress(sum(s.get("packets", 0) for s in snaps), sum(s.get("bytes", 0) for s in snaps))
        if cfg.stats_file and now - self._last_stats >= cfg.stats_interval:
            self._last_stats = now
            write_json(cfg.stats_file, self.snapshot())     # owner-only, atomic (engine/daemon/control.py)


def _sum_dicts(ds: list) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def merge_values(vals: list):
    """One summary value from the shards' values of a key: numbers summed (booleans: any), dicts merged key by
    key, lists of strings as their sorted union (``analysers.names``), other lists joined; else (None, text) the
    first shard's value that is not None."""
    if vals and all(isinstance(v, bool) for v in vals):
        return any(vals)
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return sum(vals)
    if vals and all(isinstance(v, dict) for v in vals):
        keys = list(dict.fromkeys(k for v in vals for k in v))
        return {k: merge_values([v[k] for v in vals if k in v]) for k in keys}
    if vals and all(isinstance(v, list) for v in vals):
        if all(isinstance(x, str) for v in vals for x in v):
            return sorted(set().union(*vals))
        return [x for v in vals for x in v]
    return next((v for v in vals if v is not None), None)


def merge_warmup(vals: list) -> dict:
    """The shards' ``packet_loop_warmup`` (run.py _warmup_summary: each loop's first WARMUP_BATCHES batches) as
    one: ``batches``, ``packets`` and ``cpu_s`` summed (so packet_loop_cpu_s - cpu_s over packets - packets is the
    CPU per packet after every shard's warm-up, as for one fast path), ``s`` the longest (the loops run side by
    side).  Shards whose loop had fewer batches ({}) are left out; {} when none had a warm-up."""
    vals = [v for v in vals if v]
    if not vals:
        return {}
    return {"batches": sum(v["batches"] for v in vals), "packets": sum(v["packets"] for v in vals),
            "s": max(v["s"] for v in vals), "cpu_s": round(sum(v["cpu_s"] for v in vals), 4)}


PREFAULT_COUNTS = ("pages", "calls", "cpu_s", "wakeups", "records_mapped_by_fast_path")


def merge_prefault(vals: list) -> dict | None:
    """The shards' ``flow_prefault`` (run.py _prefault_summary: one prefault helper thread per shard process) as one:
    ``helper`` true when every shard ran one, its counts summed, ``errno`` the first shard's refusal (0: none),
    ``reason`` the first shard's why-not.  None when no shard reported one.  (Summed as plain counts, True + True
    was ``"helper": 2``, two EINVALs ``"errno": 44``, and the reason was dropped.)"""
    vals = [v for v in vals if v]
    if not vals:
        return None
    out: dict = {"helper": all(v.get("helper") is True for v in vals)}
    for k in PREFAULT_COUNTS:
        nums = [v[k] for v in vals if k in v]
        if nums:
            out[k] = round(sum(nums), 4) if k == "cpu_s" else sum(nums)
    if any("errno" in v for v in vals):
        out["errno"] = next((v["errno"] for v in vals if v.get("errno")), 0)
    reason = next((v["reason"] for v in vals if v.get("reason")), None)
    if reason is not None:
        out["reason"] = reason
    return out


#: Tables whose rows the store writer combines from several shards' rows (counters: an upsert by meter type;
#: flow_toppers: every shard's part of a bucket ranked again): a sharded run's ``rows_written`` for these is what
#: the table gained, counted by the coordinator before and after the run, not the shards' writes summed.
COMBINED_TABLES = ("counters", "flow_toppers")


def table_rows(out_dir: str, tables: tuple) -> dict:
    """{table: rows} of the store in ``out_dir`` (0 for a table or a store not made yet)."""
    import sqlite3
    path = os.path.join(out_dir, "luaprobe.sqlite")
    if not os.path.exists(path):
        return dict.fromkeys(tables, 0)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {t: _count(con, t) for t in tables}
    finally:
        con.close()


def _count(con, table: str) -> int:
    import sqlite3
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:                     # no such table yet
        return 0


def combined_rows(summary: dict, before: dict, after: dict) -> None:
    """``rows_written`` of the COMBINED_TABLES the shards wrote as the rows each table gained (``after`` - ``before``,
    {table: rows}), as one fast path counts them; ``flow_backends.toppers_written`` the same for flow_toppers.
    The shards' own writes stay in ``shards[k].rows_written``.  In place."""
    rw = summary["rows_written"]
    for t in COMBINED_TABLES:
        if t in rw:
            rw[t] = after[t] - before[t]
    fb = summary.get("flow_backends") or {}
    if "toppers_written" in fb and "flow_toppers" in rw:
        fb["toppers_written"] = rw["flow_toppers"]


def merge_store(path: str, own: dict | None, parts: list) -> dict:
    """The ``store`` entry of a sharded summary, laid out as one fast path's: the rows each kind's statements wrote,
    ``bad_rows`` and ``commits`` summed over the shards' writers and the coordinator's (``own``: its
    StoreWriter.close() report, whose ``run`` rows these are), ``errors`` listed, ``returncode`` the first non-zero.
    Statements, not rows the database got (``rows_written``): a counter row that two shards update is two, a group
    that every shard declares is N.  Each writer's report is also in ``shards[k].store``."""
    reports = [(p or {}).get("store") or {} for p in parts] + [own or {}]
    return {"path": path, "rows": _sum_dicts([r.get("rows", {}) for r in reports]),
            "bad_rows": _sum_dicts([r.get("bad_rows", {}) for r in reports]),
            "errors": [e for r in reports for e in r.get("errors", [])],
            "commits": sum(r.get("commits", 0) for r in reports),
            "returncode": next((r["returncode"] for r in reports if r.get("returncode")), 0)}


def _max_flow_id(out_dir: str) -> int:
    """The largest flows id in the store before a run (0: none, or no store yet): shard k's writer numbers its rows
    of the run from there (engine/store/writer.py _Writer._flow_ids)."""
    import sqlite3
    path = os.path.join(out_dir, "luaprobe.sqlite")
    if not os.path.exists(path):
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT max(id) FROM flows").fetchone()[0] or 0
    except sqlite3.OperationalError:                     # no flows table yet
        return 0
    finally:
        con.close()


def merge_summaries(parts: list, elapsed: float, restarts: list, cfg: RunConfig) -> dict:
    """One run summary from the shards' (FastPath.run layout): counts summed, plug-in rows tagged with
    their shard, problems and input errors once each, ``shards`` with each shard's own figures."""
    parts = [p or {} for p in parts]
    out = {"elapsed_s": round(elapsed, 3), "files": cfg.files,
           "files_done": list(dict.fromkeys(f for p in parts for f in p.get("files_done", []))),
           "input_errors": list(dict.fromkeys(e for p in parts for e in p.get("input_errors", [])))}
    for key in ("packets", "bytes", "truncated_headers", "non_ip", "flows", "flow_table_full_drops"):
        out[key] = sum(p.get(key, 0) for p in parts)
    out["drops"] = _sum_dicts([p.get("drops", {}) for p in parts])
    if cfg.interface:
        out.update(interface=cfg.interface, bpf=cfg.bpf, captured_live=sum(p.get("captured_live", 0) for p in parts),
                   kernel_packets=sum(p.get("kernel_packets", 0) for p in parts),
                   loopback_outgoing=sum(p.get("loopback_outgoing", 0) for p in parts))
    out["plugin_problems"] = list(dict.fromkeys(e for p in parts for e in p.get("plugin_problems", [])))
    out["plugins"] = [dict(pl, shard=k) for k, p in enumerate(parts) for pl in p.get("plugins", [])]
    out["rows_written"] = _sum_dicts([p.get("rows_written", {}) for p in parts])
    out["declared_groups"] = {}
    for kind in sorted({k for p in parts for k in p.get("declared_groups", {})}):   # upserts: the union, not a sum
        union = sorted({g for p in parts for g in p.get("declared_groups", {}).get(kind, [])})
        out["declared_groups"][kind] = union
        out["rows_written"][kind] = len(union)
    if any("key_info_keys" in p for p in parts):      # one label per (group, key) in the store: the union
        out["rows_written"]["key_info"] = len({k for p in parts for k in p.get("key_info_keys", [])})
    out["filex"] = [dict(x, shard=k) for k, p in enumerate(parts) for x in p.get("filex", [])]
    out["backend_reloads"] = parts[0].get("backend_reloads", 0)
    out["flow_table_pages"] = next((p["flow_table_pages"] for p in parts if p.get("flow_table_pages")), None)
    out["flow_prefault"] = merge_prefault([p.get("flow_prefault") for p in parts if "flow_prefault" in p])
    out["cpus_pinned"] = None                 # N fast paths and their capture are left to the scheduler (_pin)
    out["capture_death"] = None               # the coordinator's capture processes: set by ShardedRun.run
    out["packet_loop_warmup"] = merge_warmup([p.get("packet_loop_warmup") for p in parts])
    done = set(out) | {"store", "shards", "stopped_by", "stopped_during", "packet_loop_s", "packet_storage",
                       "closed_s", "key_info_keys"}
    for key in [k for p in parts for k in p if k not in done]:    # other counts: summed, names: their union
        out[key] = merge_values([p[key] for p in parts if key in p])
        done.add(key)
    out["packet_loop_s"] = max((p.get("packet_loop_s", 0) for p in parts), default=0)
    out["stopped_by"] = next((p["stopped_by"] for p in parts if p.get("stopped_by")), None)
    out["stopped_during"] = "drain" if any(p.get("stopped_during") == "drain" for p in parts) else None
    stores = [dict(p["packet_storage"], shard=k) for k, p in enumerate(parts) if p.get("packet_storage")]
    if stores:
        out["packet_storage"] = stores
    out["shards"] = [{"shard": k, "restarts": restarts[k], "summary": p.get("packets") is not None,
                      **{f: p.get(f, 0) for f in ("packets", "not_walked_at_stop", "bytes", "flows", "elapsed_s")},
                      "rows_written": p.get("rows_written", {}),     # this shard's writes (counter upserts)
                      "store": {k: v for k, v in (p.get("store") or {}).items() if k != "path"}}
                     for k, p in enumerate(parts)]
    return logs.printable(out)            # file names that are not UTF-8 as \xNN (shm/logs.py)


def packet_accounting(pushed: list, shards: list) -> dict:
    """Where every packet the capture process read went (files and --generate; docs/scale.md "Faults"):
    ``packets_read`` (committed to the shards' rings, counted by the capture process) == ``packets`` (walked by
    the shard processes that finished, whose results are written) + ``not_walked_at_stop`` (passed over after a
    stop by those processes) + ``packets_lost`` (released from the ring by shard processes that died: their
    results not yet written are lost).  Per shard in ``shards``: ``read`` / ``packets`` / ``not_walked_at_stop`` /
    ``lost``.  Exact: a restarted shard continues at its predecessor's release point."""
    lost = 0
    for sh, read in zip(shards, pushed):
        sh["read"], sh["lost"] = read, read - sh["packets"] - sh.get("not_walked_at_stop", 0)
        lost += sh["lost"]
    return {"packets_read": sum(pushed), "packets_lost": lost}


def make_run(cfg: RunConfig):
    """FastPath for one shard, ShardedRun for more (what the CLI and the supervisor child run)."""
    if cfg.shards > 1:
        return ShardedRun(cfg)
    from luaprobe.engine.fastpath.run import FastPath
    return FastPath(cfg)


# ---------------------------------------------------------------- one shard process
def shard_main(spec_path: str) -> int:
    """``python -m luaprobe.engine.fastpath.shards SPEC``: run FastPath on shard ring; the summary goes to summary_file."""
    import ctypes
    from luaprobe.engine.fastpath.run import FastPath
    from luaprobe.engine.store.writer import StoreDied
    with open(spec_path) as f:
        cfg = _config(json.load(f))
    signal.signal(signal.SIGINT, signal.SIG_IGN)            # ^C reaches the coordinator, which stops the input
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)      # PR_SET_PDEATHSIG: coordinator gone -> finish
    if os.getppid() != cfg.shard["coordinator"]:
        return EXIT_INTERNAL
    logs.setup()                                            # the level the CLI gave its children (-q, -v)
    fp = FastPath(cfg)
    signal.signal(signal.SIGTERM, lambda *_: fp.request_stop(end_drain=True))   # the coordinator's, or PDEATHSIG
    signal.signal(signal.SIGHUP, lambda *_: fp.request_reload_backends())
    signal.signal(signal.SIGUSR1, lambda *_: fp.request_stop())                  # the coordinator's stop (files)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHARD_SIGNALS)   # blocked by ShardedRun._start_shard
    out = cfg.shard["summary_file"]
    try:
        summary = fp.run()
    except PluginError as e:
        summary, rc = {"plugin_error": str(e)}, EXIT_PLUGIN
    except StoreDied as e:          # its writer died (killed, disk full): a crash the coordinator restarts and counts
        logs.log.error("shard %d: %s", cfg.shard["index"], e)
        _write_json(out + DIED, {"store_rows_lost": e.rows_lost, "error": str(e)})
        return EXIT_INTERNAL
    else:
        rc = EXIT_INPUT if summary["input_errors"] else EXIT_OK
    _write_json(out, summary)
    return rc


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(shard_main(sys.argv[1]))
