"""Real-process checks for CLI runs: every process a run started is found by a marker in its environment (children
inherit it, orphans reparented to init too), and its shared memory by the owner pid in the segment names."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid

import psutil

from luaprobe.shm import segment

LUAPROBE = [sys.executable, "-m", "luaprobe.engine"]


def tagged_env(extra: dict | None = None) -> tuple[dict, str]:
    """An environment for a luaprobe process with a unique marker; returns (env, marker)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, LUAPROBE_TEST_TAG=tag, **(extra or {}))
    return env, tag


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``tag``."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("LUAPROBE_TEST_TAG") == tag:
                out.append(p)
        except psutil.Error:
            continue
    return out


def segments_of(pids) -> list[str]:
    """/dev/shm/luaprobe-* segments (and private directories) owned by any of ``pids``."""
    pids = set(pids)
    return [n for n in segment.list_segments() if segment.owner_pid(n) in pids]


def start(args, *, cwd=None, env=None, **kw) -> subprocess.Popen:
    """`luaprobe ARGS` as a real process (its own session: a signal to it is ours alone)."""
    return subprocess.Popen([*LUAPROBE, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def reap(tag: str, pids=(), grace: float = 0.0) -> tuple[list, list]:
    """End every process carrying ``tag`` and unlink the segments they and ``pids`` own.

    Waits up to ``grace`` s for the processes to end by themselves (a `stop` that returned may leave its processes
    exiting), then SIGKILLs and reaps what is still running: orphans re-parented to init and the processes of a
    daemonized supervisor too, which the autouse leak guard (conftest.py no_leaks) cannot see.  The owners whose
    segments are looked for are ``pids`` and every tagged process seen while waiting, so the segments of a fast
    path killed here are found.  Returns ([(pid, cmdline)] killed, [segment names] unlinked)."""
    import time
    seen, end = set(pids), time.monotonic() + grace
    while True:
        alive = tagged_processes(tag)
        seen |= {p.pid for p in alive}
        if not alive or time.monotonic() >= end:
            break
        time.sleep(0.1)
    killed = []
    for p in alive:
        try:
            killed.append((p.pid, p.cmdline()))
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    segs = segments_of(seen)
    for n in segs:
        try:
            segment.unlink(n)
        except OSError:
            pass
    return killed, segs


def assert_nothing_left(tag: str, pids, grace: float = 0.0) -> None:
    """No process of the run alive (orphans included) and no segment of ``pids`` or of a process of the run;
    kills and unlinks what it finds (:func:`reap`)."""
    killed, segs = reap(tag, pids, grace)
    assert not killed, f"processes left running: {killed}"
    assert not segs, f"shared memory left: {segs}"


@contextlib.contextmanager
def reaped(tag: str, pids=(), grace: float = 30.0):
    """``with reaped(tag) as pids:`` -- whatever the body does, no process carrying ``tag`` and no segment of
    theirs (or of a pid the body adds to ``pids``) is left after it.  A body that raised: everything is killed at
    once and its own exception goes on (a cleanup that waited for a stop that never came, and raised, left
    the daemons running: the next test found two).  A body that ended well: the processes get ``grace`` s to end
    by themselves, then what was left is killed and the test fails naming it (:func:`reap`)."""
    pids = set(pids)
    try:
        yield pids
    except BaseException:
        reap(tag, pids)
        raise
    assert_nothing_left(tag, pids, grace)


def worker_running(procs) -> bool:
    """True when one of ``procs`` is a T.async worker serving a plug-in: started as one, or the run's warm spare
    (workers/spare.py, started before the plug-ins load) once a pool took it over (its stdin is then /dev/null,
    not the pipe it waits on).  A worker runs only after a plug-in's first task: the packet loop is under way."""
    for p in procs:
        try:
            cmd = p.cmdline()
            if "luaprobe.workers.worker" not in cmd:
                continue
            if "--spare" not in cmd or os.readlink(f"/proc/{p.pid}/fd/0") == os.devnull:
                return True
        except (psutil.Error, OSError):
            continue
    return False

