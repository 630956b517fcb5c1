"""Symbolic links planted in a daemon's run directory (security rule: no following of a pre-planted link at a
predictable path).  docs/operations.md takes a pre-existing run directory with open modes (made 0700), so another
user may have left links at the pidfile's or log's name there: root's `luaprobe start` truncated the pidfile's
target to its pid, appended its log to the log's target and chmod'ed both 0600.  Real `luaprobe start`; the truth
is the link targets' bytes and modes."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import control
from tests import helpers

CONFIG = """
[run]
out_dir = "out"
run_dir = "run"
[source]
pcap = ["{pcap}"]
[plugins]
paths = ["{plugin}"]
"""


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("name", ["supervisor.pid", "supervisor.log", "heartbeat", "state.json"])
def test_start_refuses_a_link_planted_in_an_open_run_dir(tmp_path, name):
    cfg = tmp_path / "probe.toml"
    cfg.write_text(CONFIG.format(pcap=os.path.join(helpers.REPO, "engine/examples/sample.pcap"),
                                 plugin=os.path.join(helpers.REPO, "engine/examples/tcp_ports.lua")))
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o644)
    os.symlink(victim, run / name)
    try:
        r = cli("start", "--config", str(cfg), cwd=str(tmp_path))
    finally:
        cli("stop", "--run-dir", str(run), cwd=str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.splitlines() == [f"luaprobe start: run directory {run}: {run / name} is a symbolic link (not "
                                     "followed; remove it)"]
    assert victim.read_bytes() == b"precious\n" and stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    assert not os.path.exists(run / "control.sock")


def test_pidfile_and_private_files_never_open_through_a_link(tmp_path):
    """The backstop for a link made after the run directory was checked: O_NOFOLLOW on the pidfile and on every
    status / stats / log file (control.open_private)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, tmp_path / control.PIDFILE)
    os.symlink(victim, tmp_path / "state.json")
    with pytest.raises(OSError, match="supervisor.pid is a symbolic link"):
        control.PidFile(str(tmp_path)).acquire()
    for mode in ("w", "ab"):
        with pytest.raises(OSError, match="state.json is a symbolic link"):
            control.open_private(str(tmp_path / "state.json"), mode)
    assert victim.read_bytes() == b"precious\n"


@pytest.mark.parametrize("name", ["luaprobe.sqlite", "luaprobe.sqlite-wal"])
def test_start_refuses_a_link_planted_at_the_databases_name_in_out_dir(tmp_path, name):
    """A link at the database's names in [run] out_dir: the store writer never follows it (a1891e8), so the daemon
    started and its fast path died and restarted over and over.  `start` now refuses it with one line, exit 2,
    and starts nothing; the link's target is untouched."""
    cfg = tmp_path / "probe.toml"
    cfg.write_text(CONFIG.format(pcap=os.path.join(helpers.REPO, "engine/examples/sample.pcap"),
                                 plugin=os.path.join(helpers.REPO, "engine/examples/tcp_ports.lua")))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, out / name)
    try:
        r = cli("start", "--config", str(cfg), cwd=str(tmp_path))
    finally:
        cli("stop", "--run-dir", str(tmp_path / "run"), cwd=str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.splitlines() == [f"luaprobe start: {cfg}: [run] out_dir = {out}: {name} is a symbolic "
                                     "link (not followed); remove it, or give another out_dir"]
    assert victim.read_bytes() == b"precious\n"
    assert not os.path.exists(tmp_path / "run" / "control.sock")


def test_a_link_planted_after_starts_check_is_refused_with_exit_2(tmp_path):
    """A link that appears in the run directory after `start` checked it (and before its supervisor looks): the
    supervisor refuses to start (control.ensure_run_dir: ELOOP) with one line on its refusal pipe and exit 2, and
    follows nothing.  Before, `start` said "the supervisor exited" and exited 1 (a traceback in the log) instead of
    the usage error's one line and exit 2 (docs/operations.md).  The moment is forced by running the supervisor as
    `start` spawns it (``--refusal-fd``) on a run directory `start` would have passed, with the link already there.
    (This test used to hold the moment with a FIFO as the configuration, read once by `start` and once more by the
    supervisor: config.load refuses a FIFO since 05c703f, as it held `start` and a SIGHUP reload for ever.)  That
    `start` relays a supervisor's refusal as its own one line and exit 2 is test_daemon_start_faults.py's
    directory planted at control.sock, a refusal `start`'s own checks do not see either."""
    run = tmp_path / "run"
    cfg = tmp_path / "probe.toml"
    cfg.write_text(CONFIG.format(pcap=os.path.join(helpers.REPO, "engine/examples/sample.pcap"),
                                 plugin=os.path.join(helpers.REPO, "engine/examples/tcp_ports.lua")))
    control.ensure_run_dir(str(run))                # what `start` checked and made
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, run / "heartbeat")           # planted after that check
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    refusals, w = os.pipe()
    try:
        sup = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.supervisor", "--config", str(cfg),
                              "--run-dir", str(run), "--refusal-fd", str(w)], cwd=str(tmp_path), env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, pass_fds=(w,))
        os.close(w)
        w = None
        with os.fdopen(refusals, "rb") as f:
            refusals = None
            line = f.read().decode()
    finally:
        for fd in (w, refusals):
            if fd is not None:
                os.close(fd)
    assert sup.returncode == 2, (sup.returncode, sup.stdout, sup.stderr)
    assert line == f"run directory {run}: {run / 'heartbeat'} is a symbolic link (not followed; remove it)\n", line
    assert "Traceback" not in sup.stderr, sup.stderr
    assert victim.read_bytes() == b"precious\n"
    assert control.read_pid(str(run)) is None and not os.path.exists(run / "control.sock")
