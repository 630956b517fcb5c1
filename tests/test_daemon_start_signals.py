"""`luaprobe start` and stop signals around the daemon it starts (engine/daemon/supervisor.py cmd_start, _wait_loaded,
_stop_started; shm/exits.py stop_signals_decided): whatever moment a SIGINT / SIGTERM / SIGHUP reaches `start`, its
one line tells the truth about the daemon: stopped (and gone when `start` exits), or started and running.

The moment is forced, not hoped for: `start` runs in a driver process that stops itself with SIGSTOP at the point
under test (right after the supervisor's spawn returned; right after the wait for the plug-ins returned, where
`start` only has to exit); the test sees it stopped (state T in /proc), sends the signal, then SIGCONT.  Real
`start`, supervisor, fast path and plug-in; every process and segment of the run is reaped (tests/proc_tools.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests import helpers, proc_tools
from tests.test_load_budget import looping_config
from tests.test_supervisor import PACE

#: `luaprobe start ARGS...` that stops itself (SIGSTOP) at argv[1]: "spawned" (the supervisor's Popen returned) or
#: "returned" (_wait_loaded returned; `start` reads the supervisor's exit status next, p.poll(), and exits)
FREEZE_AT = r"""
import os, signal, subprocess, sys
from luaprobe.engine.daemon import cli, supervisor
where = sys.argv.pop(1)
waited = []

class Popen(subprocess.Popen):
    def __init__(self, args, *a, **kw):
        super().__init__(args, *a, **kw)
        if where == "spawned" and "--refusal-fd" in args:      # the supervisor, not a child of anything else
            os.kill(os.getpid(), signal.SIGSTOP)

    def poll(self):
        if waited and where == "returned":
            waited.clear()
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().poll()

def wait_loaded(*a, _real=supervisor._wait_loaded, **kw):
    code = _real(*a, **kw)
    waited.append(code)
    return code

subprocess.Popen = Popen
supervisor._wait_loaded = wait_loaded
sys.exit(cli.main(sys.argv[1:]))
"""


def stopped(pid: int) -> bool:
    """Process ``pid`` is stopped by a signal (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def freeze_start(cfg, where: str, env) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", FREEZE_AT, where, "start", "--config", str(cfg)], cwd=helpers.REPO,
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    helpers.wait_for(lambda: p.poll() is not None or stopped(p.pid), 120, 0.01)
    assert p.poll() is None, p.communicate()
    return p


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_a_stop_signal_right_after_the_spawn_stops_the_daemon_and_says_so(tmp_path, signum):
    """The signal comes when the supervisor's spawn has returned and `start` has not begun to wait for it: the
    daemon it started is stopped, the one line says so, exit 128 + signal, nothing of the run is left.  Before:
    `luaprobe start: stopped by SIGINT while starting, before any packet was processed (processes started so far
    were stopped, ...)`, exit 130, and the daemon went on running (its supervisor, fast path and segments)."""
    cfg = looping_config(tmp_path)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = freeze_start(cfg, "spawned", env)
        pids.add(p.pid)
        os.kill(p.pid, signum)
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        name = signal.Signals(signum).name
        assert p.returncode == 128 + signum and "started" not in out, (p.returncode, out, err)
        assert err == (f"luaprobe start: stopped by {name} while it waited for the daemon to load its plug-ins: the "
                       "daemon it started was stopped (exit status 0)\n"), err
        assert not proc_tools.tagged_processes(tag)      # start waited for its supervisor: the daemon is gone
    st = subprocess.run([*proc_tools.LUAPROBE, "status", "--run-dir", str(tmp_path / "run")], capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 3 and st.stdout.startswith("state:      stopped  (supervisor not running)\n"), \
        (st.returncode, st.stdout, st.stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_stop_signal_after_started_was_said_changes_nothing(tmp_path, signum):
    """The signal comes after `start` printed "started: ..." (the wait returned; `start` only exits now): the
    daemon it reported runs on, exit 0, nothing on stderr.  Before: main()'s `stopped by SIGINT while starting,
    before any packet was processed (processes started so far were stopped, ...)`, exit 130, with the daemon
    running."""
    cfg = looping_config(tmp_path)
    env, tag = proc_tools.tagged_env()
    run_dir = str(tmp_path / "run")
    with proc_tools.reaped(tag) as pids:
        p = freeze_start(cfg, "returned", env)
        pids.add(p.pid)
        os.kill(p.pid, signum)
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        assert (p.returncode, err) == (0, ""), (p.returncode, out, err)
        assert out.splitlines()[-1].startswith("started: supervisor pid "), out   # after any "removed N stale ..."
        st = proc_tools.start(["status", "--run-dir", run_dir], env=env)
        st_out, st_err = st.communicate(timeout=60)
        assert st.returncode == 0 and st_out.startswith("state:      running\n"), (st.returncode, st_out, st_err)
        s = proc_tools.start(["stop", "--run-dir", run_dir], env=env)
        s.communicate(timeout=90)
        assert s.returncode == 0


#: a plug-in whose top level says it runs (a file) and then waits for the test's go (another file): the test acts
#: while the fast path is known to be loading it
GATE = """-- TrisulPlugin
local w = io.open(%r, "w"); w:close()
while true do
  local f = io.open(%r)
  if f then f:close(); break end
  os.execute("sleep 0.02")
end
TrisulPlugin = { id = { name = "gate" }, engine_monitor = { onmetronome = function() end } }
"""


def gate_config(tmp_path):
    """(config, run dir, "waiting" file, "go" file) of a daemon whose one plug-in loads when the test says go."""
    waiting, go = str(tmp_path / "waiting"), str(tmp_path / "go")
    (tmp_path / "pl").mkdir()
    (tmp_path / "pl" / "gate.lua").write_text(GATE % (waiting, go))
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n[source]\npcap = ["{helpers.REPO}/engine/examples/'
                   f'sample.pcap"]\nloop = true\nspeed = {PACE}\n[plugins]\npaths = ["pl"]\n[fastpath]\nhook_budget = 0\n'
                   '[supervise]\n'
                   'stall_timeout = 120\n')
    return str(cfg), str(tmp_path / "run"), waiting, go


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "stop"])
def test_a_daemon_stopped_while_start_waits_for_its_plugins_is_named(tmp_path, how):
    """The supervisor is stopped (a signal to it, or `luaprobe stop`) while `start` waits for the plug-ins: once the
    supervisor has taken the stop (state.json says "stopping") the plug-in may load.  `start` names who stopped the
    daemon, in one line, exit 1, and never says "started" (the daemon is gone when it exits).  Before: "the
    supervisor exited (exit status 0)" and the log's tail, exit 1 -- or, when `start` polled while the stopping
    fast path had just loaded, "started: ...", exit 0, about a daemon that was stopping."""
    from luaprobe.engine.daemon import control
    cfg, run_dir, waiting, go = gate_config(tmp_path)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = proc_tools.start(["start", "--config", cfg], env=env)
        pids.add(p.pid)
        helpers.wait_for(lambda: os.path.exists(waiting) or p.poll() is not None, 120, 0.02)
        assert p.poll() is None, p.communicate()
        sup = control.read_pid(run_dir)
        if how == "stop":
            s = proc_tools.start(["stop", "--run-dir", run_dir], env=env)
            who = f"luaprobe stop (pid {s.pid})"
        else:
            os.kill(sup, signal.Signals[how])
            who = f"{how} sent to its supervisor (pid {sup})"
        helpers.wait_for(lambda: (control.read_json(control.path(run_dir, control.STATE)) or {}).get("state")
                         == "stopping", 60, 0.02)
        open(go, "w").close()
        out, err = p.communicate(timeout=120)
        if how == "stop":
            assert s.wait(120) == 0, s.communicate()
        assert not proc_tools.tagged_processes(tag)
    assert (p.returncode, "started" in out) == (1, False), (p.returncode, out, err)
    assert err == (f"luaprobe start: the daemon it started was stopped by {who} before it reported its plug-ins "
                   f"loaded; nothing runs now (start it again; log {control.path(run_dir, control.LOG)})\n"), err
