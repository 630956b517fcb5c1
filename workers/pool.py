"""The worker processes of one plug-in VM: start, watch, time out, recycle, restart, stop.

Python here handles processes only.  Tasks and results move between the
plug-in VM (engine/plugins/async.lua) and the workers (workers/worker.lua) over
the rings in each worker's channel segment without touching Python.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import sys
import time

import psutil

from luaprobe.shm.exits import stop_signals_blocked_for_the_child
from luaprobe.shm.logs import log
from luaprobe.shm import cpus, segment
from luaprobe.shm.luajit import method

from luaprobe.shm.exits import EXIT_RECYCLE, describe_exit
from luaprobe.workers.limits import MAX_WORKERS

# The channel layout (control block lp_ctl, then the request and return rings) is defined once, in
# workers/protocol.lua and shm/ring.lua; Python reads the sizes and offsets from LuaJIT's ffi (_layout).
_LAYOUT_LUA = """function()
  local ffi, P, ring = require("ffi"), require("luaprobe.workers.protocol"), require("luaprobe.shm.ring")
  local function off(f) return ffi.offsetof("lp_ctl", f) end
  return P.CONTROL, ring.HEADER, off("pid"), off("cur_task"), off("cur_start_ns"), off("tasks_done"),
         off("exit_request"), off("state"), P.CONTROL + ring.TAIL, P.CONTROL + ring.HEAD
end"""


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """Byte sizes and offsets of a worker channel segment, as workers/protocol.lua declares them."""
    control: int          #: bytes of the control block before the request ring
    ring_header: int      #: bytes of a ring header (shm/ring.lua HEADER)
    pid: int
    cur_task: int
    cur_start_ns: int
    tasks_done: int
    exit_request: int
    state: int            #: u32, 0 while the worker starts, 1 once its loop runs (workers/worker.lua M.loop)
    req_tail: int         #: u64, the request ring's published position (the fast path's tasks)
    req_head: int         #: u64, the request ring's released position (the worker took the tasks before it)

    @classmethod
    def read(cls, lua) -> "ChannelLayout":
        return cls(*(int(x) for x in lua.eval(_LAYOUT_LUA)()))

    def segment_size(self, capacity: int) -> int:
        """Control block plus the two rings of ``capacity`` data bytes each."""
        return self.control + 2 * (self.ring_header + capacity)


@dataclasses.dataclass
class AsyncConfig:
    """Tunables of the async pool (command line / config file)."""

    workers: int | None = None          #: override TrisulPlugin.request_async_workers
    overflow_limit: int = 100_000       #: tasks waiting for ring space, all workers together
    task_timeout: float = 60.0          #: seconds one onexecute may run
    max_tasks: int = 0                  #: recycle a worker after this many tasks (0 = never)
    max_rss_mb: float = 0.0             #: recycle a worker above this RSS (0 = never)
    ring_size: int = 4 << 20            #: bytes in each request and return ring (power of two)
    drain_deadline: float = 10.0        #: seconds to finish pending tasks at shutdown
    backoff_initial: float = 0.05       #: first restart delay after a crash
    backoff_max: float = 5.0            #: restart delay cap
    backoff_reset: float = 30.0         #: a worker that ran this long before crashing restarts after backoff_initial
    check_interval: float = 0.01        #: how often the pool looks at its processes
    worker_spin_us: float = 1500.0      #: a worker polls this long after a task before it sleeps (0 = sleep at once)
    file_roots: list = dataclasses.field(default_factory=list)   #: file helpers confined beneath these (docs/async.md)
    backend: str = "local"              #: "local" worker processes, or "ray" actors (workers/raybridge.py)
    ray_address: str | None = None      #: an existing Ray cluster ("host:port"); None: a local one for the run
    ray_actor_cpus: float = 1.0         #: CPUs Ray reserves per actor (I/O-bound tasks: a fraction)
    env: dict = dataclasses.field(default_factory=dict)   #: T.env.get_config answers of the run's VMs and workers
    memory_mb: int = 0                  #: MiB of Lua memory per worker VM, as per plug-in VM (0 = no limit; the
                                        #: run's --plugin-memory-mb / [plugins] memory_mb: set by the fast path)
                                        #: ({"App>DataDirectory": dir, ...}: engine/plugins/tenv.py prepares them)

    def validate(self) -> None:
        """Raise ValueError naming the bad setting."""
        rs = self.ring_size
        if rs < 4096 or rs & (rs - 1):
            raise ValueError(f"ring_size {rs}: must be a power of two >= 4096")
        for name in ("overflow_limit", "max_tasks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be >= 0")
        if self.task_timeout <= 0 or self.drain_deadline < 0:
            raise ValueError("task_timeout must be > 0 and drain_deadline >= 0")
        if self.workers is not None and not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers {self.workers}: must be between 1 and {MAX_WORKERS}")
        for r in self.file_roots:
            if "\0" in r or not os.path.isdir(r):
                raise ValueError(f"file root {r!r}: not a directory")
        self.file_roots = [os.path.abspath(r) for r in self.file_roots]
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend {self.backend!r}: must be \"local\" or \"ray\"")
        if self.ray_actor_cpus < 0:
            raise ValueError(f"ray_actor_cpus {self.ray_actor_cpus}: must be >= 0")


@dataclasses.dataclass
class Slot:
    """One worker position: its channel segment persists across restarts."""

    k: int
    channel: segment.Segment
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None
    restarts: int = 0
    crashes_in_row: int = 0
    restart_at: float = 0.0
    started_at: float = 0.0             # time.monotonic() of the last spawn
    kill_reason: str | None = None      # set when we killed it on purpose
    timed_out_task: float = 0.0
    attached: bool = False              # formatted and known to the Lua side (Async:add_worker)
    idle_mark: tuple | None = None      # (request ring head, tasks done) when it was first seen idle with tasks
    idle_since: float = 0.0             #   waiting, and the time.monotonic() of that (_check_stalled)


#: the least time (s) a worker may take no task while tasks wait before it is replaced (_check_stalled), whatever the
#: task timeout: a worker merely descheduled on a loaded machine is not killed under a tiny --task-timeout
STALL_MIN_S = 2.0


def _kill_group(pgid: int) -> None:
    """SIGKILL every process in a worker's process group.  Only called while the worker (the group leader)
    is alive or an unreaped zombie, so its pid, and with it the group id, cannot have been reused."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spinning_workers() -> int:
    """How many workers of one pool poll their ring after a task (``worker_spin_us``); the others sleep at once.

    The CPUs this process may use less two (the capture process and the fast path, which would otherwise lose
    their cores to polling workers), at least 1: on 2 CPUs only worker 1 of a pool polls.  Before, every worker
    polled for 1.5 ms after each task, and 64 workers each woken for one task took both cores from the packet
    loop (docs/async.md "Latency and CPU")."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 1
    return max(1, ncpu - 2)


def _exited(proc: subprocess.Popen, timeout: float = 0.0) -> bool:
    """True once ``proc`` has exited, without reaping it (waitid WNOWAIT), polling up to ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:          # already reaped elsewhere
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)


def _reap(proc: subprocess.Popen) -> int:
    """End the exited worker's process group, then reap the worker; returns its exit status."""
    _kill_group(proc.pid)
    return proc.wait()


class WorkerPool:
    """Worker processes for one plug-in VM.

    ``async_obj`` is the VM's Lua Async object (engine/plugins/async.lua) and
    ``lua`` its runtime; ``bell`` is the fast path's doorbell segment.
    """

    def __init__(self, lua, async_obj, *, nworkers: int, script: str, lua_path=(),
                 bell: segment.Segment | None, config: AsyncConfig, remote: bool = False, spare=None):
        """``spare``: a :class:`luaprobe.workers.spare.SpareWorker` whose warm process the first local worker
        started takes over (None: every worker starts cold)."""
        self.lua = lua
        self.spare = spare
        self.async_obj = async_obj
        self.nworkers = nworkers
        self.script = script
        self.lua_path = list(lua_path)
        self.bell = bell
        self.config = config
        self.remote = remote and config.backend == "ray"   #: slots run bridges to Ray actors
        self.slots: list[Slot] = []
        self._last_check = 0.0
        self._last_rss = 0.0
        self.layout = ChannelLayout.read(lua)
        self._format = lua.eval(
            "function(addr, cap, ctl) local ring = require('luaprobe.shm.ring'); local P = require('luaprobe.workers.protocol');"
            " ring.format(addr + P.CONTROL, cap); ring.format(addr + P.CONTROL + ring.region_size(cap), cap) end")
        self._wake = lua.eval(
            "function(a, k) local w = a.workers[k]; require('luaprobe.shm.ring').lib.lp_bell_ring(w.req.data_bell) end")
        self._add_worker = method(lua, "add_worker")
        self._worker_lost = method(lua, "worker_lost")
        self._worker_ready = method(lua, "worker_ready")
        self.deaths = 0
        self.recycles = 0
        self.timeouts = 0
        self.stalls = 0           #: workers replaced for taking no task while tasks waited (_check_stalled)

    # ----------------------------------------------------------- lifecycle
    def start(self) -> "WorkerPool":
        """Create the channels and start every worker.  Resumable: a start interrupted by a Lua error (the hook
        budget firing in the Lua calls below while a hook's first task starts the pool) leaves every channel
        it made in ``self.slots`` (so :meth:`stop` removes it) and the next call goes on from there."""
        cap = self.config.ring_size
        for k in range(1, self.nworkers + 1):
            if k > len(self.slots):
                self.slots.append(Slot(k, segment.create(f"w{k}", self.layout.segment_size(cap))))
            slot = self.slots[k - 1]
            if not slot.attached:
                self._format(slot.channel.address, cap, 0)
                self._add_worker(self.async_obj, k, slot.channel.address, cap)
                slot.attached = True
                self._spawn(slot)
        return self

    def _spawn(self, slot: Slot) -> None:
        module = "luaprobe.workers.raybridge" if self.remote else "luaprobe.workers.worker"
        cmd = [sys.executable, "-m", module, "--channel", slot.channel.name,
               "--req-capacity", str(self.config.ring_size), "--slot", str(slot.k),
               "--ppid", str(os.getpid()), "--max-tasks", str(self.config.max_tasks),
               "--max-rss-mb", str(self.config.max_rss_mb), "--max-memory-mb", str(self.config.memory_mb),
               "--spin-us", str(self.config.worker_spin_us if slot.k <= spinning_workers() else 0.0)]
        if self.bell is not None:
            cmd += ["--bell", self.bell.name]
        if self.script:
            cmd += ["--script", self.script]
        for d in self.lua_path:
            cmd += ["--lua-path", d]
        for k, v in self.config.env.items():
            cmd += ["--env", f"{k}={v}"]
        for d in self.config.file_roots:
            cmd += ["--file-root", d]
        if self.remote:
            cmd += ["--ray-actor-cpus", str(self.config.ray_actor_cpus)]
            if self.config.ray_address:
                cmd += ["--ray-address", self.config.ray_address]
        buf = slot.channel.buf
        lay = self.layout
        for off in (lay.pid, lay.cur_task, lay.cur_start_ns, lay.tasks_done):
            struct.pack_into("<d", buf, off, 0.0)
        struct.pack_into("<I", buf, lay.exit_request, 0)
        struct.pack_into("<I", buf, lay.state, 0)      # ready again only once this process's loop runs
        del buf
        # its own process group: a timeout, a recycle or a crash ends everything the task started
        # (os.execute children included) with killpg; the terminal's ^C does not reach it
        slot.proc = self.spare.take(cmd[3:]) if self.spare is not None and not self.remote else None
        if slot.proc is None:
            with stop_signals_blocked_for_the_child():
                slot.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True, process_group=0)
        cpus.unpin_child(slot.proc.pid)     # restarted from a pinned fast path: not on its CPU (shm/cpus.py)
        try:
            slot.ps = psutil.Process(slot.proc.pid)
        except psutil.Error:
            slot.ps = None
        slot.kill_reason = None
        slot.timed_out_task = 0.0
        slot.started_at = time.monotonic()

    def ready_count(self) -> int:
        """Workers whose process is alive and runs its task loop: it has done its imports and built its VM and
        set ``state`` to 1 in its control block (workers/worker.lua ``M.loop``; reset to 0 at each spawn)."""
        n = 0
        for slot in self.slots:
            if slot.proc is not None and not _exited(slot.proc) and \
                    struct.unpack_from("<I", slot.channel.buf, self.layout.state)[0] == 1:
                n += 1
        return n

    def pids(self) -> list[int]:
        """Pids of running workers."""
        return [s.proc.pid for s in self.slots if s.proc is not None]

    def _control(self, slot: Slot) -> tuple[float, float, float]:
        buf, lay = slot.channel.buf, self.layout
        return tuple(struct.unpack_from("<d", buf, off)[0] for off in (lay.cur_task, lay.cur_start_ns, lay.tasks_done))

    # ----------------------------------------------------------- watching
    def check(self, now: float | None = None, force: bool = False) -> None:
        """Notice dead, hung and bloated workers and restart them.  Cheap; call often."""
        now = time.monotonic() if now is None else now
        if not force and now - self._last_check < self.config.check_interval:
            return
        self._last_check = now
        check_rss = self.config.max_rss_mb > 0 and now - self._last_rss >= 1.0
        if check_rss:
            self._last_rss = now
        for slot in self.slots:
            if not slot.attached:                   # an interrupted start's channel: start() completes it
                continue
            if slot.proc is None:
                if now >= slot.restart_at:
                    self._spawn(slot)
                    self._worker_ready(self.async_obj, slot.k)
                continue
            if _exited(slot.proc):
                self._lost(slot, _reap(slot.proc), now)
                continue
            if self._check_timeout(slot) or self._check_stalled(slot, now):
                continue
            if check_rss:
                self._check_rss(slot)

    def _check_timeout(self, slot: Slot) -> bool:
        cur_task, start, _ = self._control(slot)
        if cur_task and time.monotonic_ns() - start > self.config.task_timeout * 1e9:
            slot.kill_reason = f"task timed out after {self.config.task_timeout:g} s"
            slot.timed_out_task = cur_task
            log.warning("[%s] async worker %d (pid %d): %s; replacing it", os.path.basename(self.script),
                        slot.k, slot.proc.pid, slot.kill_reason)
            _kill_group(slot.proc.pid)
            _exited(slot.proc, 5.0)
            self.timeouts += 1
            self._lost(slot, _reap(slot.proc), time.monotonic())
            return True
        return False

    def _check_stalled(self, slot: Slot, now: float) -> bool:
        """A worker that runs no task while tasks wait in its request ring, and took none for task_timeout
        seconds (at least STALL_MIN_S), is replaced as a hung task is: stopped (SIGSTOP, a debugger) or wedged between two tasks, it held
        them (and with them the counter buckets of their schedule times, docs/async.md "Time") for ever, since
        the task timeout only watches a task under way.  Its waiting tasks go to the replacement
        (Async:worker_lost: redispatched, none lost, none run twice)."""
        buf, lay = slot.channel.buf, self.layout
        cur_task, _, done = self._control(slot)
        tail, head = (struct.unpack_from("<Q", buf, off)[0] for off in (lay.req_tail, lay.req_head))
        if cur_task or tail == head or struct.unpack_from("<I", buf, lay.state)[0] != 1:
            slot.idle_mark = None
            return False
        if slot.idle_mark != (head, done):          # first seen idle with tasks waiting, or it took one since
            slot.idle_mark, slot.idle_since = (head, done), now
            return False
        if now - slot.idle_since <= max(self.config.task_timeout, STALL_MIN_S):
            return False
        slot.kill_reason = (f"took no task for {now - slot.idle_since:.0f} s with tasks waiting (stopped or "
                            f"wedged between tasks)")
        log.warning("[%s] async worker %d (pid %d): %s; replacing it", os.path.basename(self.script), slot.k,
                    slot.proc.pid, slot.kill_reason)
        _kill_group(slot.proc.pid)
        _exited(slot.proc, 5.0)
        self.stalls += 1
        self._lost(slot, _reap(slot.proc), time.monotonic())
        return True

    def _check_rss(self, slot: Slot) -> None:
        try:
            rss = slot.ps.memory_info().rss if slot.ps else 0
        except psutil.Error:
            return
        if rss > self.config.max_rss_mb * 1e6 and slot.kill_reason is None:
            slot.kill_reason = f"recycled: RSS {rss / 1e6:.0f} MB above {self.config.max_rss_mb:g} MB"
            struct.pack_into("<I", slot.channel.buf, self.layout.exit_request, 1)
            self._wake(self.async_obj, slot.k)

    def _lost(self, slot: Slot, rc: int, now: float) -> None:
        # the task the worker was running when it died, read after its death: a task that timed out but
        # finished just before the kill has published its result (delivered by worker_lost) and the worker
        # may already run the next one; that one fails with the kill, it is not run a second time
        cur_task, _, _ = self._control(slot)
        planned = rc == EXIT_RECYCLE or (rc == 0 and slot.kill_reason and slot.kill_reason.startswith("recycled"))
        if slot.timed_out_task and cur_task == slot.timed_out_task:
            reason, is_timeout = slot.kill_reason, True
        elif slot.timed_out_task:
            reason, is_timeout = ("worker killed: the task before this one timed out as it finished "
                                  f"({slot.kill_reason})"), False
        elif slot.kill_reason and slot.kill_reason.startswith("took no task"):
            reason, is_timeout = f"worker killed: it {slot.kill_reason}", False
        else:
            reason, is_timeout = f"worker died ({describe_exit(rc)})", False
        # bytes: a Python str would reach Lua as userdata (the VMs have no encoding), and onerror
        # would get an object it cannot concatenate instead of the message string
        stalled = bool(slot.kill_reason and slot.kill_reason.startswith("took no task"))   # logged at the kill
        death = not (planned or slot.timed_out_task or stalled)   # logged below in one line, the failed task with it
        failed = self._worker_lost(self.async_obj, slot.k, reason.encode(), cur_task, is_timeout, death)
        slot.proc, slot.ps = None, None
        slot.restarts += 1
        if not death:
            self.recycles += planned
            slot.crashes_in_row = 0
            slot.restart_at = now
        else:
            self.deaths += 1
            if now - slot.started_at >= self.config.backoff_reset:
                slot.crashes_in_row = 0          # it ran healthily for a while: not a crash loop
            slot.crashes_in_row += 1
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (slot.crashes_in_row - 1))
            slot.restart_at = now + delay
            log.error("%s", self.death_line(slot.k, describe_exit(rc), bool(failed), delay))
        if slot.restart_at <= now:
            self._spawn(slot)
            self._worker_ready(self.async_obj, slot.k)

    def death_line(self, k: int, how: str, failed: bool, delay: float) -> str:
        """The one line of a worker's death (docs/async.md "Faults"): the plug-in file, how the worker ended
        (``describe_exit``: "killed by SIGSEGV", "exit status 3"), whether the task it ran failed, the restart.
        Its failed task is counted as ``error`` and its onerror called, not logged again (async.lua worker_lost)."""
        where = (" running a task (onexecute or a file helper): that task failed (counted as error, onerror "
                 "called)" if failed else ": it was between tasks, no task failed")
        return (f"[{os.path.basename(self.script)}] T.async worker {k} of {self.script} died ({how}){where}; the run "
                f"goes on, restarting the worker in {delay:.2f} s")

    # ----------------------------------------------------------- stopping
    def stop(self, timeout: float = 2.0) -> None:
        """Ask every worker to exit, kill what is left after ``timeout``, unlink the channels."""
        for slot in self.slots:
            if slot.proc is not None and not _exited(slot.proc):
                struct.pack_into("<I", slot.channel.buf, self.layout.exit_request, 1)
                self._wake(self.async_obj, slot.k)
        end = time.monotonic() + timeout
        for slot in self.slots:
            if slot.proc is None:
                continue
            if not _exited(slot.proc, max(0.0, end - time.monotonic())):
                slot.proc.kill()
            _exited(slot.proc, 5.0)
            _reap(slot.proc)
            slot.proc = None
        for slot in self.slots:
            slot.channel.close()
        self.slots = []

    def stats(self) -> list[dict]:
        """Per worker: pid, restarts, tasks done by the current process, CPU and RSS (psutil)."""
        out = []
        for slot in self.slots:
            cur_task, _, done = self._control(slot)
            row = {"slot": slot.k, "pid": slot.proc.pid if slot.proc else None, "restarts": slot.restarts,
                   "tasks_done": int(done), "busy": bool(cur_task)}
            if slot.ps is not None:
                try:
                    with slot.ps.oneshot():
                        row["cpu_percent"] = slot.ps.cpu_percent()
                        row["rss"] = slot.ps.memory_info().rss
                except psutil.Error:
                    pass
            out.append(row)
        return out
