"""The per-user registry of running daemons (engine/daemon/control.py register / running_run_dirs) cannot be
written or read: a convenience lost, not a daemon.  A real daemon whose LUAPROBE_STATE_DIR is a regular file (what a
service account's $HOME that does not exist, or a read-only home, is to an unprivileged user: makedirs fails)."""
from __future__ import annotations

import os
import subprocess
import sys

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


def test_a_daemon_whose_registry_cannot_be_written_runs_and_is_found_with_run_dir(daemon, tmp_path):  # noqa: F811
    """`start` exits 0 and the supervisor log says in one line that it could not register and how it is found;
    `status --run-dir` answers (running), `status` without it says not running (3) in one line, no traceback;
    `stop --run-dir` stops it.  Before: register()'s NotADirectoryError ended the supervisor after its checks:
    `start` exit 1, its log tail a traceback; and `status` without --run-dir was a traceback too."""
    state = tmp_path / "state-file"
    state.write_text("")
    env = dict(os.environ, LUAPROBE_STATE_DIR=str(state))

    def luaprobe(*args):
        return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO, env=env,
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    daemon.write_config()
    r = luaprobe("start", "--config", daemon.config)
    if control.read_pid(daemon.run_dir):
        daemon.pids.add(control.read_pid(daemon.run_dir))
    assert r.returncode == 0, (r.returncode, r.stderr)
    log = open(control.path(daemon.run_dir, control.LOG)).read()
    assert (f"cannot register this daemon in {state}/daemons: Not a directory; luaprobe status, stop, reload "
            f"and stats find it only with --run-dir {daemon.run_dir}") in log, log[-2000:]
    assert "Traceback" not in log
    r = luaprobe("status", "--run-dir", daemon.run_dir)
    assert r.returncode == 0 and r.stdout.startswith("state:      running\n"), (r.returncode, r.stdout, r.stderr)
    elsewhere = tmp_path / "elsewhere"                 # no ./run there: only the registry could name the daemon
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "status"], cwd=str(elsewhere), env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 3 and "Traceback" not in r.stderr and r.stdout.startswith("state:      stopped (never "), \
        (r.returncode, r.stdout, r.stderr)
    assert luaprobe("stop", "--run-dir", daemon.run_dir).returncode == 0
    assert not daemon.alive() and not daemon.segments()
