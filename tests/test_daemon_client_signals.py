"""^C / SIGTERM to a daemon client while it waits for the supervisor (engine/daemon/cli.py _client_stopped): one line
naming what the supervisor is doing now, 130 / 143, and the daemon goes on with what it was asked.

A real daemon (tests/test_supervisor.py's fixture) whose fast path is held by SIGSTOP, so that its stop cannot end
before the test lets it (stop_deadline 120 s, the stall rule's 60 s not reached either): the `luaprobe stop` client
is then waiting (for the reply or for the supervisor to exit) once the supervisor has saved the state "stopping",
which it does only after reading that client's request.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_client_interrupted_while_the_daemon_stops_says_the_stop_goes_on(daemon, sig):  # noqa: F811
    """`luaprobe stop` interrupted while the supervisor stops: "luaprobe stop: stopped waiting by SIGINT: the
    supervisor (pid N) goes on stopping (luaprobe status --run-dir RUN)", exit 128 + the signal, no traceback; the
    daemon then stops by itself once its fast path is let go.  Before: "luaprobe stop: stopped by SIGINT while
    starting, before any packet was processed (processes started so far were stopped, shared memory removed)"."""
    daemon.start(supervise="stop_deadline = 120")
    st = daemon.status()
    fastpath = st["fastpath_pid"]
    os.kill(fastpath, signal.SIGSTOP)
    try:
        client = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "stop", "--run-dir",
                                   daemon.run_dir], cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            helpers.wait_for(lambda: (control.read_json(control.path(daemon.run_dir, control.STATE)) or {})
                             .get("state") == "stopping", 60, 0.01)
            client.send_signal(sig)
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    finally:
        os.kill(fastpath, signal.SIGCONT)
    name = signal.Signals(sig).name
    assert (client.returncode, out, err) == (128 + sig, "", f"luaprobe stop: stopped waiting by {name}: the supervisor "
                                             f"(pid {st['supervisor_pid']}) goes on stopping (luaprobe status "
                                             f"--run-dir {daemon.run_dir})\n"), (client.returncode, out, err)
    helpers.wait_for(lambda: control.read_pid(daemon.run_dir) is None and not daemon.alive(), 120, 0.05)
    assert (control.read_json(control.path(daemon.run_dir, control.STATE)) or {}).get("state") == "stopped"
    assert not daemon.segments()
