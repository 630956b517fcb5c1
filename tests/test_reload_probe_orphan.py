"""A reload's plug-in probe (engine/daemon/supervisor.py PluginProbe, ``--probe-plugins``) does not outlive its
supervisor.  With [fastpath] hook_budget = 0 and a top level in a compiled endless loop the probe runs until its
deadline; when the supervisor is SIGKILLed meanwhile, nobody kills it at the deadline: it spun on at 100 % CPU as an
orphan (reparented to init) for ever.  The probe now has PR_SET_PDEATHSIG SIGKILL (the fast path has SIGTERM).
Truth: the kernel's process table (psutil), waited on as a condition; the fast path stops on its own death signal."""
from __future__ import annotations

import os
import signal

import psutil

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_control_races import reloading_into_a_looping_probe
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_reload_probe_dies_with_its_killed_supervisor(daemon, tmp_path):  # noqa: F811
    with reloading_into_a_looping_probe(daemon, tmp_path) as (reload, before):
        sup, fastpath = control.read_pid(daemon.run_dir), before["fastpath_pid"]
        probes = [p for p in psutil.Process(sup).children() if "--probe-plugins" in helpers.cmdline(p)]
        assert len(probes) == 1, probes
        probe = probes[0].pid
        daemon.pids.add(probe)                             # the fixture kills it if it is left
        os.kill(sup, signal.SIGKILL)
        helpers.wait_for(lambda: gone(sup), 30, 0.01)
        # the probe's deadline (RELOAD_PROBE_DEADLINE, 30 s with hook_budget 0) is the supervisor's to enforce: dead
        # with it, the probe must go by itself, well before that
        helpers.wait_for(lambda: gone(probe), 20, 0.05)
        helpers.wait_for(lambda: gone(fastpath), 60, 0.05)  # (its own PDEATHSIG: SIGTERM, a graceful stop)
        helpers.finish(reload, 60)
