"""A daemon configuration that is not a regular file (engine/daemon/config.py load): a FIFO at its path, or
`--config <(...)`'s pipe.  The supervisor reads its configuration again when it starts and at each reload, so
such a file is refused in one line, without waiting for a writer.  Before, open() of a FIFO with no writer waited
for ever: `luaprobe start` hung, the `reload` client hung (it reads the config for its wait), and a SIGHUP reload
hung the supervisor's loop (no status answered, the fast path unwatched).  Real daemons and FIFOs; the test's own
timeouts are the "for ever"."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


def luaprobe(*args, timeout=60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"luaprobe {' '.join(args)} still waiting after {timeout} s")


def not_regular(path: str) -> str:
    return (f"{path}: not a regular file (a FIFO, pipe or device; the daemon reads its configuration again at each "
            "start and reload: give a file)")


def test_start_with_a_fifo_as_config_is_refused_at_once(tmp_path):
    """`start --config FIFO`: one line, exit 2 (usage), nothing started."""
    fifo = str(tmp_path / "probe.toml")
    os.mkfifo(fifo, 0o600)
    r = luaprobe("start", "--config", fifo)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"luaprobe start: {not_regular(fifo)}\n"), r
    assert control.read_pid(str(tmp_path / "run")) is None


def test_a_config_replaced_by_a_fifo_refuses_the_reload_and_keeps_the_daemon(daemon):  # noqa: F811
    """The running daemon's config file replaced by a FIFO: `luaprobe reload` is refused in one line, exit 2, the
    fast path kept; a SIGHUP reload is refused in the log and the supervisor answers `status` (exit 0, the same
    pids); with the file back, reload works."""
    daemon.start()
    before = daemon.status()
    text = open(daemon.config).read()
    os.unlink(daemon.config)
    os.mkfifo(daemon.config, 0o600)
    r = luaprobe("reload", "--run-dir", daemon.run_dir)
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", f"luaprobe reload: reload refused, configuration invalid: {not_regular(daemon.config)}\n"), r
    log = control.path(daemon.run_dir, control.LOG)
    os.kill(before["supervisor_pid"], signal.SIGHUP)
    helpers.wait_for(lambda: "reload requested by SIGHUP" in open(log).read(), 60, 0.02)
    r = luaprobe("status", "--run-dir", daemon.run_dir, "--json")
    assert r.returncode == 0, (r.returncode, r.stderr)
    st = daemon.status()
    assert (st["state"], st["supervisor_pid"], st["fastpath_pid"], st["reloads"]) == \
        ("running", before["supervisor_pid"], before["fastpath_pid"], 0), st
    assert f"reload refused: {not_regular(daemon.config)}" in open(log).read()
    os.unlink(daemon.config)
    with open(daemon.config, "w") as f:
        f.write(text)
    assert daemon.cli("reload", timeout=120).returncode == 0
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
