"""CPU pinning of the capture process and the fast path (shm/cpus.py, `--pin-cpus`, docs/operations.md).

Real runs: the CPU sets are read from /proc/PID/status (Cpus_allowed_list) of the real capture process and
/proc/self/task/TID/status of the fast path's thread while the packet loop runs, not from our own bookkeeping.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil
import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.shm import cpus
from tests import helpers

EX = os.path.join(helpers.REPO, "engine", "examples")
PLUGIN = os.path.join(EX, "tcp_ports.lua")
PCAP = os.path.join(helpers.PCAPS, "tcp-echo-many-flows.pcap")     # 6.8 MB: more than the 1 MiB ring below
USABLE = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(USABLE) < 2, reason="needs two usable CPUs")


def allowed(path: str) -> set[int]:
    """Cpus_allowed_list of a /proc status file as a set ("0-1,3" -> {0, 1, 3})."""
    with open(path) as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    out = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def run_and_look(tmp_path, pin: str) -> tuple[dict, set, set]:
    """A fast-path run with pin_cpus=pin; (summary, capture process CPUs, fast-path thread CPUs) as seen in
    /proc at the first progress report of the packet loop (the capture process is then still filling the
    1 MiB ring from a 6.8 MB file)."""
    seen: dict = {}
    me = psutil.Process()

    def progress(_packets, _bytes):
        if seen:
            return
        cap = [p for p in me.children() if "luaprobe.engine.capture.process" in " ".join(helpers.cmdline(p))]
        assert len(cap) == 1
        seen["capture"] = allowed(f"/proc/{cap[0].pid}/status")
        seen["fastpath"] = allowed(f"/proc/self/task/{threading.get_native_id()}/status")

    s = FastPath(RunConfig(plugins=[PLUGIN], files=[PCAP], out_dir=str(tmp_path / "out"), pin_cpus=pin,
                           packet_ring_size=1 << 20, progress=progress)).run()
    assert s["packets"] > 0 and not s["input_errors"]
    return s, seen["capture"], seen["fastpath"]


@two_cpus
def test_auto_puts_capture_and_fast_path_on_two_cpus(tmp_path):
    s, cap, fp = run_and_look(tmp_path, "auto")
    assert len(cap) == 1 and len(fp) == 1 and cap != fp and (cap | fp) <= set(USABLE)
    assert s["cpus_pinned"] == {"capture": min(cap), "fastpath": min(fp)}
    assert os.sched_getaffinity(0) == set(USABLE)          # the thread has its CPUs back after the run


@two_cpus
def test_explicit_cpus(tmp_path):
    c, f = USABLE[-1], USABLE[0]
    s, cap, fp = run_and_look(tmp_path, f"{c},{f}")
    assert (cap, fp) == ({c}, {f}) and s["cpus_pinned"] == {"capture": c, "fastpath": f}


def test_off_pins_nothing(tmp_path):
    s, cap, fp = run_and_look(tmp_path, "off")
    assert cap == fp == set(USABLE) and s["cpus_pinned"] is None


@pytest.mark.skipif(not USABLE or not os.path.exists("/usr/bin/taskset"), reason="needs taskset")
@pytest.mark.parametrize("pin", ["auto", f"{USABLE[0]},{USABLE[0] + 1}"])
def test_one_usable_cpu_pins_nothing_and_runs(tmp_path, pin):
    """Under `taskset -c N` (as a container or cgroup restricts a run) auto pins nothing and an explicit pair
    that is not usable is a warning: the run completes, every packet counted."""
    out = tmp_path / "out"
    r = subprocess.run(["taskset", "-c", str(USABLE[0]), sys.executable, "-m", "luaprobe.engine.daemon.cli", "run",
                        PLUGIN, "--pcap", PCAP, "--out", str(out), "--pin-cpus", pin],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    if pin != "auto":
        assert f"--pin-cpus {pin}: CPU {USABLE[0] + 1} is not usable by this process" in r.stderr
    import json
    import sqlite3
    with sqlite3.connect(out / "luaprobe.sqlite") as db:
        summary = dict(db.execute("SELECT key, value FROM run").fetchall())
    assert json.loads(summary["cpus_pinned"]) is None and json.loads(summary["packets"]) > 0


def test_plan():
    """The rule of shm/cpus.py on given CPU sets (the real-process tests above use whatever this machine has)."""
    assert cpus.plan("auto", [0], 0) == (None, None)
    assert cpus.plan("auto", [0, 1], 0) == ((1, 0), None)
    assert cpus.plan("auto", [0, 1], 1) == ((0, 1), None)
    assert cpus.plan("auto", [2, 5, 7], 7) == ((2, 7), None)
    assert cpus.plan("auto", [2, 5], None) == ((2, 5), None)
    assert cpus.plan("off", [0, 1], 0) == (None, None)
    assert cpus.plan((1, 0), [0, 1], 0) == ((1, 0), None)
    where, warning = cpus.plan((3, 0), [0, 1], 0)
    assert where is None and "CPU 3 is not usable" in warning
    for bad in ("1", "1,1", "a,b", "-1,2", "1,2,3", ""):
        with pytest.raises(ValueError):
            cpus.parse(bad)
    assert cpus.parse(" Auto ") == "auto" and cpus.parse("3,1") == (3, 1)


@two_cpus
def test_child_of_the_pinned_thread_gets_every_cpu_back():
    """workers/pool.py restarts T.async workers from the fast path's (pinned) thread: unpin_child gives such a
    child the thread's CPU set from before the pin, so a worker never shares the fast path's single CPU."""
    assert cpus.pin_thread(USABLE[0])
    try:
        p = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
        try:
            assert allowed(f"/proc/{p.pid}/status") == {USABLE[0]}          # inherited from the thread
            cpus.unpin_child(p.pid)
            assert allowed(f"/proc/{p.pid}/status") == set(USABLE)
        finally:
            p.kill()
            p.wait()
    finally:
        cpus.unpin_thread()
    assert os.sched_getaffinity(0) == set(USABLE)
