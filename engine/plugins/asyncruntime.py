"""The fast path's service loop for async work: poll return rings, watch workers, drain at shutdown.

One :class:`AsyncRuntime` per fast-path process owns the doorbell segment all
its workers ring when they publish results, and the plug-in VMs whose pools
it watches.  The packet loop calls :meth:`service` between batches; when
there is nothing else to do it calls :meth:`wait` (no CPU while idle).
"""
from __future__ import annotations

import time

from luaprobe.shm import segment
from luaprobe.workers.pool import AsyncConfig

from luaprobe.engine.plugins.vm import PluginVM

BELL_SIZE = 4096
DRAIN_BATCH = 64        #: results per poll below which a drain naps instead of polling again at once
DRAIN_NAP = 0.0002      #: seconds of that nap


class AsyncRuntime:
    """Plug-in VMs sharing one doorbell; call close() (or use as a context manager)."""

    def __init__(self, config: AsyncConfig | None = None, lua_path=(), bell_name: str | None = None):
        """``bell_name``: attach this doorbell segment (a shard's, owned by engine/shards.py) instead of
        creating one."""
        self.config = config or AsyncConfig()
        self.config.validate()
        self.lua_path = list(lua_path)
        segment.sweep()
        self.bell = segment.attach(bell_name) if bell_name else segment.create("bell", BELL_SIZE)
        self.ray_local = False
        if self.config.backend == "ray" and not self.config.ray_address:
            try:
                self._start_local_ray()
            except BaseException:
                self.bell.close()              # nobody holds this runtime to close it
                raise
        self.vms: list[PluginVM] = []
        self._services = 0              #: service() calls (a VM without workers is polled every 64th)
        self.closed = False
        self.abort = None               #: callable -> True when a hard stop was asked (checked while draining)
        self.beat = None                #: callable: the fast path's heartbeat, called while draining
        self.spare = None               #: workers/spare.py SpareWorker (prestart_worker)

    def prestart_worker(self) -> None:
        """Start a warm spare worker process now (workers/spare.py); the first local worker any VM loaded
        after this starts takes it over instead of starting cold in the middle of the packet loop.  No-op with
        the Ray backend (its slots are bridges)."""
        if self.config.backend == "local" and self.spare is None:
            from luaprobe.workers.spare import SpareWorker
            self.spare = SpareWorker().start()

    def load(self, path: str, instance: str = "0", enginetype: str = "frontend", **kw) -> PluginVM:
        """Load a plug-in (its workers start now, or on first use with start_workers="lazy")."""
        vm = PluginVM(path, instance=instance, enginetype=enginetype, lua_path=self.lua_path,
                      async_config=self.config, bell=self.bell, spare=self.spare, **kw)
        self.vms.append(vm)
        return vm

    def wait_workers(self, limit: float | None = None, stop=None) -> list[str]:
        """Wait until every worker of the pools started at load (``PluginVM.eager``: more than one worker asked
        for) runs its task loop (WorkerPool.ready_count), so that neither their spawns nor their start-up CPU
        (~60 ms each) fall in the packet loop.  Dead workers are restarted meanwhile (WorkerPool.check).
        ``limit``: seconds, by default the task timeout (--task-timeout: how long a worker may be busy); ``stop()``
        true ends the wait early (a stop signal).  Returns one line per plug-in whose workers are not all ready by
        then, naming its file (the run goes on: the pool keeps them, their tasks wait for them)."""
        limit = self.config.task_timeout if limit is None else limit
        end = time.monotonic() + limit
        waiting = [vm for vm in self.vms if getattr(vm, "eager", False) and vm.pool is not None]
        while waiting and time.monotonic() < end and not (stop is not None and stop()):
            if self.beat is not None:
                self.beat()
            for vm in waiting:
                vm.pool.check(force=True)
            waiting = [vm for vm in waiting if vm.pool is not None and vm.pool.ready_count() < vm.pool.nworkers]
            if waiting:
                time.sleep(0.005)
        if stop is not None and stop():
            return []
        return [f"{vm.path}: {vm.pool.nworkers - vm.pool.ready_count()} of its {vm.pool.nworkers} T.async "
                f"workers not running {limit:g} s after their start (--task-timeout); the run goes on, tasks "
                "wait for them" for vm in waiting]

    def retire(self, vm: PluginVM, deadline: float) -> None:
        """Stop one VM's task intake and deliver its results for up to `deadline` s (the rest: timeout)."""
        vm.stop_accepting()
        end = time.monotonic() + deadline
        while vm.pending() and time.monotonic() < end:
            if self.beat is not None:
                self.beat()
            self._drain_step(end)
        vm.cut_off(f"still running at the reload drain deadline ({deadline:g} s): result lost")

    def unload(self, vm: PluginVM) -> None:
        """Drop a VM that will not run (disabled by onload, bad definition): no onunload."""
        vm.close()
        self.vms.remove(vm)

    def service(self, max_results: int = 4096) -> int:
        """Deliver ready results in every VM and watch the workers; returns results delivered."""
        n = 0
        self._services = k = self._services + 1
        for vm in self.vms:
            # a VM with no worker pool has scheduled no task (its first one starts the pool): nothing to send or
            # deliver, only the collector's pace to check (gcpace.lua, every 64 polls), so it is polled every 64th
            # time, with the check: a lupa call per VM and batch was ~1-3 us (issue 10)
            if vm.pool is None:
                if k % 64 == 0:
                    n += vm.poll(max_results, pace=True)
                continue
            n += vm.poll(max_results)
            if vm.pool is not None:
                vm.pool.check()
        return n

    def wait(self, timeout: float, extra_ready=None) -> None:
        """Sleep until a worker publishes a result, the doorbell rings (e.g. the packet ring's
        producer published) or ``timeout`` seconds pass.  ``extra_ready()`` is re-checked after arming.
        A ``timeout`` <= 0 never sleeps (lp_bell_sleep takes 0 as "no timeout": a deadline reached exactly
        would otherwise block until the next doorbell, possibly forever)."""
        if timeout <= 0:
            return
        for vm in self.vms:
            if vm.has_results():
                return
        if extra_ready is not None and extra_ready():
            return
        seq = self._arm()
        if any(vm.has_results() for vm in self.vms) or (extra_ready is not None and extra_ready()):
            self._disarm()
            return
        self._sleep(seq, timeout)

    def _lib(self):
        if not hasattr(self, "_c"):
            import ctypes

            from luaprobe.shm.luajit import lpsync_path
            c = ctypes.CDLL(lpsync_path())
            c.lp_bell_arm.restype = ctypes.c_uint32
            c.lp_bell_arm.argtypes = [ctypes.c_void_p]
            c.lp_bell_disarm.argtypes = [ctypes.c_void_p]
            c.lp_bell_sleep.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_double]
            self._c = c
        return self._c

    def _arm(self) -> int:
        return self._lib().lp_bell_arm(self.bell.address)

    def _disarm(self) -> None:
        self._lib().lp_bell_disarm(self.bell.address)

    def _sleep(self, seq: int, timeout: float) -> None:
        self._lib().lp_bell_sleep(self.bell.address, seq, timeout * 1e9)

    def pending(self) -> int:
        """Tasks pending in all VMs."""
        return sum(vm.pending() for vm in self.vms)

    def run_until_idle(self, timeout: float = 30.0, stop=None) -> bool:
        """Service until no task is pending (True) or ``timeout`` passes or ``stop()`` is true (False)."""
        end = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= end or (stop is not None and stop()):
                return False
            if self.abort is not None and self.abort():
                raise KeyboardInterrupt
            if self.beat is not None:
                self.beat()
            self._drain_step(end)
        return True

    def _drain_step(self, end: float) -> None:
        """One step of a drain (results wanted until monotonic time ``end``): deliver what is ready; with
        nothing ready sleep on the doorbell, and with fewer than DRAIN_BATCH results ready (workers finishing
        them one by one) nap DRAIN_NAP s so they accumulate: polling again at once would spin on a core the
        workers need (issue 11: on 2 cores this spin cost ~0.1-0.2 µs of CPU per task at the end of a run)."""
        n = self.service()
        if n == 0:
            self.wait(min(0.02, max(0.0, end - time.monotonic())))
        elif n < DRAIN_BATCH:
            time.sleep(min(DRAIN_NAP, max(0.0, end - time.monotonic())))

    def shutdown(self, deadline: float | None = None) -> None:
        """Stop accepting, drain up to the deadline, cut off the rest (timeout), onunload, unlink."""
        if self.closed:
            return
        self.drain_and_stop(deadline)
        self.unload_all()
        self.close()

    def drain_and_stop(self, deadline: float | None = None, stop=None) -> None:
        """Stop accepting tasks, deliver results up to the deadline, count the rest as timeout
        (``lost_at_deadline``).  ``stop()`` -> a reason string (a signal during the drain) ends the drain
        early: the rest is counted as ``lost_at_stop`` with that reason."""
        deadline = self.config.drain_deadline if deadline is None else deadline
        for vm in self.vms:
            vm.stop_accepting()
        self.run_until_idle(deadline, stop)
        why = stop() if stop is not None else None
        for vm in self.vms:
            if why:
                vm.cut_off(f"{why}: result lost", "lost_at_stop")
            else:
                vm.cut_off(f"still running at the drain deadline ({deadline:g} s, --drain-deadline): result lost")

    def unload_all(self) -> None:
        """Call onunload in every VM (each at most once)."""
        for vm in self.vms:
            if not getattr(vm, "unloaded", False):
                vm.unloaded = True
                vm.call(None, "onunload")

    def _start_local_ray(self) -> None:
        """backend "ray" without an address: a local Ray instance for this run (this process is its
        driver; the bridges connect to it; stopped by close())."""
        try:
            import ray
        except ImportError:
            raise ValueError('async backend "ray" needs the ray package (pip install \'luaprobe[ray]\')') from None
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False,
                 namespace="luaprobe")
        self.config.ray_address = ray.get_runtime_context().gcs_address
        self.ray_local = True

    def close(self) -> None:
        """Stop every worker and unlink every segment (no drain)."""
        if self.closed:
            return
        self.closed = True
        if self.spare is not None:
            self.spare.close()
        for vm in self.vms:
            vm.close()
        self.bell.close()
        if self.ray_local:
            import ray
            ray.shutdown()
            self.config.ray_address = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(0 if exc[0] else None)
