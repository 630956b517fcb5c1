"""A warm spare worker process: started with the run, adopted by the first worker pool that starts a worker.

A plug-in VM with one T.async worker (the default) starts it on its first task (engine/fastpath/run.py loads
VMs with ``start_workers="lazy"``; more than one worker start at load, engine/plugins/vm.py ``_start_at_load``),
so in `luaprobe run` that worker starts while packets already flow.  A worker
process needs ~60 ms of CPU before it runs a task (the interpreter, site, the imports, lupa; building its VM is
~7 ms of it), and during the packet loop it gets that CPU from the same cores as the capture process and the fast
path: on 2 cores its first result came 0.2-0.25 s after the first task, 50 000-160 000 tasks behind, and the
plug-in VM's collector re-marked that backlog (the onresult closures and data of every task in flight) at every
cycle (issue 11, tools/bench/async_e2e_trace.py).

:class:`SpareWorker` starts ``python -m luaprobe.workers.worker --spare --ppid PID`` before the plug-ins load
(engine/fastpath/run.py, when a plug-in file names ``async``: ``mentions_async``):
the process does its imports, then blocks reading one line from its stdin.  :meth:`SpareWorker.take` hands it
the worker's arguments (the line: a JSON array of the strings :func:`luaprobe.workers.worker.parse_args` takes)
and returns its ``Popen``; from there it is an ordinary worker (own process group, ``PR_SET_PDEATHSIG``).
Only the first worker started is warm (no spare is started again: a spare started during the packet loop would
take the same CPU a cold start does).  :meth:`close` ends an unused spare (SIGKILL: it holds nothing yet); EOF on its stdin also
ends it (exit 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


class SpareWorker:
    """At most one warm worker process waiting for its arguments; close() when the run ends."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SpareWorker":
        """Start the spare (its own process group, stdin a pipe, no other descriptor inherited)."""
        from luaprobe.shm.exits import stop_signals_blocked_for_the_child
        with stop_signals_blocked_for_the_child():
            self.proc = subprocess.Popen([sys.executable, "-m", "luaprobe.workers.worker", "--spare",
                                          "--ppid", str(os.getpid())],
                                         stdin=subprocess.PIPE, close_fds=True, process_group=0)
        return self

    def take(self, args: list[str]) -> subprocess.Popen | None:
        """The spare, now a worker with ``args`` (worker command-line arguments), or None when there is no live
        spare (never started, already taken, died): the caller then starts a worker itself."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps(list(args)).encode() + b"\n")
                proc.stdin.close()
                return proc
            except (BrokenPipeError, OSError):
                pass
        _end(proc)
        return None

    def close(self) -> None:
        """End an unused spare (SIGKILL: it holds nothing yet, and a run ending, even at a second stop signal,
        does not wait for its imports to finish) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
