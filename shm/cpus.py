"""CPU pinning of the capture process and the fast-path thread (``--pin-cpus``, docs/operations.md).

On a machine with two or more usable CPUs the capture process (the packet ring's producer) and the fast
path's thread (its consumer, the plug-in VMs' walks included) each get a CPU of their own, so the scheduler
neither puts them on one CPU for a while nor migrates the fast path away from the caches it filled: both
made the run-to-run spread of the fast-path benchmark (docs/benchmarks.md, "Pinning").  Everything else (the
SQLite writer, T.async workers, other programs) keeps the process's whole CPU set.

Setting values (a string, from the flag or TOML ``[fastpath] pin_cpus``):

* ``auto`` (default): pin when at least two CPUs are usable (``sched_getaffinity``); the fast path keeps the
  CPU it runs on when the loop starts (the scheduler's choice, so concurrent runs spread out), the capture
  process gets the next usable one.  Fewer than two usable CPUs: nothing is pinned.
* ``off``: nothing is pinned.
* ``C,F``: the capture process on CPU C, the fast path on CPU F (C != F); a CPU outside the usable set is
  not an error at run time (containers and ``taskset`` restrict it): a warning, and nothing is pinned.

Pinning never fails a run: an ``OSError`` from ``sched_setaffinity`` (a restricted cgroup, an exited
process) leaves that process as it was.  Linux only; elsewhere nothing is pinned.
"""
from __future__ import annotations

import os

SETTING_HELP = ("'auto' (capture process and fast path on two different CPUs when >= 2 are usable), 'off', or "
                "'C,F': capture on CPU C, fast path on CPU F")

_original: set | None = None      #: the fast-path thread's CPU set before pin_thread (None: not pinned)


def parse(text: str) -> str | tuple[int, int]:
    """``"auto"``, ``"off"`` or ``(capture cpu, fast-path cpu)`` from a setting value.

    Raises ValueError with a one-line reason for anything else."""
    t = str(text).strip().lower()
    if t in ("auto", "off"):
        return t
    parts = t.split(",")
    try:
        c, f = (int(p, 10) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: must be 'auto', 'off' or two CPU numbers 'C,F'") from None
    if c < 0 or f < 0 or c == f:
        raise ValueError(f"{text!r}: the two CPU numbers must be different and >= 0")
    return c, f


def usable() -> list[int]:
    """The CPUs this thread may run on, sorted ([] where the OS has no sched_getaffinity)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def current_cpu() -> int | None:
    """The CPU the calling thread runs on now (/proc/thread-self/stat field 39), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def plan(setting, cpus: list[int], here: int | None) -> tuple[tuple[int, int] | None, str | None]:
    """((capture cpu, fast-path cpu) or None, warning or None) for a parsed setting, the usable CPUs and the
    CPU the fast path runs on (``here``)."""
    if setting == "off" or (setting == "auto" and len(cpus) < 2):
        return None, None
    if setting == "auto":
        f = here if here in cpus else cpus[-1]
        return (cpus[(cpus.index(f) + 1) % len(cpus)], f), None
    c, f = setting
    if c not in cpus or f not in cpus:
        return None, (f"--pin-cpus {c},{f}: CPU {c if c not in cpus else f} is not usable by this process "
                      f"(usable: {','.join(map(str, cpus))}); nothing pinned")
    return (c, f), None


def pin_process(pid: int, cpu: int) -> bool:
    """Run process ``pid`` (its main thread) on ``cpu`` only.  False when the OS refused."""
    try:
        os.sched_setaffinity(pid, {cpu})
        return True
    except (AttributeError, OSError):
        return False


def pin_thread(cpu: int) -> bool:
    """Run the calling thread on ``cpu`` only, remembering its CPU set for unpin_thread / unpin_child."""
    global _original
    before = usable()
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        return False
    if _original is None:
        _original = set(before)
    return True


def unpin_thread() -> None:
    """Give the calling thread back the CPU set it had before pin_thread (no-op when not pinned)."""
    global _original
    if _original is None:
        return
    try:
        os.sched_setaffinity(0, _original)
    except OSError:
        pass
    _original = None


def unpin_child(pid: int) -> None:
    """A child started by a pinned thread inherited its single CPU: give it the thread's original set back
    (T.async workers restarted during a run must not share the fast path's CPU).  No-op when not pinned."""
    if _original is None:
        return
    try:
        os.sched_setaffinity(pid, _original)
    except OSError:
        pass
