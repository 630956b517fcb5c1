"""Real-process checks for CLI runs: every process a run started is found by a marker in its environment (children
inherit it, orphans reparented to init too), and its shared memory by the owner pid in the segment names."""
from __future__ import annotations

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


def assert_nothing_left(tag: str, pids) -> None:
    """No process of the run alive (orphans included) and no segment of ``pids``; kills what it finds."""
    alive = tagged_processes(tag)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    segs = segments_of(pids)
    for n in segs:
        try:
            segment.unlink(n)
        except OSError:
            pass
    assert not alive, f"processes left running: {[(p.pid, p.cmdline()) for p in alive]}"
    assert not segs, f"shared memory left: {segs}"


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

