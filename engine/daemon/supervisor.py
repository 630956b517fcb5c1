"""The luaprobe daemon: runs the fast path as a child process, restarts it, stops and reloads it.

    luaprobe start --config f.toml [--foreground]    (luaprobe.engine.daemon.cli -> cmd_start)
    python -m luaprobe.engine.daemon.supervisor --config f.toml --run-dir DIR            the daemon itself
    python -m luaprobe.engine.daemon.supervisor --child --config f.toml --run-dir DIR    one fast-path run

The supervisor never touches packets.  Its child is one ``FastPath(RunConfig(...)).run()`` with
``stats_file=<run>/stats.json``; the fast path supervises its own capture process and async workers.
A child that dies is restarted with exponential backoff; more than ``crash_loop_restarts`` restarts
within ``crash_loop_window`` seconds end in state ``failed: crash loop (last exit: ...)``.
``stop``/SIGTERM/SIGINT: SIGTERM to the child (graceful: input stops, ring and async tasks drain,
onunload, outputs flushed, shm unlinked), SIGKILL of the child's process tree after
``stop_deadline`` seconds and a sweep of its segments.  ``reload``/SIGHUP: the configuration is
re-validated, then the child is restarted the same graceful way (scripts are re-read).
See docs/operations.md.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time

import psutil

from luaprobe.shm import segment

from luaprobe.engine.daemon import config as config_mod
from luaprobe.engine.daemon import control, privileges
from luaprobe.engine.daemon.usage import UsageError, claim_out_dir, db_link
from luaprobe.shm.logs import log, one_line

from luaprobe.shm.exits import (EXIT_INPUT, EXIT_INTERNAL, EXIT_NOT_RUNNING, EXIT_OK, EXIT_PLUGIN,  # noqa: F401
                                EXIT_STOP_KILLED, EXIT_USAGE, describe_exit, stop_signals_decided)

ACCEPT_RETRY = 0.1          #: s before the control socket is polled again after accept() failed (EMFILE)
CLIENT_DEADLINE = 2.0       #: s a control client has to send its request line (Supervisor._read_client)
LOADING_STOP_GRACE = 5.0    #: s a fast path still loading its plug-ins gets to take a stop before it is killed
#: s a client (`luaprobe stop`, `start` stopping the daemon it started) waits beyond the stop's stop_deadline for
#: the supervisor to be gone (docs/operations.md: "still there `stop_deadline` + 15 s later")
STOP_WAIT_SLACK = 15.0
HEARTBEAT = "heartbeat"     #: run-dir file the fast path touches while it makes progress ([supervise] stall_timeout)


# Settings the supervisor itself holds from its start: a reload keeps the running value and says so.
RESTART_ONLY = (("stats", "prometheus_port"), ("stats", "json_lines_file"), ("run", "run_dir"))


RELOAD_PROBE_DEADLINE = 30.0    #: s a reload's plug-in probe may take with [fastpath] hook_budget = 0 (no budget)
PROBE_SLACK = 10.0               #: s added to hook budget + the load watch's grace (interpreter start-up, imports)


def probe_deadline(budget: float) -> float:
    """s the reload's plug-in probe (:func:`plugin_errors`) may run with [fastpath] hook_budget = ``budget`` s."""
    return budget + 2.0 + PROBE_SLACK if budget > 0 else RELOAD_PROBE_DEADLINE


def reload_timeout(status: dict) -> float:
    """s `luaprobe reload` waits for the supervisor's reply: it answers after probing the plug-ins under the hook
    budget of the configuration as it is on disk now (``status["config"]``, read here as the supervisor will read
    it), so the wait is that probe's deadline plus the time to start it and to validate the configuration.  An
    unreadable or invalid configuration is refused before any probe: the default budget's deadline is enough."""
    try:
        budget = float(config_mod.load(status["config"], run_dir=status.get("run_dir"))["fastpath"]["hook_budget"])
    except (config_mod.ConfigError, KeyError, TypeError, ValueError, OSError):
        from .settings import SETTINGS
        budget = float(next(row[4] for row in SETTINGS if row[2] == ("fastpath", "hook_budget")))
    return probe_deadline(budget) + PROBE_SLACK


class PluginProbe:
    """Probe the configured plug-ins as `luaprobe check` does, in a child process (``--probe-plugins``) with a
    deadline (:func:`probe_deadline`): a top level that never returns (an endless loop, compiled by LuaJIT where the
    hook budget's interrupt cannot reach it, or with hook_budget = 0 not interrupted at all) is killed and named
    instead of hanging the supervisor (docs/operations.md "Reload").  Started here; the supervisor's loop asks
    :meth:`done` and then :meth:`errors`, and keeps answering status meanwhile.  The child's output goes to
    temporary files (no pipe to keep drained).  Raises OSError when the files or the process cannot be made
    (EMFILE, ENOSPC, EAGAIN, a removed TMPDIR), with nothing left open."""

    def __init__(self, cfg):
        import tempfile
        budget = float(cfg["fastpath"]["hook_budget"])
        self.deadline = probe_deadline(budget)
        self.end = time.monotonic() + self.deadline
        self.started = time.time()
        spec = json.dumps({"paths": cfg["plugins"]["paths"], "lua_path": cfg["plugins"]["lua_path"],
                           "budget": budget, "parent": os.getpid()})
        files = []
        try:                                    # OSError (no fd, no space, no process: EMFILE, ENOSPC, EAGAIN) is
            for _ in range(2):                  # raised with nothing left open (Supervisor.request_reload says it)
                files.append(tempfile.TemporaryFile("w+"))
            self.out, self.err = files
            self.p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.supervisor", "--probe-plugins",
                                       spec], stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err, text=True,
                                      cwd=os.path.dirname(cfg.path) or None)
        except BaseException:
            for f in files:
                f.close()
            raise

    def done(self) -> bool:
        """The probe ended, or its deadline has passed."""
        return self.p.poll() is not None or time.monotonic() >= self.end

    def errors(self) -> list[str]:
        """One ``file:line: message`` per plug-in that fails to load, [] when all load (killed first when past its
        deadline)."""
        timed_out = self.p.poll() is None
        if timed_out:
            self.p.kill()
        self.p.wait()
        out, err = self._read()
        if timed_out:
            loading = [ln[len("loading "):] for ln in out.splitlines() if ln.startswith("loading ")]
            where = loading[-1] if loading else "a plug-in"
            return [f"{where}: its top level did not return within {self.deadline:g} s (an endless loop?)"]
        lines = out.splitlines()
        if self.p.returncode == 0 and lines and lines[-1].startswith("["):
            return json.loads(lines[-1])
        return [err.strip().splitlines()[-1].removeprefix("luaprobe reload: plug-in error: ") if err.strip()
                else f"the plug-in probe ended with {describe_exit(self.p.returncode)}"]

    def cancel(self) -> None:
        """Kill and reap the probe (a stop while it runs)."""
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self._read()

    def _read(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return texts[0], texts[1]


def plugin_errors(cfg) -> list[str]:
    """:class:`PluginProbe`, waited for: one ``file:line: message`` per plug-in that fails to load; [] when all
    load."""
    probe = PluginProbe(cfg)
    try:
        probe.p.wait(timeout=probe.deadline)
    except subprocess.TimeoutExpired:
        pass
    return probe.errors()


def probe_main(spec: str) -> int:
    """``--probe-plugins SPEC`` (plugin_errors' child): "loading FILE" before each file, then the errors as one JSON
    list; a top level stuck in a compiled loop past the budget ends it as `luaprobe check` does (LoadWatch)."""
    from luaprobe.engine.plugins.discovery import probe_all
    from luaprobe.engine.plugins.loadwatch import LoadWatch
    from luaprobe.engine.plugins.vm import PluginError
    a = json.loads(spec)
    # the supervisor gone (SIGKILL, a crash) -> this probe goes too: SIGKILL, since a top level in a compiled loop
    # (hook_budget = 0) runs no Python signal handler and would spin on as an orphan for ever
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    if a.get("parent") is not None and os.getppid() != a["parent"]:
        return EXIT_INTERNAL                                   # it died before the prctl: nobody reads the answer

    def before(f):
        print(f"loading {f}", flush=True)
    try:
        with LoadWatch("luaprobe reload", EXIT_PLUGIN):
            infos = probe_all(a["paths"], a["lua_path"], a["budget"], before=before)
        # what `luaprobe check` refuses (exit 4), `start` refuses too: load errors, the problems a run finds when it
        # sets a type up, and no plug-in file at all (before, such a reload said "reloaded" and the new fast path
        # ran without the instance, or failed at once and the daemon was gone)
        errors = [e for i in infos for e in i.errors + i.setup_problems]
        if not infos:
            errors = ["no plug-in files found in " + ", ".join(a["paths"])]
        elif not errors and not any(i.runnable_types for i in infos) and any(i.unsupported for i in infos):
            errors = ["no plug-in here can run (" + "; ".join(p for i in infos for p in i.problems) + ")"]
    except PluginError as e:
        errors = [str(e)]
    print(json.dumps(errors), flush=True)
    return EXIT_OK


class Supervisor:
    """One daemon per run directory; :meth:`run` returns the process exit code."""

    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.run_dir = control.ensure_run_dir(cfg.run_dir)
        self.sv = cfg["supervise"]
        self.state = "starting"
        self.child: subprocess.Popen | None = None
        self.child_started = 0.0
        self.started = time.time()
        self.restarts = 0
        self.reloads = 0
        self.last_exit: str | None = None
        self.last_exit_code: int | None = None
        self.last_error: str | None = None       #: the fast path's last error message (status, start)
        self.store_rows_lost = 0                 #: rows lost by store writers that died (all fast paths so far)
        self.crashes: collections.deque = collections.deque()
        self.restart_at: float | None = None
        self.stop_at: float | None = None       # hard-stop deadline (monotonic) while stopping / reloading
        self.mode = "run"                       # run | stop | reload
        self.stopped_by: str | None = None      # who asked the stop: "SIGTERM" (to the supervisor), "luaprobe stop
                                                # (pid 4711)"; status `stopped_by` (`start` names it, _wait_loaded)
        self._stop_signal: str | None = None    # the first stop signal's name, from the handler to the loop
        self.snapshot: dict | None = None
        self.rates: dict = {}
        self._prev: dict | None = None
        self._flags = {"stop": False, "reload": False}
        self.stats_path = control.path(self.run_dir, control.STATS)
        self.heartbeat_path = control.path(self.run_dir, HEARTBEAT)
        self.stalled: str | None = None         # why the current child was killed as stalled
        self.stop_killed: str | None = None     # what a stop past stop_deadline SIGKILLed (`luaprobe stop` exits 5)
        self.exporter = self.jsonl = None
        self.file_errors: dict = {}             # run-dir file -> its write error (full disk), while it lasts
        self.probe: PluginProbe | None = None   # a reload's plug-in probe under way (request_reload)
        self.probe_cfg = None                   # the configuration that reload validated
        self.reload_waiters: list = []          # client connections waiting for that reload's reply
        self._saved_at = 0.0                    # time.monotonic() of the last state.json write attempt
        self.spare: int | None = None           # a descriptor held in reserve for answering at EMFILE (_accept_spare)
        self.out_claim = None                   # usage.OutClaim of [run] out_dir while run() holds it
        self.sweep_pending = False              # a segment sweep failed (EMFILE): tried again each turn (_sweep)
        self.final_state: control.HeldWrite | None = None   # descriptors held for the last state.json (_save_state)
        self.walked: tuple[str, int] = ("", 0)  # ([source] as JSON, packets of it the earlier fast paths walked)
        self.spawned_skip = ("", 0, 0.0)        # the running fast path's: ([source], packets it skipped, start time)

    # ------------------------------------------------------------ child
    def _spawn(self) -> None:
        """Start the fast path (state running).  One that cannot be started (OSError: active_config.json not written
        on a full run directory, no process: EAGAIN, ENOMEM) is a crash (:meth:`_crashed`): ``child`` stays None,
        last_error says why, the restart is retried with backoff, or the state is ``failed: crash loop ...``."""
        active = control.path(self.run_dir, "active_config.json")      # the child runs exactly what was validated
        cmd = [sys.executable, "-m", "luaprobe.engine.daemon.supervisor", "--child", "--config", active, "--run-dir", self.run_dir]
        skip = self._walked_before()
        self.spawned_skip = (self._source_key(), skip, time.time())
        if skip:
            cmd += ["--skip-packets", str(skip)]
        claim = self.out_claim.fd if self.out_claim is not None and self.out_claim.fd is not None else None
        if claim is not None:
            cmd += ["--out-lock-fd", str(claim)]
        step = f"clearing {self.run_dir}"
        try:
            # the heartbeat too: the previous child's names the plug-in it loaded last and was touched a moment
            # ago; taken for this child's, a stop during its start-up blamed that plug-in (_loading_file)
            for name in (control.LOADED, control.LAST_ERROR, HEARTBEAT):
                try:
                    os.unlink(control.path(self.run_dir, name))
                except FileNotFoundError:
                    pass
            step = f"writing {active}"
            control.write_json(active, {"path": self.cfg.path, "values": self.cfg.values})
            step = "starting its process"
            # SIGTERM/SIGHUP stay blocked in the child until it has installed its handlers (child_main): a stop or
            # reload right after a start is then a graceful stop, not the default action of a half-started child
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
            try:
                # the out_dir claim's descriptor goes with it: its flock (one per open file) then holds until the
                # fast path too has exited, so a supervisor killed with SIGKILL does not free out_dir for another
                # `start` while its fast path, stopping by PR_SET_PDEATHSIG, still writes the database; the fast path
                # hands it on to its store writer (--out-lock-fd), which may outlive it (killed) while it commits
                self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=() if claim is None else (claim,),
                                              cwd=os.path.dirname(self.cfg.path) or None)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        except OSError as e:
            self.child = None
            why = f"cannot start the fast path: {step}: {e.strerror or e}"
            self.last_error, self.last_exit, self.last_exit_code = why, why, EXIT_INTERNAL
            self._crashed(why)
            return
        self.child_started = time.monotonic()
        self.child_started_wall = time.time()
        self.stalled = None
        self.restart_at = None
        self._stopped, self._progress = {}, None       # _check_stuck_input
        self._files_only = bool(self.cfg["source"]["pcap"]) and all(
            os.path.isfile(os.path.join(os.path.dirname(self.cfg.path), p)) for p in self.cfg["source"]["pcap"])
        self._set_state("running")
        log.info("fast path started (pid %d)", self.child.pid)

    def _walked_before(self) -> int:
        """Packets of a [source] of files (not looping) that earlier fast paths of this supervisor walked and wrote
        (they stopped normally: a reload that changed settings): the next one reads on after them instead of from the
        first file, which counted them again in the database (alerts, resources and flows added twice, counters
        summed)."""
        key, n = self.walked
        return n if key and key == self._source_key() else 0

    def _source_key(self) -> str:
        """[source] as JSON when it is files read once ("" for a live, looping or generated source); its speed
        left out (a reload that changes only the pace reads on too)."""
        src = {k: v for k, v in self.cfg["source"].items() if k != "speed"}
        return json.dumps(src, sort_keys=True, default=str) if src.get("pcap") and not src.get("loop") else ""

    def _count_walked(self) -> None:
        """The fast path ended: when it ended its run normally (a stop: its final stats snapshot; every output
        of the packets it walked is written), the packets it walked plus those it skipped are :attr:`walked` of the
        source it ran.  After a crash they stay as they were: the next fast path reads again what the crashed one
        walked, whose rows not yet handed to the store writer (up to 4096 of a kind) are lost with it."""
        key, skipped, started = self.spawned_skip
        snap = control.read_json(self.stats_path)      # the final one has no pids: written after this one's start
        if key and snap and snap.get("final") and float(snap.get("time") or 0) >= started:
            self.walked = (key, skipped + int(snap.get("packets") or 0))

    def _signal_child(self, sig) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(sig)

    def _kill_tree(self) -> str:
        """SIGKILL the child and everything under it, reap, remove the segments they owned.  Returns what was
        killed: "fastpath 10, capture 11, store 12, workers 13 14 (+ 1 more process)"."""
        if self.child is None:
            return ""
        try:
            procs = psutil.Process(self.child.pid).children(recursive=True)
        except (psutil.Error, OSError):         # OSError: no descriptor to read /proc with (EMFILE); the fast
            procs = []                          # path's children then go by PR_SET_PDEATHSIG
        roles = {k: v for k, v in self._pids().items() if k != "supervisor"}
        known = {p for v in roles.values() for p in (v if isinstance(v, list) else [v])}
        what = ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in roles.items())
        more = sum(p.pid not in known for p in procs)
        what += f" (+ {more} more process{'es' if more > 1 else ''})" if more else ""
        self._signal_child(signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        self.child.wait()
        return what

    def _check_stall(self) -> None:
        """A running fast path whose heartbeat (engine/fastpath/run.py _beat) is older than [supervise]
        stall_timeout is stuck (a hook in an endless loop that no Lua error can interrupt, compiled code):
        kill its tree; it is restarted like a crash, and status says why."""
        limit = self._stall_limit()
        if not limit:
            return
        try:
            beat = os.stat(self.heartbeat_path).st_mtime
        except FileNotFoundError:
            beat = 0.0
        if beat < self.child_started_wall - 1:               # not beating yet (the child imports: at most 2x + 10 s
            beat, limit = self.child_started_wall, 2 * limit + 10   # before it beats), or the previous child's
        age = time.time() - beat
        if age > limit:
            # a stopped process (the store, say) holds the fast path up: that is the cause the operator needs to
            # see; every process of the child's tree is looked at, not only those its last snapshot named
            if stopped := self._stopped_processes(tree=True):
                self._stalled(f"stalled: {_stopped_text(*stopped[0])}; no heartbeat for {age:.0f} s; killed")
                return
            log.error("fast path (pid %d): no heartbeat for %.0f s; its processes: %s", self.child.pid, age,
                      self._tree_states())
            if waiting := self._disk_waits():
                self._stalled(f"stalled: no heartbeat for {age:.0f} s; {waiting[0]} (a slow or hung disk?); killed")
                return
            loading = not self._loaded()["loaded"]   # the fast path beats before each plug-in it loads: one's top
            what = self._loading_file() or "its plug-ins"
            self.stalled_loading = loading           # level stuck in a loop: a plug-in error, not retried
            self._stalled(f"stalled while loading {what}: no heartbeat for {age:.0f} s (a plug-in's top level stuck "
                          "in a loop?); killed" if loading else
                          f"stalled: no heartbeat for {age:.0f} s (a hook stuck in a loop?); killed")

    def _loading_file(self) -> str | None:
        """The plug-in file the running fast path beat for last (engine/fastpath/run.py _beat writes its path into the
        heartbeat file before loading it), or None when this child has not beaten yet (it still imports and
        starts its store writer and capture process: no plug-in code has run) or the file cannot be read."""
        try:
            with open(self.heartbeat_path, encoding="utf-8", errors="replace") as f:
                if os.fstat(f.fileno()).st_mtime < self.child_started_wall - 1:     # the previous child's
                    return None
                return f.read().strip() or None
        except OSError:
            return None

    def _roles(self, tree: bool = False) -> list[tuple[str, int]]:
        """The run's processes as (role, pid), role in the singular ("shard", "worker"): those the last snapshot
        names (:meth:`_pids`); ``tree``: also every other process under the fast path (psutil; a /proc walk of
        every process, so only when a rule fires), named by its command name ("python3")."""
        out = [({"shards": "shard", "workers": "worker"}.get(role, role), pid)
               for role, v in self._pids().items() if role != "supervisor"
               for pid in (v if isinstance(v, list) else [v]) if pid]
        if tree and self.child is not None:
            known = {pid for _, pid in out}
            try:
                kids = psutil.Process(self.child.pid).children(recursive=True)
            except (psutil.Error, OSError):
                kids = []
            for p in kids:
                try:
                    name = p.name()
                except psutil.Error:
                    continue
                if p.pid not in known:
                    out.append((name, p.pid))
        return out

    def _stopped_processes(self, tree: bool = False) -> list[tuple[str, int, str]]:
        """The run's processes (:meth:`_roles`) found stopped now, as (role, pid, how): state T/t in /proc (SIGSTOP,
        a debugger), how "state T"; or sent SIGSTOP while in uninterruptible sleep, which it takes when the sleep
        ends (control.proc_stop_pending), how "state D, SIGSTOP pending".  [("store", 12, "state T")]."""
        found = []
        for role, pid in self._roles(tree):
            state = control.proc_state(pid)
            if state in ("T", "t"):
                found.append((role, pid, f"state {state}"))
            elif state is not None and control.proc_stop_pending(pid):
                found.append((role, pid, f"state {state}, SIGSTOP pending"))
        return found

    def _disk_waits(self) -> list[str]:
        """The run's processes in uninterruptible sleep now (state D: a write or fsync the disk has not finished),
        as "store process (pid 12) in uninterruptible disk wait (state D)"."""
        return [f"{role} process (pid {pid}) in uninterruptible disk wait (state D)"
                for role, pid in self._roles(tree=True) if control.proc_state(pid) == "D"]

    def _tree_states(self) -> str:
        """Every process of the run with its /proc state letter, for the log of a stall with no named cause:
        "fastpath 10 S, shard 11 S, store 12 D"."""
        return ", ".join(f"{role} {pid} {control.proc_state(pid) or 'gone'}" for role, pid in self._roles(tree=True))

    def _stall_limit(self) -> float:
        """[supervise] stall_timeout in s while a fast path runs or stops (a stall found during a stop ends the stop
        at once instead of at stop_deadline), else 0 (off: while it reloads, or stops while still loading, which
        has its own LOADING_STOP_GRACE)."""
        limit = float(self.sv.get("stall_timeout", 0) or 0)
        on = self.mode == "run" or (self.mode == "stop" and not getattr(self, "stop_while_loading", False))
        return limit if self.child is not None and on else 0.0

    def _stalled(self, why: str) -> None:
        """A stall rule fired: status and the log say ``why``; the fast path's tree is killed (restarted like a
        crash; during a stop, the stop ends as one past stop_deadline does: `luaprobe stop` exits 5)."""
        self.stalled = why
        log.error("fast path (pid %d) %s", self.child.pid, why)
        what = self._kill_tree()
        if self.mode == "stop":
            self.stop_killed = f"the fast path stalled while stopping: {why.removeprefix('stalled: ').removesuffix('; killed')}: SIGKILLed {what}"
            log.error("%s", self.stop_killed)

    def _check_stuck_input(self) -> None:
        """The rest of the stall rule ([supervise] stall_timeout; docs/operations.md "Faults"), for what the
        heartbeat cannot see, because the fast path itself keeps beating while it waits for packets:
        * any process of the run (capture, shard, store, fast path) found stopped (state T/t in /proc: SIGSTOP,
          a debugger) on every look for stall_timeout s;
        * a source of regular files (looping or not), whose capture always keeps the packet ring full: the fast
          path's packet count unchanged for stall_timeout s after its first packet, while its snapshots keep
          coming (its loop runs idle; a stuck hook stops them, and the heartbeat rule applies).
          A live interface (or a FIFO / stdin) with no packets is a quiet source, not a stall; so is a paced
          replay of files ([source] speed > 0: its capture waits, with an empty ring, until the next packet is due,
          which may be longer than stall_timeout at a low speed), for which only the first rule and the heartbeat
          apply.
        Either kills the tree; the fast path is restarted like a crash and status says why."""
        limit = self._stall_limit()
        if not limit:
            return
        now = time.monotonic()
        stopped, why = {}, None
        for name, pid, how in self._stopped_processes():
            stopped[pid] = since = self._stopped.get(pid, now)
            if now - since >= limit:
                why = f"{_stopped_text(name, pid, how)} for {now - since:.0f} s"
        self._stopped = stopped
        snap = self.snapshot or {}
        paced = bool(self.cfg["source"].get("speed"))
        if (why is None and self._files_only and not paced and self.mode == "run" and not snap.get("final")
                and snap.get("processes", {}).get("fastpath") == self.child.pid):
            packets, t = snap.get("packets"), snap.get("time")
            if not packets or self._progress is None or packets != self._progress[0]:   # 0: still starting
                self._progress = (packets, now)
            elif (now - self._progress[1] >= limit       # the fast path still writes snapshots: its loop idles
                  and time.time() - (t or 0) <= 2 * float(self.cfg["stats"]["interval"]) + 1):
                names = ", ".join(f"pid {p} is stopped" for p in stopped)
                why = (f"no packets for {now - self._progress[1]:.0f} s from a file source while the fast path "
                       f"idles (capture stuck?{' ' + names if names else ''})")
        if why:
            self._stalled(f"stalled: {why}; killed")

    def _child_exited(self, rc: int) -> bool:
        """React to the child's exit; False when the supervisor is done."""
        now = time.monotonic()
        desc = self.stalled or describe_exit(rc)
        self.last_exit_code = rc
        err = control.read_json(control.path(self.run_dir, control.LAST_ERROR))
        if err and err.get("fastpath_pid") == self.child.pid:
            self.last_error = err["error"]
            self.store_rows_lost += int(err.get("store_rows_lost") or 0)
        elif rc != 0:
            self.last_error = f"fast path {desc} (see {control.path(self.run_dir, control.LOG)})"
        self._sweep()                                           # what a killed fast path left behind
        self._count_walked()
        self.child = None
        if self.mode == "stop":
            self.last_exit = desc
            if getattr(self, "stop_while_loading", False) and rc < 0 and self.stalled:
                self.last_exit_code = EXIT_PLUGIN
                self.last_error = (f"plug-in error: the top level of {self.loading_file} ran on for "
                                   f"{LOADING_STOP_GRACE:g} s after the stop (stuck in a loop?); the fast path was "
                                   "killed before it processed anything")
            self._set_state("stopped")
            return False
        if self.mode == "reload":
            self.mode = "run"
            self.reloads += 1
            self.last_exit = desc
            log.info("reload: fast path exited (%s); starting it again", desc)
            self._spawn()
            return True
        self.last_exit = desc
        src = self.cfg["source"]
        if rc == 0 and src["pcap"] and not src["loop"]:
            self._set_state("stopped (input finished)")
            return False
        if getattr(self, "stalled_loading", False):   # it would loop again at every restart
            self.stalled_loading = False
            self.last_exit_code = EXIT_PLUGIN
            self.last_error = f"plug-in error: the fast path {self.stalled}"
            self._set_state(f"failed: plug-in error ({desc})")
            return False
        if rc in (EXIT_USAGE, EXIT_PLUGIN) or (rc == EXIT_INPUT and src["pcap"]):
            self._set_state(f"failed: {'input' if rc == EXIT_INPUT else 'plug-in or usage'} error ({desc})")
            return False
        return self._crashed(desc)

    def _crashed(self, desc: str) -> bool:
        """A crash (or a fast path that could not be started, :meth:`_spawn`): the restart is scheduled with
        exponential backoff; False, state ``failed: crash loop (last exit: DESC)``, after more than
        crash_loop_restarts of them within crash_loop_window s."""
        now = time.monotonic()
        window = self.sv["crash_loop_window"]
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > window:
            self.crashes.popleft()
        if len(self.crashes) > self.sv["crash_loop_restarts"]:
            log.error("fast path %s: %d crashes within %g s; giving up", desc, len(self.crashes), window)
            self._set_state(f"failed: crash loop (last exit: {desc})")
            return False
        delay = min(self.sv["restart_backoff_max"], self.sv["restart_backoff_initial"] * 2 ** (len(self.crashes) - 1))
        log.error("fast path %s; restarting in %.2f s", desc, delay)
        self.restart_at = now + delay
        self._set_state(f"restarting (last exit: {desc})")
        return True

    def _stop_overdue(self, now: float) -> bool:
        """A stop or reload has run past its time (stop_at, monotonic s): the fast path is to be killed now."""
        if self.stop_at is None or self.mode not in ("stop", "reload") or now <= self.stop_at:
            return False
        return not getattr(self, "stop_while_loading", False) or self._grace_for_start_up()

    def _grace_for_start_up(self) -> bool:
        """LOADING_STOP_GRACE has passed since a stop that found the fast path not yet loaded: True when a plug-in
        file is loading (self.loading_file: its top level has had the grace, it is killed and blamed).  False when
        the fast path has not beaten yet, i.e. no plug-in code has run (it still imports or starts its store writer
        and capture process, which a loaded machine can stretch beyond the grace): it is not blamed on a plug-in and
        gets the rest of stop_deadline like any stop; its SIGTERM, held blocked until its handlers are in place,
        then stops it, or stop_deadline kills it (`luaprobe stop` exits 5)."""
        self.loading_file = self._loading_file()
        if self.loading_file is not None:
            return True
        self.stop_while_loading = False
        self.stop_at = self.stop_deadline_at
        log.info("fast path (pid %d) still starting %g s after the stop (no plug-in loading yet): waiting for it "
                 "until stop_deadline", self.child.pid, LOADING_STOP_GRACE)
        return False

    # ------------------------------------------------------------ requests
    def request_stop(self, by: str | None = None) -> None:
        """Stop gracefully; ``by``: who asked (status ``stopped_by``), the first asker when asked twice."""
        if self.mode == "stop":
            return
        self.mode = "stop"
        self.stopped_by = by
        self._cancel_reload("reload cancelled: the daemon is stopping")
        self.stop_at = self.stop_deadline_at = time.monotonic() + self.sv["stop_deadline"]
        if self.child is not None and self.child.poll() is None and not self._loaded()["loaded"]:
            # still loading: nothing processed yet, and a top level stuck in a compiled loop never takes the stop
            self.stop_at = min(self.stop_at, time.monotonic() + LOADING_STOP_GRACE)
            self.stop_while_loading = True
        self._set_state("stopping")
        self._signal_child(signal.SIGTERM)

    def request_reload(self, conn=None) -> dict | None:
        """Re-validate the config and the plug-ins, then reload (docs/operations.md "Reload").  A reply
        ``{"ok": False, "error": ..., "exit": code}`` leaves the running fast path alone: an invalid config
        (exit 2; exit 1 when the config could not be read or its directories probed for want of the supervisor's own
        descriptors or memory: ConfigError.resource), a plug-in that fails to load (exit 4, ``errors``: one
        ``file:line: message`` each), or a probe that cannot be started (exit 1: "cannot start the plug-in probe: STRERROR ...", logged as "reload refused").
        ``notes``: settings that only take effect at the next start (RESTART_ONLY).
        The plug-ins are probed in a child process (:class:`PluginProbe`) while the loop goes on (status answered,
        the fast path watched): None is returned then, and the reply goes to ``conn`` (a client's connection,
        kept open; None: SIGHUP) when the probe is done (:meth:`_poll_reload`).  A reload asked while one is being
        probed waits for that one's reply."""
        try:
            cfg = config_mod.load(self.cfg.path, run_dir=self.run_dir)
        except config_mod.ConfigError as e:
            log.error("reload refused: %s", e)
            if e.resource:                      # EMFILE / ENFILE / ENOMEM: the supervisor's resources, not the file
                return {"ok": False, "error": f"reload refused, the configuration could not be checked: {e} (the "
                        "running fast path and its plug-ins are kept; reload again)", "exit": EXIT_INTERNAL}
            return {"ok": False, "error": f"reload refused, configuration invalid: {e}", "exit": EXIT_USAGE}
        if self.mode != "run":
            return {"ok": False, "error": f"cannot reload while {self.state}", "exit": EXIT_USAGE}
        if self.probe is None:
            try:
                self.probe, self.probe_cfg = PluginProbe(cfg), cfg
            except OSError as e:                # no process or temporary file for it (EAGAIN, EMFILE, ENOSPC, ...)
                why = (f"cannot start the plug-in probe: {e.strerror or e} (the running fast path and its plug-ins "
                       "are kept; reload again)")
                log.error("reload refused: %s", why)
                return {"ok": False, "error": why, "exit": EXIT_INTERNAL}
            log.info("reload: probing the plug-ins (pid %d, deadline %g s)", self.probe.p.pid, self.probe.deadline)
        if conn is not None:
            self.reload_waiters.append(conn)
        return None

    def _poll_reload(self) -> None:
        """A reload's probe that is done: apply the reload (:meth:`_apply_reload`), reply to every waiting client."""
        if self.probe is None or not self.probe.done():
            return
        errors, cfg = self.probe.errors(), self.probe_cfg
        self.probe = self.probe_cfg = None
        if self.mode != "run":
            reply = {"ok": False, "error": f"cannot reload while {self.state}", "exit": EXIT_USAGE}
        else:
            reply = self._apply_reload(cfg, errors)
        self._reply_waiters(reply)

    def _cancel_reload(self, why: str) -> None:
        """Kill a reload's probe under way; its clients get ``why`` (exit 2)."""
        if self.probe is not None:
            self.probe.cancel()
            self.probe = self.probe_cfg = None
            log.info("%s", why)
        self._reply_waiters({"ok": False, "error": why, "exit": EXIT_USAGE})

    def _reply_waiters(self, reply: dict) -> None:
        for conn in self.reload_waiters:
            control.send_reply(conn, reply)
            conn.close()
        self.reload_waiters = []

    def _apply_reload(self, cfg, errors: list[str]) -> dict:
        """The reload itself, once ``cfg`` was validated and its plug-ins probed (``errors``)."""
        if errors:
            for e in errors:
                log.error("reload refused, a plug-in failed to load (the running fast path is kept): %s", e)
            return {"ok": False, "exit": EXIT_PLUGIN, "errors": errors,
                    "error": "reload refused, a plug-in failed to load (the running fast path and its plug-ins "
                             "are kept): " + "; ".join(errors)}
        notes = []
        for section, key in RESTART_ONLY:
            was, now = self.cfg[section][key], cfg[section][key]
            if was != now:
                cfg.values[section][key] = was
                notes.append(f"[{section}] {key} changed ({config_mod._show(was)} -> {config_mod._show(now)}): "
                             f"takes effect at the next start (stop, then start); the daemon keeps "
                             f"{config_mod._show(was)}")
        for n in notes:
            log.warning("reload: %s", n)
        same_config = cfg.values == self.cfg.values
        self.cfg, self.sv = cfg, cfg["supervise"]
        if self.child is None:                  # waiting for a restart: start now with the new scripts
            self.reloads += 1
            self._spawn()
            if self.child is None:              # it could not be started (_spawn): restarted with backoff
                return {"ok": False, "error": f"reload: {self.last_error}; {self.state}", "exit": EXIT_INTERNAL}
        elif same_config:                       # only scripts changed: backend scripts reload live
            self.reloads += 1
            self._signal_child(signal.SIGHUP)
            return {"ok": True, "reloads_before": self.reloads - 1, "mode": "live backend reload", "notes": notes}
        else:                                   # settings changed: graceful restart with the new ones
            self.mode = "reload"
            self.stop_at = time.monotonic() + self.sv["stop_deadline"]
            self._set_state("reloading")
            self._signal_child(signal.SIGTERM)
        return {"ok": True, "reloads_before": self.reloads, "notes": notes}

    def status(self) -> dict:
        snap = self.snapshot or {}
        return {"ok": True, "state": self.state, "supervisor_pid": os.getpid(),
                "fastpath_pid": self.child.pid if self.child else None,
                "processes": self._pids(), "started": self.started,
                "uptime_s": round(time.time() - self.started, 3),
                "fastpath_uptime_s": round(time.monotonic() - self.child_started, 3) if self.child else None,
                "restarts": self.restarts, "reloads": self.reloads, "last_exit": self.last_exit,
                "source": self.cfg.source_text(), "config": self.cfg.path, "run_dir": self.run_dir,
                "out_dir": self.cfg["run"]["out_dir"],
                "last_error": self.last_error, "last_exit_code": self.last_exit_code, **self._loaded(),
                "stopped_by": self.stopped_by,
                "stop_killed": self.stop_killed,
                # the finished fast paths' (last_error) and the running one's shards' (their dead store writers)
                "store_rows_lost": self.store_rows_lost + self._running_rows_lost(snap),
                "reload_probe": {"pid": self.probe.p.pid, "since": self.probe.started} if self.probe else None,
                "file_errors": dict(self.file_errors),
                "last_stats": {k: snap.get(k) for k in ("time", "packets", "bytes", "flows", "flows_live")}
                | self.rates if snap else None}

    def _running_rows_lost(self, snap: dict) -> int:
        """Rows lost so far by the store writers of the running fast path's shards (its snapshot; a single fast path
        whose writer dies ends, and its last_error carries them)."""
        if self.child is None or snap.get("processes", {}).get("fastpath") != self.child.pid:
            return 0
        return int(snap.get("store_rows_lost") or 0)

    def _loaded(self) -> dict:
        """{"loaded": bool, "plugin_problems": [...]} of the running fast path (loaded.json)."""
        ld = control.read_json(control.path(self.run_dir, control.LOADED)) if self.child is not None else None
        if not ld or ld.get("fastpath_pid") != self.child.pid:
            return {"loaded": False, "plugin_problems": []}
        return {"loaded": True, "plugin_problems": ld.get("problems", [])}

    def _pids(self) -> dict:
        """Every process of this run: supervisor, fast path, capture, store, workers (from the snapshot)."""
        out = {"supervisor": os.getpid()}
        if self.child is None:
            return out
        out["fastpath"] = self.child.pid
        snap = self.snapshot or {}
        if snap.get("processes", {}).get("fastpath") == self.child.pid:
            for k, v in snap["processes"].items():
                out.setdefault(k, v)
            workers = [w["pid"] for p in snap.get("plugins", []) for w in p.get("workers", []) if w.get("pid")]
            if workers:
                out["workers"] = workers
        return out

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("state: %s", state)
        self.state = state
        self._save_state()

    def _save_state(self, last: bool = False) -> None:
        """state.json now.  ``last``: the supervisor's final state, which `status` and `stop` read once it is gone;
        when no descriptor can be had for it (EMFILE: its RLIMIT_NOFILE lowered below the descriptors it holds, the
        spare's too; ENFILE) it is written through the descriptors held for it since the start (control.HeldWrite).
        Before, such a supervisor left its last saved state ("running", "stopping") and `status` said "stopped
        (supervisor gone; was running)", exit 3 also when it had failed (exit 1)."""
        self._saved_at = time.monotonic()
        state = self.status() | {"saved": time.time()}
        try:
            control.write_json(control.path(self.run_dir, control.STATE), state)
        except OSError as e:
            if last and e.errno in (errno.EMFILE, errno.ENFILE) and self.final_state is not None:
                try:
                    self.final_state.write_json(state)
                except OSError as e2:
                    log.error("cannot write the final state.json in %s through its held descriptor either: %s",
                              self.run_dir, e2.strerror or e2)
                else:
                    self._file_ok("state.json")
                    return
            self._file_error("state.json", e)
        else:
            self._file_ok("state.json")

    def _file_error(self, what: str, e: OSError, doing: str = "cannot write", retry: str = "at the next write") -> None:
        """A run-dir file could not be written (a full disk), or no connection accepted on control.sock (no fd left:
        EMFILE): one log line per episode (status ``file_errors``); the probe keeps running and the next write
        (state: every change and stats interval; stats.jsonl: every snapshot) or accept (ACCEPT_RETRY s later)
        tries again."""
        if what not in self.file_errors:
            self.file_errors[what] = str(e)
            log.error("%s %s in %s: %s; the probe keeps running, retrying %s", doing, what, self.run_dir,
                      e.strerror or e, retry)

    def _file_ok(self, what: str, done: str = "written") -> None:
        if self.file_errors.pop(what, None) is not None:
            log.info("%s %s again", what, done)

    def _reserve(self) -> None:
        """Hold a spare descriptor (the run directory, opened read-only) unless one is held: it is given up to accept
        one control connection when accept() fails for want of descriptors (:meth:`_accept_spare`), and taken
        again once that connection is closed.  Opened first thing in :meth:`run`, it is one of the supervisor's
        lowest-numbered descriptors, below any RLIMIT_NOFILE it can run into.  Failing (EMFILE): tried again at the
        next turn of the loop."""
        if self.spare is None:
            try:
                self.spare = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                pass

    def _sweep(self) -> None:
        """Remove the shared-memory segments of dead owners (segment.sweep: a killed fast path's).  Listing /dev/shm
        needs a descriptor: out of them (EMFILE) the sweep is logged once (status ``file_errors``) and tried again
        at every turn of the loop (``sweep_pending``) instead of ending the supervisor ("supervisor internal
        error": a crash of its fast path while it was at its limit ended the daemon)."""
        try:
            segment.sweep()
        except OSError as e:
            self.sweep_pending = True
            self._file_error("/dev/shm", e, "cannot sweep dead processes' segments from", "at the next turn")
        else:
            self.sweep_pending = False
            self._file_ok("/dev/shm", "swept")

    def _release_spare(self) -> None:
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None

    def _accept_spare(self, sock, e: OSError):
        """accept() failed with ``e`` (EMFILE: every descriptor below the soft RLIMIT_NOFILE in use; ENFILE: the
        system's table full): the spare descriptor is closed and the connection accepted into its slot, so that the
        client gets one line naming the cause (:meth:`_handle`, ``refuse``) instead of waiting out its 10 s and
        guessing "busy".  Returns the connection, or None (no spare held, or accept() failed again: the connection
        stays queued, retried after ACCEPT_RETRY s)."""
        if self.spare is None or e.errno not in (errno.EMFILE, errno.ENFILE):
            return None
        os.close(self.spare)
        self.spare = None
        try:
            conn, _ = sock.accept()
        except OSError:
            self._reserve()
            return None
        return conn

    def _refusal(self, e: OSError) -> str:
        """What a client accepted on the spare descriptor is told (:meth:`_accept_spare`)."""
        if e.errno == errno.EMFILE:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            cause = (f"it is out of file descriptors (accept() on {control.SOCKET}: {e.strerror}: all "
                     f"{'of them' if soft == resource.RLIM_INFINITY else soft} allowed by its RLIMIT_NOFILE soft "
                     "limit are in use)")
        else:
            cause = f"the system is out of file descriptors (accept() on {control.SOCKET}: {e.strerror})"
        return (f"{cause}; its fast path keeps running, and it takes requests again once descriptors are free "
                f"(raise the limit: prlimit --nofile, LimitNOFILE=; log {control.path(self.run_dir, control.LOG)})")

    def _read_client(self, sel, conn, client: dict) -> None:
        """A client's connection is readable (registered with ``sel`` at accept, non-blocking): its bytes are kept
        in ``client["buf"]`` until its line is whole (a newline, the end of its stream, or control.MAX_LINE bytes),
        then it is handled.  So a client that connects and sends nothing, or half a line, holds up no one: the loop
        goes on watching the fast path and answering others, and :meth:`_expire_clients` answers it at its deadline.
        Before, the loop read each request blocking (2 s each): eight silent connections kept `status` from an
        answer for its 10 s and the fast path unwatched for 16 s."""
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        client["buf"] += chunk
        if chunk and b"\n" not in client["buf"] and len(client["buf"]) < control.MAX_LINE:
            return
        sel.unregister(conn)
        self._handle(conn, bytes(client["buf"]), client.get("refuse"))

    def _expire_clients(self, sel, now: float) -> None:
        """Answer the connections whose line did not come whole within CLIENT_DEADLINE s as a bad request."""
        late = [(key.fileobj, key.data) for key in list(sel.get_map().values())
                if isinstance(key.data, dict) and key.data["deadline"] <= now]
        for conn, _ in late:
            sel.unregister(conn)
            conn.setblocking(True)
            conn.settimeout(2.0)
            control.send_reply(conn, {"ok": False, "error": f"bad request: the request line did not come whole "
                                                            f"within {CLIENT_DEADLINE:g} s"})
            conn.close()

    def _handle(self, conn, buf: bytes, refuse: str | None = None) -> None:
        """Answer the request line ``buf`` on ``conn`` and close it.  ``refuse``: the connection was accepted on the
        spare descriptor (:meth:`_accept_spare`): the request is read but not acted on, the reply
        ``{"ok": false, "unserved": true, "error": refuse, "exit": 1}`` (control.Unserved on the client's side)."""
        conn.setblocking(True)
        conn.settimeout(2.0)                    # the reply: sendall to a client that does not read ends here
        if refuse is not None:
            control.send_reply(conn, {"ok": False, "unserved": True, "exit": EXIT_INTERNAL, "error": refuse,
                                      "supervisor_pid": os.getpid()})
            conn.close()
            return
        try:
            req = control.parse_request(buf)
            cmd = req.get("cmd")
            if cmd == "status":
                reply = self.status()
            elif cmd == "stats":
                reply = {"ok": True, "snapshot": self.snapshot, "rates": self.rates, "status": self.status()}
            elif cmd == "stop":
                self.request_stop(by=f"luaprobe stop{_peer(conn)}")
                reply = {"ok": True, "state": self.state, "stop_deadline": self.sv["stop_deadline"]}
            elif cmd == "reload":
                reply = self.request_reload(conn)
                if reply is None:               # answered when its plug-in probe is done (_poll_reload)
                    return
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r} (status, stats, stop, reload)"}
        except (OSError, ValueError) as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        control.send_reply(conn, reply)
        conn.close()

    # ------------------------------------------------------------ stats
    def _poll_stats(self) -> None:
        snap = control.read_json(self.stats_path)
        if not snap or (self.snapshot and snap.get("time") == self.snapshot.get("time")):
            # no new snapshot (e.g. a full run directory stops the fast path's stats.json too): state.json is still
            # written once a stats interval, so a write error shows in status and the saved time stays current
            if time.monotonic() - self._saved_at >= float(self.cfg["stats"]["interval"]):
                self._save_state()
            return
        if self.child is None or snap.get("processes", {}).get("fastpath") not in (self.child.pid, None):
            return                                              # a previous child's file
        prev = self._prev
        pid = snap.get("processes", {}).get("fastpath")
        if snap.get("final") or not prev or prev.get("processes", {}).get("fastpath") != pid:
            self.rates = {}                                     # a new (or finished) fast path: no rate yet
        elif not snap.get("final") and pid:
            dt = snap["time"] - prev["time"]
            if dt > 0:
                self.rates = {"packets_per_s": round((snap["packets"] - prev["packets"]) / dt, 1),
                              "bits_per_s": round((snap["bytes"] - prev["bytes"]) * 8 / dt, 1)}
        self._prev = self.snapshot = snap
        if self.jsonl is not None:
            try:
                self.jsonl.write(snap, self.rates, self.status())
            except OSError as e:
                self._file_error("stats.jsonl", e)
            else:
                self._file_ok("stats.jsonl")
        self._save_state()

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        self._reserve()                         # first: a low-numbered descriptor (_accept_spare)
        pidfile = control.PidFile(self.run_dir)
        try:
            pidfile.acquire()
        except RuntimeError as e:              # another supervisor won a race of two `start`s: nothing started
            self._release_spare()
            return refuse(str(e))
        except OSError as e:                   # a symbolic link planted at the pidfile's name (control.PidFile)
            self._release_spare()
            return refuse(f"pidfile: {e.strerror}")
        try:                                    # one daemon's database is its own: held until it exits
            self.out_claim = out_claim = claim_out_dir(
                self.cfg["run"]["out_dir"], "[run] out_dir =",
                private=bool(self.cfg["run"]["user"] or self.cfg["run"]["group"]))
        except UsageError as e:
            pidfile.release()
            self._release_spare()
            return refuse(f"{self.cfg.path}: {e}")
        try:
            sock = control.listen(self.run_dir)
        except OSError as e:                    # a directory planted at control.sock (EISDIR), no descriptor
            out_claim.release()
            pidfile.release()
            self._release_spare()
            sock_path = control.path(self.run_dir, control.SOCKET)
            return refuse(f"cannot listen on {sock_path}: {e.strerror or e}"
                          + (" (remove it)" if e.errno in (errno.EISDIR, errno.EPERM) else ""))
        try:
            control.register(self.run_dir)
        except OSError as e:                    # a convenience only: the daemon runs, found with --run-dir
            log.warning("cannot register this daemon in %s: %s; luaprobe status, stop, reload and stats "
                        "find it only with --run-dir %s", control.registry_dir(), e.strerror or e, self.run_dir)
        try:                                    # [run] user: drop now, keeping CAP_NET_RAW for the children
            privileges.enter_supervisor(self.cfg, self.run_dir)
        except (UsageError, OSError, RuntimeError) as e:
            sock.close()
            control.unregister(self.run_dir)
            out_claim.release()
            pidfile.release()
            self._release_spare()
            return refuse(f"cannot drop privileges: {e}")
        # after the privileges are dropped: the state.json it makes is the running user's, as every other write's
        self.final_state = control.HeldWrite(control.path(self.run_dir, control.STATE))
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)
        handlers = {signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGHUP: "reload"}
        def on_signal(signum, _frame):
            self._flags[handlers[signum]] = True
            if handlers[signum] == "stop":
                self._stop_signal = self._stop_signal or signal.Signals(signum).name
        old = {s: signal.signal(s, on_signal) for s in handlers}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(handlers))   # `start` spawned us with them blocked (cmd_start)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, "sock")
        sel.register(rfd, selectors.EVENT_READ, "signal")
        from luaprobe.engine.daemon import metrics
        try:
            st = self.cfg["stats"]
            if st["json_lines_file"]:
                self.jsonl = metrics.JsonLines(st["json_lines_file"], int(st["json_lines_max_mb"] * 1048576),
                                               st["json_lines_backups"])
            if st["prometheus_port"]:
                self.exporter = metrics.start_prometheus(st["prometheus_port"], self.stats_path, self.status)
            try:
                os.unlink(self.stats_path)
            except FileNotFoundError:
                pass
            self._sweep()
            self._spawn()
            next_stats = time.monotonic()
            accept_paused = None                # time.monotonic() until which a failing accept() is not retried
            while True:
                if accept_paused is not None and time.monotonic() >= accept_paused:
                    sel.register(sock, selectors.EVENT_READ, "sock")
                    accept_paused = None
                for key, _ in sel.select(timeout=0.1):
                    if key.data == "sock":
                        try:
                            conn, _ = sock.accept()
                        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                            continue
                        except OSError as e:    # EMFILE / ENFILE / ENOBUFS: the connection stays queued
                            self._file_error(control.SOCKET, e, "cannot accept a request on",
                                             f"in {ACCEPT_RETRY:g} s")
                            conn = self._accept_spare(sock, e)
                            if conn is None:
                                sel.unregister(sock)    # readable until accepted: try again in ACCEPT_RETRY s,
                                accept_paused = time.monotonic() + ACCEPT_RETRY     # not in a busy loop
                                continue
                            client = {"refuse": self._refusal(e)}    # its line read, then told why, not served
                        else:
                            self._file_ok(control.SOCKET, "accepting requests")
                            client = {}
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ,
                                     client | {"buf": bytearray(), "deadline": time.monotonic() + CLIENT_DEADLINE})
                    elif isinstance(key.data, dict):
                        self._read_client(sel, key.fileobj, key.data)
                    else:
                        try:
                            os.read(rfd, 512)
                        except BlockingIOError:
                            pass
                self._reserve()                 # given up to a client at EMFILE (_accept_spare): taken again
                if self.sweep_pending:
                    self._sweep()               # one that failed for want of a descriptor (EMFILE): again
                if self._flags["stop"]:
                    self._flags["stop"] = False
                    log.info("stop requested by signal (%s)", self._stop_signal)
                    self.request_stop(by=self._stop_signal)
                if self._flags["reload"]:
                    self._flags["reload"] = False
                    log.info("reload requested by SIGHUP")
                    self.request_reload()       # its reply (a refusal, or the probe's result) is logged
                self._poll_reload()
                now = time.monotonic()
                self._expire_clients(sel, now)
                if now >= next_stats:
                    next_stats = now + min(1.0, float(self.cfg["stats"]["interval"]))
                    self._poll_stats()
                if self.child is not None:
                    self._check_stall()
                    if self.child.poll() is None:
                        self._check_stuck_input()
                    rc = self.child.poll()
                    if rc is None and self._stop_overdue(now):
                        if getattr(self, "stop_while_loading", False):
                            self.stalled = (f"killed: still loading {self.loading_file} {LOADING_STOP_GRACE:g} s "
                                            "after the stop")
                            log.error("fast path (pid %d) %s", self.child.pid, self.stalled)
                            self._kill_tree()
                        else:
                            log.error("fast path did not stop within %g s: killing it", self.sv["stop_deadline"])
                            what = self._kill_tree()
                        if self.mode == "stop" and not getattr(self, "stop_while_loading", False):
                            self.stop_killed = (f"the fast path did not stop within stop_deadline = "
                                                f"{self.sv['stop_deadline']:g} s: SIGKILLed {what}")
                            log.error("%s", self.stop_killed)
                        rc = self.child.returncode
                    if rc is not None:
                        self._poll_stats()                      # the run's final snapshot
                        if not self._child_exited(rc):
                            break
                elif self.mode == "stop":
                    self._set_state("stopped")
                    break
                elif self.state.startswith("failed"):   # _spawn: a fast path that could not be started, too often
                    break
                elif self.restart_at is not None and now >= self.restart_at:
                    self.restarts += 1
                    self._spawn()
            if self.state.startswith("failed"):
                return EXIT_INTERNAL
            return EXIT_STOP_KILLED if self.stop_killed else EXIT_OK
        except Exception as e:                  # a bug: its traceback in the log, and state.json says so
            log.exception("supervisor internal error")
            self.last_error = f"supervisor internal error: {type(e).__name__}: {e}"
            self.state = f"failed: {self.last_error}"
            return EXIT_INTERNAL
        finally:
            self._release_spare()               # a descriptor for the steps below, should the others be in use
            self._cancel_reload("reload cancelled: the supervisor is exiting")
            if self.child is not None and self.child.poll() is None:      # an exception above: no orphans
                self._kill_tree()
            self._sweep()
            if self.exporter is not None:
                self.exporter.shutdown()
            if self.jsonl is not None:
                self.jsonl.close()
            for key in list(sel.get_map().values()):
                if isinstance(key.data, dict):      # clients whose line had not come whole: closed unanswered
                    key.fileobj.close()
            sel.close()
            sock.close()
            try:
                os.unlink(control.path(self.run_dir, control.SOCKET))
            except FileNotFoundError:
                pass
            self._save_state(last=True)
            self.final_state.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old.items():
                signal.signal(s, h)
            os.close(rfd)
            os.close(wfd)
            control.unregister(self.run_dir)
            out_claim.release()
            pidfile.release()
            self._release_spare()
            log.info("supervisor exiting: %s", self.state)


def _peer(conn) -> str:
    """" (pid 4711)": the process at the other end of a control connection (SO_PEERCRED), or "" when unknown."""
    import socket
    import struct
    try:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    except (OSError, AttributeError, struct.error):
        return ""
    return f" (pid {pid})" if pid > 0 else ""


def _stopped_text(role: str, pid: int, how: str = "state T") -> str:
    """How both stall rules name a process found stopped (Supervisor._stopped_processes): "store process (pid 12)
    stopped (state T)"; the rule adds how long ("; no heartbeat for 5 s" or " for 5 s")."""
    return f"{role} process (pid {pid}) stopped ({how})"


# ---------------------------------------------------------------- the child: one fast-path run
def final_snapshot(summary: dict) -> dict:
    """The run's final counters in the layout of FastPath.snapshot (what `stats` shows after the end)."""
    return {"time": time.time(), "final": True, "packets": summary["packets"], "bytes": summary["bytes"],
            "flows": summary["flows"], "flows_live": 0, "rings": {}, "drops": summary["drops"],
            "processes": {}, "elapsed_s": summary["elapsed_s"], "input_errors": summary["input_errors"],
            "plugins": [dict(p, workers=[]) for p in summary["plugins"]]}


def child_main(config_path: str, run_dir: str, out_lock_fd: int | None = None, skip_packets: int = 0) -> int:
    """One fast-path run under the supervisor: SIGTERM = finish now, normally.  ``out_lock_fd``: the supervisor's
    claim of out_dir, inherited; the store writer (and shards) inherit it in turn (RunConfig.out_lock_fd)."""
    import json

    from luaprobe.shm import logs
    from luaprobe.engine.fastpath.shards import make_run
    from luaprobe.engine.plugins.vm import PluginError
    from luaprobe.engine.store.writer import StoreDied
    from .usage import InputProblem
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)         # the supervisor turns ^C into SIGTERM
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})   # blocked by Supervisor._spawn
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)              # PR_SET_PDEATHSIG: supervisor gone -> graceful stop
    if os.getppid() == 1:
        return EXIT_OK
    active = control.read_json(config_path)          # written by Supervisor._spawn: validated values
    cfg = config_mod.Config(active["path"], active["values"])
    logs.setup(verbose=cfg["log"]["verbose"], json_lines=cfg["log"]["format"] == "json")
    stats_file = control.path(run_dir, control.STATS)

    def failed(code: int, message: str, **extra) -> int:
        """Log the error (supervisor.log), leave it for `status` and `start`, return the exit code."""
        log.error("%s", message)
        control.write_json(control.path(run_dir, control.LAST_ERROR),
                           {"fastpath_pid": os.getpid(), "exit_code": code, "error": message, "time": time.time(),
                            **extra})
        return code

    def loaded(problems: list) -> None:
        for p in problems:
            log.error("plug-in problem: %s", p)
        control.write_json(control.path(run_dir, control.LOADED), {"fastpath_pid": os.getpid(), "problems": problems})

    try:
        rc = cfg.run_config(stats_file=stats_file, heartbeat_file=control.path(run_dir, HEARTBEAT),
                             on_loaded=loaded)
        rc.on_fatal = lambda code, line: failed(code, line)   # a plug-in stuck while loading (fastpath/run.py)
        rc.out_lock_fd = out_lock_fd
        rc.skip_packets = skip_packets     # files: the packets the earlier fast paths walked (Supervisor._walked_before)
        privileges.enter_run(rc, where=("[run] user =", "[run] group ="))   # sockets, then no capability
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)          # PR_SET_PDEATHSIG again (a credential change clears it)
        fp = make_run(rc)
    except (ValueError, InputProblem) as e:
        return failed(e.exit_code if isinstance(e, (UsageError, InputProblem)) else EXIT_USAGE, str(e))
    signal.signal(signal.SIGTERM, lambda *_: fp.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: fp.request_reload_backends())    # live backend reload
    if stop:
        fp.request_stop()
    try:
        summary = fp.run()
    except PluginError as e:
        return failed(EXIT_PLUGIN, f"plug-in error: {e}")
    except UsageError as e:
        return failed(EXIT_USAGE, str(e))
    except StoreDied as e:              # killed, disk full: the supervisor restarts the fast path (a crash)
        if getattr(e, "summary", None) is not None:                 # the counters up to the death
            control.write_json(control.path(run_dir, "last_summary.json"), e.summary)
        return failed(EXIT_INTERNAL, str(e), store_rows_lost=e.rows_lost)
    except Exception as e:  # noqa: BLE001
        from luaprobe.engine.plugins.errors import text
        log.debug("internal error", exc_info=True)
        return failed(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {text(e)}")
    control.write_json(stats_file, final_snapshot(summary))
    control.write_json(control.path(run_dir, "last_summary.json"), summary)
    log.info("fast path finished: %s", json.dumps({k: summary[k] for k in ("packets", "bytes", "flows",
                                                                           "elapsed_s", "input_errors")}))
    from .cli import run_exit_code
    code, reasons = run_exit_code(summary, stop_is_early=False)
    return failed(code, "; ".join(reasons), store_rows_lost=summary.get("store_rows_lost", 0)) if code else EXIT_OK


# ---------------------------------------------------------------- luaprobe start / stop / status / reload
def _log_tail(run_dir: str, n: int = 15) -> str:
    try:
        with open(control.path(run_dir, control.LOG), "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


def cmd_start(args) -> int:
    """`luaprobe start --config FILE [--foreground]`: validate, sweep, daemonize, wait until it answers."""
    from luaprobe.shm import logs
    try:
        cfg = config_mod.load(args.config, run_dir=getattr(args, "run_dir", None))
    except config_mod.ConfigError as e:
        print(f"luaprobe start: {e}", file=sys.stderr)
        return EXIT_INTERNAL if e.resource else EXIT_USAGE
    try:
        if cfg["run"]["user"] or cfg["run"]["group"]:
            privileges.check_target(cfg["run"]["user"], cfg["run"]["group"], ("[run] user =", "[run] group ="))
    except UsageError as e:
        key = "group" if str(e).startswith("[run] group") else "user"
        n = config_mod.line_of_key(cfg.path, "run", key)
        print(f"luaprobe start: {cfg.path}:{n}: {e}" if n else f"luaprobe start: {cfg.path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_dir = control.ensure_run_dir(cfg.run_dir)   # tried by config.load; the disk may have changed since
    except OSError as e:
        print(f"luaprobe start: run directory {cfg.run_dir}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    pid = control.read_pid(run_dir)
    if pid:
        print(f"luaprobe start: already running (supervisor pid {pid}, run dir {run_dir}): nothing started "
              "(stop it first, or give another [run] run_dir / --run-dir)", file=sys.stderr)
        return EXIT_USAGE
    try:                                          # a run or another daemon writing there: said here, once
        claim_out_dir(cfg["run"]["out_dir"], "[run] out_dir =", shared=True).release()   # (the supervisor holds it)
    except UsageError as e:
        pid = control.read_pid(run_dir)           # a start racing this one won: its supervisor holds out_dir
        print(f"luaprobe start: already running (supervisor pid {pid}, run dir {run_dir}): nothing started (stop it "
              "first, or give another [run] run_dir / --run-dir)" if pid else f"luaprobe start: {cfg.path}: {e}",
              file=sys.stderr)
        return EXIT_USAGE
    link = db_link(cfg["run"]["out_dir"])         # the store writer would refuse it and the daemon restart forever
    if link:
        print(f"luaprobe start: {cfg.path}: [run] out_dir = {cfg['run']['out_dir']}: {os.path.basename(link)} is a symbolic link "
              "(not followed); remove it, or give another out_dir", file=sys.stderr)
        return EXIT_USAGE
    from luaprobe.engine.plugins.discovery import discover   # what the fast path's preflight refuses (exit 4):
    paths = cfg["plugins"]["paths"]                          # before, the daemon started, failed at once and
    if not discover(paths, cfg["plugins"]["lua_path"]):      # `start` printed its log's tail
        print(f"luaprobe start: plug-in error: no plug-in files found in {', '.join(paths)} (nothing started)",
              file=sys.stderr)
        return EXIT_PLUGIN
    from luaprobe.engine.daemon import metrics
    port = cfg["stats"]["prometheus_port"]
    problem = port and metrics.port_problem(port)
    if problem:
        print(f"luaprobe start: {cfg.path}: [stats] prometheus_port = {port}: cannot serve /metrics on "
              f"127.0.0.1:{port}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    removed = segment.sweep()
    if removed:
        print(f"removed {len(removed)} stale shared-memory segment(s)")
    if args.foreground:
        logs.setup(verbose=cfg["log"]["verbose"], json_lines=cfg["log"]["format"] == "json")
        return Supervisor(cfg).run()
    from luaprobe.shm.exits import STOP_SIGNALS, StartupStop
    # SIGINT / SIGTERM / SIGHUP are blocked from before the spawn until `start` waits in the try below: one that comes
    # meanwhile is taken there, and stops the daemon just started (_stop_started).  Before, one that came between the
    # spawn and the try ended `start` with main()'s "processes started so far were stopped" while the daemon ran.  The
    # supervisor inherits the mask and unblocks them once its own handlers are in place (Supervisor.run), so the stop
    # it may get at once is its graceful one, not the default action of a half-started process.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    refusals = wfd = None
    step = "its refusal pipe"
    try:
        refusals, wfd = os.pipe()             # the supervisor's refusal line, if it refuses to start (refuse())
        step = control.path(run_dir, control.LOG)
        with control.open_private(control.path(run_dir, control.LOG), "ab") as logf:
            step = "its process"
            p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.supervisor", "--config", cfg.path,
                                  "--run-dir", run_dir, "--log-file", control.path(run_dir, control.LOG),
                                  "--refusal-fd", str(wfd)],
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                 cwd=os.path.dirname(cfg.path), close_fds=True, pass_fds=(wfd,))
    except OSError as e:                      # no descriptor, process or memory left to `start` (EMFILE, EAGAIN)
        if refusals is not None:
            os.close(refusals)
        print(f"luaprobe start: cannot start the supervisor: {step}: {e.strerror or e} (nothing started)",
              file=sys.stderr)
        stop_signals_decided()                # the line above is the last word: a stop signal that came is moot
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return EXIT_INTERNAL
    finally:
        if wfd is not None:
            os.close(wfd)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)    # a stop signal held since the spawn raises here
        os.set_blocking(refusals, False)
        code = _wait_loaded(run_dir, p, timeout=60, refusals=refusals,
                            stop_deadline=float(cfg["supervise"]["stop_deadline"]))
    except StartupStop as e:                  # the daemon started here is stopped too (it runs in its own session)
        return _stop_started(run_dir, p, e)
    finally:
        os.close(refusals)
    p.returncode = p.returncode if p.poll() is not None else 0   # detached: not ours to reap (new session)
    return code


def _stop_started(run_dir: str, p: subprocess.Popen, e) -> int:
    """SIGINT / SIGTERM / SIGHUP to `start` from the supervisor's spawn on while it waits for the fast path to load
    (cmd_start): the supervisor it started (a new session, which the signal did not reach) is stopped as `luaprobe
    stop` would, and the line says so; 130 / 143 / 129."""
    from luaprobe.shm.exits import STOP_SIGNALS
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)          # the stop below is the last word
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)             # the supervisor's graceful stop (stop_deadline, then SIGKILL)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            pass
    gone = p.poll() is not None
    print(f"luaprobe start: stopped by {e.name} while it waited for the daemon to load its plug-ins: the daemon it started "
          + ("was stopped (" + describe_exit(p.returncode) + ")" if gone else
             f"did not stop within 60 s (supervisor pid {p.pid}; luaprobe stop --run-dir {run_dir})"),
          file=sys.stderr)
    return 128 + e.signum


def _wait_loaded(run_dir: str, p: subprocess.Popen, timeout: float, refusals: int | None = None,
                 stop_deadline: float = 20.0) -> int:
    """`start` waits until the fast path has loaded its plug-ins: 0 when it runs cleanly; else the error is
    printed as `luaprobe run` prints it and the daemon is stopped (nothing half-started, :func:`_stop_quietly`;
    ``stop_deadline``: the config's [supervise] stop_deadline): 2, 3 or 4.
    ``refusals``: the read end of the supervisor's ``--refusal-fd`` pipe: a supervisor that refused to start (a
    link planted in the run directory after the checks here, say) wrote its one line there and exited 2."""
    log_path = control.path(run_dir, control.LOG)
    end = time.monotonic() + timeout
    stopping = None                               # who stopped the daemon, once status said "stopping"
    while time.monotonic() < end:
        if p.poll() is not None:                  # the supervisor is done already (input finished, or failed)
            other = control.read_pid(run_dir)
            if p.returncode == EXIT_USAGE and other and other != p.pid:   # another `start` won the pidfile
                print(f"luaprobe start: already running (supervisor pid {other}, run dir {run_dir}): nothing started "
                      "(stop it first, or give another [run] run_dir / --run-dir)", file=sys.stderr)
                return EXIT_USAGE
            refused = _read_refusal(refusals) if p.returncode == EXIT_USAGE else ""
            if refused:                           # nothing started: its line, and exit 2 (not the state of another)
                print(f"luaprobe start: {refused}; nothing started", file=sys.stderr)
                return EXIT_USAGE
            st = control.read_state(run_dir) or {}
            if st.get("state", "").startswith("stopped (input finished)") and not st.get("last_error"):
                stop_signals_decided()
                print(f"finished: the input was processed completely; outputs in {st.get('out_dir')}, "
                      f"log {log_path}")
                return EXIT_OK
            by = st.get("stopped_by")
            if by and st.get("state") == "stopped" and not st.get("last_error"):    # a stop, not a failure
                print(f"luaprobe start: {_stopped_while_loading(by, p)}; nothing runs now (start it again; log "
                      f"{log_path})", file=sys.stderr)
                return EXIT_INTERNAL
            problems = _load_problems(st)
            if problems:                          # its plug-ins failed to load and it is gone already (a short input
                _say_problems(problems, None)     # ended before a status request saw it)
                _say_not_started(None, log_path)
                return EXIT_PLUGIN
            err = st.get("last_error") or f"the supervisor exited ({describe_exit(p.returncode)})"
            print(f"luaprobe start: {err}\n{log_path} ends with:\n{_log_tail(run_dir)}", file=sys.stderr)
            return st.get("last_exit_code") or EXIT_INTERNAL
        try:
            st = control.request(run_dir, "status", timeout=5)
        except control.ControlError:            # not listening yet, or busy: the deadline above decides
            time.sleep(0.05)
            continue
        if st.get("supervisor_pid") != p.pid:   # another supervisor's socket: a racing `start` won the pidfile
            time.sleep(0.05)                    # while ours waits for it (PidFile.acquire); ours decides (above)
            continue
        if st["state"] == "stopping":           # stopped by someone else (luaprobe stop, a signal to the supervisor):
            if stopping is None:                # not "started", whether or not its plug-ins loaded; its exit is
                stopping = st.get("stopped_by") or "a stop"     # awaited and named above
                end = max(end, time.monotonic() + float(st.get("stop_deadline") or stop_deadline) + STOP_WAIT_SLACK)
            time.sleep(0.05)
            continue
        if st.get("loaded") or st["state"].startswith(("stopped", "failed")):
            problems = _load_problems(st)
            if not problems and not st["state"].startswith("failed"):
                stop_signals_decided()        # said "started" with the daemon running: a stop signal now is moot
                print(f"started: supervisor pid {st['supervisor_pid']}, fast path pid {st['fastpath_pid']}, "
                      f"run dir {run_dir}, log {log_path}")
                return EXIT_OK
            failed = st["state"].startswith("failed")
            _say_problems(problems, (st.get("last_error") or st["state"]) if failed else None)
            _say_not_started(_stop_quietly(run_dir, p, stop_deadline), log_path)
            return EXIT_PLUGIN if problems else (st.get("last_exit_code") or EXIT_INTERNAL)
        time.sleep(0.05)
    if stopping is not None:
        print(f"luaprobe start: {_stopped_while_loading(stopping, p)}, and it is still stopping (supervisor pid "
              f"{p.pid}; luaprobe status --run-dir {run_dir}, log {log_path})", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"luaprobe start: the fast path did not finish loading its plug-ins within {timeout:g} s "
          f"(it keeps running; see luaprobe status, {log_path})", file=sys.stderr)
    return EXIT_INTERNAL


def _load_problems(st: dict) -> list[str]:
    """The plug-in problems a status or state file reports that refuse a start (a "not supported" one does not)."""
    return [x for x in st.get("plugin_problems", []) if "not supported" not in x]


def _say_problems(problems: list[str], failed: str | None) -> None:
    """`start`'s first lines for a daemon that did not start: each plug-in problem, then the failed state's error
    when there is one."""
    for x in problems:
        print(f"luaprobe start: plug-in problem: {one_line(x)}", file=sys.stderr)
    if failed:
        print(f"luaprobe start: {one_line(failed)}", file=sys.stderr)


def _say_not_started(still: str | None, log_path: str) -> None:
    """`start`'s last line for a daemon that did not start: `still` (it would not stop: _stop_quietly's line) or
    "not started: fix the problem ..."."""
    print(f"luaprobe start: {still}" if still else
          f"luaprobe start: not started: fix the problem and start again (log {log_path})", file=sys.stderr)


def _stopped_while_loading(by: str, p: subprocess.Popen) -> str:
    """"the daemon it started was stopped by SIGTERM sent to its supervisor (pid 4711) before ...": ``by`` is the
    supervisor's ``stopped_by`` (a signal's name, or "luaprobe stop (pid N)")."""
    who = f"{by} sent to its supervisor (pid {p.pid})" if by.startswith("SIG") else by
    return f"the daemon it started was stopped by {who} before it reported its plug-ins loaded"


def _read_refusal(fd: int | None) -> str:
    """The last line a supervisor that refused to start wrote to its refusal pipe (non-blocking read end), or ""."""
    if fd is None:
        return ""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    lines = data.decode("utf-8", "backslashreplace").strip().splitlines()
    return lines[-1] if lines else ""


_refusal_fd: int | None = None      #: --refusal-fd: where refuse() also writes its line (the `start` waiting)


def refuse(message: str) -> int:
    """The supervisor refuses to start (nothing started): ``luaprobe: MESSAGE`` on stderr (the log), the message on
    the refusal pipe of the `start` that spawned it; returns 2."""
    print(f"luaprobe: {message}", file=sys.stderr, flush=True)
    if _refusal_fd is not None:
        try:
            os.write(_refusal_fd, message.encode("utf-8", "backslashreplace") + b"\n")
        except OSError:
            pass                            # that `start` is gone
    return EXIT_USAGE


def _stop_quietly(run_dir: str, p: subprocess.Popen, stop_deadline: float = 20.0) -> str | None:
    """Stop the daemon this `start` started (its supervisor ``p``) and wait until it is gone: None then.  The stop is
    asked on the control socket; when that request fails in any way (control.ControlError: no answer within 10 s, a
    connection reset while ``p`` lives, a reply that is not JSON, a socket we may not open), ``p`` gets SIGTERM,
    the same graceful stop.  The wait: ``stop_deadline`` + STOP_WAIT_SLACK (15 s).  Still running after it (frozen, or
    it ignored the signal): one line naming why and its pid, for `start` to print instead of "not started"."""
    why = None
    try:
        reply = control.request(run_dir, "stop")
        wait = float(reply.get("stop_deadline") or stop_deadline) + STOP_WAIT_SLACK
    except (control.ControlError, OSError) as e:    # NotRunning, NoAnswer, a failed request; no socket (EMFILE)
        why = str(e) if isinstance(e, control.ControlError) else f"no socket: {e.strerror}"
        wait = stop_deadline + STOP_WAIT_SLACK
        if p.poll() is None and isinstance(e, control.NotRunning) and _wait_gone(run_dir, 2.0, p.pid):
            why = None                  # it was exiting already (its socket closed on the way out)
        elif p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    if p.poll() is not None or _wait_gone(run_dir, wait, p.pid):
        return None
    return (f"the daemon it started did not stop ({why or 'the stop was asked'}; still running {wait:g} s later): "
            f"supervisor pid {p.pid}; stop it with `luaprobe stop --run-dir {run_dir}` or kill -TERM {p.pid}")


def _wait_gone(run_dir: str, timeout: float, pid: int | None = None) -> bool:
    """Until the pidfile lock is free and the supervisor process ``pid`` has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if control.read_pid(run_dir) is None:
            try:
                if pid is None or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                return True
        time.sleep(0.02)
    return False


def cmd_stop(args) -> int:
    """`luaprobe stop`: graceful stop; waits for the supervisor to exit.  Exit 0 stopped, 3 nothing was running
    (as `status`, `reload` and `stats`; docs/operations.md "Exit codes"), 5 the fast path missed stop_deadline or
    stalled while stopping and was SIGKILLed (what it had not written is lost; one line on stderr names what was
    killed), 1 still running after the wait, or the fast path ended with an error, or a store writer of the run
    failed (disk full) and the rows it was handed are missing, even when a restarted fast path ended well."""
    run_dir, how = control.find_run_dir(getattr(args, "run_dir", None))
    pid = control.read_pid(run_dir)
    try:
        reply = control.request(run_dir, "stop")
    except control.NoAnswer as e:
        print(f"luaprobe stop: {e}; " + ("the stop request stays queued (it stops when it reads it)" if e.sent else
                                         "nothing was asked of it") + f"; or kill -TERM {pid or 'the supervisor'}",
              file=sys.stderr)
        return EXIT_INTERNAL
    except control.NotRunning:
        try:
            st = control.read_state(run_dir) or {}
        except control.DamagedState as e:
            print(f"luaprobe stop: not running (looked in {run_dir}, found as {how}); {e}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        state = st.get("state", "never started")
        if not state.startswith(("stopped", "failed", "never")):     # state.json of a supervisor that was killed
            state = (f"stopped: the supervisor is gone (killed?) while {state}; its fast path got SIGTERM from the "
                     "kernel and stopped by itself")
        print(f"luaprobe stop: not running ({state}; looked in {run_dir}, found as {how})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not _wait_gone(run_dir, reply.get("stop_deadline", 20) + STOP_WAIT_SLACK, pid):
        print(f"luaprobe stop: the supervisor is still running (pid {control.read_pid(run_dir)})", file=sys.stderr)
        return EXIT_INTERNAL
    st = control.read_state(run_dir) or {}
    if st.get("stop_killed"):
        rule = "the stall rule, [supervise] stall_timeout" if "stalled" in st["stop_killed"] else \
            "raise [supervise] stop_deadline"
        print(f"luaprobe stop: {st['stop_killed']}; what they had not written is lost ({rule}; "
              f"log {control.path(run_dir, control.LOG)})", file=sys.stderr)
        return EXIT_STOP_KILLED
    code = st.get("last_exit_code") or 0
    if code > 0:                        # it ended with an error (docs/operations.md "Exit codes"): say so
        print(f"luaprobe stop: stopped, but the fast path ended with {st.get('last_exit')}: "
              f"{st.get('last_error') or '-'} (log {control.path(run_dir, control.LOG)})", file=sys.stderr)
        return code if code in (EXIT_INTERNAL, EXIT_PLUGIN) else EXIT_INTERNAL   # 3 would read as "not running"
    lost = int(st.get("store_rows_lost") or 0)
    if lost:                            # an earlier fast path's store writer failed (disk full): rows are missing
        print(f"luaprobe stop: stopped, but {lost} rows handed to the store writers of earlier fast paths are not in "
              f"the database (restarts {st.get('restarts', 0)}; last error: {st.get('last_error') or '-'}) "
              f"(log {control.path(run_dir, control.LOG)})", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"stopped (fast path {st.get('last_exit')}; outputs in {st.get('out_dir')})")
    return EXIT_OK


def format_status(st: dict, live: bool) -> str:
    ls = st.get("last_stats") or {}
    lines = [f"state:      {st.get('state')}" + ("" if live or st.get("answering") is False
                                                  else "  (supervisor not running)")]
    if live:
        procs = ", ".join(f"{k} {v}" for k, v in st.get("processes", {}).items())
        lines += [f"pids:       {procs}",
                  f"uptime:     {st['uptime_s']:.0f} s (fast path {st.get('fastpath_uptime_s') or 0:.0f} s)"]
    lines.append(f"restarts:   {st.get('restarts', 0)}  reloads: {st.get('reloads', 0)}  "
                 f"last exit: {st.get('last_exit') or '-'}")
    lines += [f"{k + ':':<11} {st[k]}" for k in ("source", "config", "run_dir", "out_dir") if st.get(k)]
    if st.get("last_error"):
        lines.append(f"last error: {one_line(st['last_error'])}")
    for p in st.get("plugin_problems") or []:
        lines.append(f"plug-in problem: {one_line(p)}")
    if ls:
        lines.append("last stats: " + "  ".join(f"{k} {v:,.0f}" if isinstance(v, (int, float)) and k != "time"
                                                else f"{k} {time.strftime('%H:%M:%S', time.localtime(v))}"
                                                for k, v in ls.items() if v is not None))
    return "\n".join(lines)


def cmd_status(args) -> int:
    """`luaprobe status`: 0 running, 3 stopped, 1 failed (LSB-like), or a supervisor that holds its socket but did
    not answer within 10 s (control.NoAnswer: its last saved state is shown, and one line on stderr says so)."""
    import json
    run_dir, how = control.find_run_dir(getattr(args, "run_dir", None))
    try:
        st, live = control.request(run_dir, "status"), True
    except control.NoAnswer as e:               # running, but frozen or busy: its last saved state, and exit 1
        st = control.read_state(run_dir) or {"run_dir": run_dir}
        what = "not taking requests" if isinstance(e, control.Unserved) else "not answering"
        st |= {"state": f"{what} (last saved state: {st.get('state', 'none')})", "answering": False}
        print(json.dumps(st | {"live": False}, indent=2) if getattr(args, "json", False) else format_status(st, False))
        print(f"luaprobe status: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except control.NotRunning:
        try:
            st, live = control.read_state(run_dir), False
        except control.DamagedState as e:       # no state to show: one line (--json too), not running
            print(f"luaprobe status: not running (looked in {run_dir}, found as {how}); {e}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        if st is None:
            st = {"state": f"stopped (never started in {run_dir}; looked there as {how})", "run_dir": run_dir}
        elif not st.get("state", "").startswith(("stopped", "failed")):
            st["state"] = f"stopped (supervisor gone; was {st.get('state')})"
    print(json.dumps(st | {"live": live}, indent=2) if getattr(args, "json", False) else format_status(st, live))
    if live:
        return EXIT_OK
    return EXIT_INTERNAL if st["state"].startswith("failed") else EXIT_NOT_RUNNING


def cmd_reload(args) -> int:
    """`luaprobe reload`: re-validate the config; if only scripts changed, backend scripts reload live
    (SIGHUP to the fast path); if settings changed, restart the fast path gracefully and wait until it runs."""
    run_dir = control.find_run_dir(getattr(args, "run_dir", None))[0]
    try:
        before = control.request(run_dir, "status")
        reply = control.request(run_dir, "reload", timeout=reload_timeout(before))
    except control.NotRunning as e:
        print(f"luaprobe reload: not running ({e})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except control.NoAnswer as e:
        print(f"luaprobe reload: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    if not reply.get("ok"):
        for line in reply.get("errors") or [reply.get("error")]:
            print(f"luaprobe reload: {'refused: ' if reply.get('errors') else ''}{line}", file=sys.stderr)
        if reply.get("errors"):
            print("luaprobe reload: the running fast path and its plug-ins are kept (fix the file, reload again)",
                  file=sys.stderr)
        return reply.get("exit", EXIT_USAGE)
    for n in reply.get("notes") or []:
        print(f"luaprobe reload: note: {n}", file=sys.stderr)
    if reply.get("mode") == "live backend reload":
        print(f"reloaded: backend scripts reload live in fast path pid {before['fastpath_pid']} "
              "(frontend scripts and settings need a restart: change the config or stop/start)")
        return EXIT_OK
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            st = control.request(run_dir, "status")
        except control.NotRunning:              # it ended while the fast path restarted: its last word
            st = control.read_state(run_dir) or {}
            print(f"luaprobe reload: the supervisor exited while the fast path restarted (state "
                  f"{st.get('state', 'unknown')}; last error: {one_line(st.get('last_error') or '-')}; log "
                  f"{control.path(run_dir, control.LOG)})", file=sys.stderr)
            return EXIT_INTERNAL
        if st["reloads"] > before["reloads"] and st["state"] == "running":
            print(f"reloaded: fast path pid {before['fastpath_pid']} -> {st['fastpath_pid']} (reloads {st['reloads']})")
            return EXIT_OK
        if st["state"].startswith(("failed", "stopp")):
            break
        time.sleep(0.05)
    print(f"luaprobe reload: state {st['state']}", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="luaprobe-supervisor")
    ap.add_argument("--config")
    ap.add_argument("--run-dir")
    ap.add_argument("--child", action="store_true", help="run the fast path once (started by the supervisor; "
                    "--config is then the validated active_config.json)")
    ap.add_argument("--log-file", help="own this log file (started by `start`): every process's output is copied "
                    "into it, rotated by [log] max_mb / backups (engine/daemon/logfile.py)")
    ap.add_argument("--probe-plugins", metavar="SPEC", help="probe plug-ins for a reload (plugin_errors)")
    ap.add_argument("--refusal-fd", type=int, help="write the line of a refusal to start here (the `start` that "
                    "spawned this supervisor reads it: refuse())")
    ap.add_argument("--out-lock-fd", type=int, help="--child: the supervisor's claim of out_dir (inherited), handed "
                    "on to the store writer (RunConfig.out_lock_fd)")
    ap.add_argument("--skip-packets", type=int, default=0, help="--child, files: read on after this many packets "
                    "(those the earlier fast paths walked)")
    args = ap.parse_args(argv)
    global _refusal_fd
    _refusal_fd = args.refusal_fd
    if args.probe_plugins:
        return probe_main(args.probe_plugins)
    if not args.config:
        ap.error("--config is required")
    if args.child:
        return child_main(args.config, args.run_dir, args.out_lock_fd, args.skip_packets)
    from luaprobe.shm import logs
    try:
        cfg = config_mod.load(args.config, run_dir=args.run_dir)
    except config_mod.ConfigError as e:
        return refuse(str(e))
    pump = None
    if args.log_file:
        from .logfile import LogPump
        pump = LogPump(args.log_file, int(cfg["log"]["max_mb"] * 1048576), cfg["log"]["backups"])
    logs.setup(verbose=cfg["log"]["verbose"], json_lines=cfg["log"]["format"] == "json")
    try:
        try:
            sup = Supervisor(cfg)
        except OSError as e:    # control.ensure_run_dir: a link planted in the run directory after `start` checked it
            return refuse(f"run directory {cfg.run_dir}: {e.strerror}")
        return sup.run()
    except Exception:                           # a bug: its traceback into the log while the pump still copies it
        import traceback                        # (printed by the interpreter after pump.close(): /dev/null)
        traceback.print_exc()
        return EXIT_INTERNAL
    finally:
        if pump is not None:
            pump.close()


if __name__ == "__main__":
    sys.exit(main())
