"""A reload's plug-in probe (engine/daemon/supervisor.py PluginProbe, ``--probe-plugins``) does not outlive its
supervisor.  With [fastpath] hook_budget = 0 and a top level in a compiled endless loop the probe runs until its
deadline; when the supervisor is SIGKILLed meanwhile, nobody kills it at the deadline: it spun on at 100 % CPU as an
orphan (reparented to init) for ever.  The probe now has PR_SET_PDEATHSIG SIGKILL (the fast path has SIGTERM).
Truth: the kernel's process table (psutil), waited on as a condition; the fast path stops on its own death signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_control_races import LOOPING
from tests.test_supervisor import cli, daemon  # noqa: F401 - the fixture


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_reload_probe_dies_with_its_killed_supervisor(daemon, tmp_path):  # noqa: F811
    plug = tmp_path / "plugins"
    plug.mkdir()
    script = plug / "monitor.lua"
    script.write_text('TrisulPlugin = { id = { name = "m" }, engine_monitor = { onmetronome = function() end } }\n')
    daemon.write_config(plugins=[plug])
    with open(daemon.config, "a") as f:
        f.write("[fastpath]\nhook_budget = 0\n")
    r = cli("start", "--config", daemon.config)
    assert r.returncode == 0, r.stderr
    sup = control.read_pid(daemon.run_dir)
    daemon.pids.add(sup)
    fastpath = daemon.status()["fastpath_pid"]
    script.write_text(LOOPING % str(tmp_path / "looping"))
    reload = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "reload", "--run-dir",
                               daemon.run_dir], cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with helpers.killed_when_left(reload):
        helpers.wait_for(lambda: (tmp_path / "looping").exists() or reload.poll() is not None, 60, 0.01)
        assert reload.poll() is None, reload.communicate()
        probes = [p for p in psutil.Process(sup).children() if "--probe-plugins" in p.cmdline()]
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
