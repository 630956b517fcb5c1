"""The run's input from an inputfilter's step: ``luaprobe run --lua-input FILE --args TEXT`` (Trisul's
``trisul -mode lua -in FILE -args TEXT``, docs.trisul.org/docs/lua/inputfilter; docs/plugins.md "inputfilter").

No capture process: the fast path calls the script's ``inputfilter.step(packet, engine)`` itself,
``STEP_CALLS`` at a time and no further than the first call that moves the engine's clock to another second
(engine/plugins/inputfilter.lua ``run``), and ticks that second as a packet's would (buckets close, flows expire,
backends get onmetronome / onendflush); nothing is ticked until the script set a time.  The input ends when step
returns a false value (Trisul: false at the end of its input; nil counts as false), on a stop signal, when the
instance hits its memory limit (a plug-in problem, exit 4), or after ``ERRORS_IN_A_ROW`` calls in a row that raised
an error (each one is a hook error, logged with its file:line; a call that goes well between them starts the count
again).  The frames the script gives with ``packet:set_packet`` go into the packet ring, which the fast path drains
before each round, and are walked as captured packets (engine/plugins/inputfilter.lua ``attach_ring``).
"""
from __future__ import annotations

import os

from luaprobe.shm import logs
from luaprobe.shm.luajit import method

STEP_CALLS = 4096        #: step calls per round between the fast path's other work (stats, T.async results, messages)
ERRORS_IN_A_ROW = 1000   #: step calls in a row that raise an error before the input ends (a plug-in problem, exit 4)


class StepInput:
    """Stands where the capture process stands in FastPath.run (``poll`` / ``wait`` / ``kill`` / ``send_signal`` /
    ``pid``) and calls the inputfilter instance ``inst``'s step.  The engine's clock starts at ``start_sec`` (Unix
    seconds) until the script sets a time (packet:set_timestamp); its frames go to the packet ring at ``ring_addr``."""

    def __init__(self, inst, start_sec: int, ring_addr: int):
        self.inst = inst
        self.pid = os.getpid()
        self.returncode = None
        self.calls = self.errors = self.in_a_row = 0
        self.ended = None                 #: why the input ended: end of input / stopped / disabled / errors
        self.problem = None               #: the plug-in problem line when it ended on errors
        self.disable_line = None          #: the line of the instance's memory limit when that ended it
        self._run = method(inst.vm.lua, "step_input")
        inst.vm.set_time(inst.vm.host.engine, int(start_sec), 0)
        inst.vm.lua.eval("function(h, a) require('luaprobe.engine.plugins.inputfilter').attach_ring(h, a) end")(
            inst.vm.host, ring_addr)

    @property
    def more(self) -> bool:
        return self.returncode is None

    def step(self) -> int | None:
        """One round of step calls; returns the engine clock's second after it (Unix seconds), or None while the
        script has set no time (packet:set_timestamp): nothing is ticked before, so records read before the first
        time (a header, lines it skips) do not tick the wall clock's second and make every later one late."""
        if self.inst.disabled is not None:
            self._end("disabled")
            return None
        n, goes_on, sec, err, why = self._run(self.inst.vm.host, STEP_CALLS)
        self.calls += int(n)
        if err is not None:
            self.errors += 1
            self.in_a_row = self.in_a_row + 1 if int(n) == 1 else 1    # the round's earlier calls went well
            if self.in_a_row >= ERRORS_IN_A_ROW:
                text = err if isinstance(err, str) else err.decode("utf-8", "backslashreplace")
                first = logs.one_line(text.split("\nstack traceback:", 1)[0])
                self.problem = (f"{self.inst.vm.path}: inputfilter.step failed on {self.in_a_row} calls in a row; "
                                f"the input ends here after {self.calls} calls (last error: {first})")
                self._end("errors")
        else:
            self.in_a_row = 0
        if why is not None and self.more:       # FastPath._disable logs it and makes it a plug-in problem (exit 4)
            self.disable_line = why if isinstance(why, str) else why.decode("utf-8", "backslashreplace")
            self._end("disabled")
        if not goes_on and self.more:
            self._end("disabled" if self.inst.disabled is not None else "end of input")
        return None if sec is None else int(sec)

    def _end(self, why: str) -> None:
        if self.returncode is None:
            self.returncode, self.ended = 0, why

    def summary(self) -> dict:
        """The run summary's ``lua_input`` entry."""
        host = self.inst.vm.host
        return {"script": self.inst.vm.path, "step_calls": self.calls, "step_errors": self.errors,
                "ended": self.ended, "frames": int(host.step_frames), "clipped": int(host.step_clipped)}

    # the capture process's interface (FastPath.run, _stop_capture, snapshot)
    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode

    def kill(self) -> None:
        self._end("stopped")

    def send_signal(self, sig) -> None:
        self._end("stopped")
