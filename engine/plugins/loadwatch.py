"""A plug-in's top level stuck while it loads, in a process without a fast path (``luaprobe check``, the
supervisor's config check): the load runs under the hook budget (engine/plugins/host.lua ``boot``, opts.budget), whose
interrupt ends an interpreted loop as a load error; a loop LuaJIT compiled never returns to the interpreter, so this
thread ends the process instead, ``GRACE`` s after the budget ran out (engine/plugins/_lpwatch.c ``stuck_for``).
The fast path does the same in engine/fastpath/run.py ``_SignalWatch``."""
from __future__ import annotations

import os
import sys
import threading
import time

GRACE = 2.0          #: s past the budget before a load the interrupt could not reach ends the process


class LoadWatch:
    """``with LoadWatch(prefix, code):`` probe plug-ins; a stuck load prints ``{prefix}: plug-in error: <the budget
    message>, and N s later it still runs ...`` and exits the process with ``code`` (os._exit: nothing to clean up
    in a process that only probes)."""

    def __init__(self, prefix: str, code: int, on_stuck=None):
        self.prefix, self.code, self.on_stuck = prefix, code, on_stuck
        self.done = threading.Event()

    def __enter__(self):
        try:
            from luaprobe.engine.plugins import _lpwatch
        except ImportError:                 # not built: the budget is not enforced
            return self
        self._lpwatch = _lpwatch
        threading.Thread(target=self._run, name="luaprobe-load-watch", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        return False

    def _run(self) -> None:
        while not self.done.wait(0.25):
            late = self._lpwatch.stuck_for()
            if late > GRACE:
                line = (f"plug-in error: {self._lpwatch.message()}, and {late:.0f} s later it still runs in code the "
                        "interrupt cannot reach (a loop LuaJIT compiled, or a C function)")
                if self.on_stuck is not None:
                    self.on_stuck(line)
                sys.stderr.write(f"{self.prefix}: {line}\n")
                sys.stderr.flush()
                os._exit(self.code)
