"""Exit codes of every luaprobe process, and how a child's exit status is described (one table).

The CLI's codes are documented in README.md ("Exit codes"); the supervisor and the worker pool
describe a child's end with :func:`describe_exit`; child processes call :func:`die_with_parent`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1     #: prctl(2)

EXIT_OK = 0          #: success
EXIT_INTERNAL = 1    #: internal error (a bug: the log has the traceback)
EXIT_USAGE = 2       #: usage error: a bad flag, config key or argument
EXIT_INPUT = 3       #: input error: a bad capture (the message names the file and byte offset)
EXIT_PLUGIN = 4      #: plug-in error: a plug-in failed to load, or a hook failed on every call
EXIT_NOT_RUNNING = 3  #: `status` / `stop` / `reload` / `stats`: no daemon runs in the run directory (LSB's 3)
EXIT_STOP_KILLED = 5  #: `stop` (and a foreground supervisor): the fast path missed stop_deadline and was SIGKILLed
EXIT_RECYCLE = 75    #: a worker leaving on purpose (max tasks / RSS); the pool restarts it without backoff
#: a file / --generate run stopped early by a signal (128 + signal number): graceful, everything up to the stop
#: was processed and written (a live run's normal end is a signal: it exits 0); a second signal: EXIT_INTERNAL
#: SIGHUP (the terminal went away, or `kill -HUP`) is the same graceful stop as SIGTERM (docs/operations.md)
EXIT_STOPPED = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   #: what stops a run (the first: gracefully)


def describe_exit(rc: int) -> str:
    """``rc`` as Popen.returncode gives it: 'exit status 1' or 'killed by SIGKILL'."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


@contextlib.contextmanager
def stop_signals_blocked_for_the_child():
    """Around a ``subprocess.Popen(..., process_group=0)`` of a helper that ignores the stop signals (a T.async
    worker): SIGINT, SIGHUP and SIGTERM are blocked in this thread, so the child is born with them blocked and
    keeps them blocked through exec until it has set them to SIG_IGN (:func:`ignore_stop_signals`).  CPython's
    child resets its handlers to SIG_DFL and restores the mask *before* its setpgid(): a Ctrl-C or a `kill -INT
    -PGID` to the run's group in that window killed the new worker ("async worker 1 killed by SIGINT; restarting",
    tests/test_sighup.py, 1 run in 11 under load).  A signal that comes meanwhile stays pending for this thread
    and is taken when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """The child's side of :func:`stop_signals_blocked_for_the_child`: SIGINT, SIGHUP, SIGTERM ignored, then
    unblocked (a pending one is discarded)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def die_with_parent(ppid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), and exit now
    if the parent ``ppid`` is already gone (the process was reparented before the call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != ppid:
        os._exit(0)


class StartupStop(KeyboardInterrupt):
    """SIGINT / SIGTERM before a command took over its signals (start-up: imports, checks, loading)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def early_stop(signum, frame):
    """The CLI's first SIGINT / SIGTERM handler: raise :class:`StartupStop`, which main() reports as one line
    and exit 128 + signum (130 / 143); `luaprobe run` replaces it with its graceful stop once it can."""
    raise StartupStop(signum)


def decided(signum, frame):
    """A stop signal after the command's outcome was decided and said (`start`'s "started: ..."): it changes nothing
    (:func:`stop_signals_decided`)."""


def stop_signals_decided() -> None:
    """The command's outcome is decided: a stop signal from now on is taken by :func:`decided` and changes nothing,
    where :func:`early_stop` would raise and have main() print a line contradicting what was said.  Only the signals
    early_stop holds are touched (the CLI's main() gives back its previous handlers, an ignored SIGHUP stays
    ignored)."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is early_stop:
            signal.signal(s, decided)


def install_early_stop(old: dict) -> None:
    """Take SIGINT and SIGTERM when nobody else has (default disposition or Python's KeyboardInterrupt), noting
    each previous handler in ``old`` ({signal: handler}) before the swap: early_stop may raise as soon as it is
    installed, and the caller gives back what ``old`` holds."""
    for s in STOP_SIGNALS:
        h = signal.getsignal(s)
        if h in (signal.SIG_DFL, signal.default_int_handler):
            old[s] = h
            signal.signal(s, early_stop)

