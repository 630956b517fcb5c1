"""A plug-in whose top level never returns (issue: `-- TrisulPlugin` + `while true do end` hung run, check and start).
Loading runs under the hook budget (engine/plugins/host.lua boot): an interpreted loop is interrupted as a load error,
a compiled one ends the process as a plug-in error (engine/fastpath/run.py _SignalWatch, engine/plugins/loadwatch.py);
the daemon's stall rule covers loading, and a stop or a signal to `start` during loading ends promptly.
Every test runs real processes and asserts that none of them and none of their segments is left."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests import helpers, proc_tools
from tests.test_supervisor import PACE

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
COMPILED = "-- TrisulPlugin\nwhile true do end\n"
INTERPRETED = "-- TrisulPlugin\nlocal n = 0\nwhile true do n = n + #debug.getinfo(1).source end\n"


def finish(p, timeout=60):
    """(exit code, stderr) of ``p`` once it ended; the test's ``with proc_tools.reaped(tag, grace=0)`` then finds
    nothing of the run left at that moment, and kills all of it (daemons included) whatever the test's outcome."""
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err


@pytest.mark.parametrize("src,line", [(COMPILED, ""), (INTERPRETED, ":3:")], ids=["compiled", "interpreted"])
@pytest.mark.parametrize("cmd", ["run", "check"])
def test_a_top_level_loop_is_a_plugin_error(tmp_path, src, line, cmd):
    plug = tmp_path / "loop.lua"
    plug.write_text(src)
    env, tag = proc_tools.tagged_env()
    args = [cmd, str(plug), "--hook-budget", "1"]
    if cmd == "run":
        args += ["--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q"]
    t0 = time.monotonic()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = proc_tools.start(args, env=env)
        pids.add(p.pid)
        rc, err = finish(p)
    assert rc == 4, err
    assert time.monotonic() - t0 < 30
    mine = [x for x in err.splitlines() if "top level of" in x]
    assert len(mine) == 1, err
    assert f"{plug}{line}" in mine[0] and "hook budget of 1 s" in mine[0] and "Traceback" not in err


def daemon_config(tmp_path, budget, stall):
    plug = tmp_path / "pl"
    plug.mkdir()
    (plug / "loop.lua").write_text(COMPILED)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n[source]\npcap = ["{SAMPLE}"]\n[plugins]\n'
                   f'paths = ["pl"]\n[fastpath]\nhook_budget = {budget}\n[supervise]\nstall_timeout = {stall}\n'
                   'stop_deadline = 20\n')
    return str(cfg), str(tmp_path / "run")


@pytest.mark.parametrize("budget,stall,why", [(1, 60, "top level of"), (0, 3, "stalled while loading")],
                         ids=["budget", "stall-rule"])
def test_daemon_start_fails_as_a_plugin_error(tmp_path, budget, stall, why):
    cfg, run_dir = daemon_config(tmp_path, budget, stall)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = proc_tools.start(["start", "--config", cfg], env=env)
        pids.add(p.pid)
        rc, err = finish(p, timeout=90)
    assert rc == 4, err
    assert why in err and "loop.lua" in err, err
    st = proc_tools.start(["status", "--run-dir", run_dir, "--json"])
    out, _ = st.communicate(timeout=30)
    assert '"failed: ' in out and "restarts\": 0" in out


def test_daemon_stop_while_loading_is_prompt(tmp_path):
    cfg, run_dir = daemon_config(tmp_path, 0, 120)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = proc_tools.start(["start", "--config", cfg], env=env)
        pids.add(p.pid)
        helpers.wait_for(lambda: os.path.exists(os.path.join(run_dir, "heartbeat")), 30, 0.05)
        t0 = time.monotonic()
        s = proc_tools.start(["stop", "--run-dir", run_dir], env=env)
        _, err = s.communicate(timeout=60)
        took = time.monotonic() - t0
        finish(p)
    assert s.returncode == 4 and "before it processed anything" in err and "loop.lua ran on" in err, err
    assert took < 15, took                               # not stop_deadline (20 s) and exit 5


def test_a_signal_to_start_stops_the_daemon_it_started(tmp_path):
    cfg, run_dir = daemon_config(tmp_path, 0, 120)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag, grace=0) as pids:
        p = proc_tools.start(["start", "--config", cfg], env=env)
        pids.add(p.pid)
        helpers.wait_for(lambda: os.path.exists(os.path.join(run_dir, "heartbeat")), 30, 0.05)
        p.send_signal(signal.SIGTERM)
        rc, err = finish(p)
    assert rc == 143, err
    assert "the daemon it started was stopped" in err, err


def looping_config(tmp_path):
    """A daemon config in tmp_path that runs until stopped: sample.pcap looped, one plug-in that loads at once."""
    plug = tmp_path / "pl"
    plug.mkdir()
    (plug / "ok.lua").write_text('TrisulPlugin = { id = { name = "ok" }, engine_monitor = {\n'
                                 '  onmetronome = function() end } }\n')
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n[source]\npcap = ["{SAMPLE}"]\nloop = true\n'
                   f'speed = {PACE}\n[plugins]\npaths = ["pl"]\n')     # paced: not a core busy per daemon
    return cfg


def test_two_racing_starts_one_runs_the_other_exits_2(tmp_path):
    """Both pass start's pidfile check; the supervisor that loses the flock exits 2 and its `start` says already
    running (docs/operations.md: `start` exits 2 when a supervisor already runs in the run directory)."""
    cfg = looping_config(tmp_path)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag) as pids:       # both daemons and all theirs gone, whatever the assertions said
        a, b = (proc_tools.start(["start", "--config", str(cfg)], env=env) for _ in range(2))
        pids |= {a.pid, b.pid}
        ra, rb = (p.communicate(timeout=90) + (p.returncode,) for p in (a, b))
        codes = sorted([ra[2], rb[2]])
        loser = ra if ra[2] == 2 else rb
        if codes == [0, 2]:                      # the race happened in the supervisors (else in start's check)
            assert "luaprobe start: already running (supervisor pid" in loser[1], loser
        assert codes == [0, 2], (ra, rb)
        s = proc_tools.start(["stop", "--run-dir", str(tmp_path / "run")], env=env)
        s.communicate(timeout=60)
        assert s.returncode == 0


def test_a_failing_daemon_test_leaves_nothing_and_keeps_its_error(tmp_path):
    """The clean-up the daemon tests above run in (proc_tools.reaped): a body that fails while its daemon runs
    (here: raises after the daemon's fast path, capture and segments exist) ends with that daemon and every
    process and segment of it gone, and with the body's own error, not one of the clean-up's.  Before, the
    racing-starts test waited 30 s in its `finally` for a stop that never came, raised there, and left its
    daemons running: the next test (test_supervisor's status from any directory) found two."""
    cfg = looping_config(tmp_path)
    env, tag = proc_tools.tagged_env()
    seen = set()

    def running():
        procs = proc_tools.tagged_processes(tag)
        seen.update(p.pid for p in procs)
        return proc_tools.segments_of(seen) and any("capture" in " ".join(helpers.cmdline(p)) for p in procs)
    with pytest.raises(RuntimeError, match="^the body's own error$"):
        with proc_tools.reaped(tag) as pids:
            p = proc_tools.start(["start", "--config", str(cfg)], env=env)
            pids.add(p.pid)
            assert finish(p, timeout=90)[0] == 0
            helpers.wait_for(running, 30, 0.1)
            raise RuntimeError("the body's own error")
    assert not proc_tools.tagged_processes(tag)
    assert not proc_tools.segments_of(seen), proc_tools.segments_of(seen)


#: sitecustomize.py for the daemon's fast-path child only (its command line holds "--child"): it stops itself with
#: SIGSTOP before anything of luaprobe is imported, so the test holds its start-up for as long as it likes
STOP_AT_START = ("import os, signal\n"
                 "if os.environ.get('LUAPROBE_TEST_HOLD_CHILD') and b'--child' in open('/proc/self/cmdline', 'rb').read():\n"
                 "    os.kill(os.getpid(), signal.SIGSTOP)\n")


def stop_past_the_grace(child, run_dir, env):
    """`luaprobe stop` while ``child`` (a fast path held by SIGSTOP before its first heartbeat) starts: the child must
    still be there once the supervisor logged that it waits for it past the 5 s grace; then it is let go.
    Returns (the stop's Popen, its stderr)."""
    s = proc_tools.start(["stop", "--run-dir", str(run_dir)], env=env)
    log = run_dir / "supervisor.log"
    helpers.wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
                     or (log.exists() and "still starting" in log.read_text()), 30, 0.1)
    assert child.is_running() and child.status() == psutil.STATUS_STOPPED, s.communicate(timeout=60)  # not killed
    child.send_signal(signal.SIGCONT)
    _, err = s.communicate(timeout=60)
    return s, err


def test_daemon_stop_during_a_slow_start_up_blames_no_plugin(tmp_path):
    """A stop while the fast path is still starting (a loaded machine: its Python imports take longer than the
    5 s the supervisor gives a plug-in's top level after a stop) is not a plug-in error: no plug-in code has run.
    The child is held stopped before its first heartbeat past that grace, then let go: its SIGTERM (blocked until
    its handlers are in place) stops it gracefully and `luaprobe stop` exits 0.  Before, the supervisor killed it at
    5 s and `stop` exited 4 with "plug-in error: a plug-in's top level ran on for 5 s after the stop"."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STOP_AT_START)
    cfg = looping_config(tmp_path)
    run_dir = tmp_path / "run"
    env, tag = proc_tools.tagged_env({"LUAPROBE_TEST_HOLD_CHILD": "1",
                                      "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    with proc_tools.reaped(tag) as pids:
        p = proc_tools.start(["start", "--config", str(cfg)], env=env)
        pids.add(p.pid)

        def held_child():
            for q in proc_tools.tagged_processes(tag):
                try:
                    if "--child" in q.cmdline() and q.status() == psutil.STATUS_STOPPED:
                        return q
                except psutil.Error:
                    continue
        child = helpers.wait_for(held_child, 60, 0.05)
        assert not (run_dir / "heartbeat").exists()            # no plug-in has started loading
        s, err = stop_past_the_grace(child, run_dir, env)
        p.communicate(timeout=60)
    assert s.returncode == 0, err
    assert "plug-in" not in err, err


#: sitecustomize.py: as STOP_AT_START, but only once the file LUAPROBE_TEST_HOLD_AFTER names exists (the test makes it
#: before it kills the first fast path: the restarted one is held, the first ran normally)
STOP_AFTER_FLAG = ("import os, signal\n"
                   "flag = os.environ.get('LUAPROBE_TEST_HOLD_AFTER')\n"
                   "if flag and os.path.exists(flag) and b'--child' in open('/proc/self/cmdline', 'rb').read():\n"
                   "    os.kill(os.getpid(), signal.SIGSTOP)\n")


def test_daemon_stop_during_a_restarted_child_s_start_up_blames_no_plugin(tmp_path):
    """As above, for a fast path restarted after a crash: the heartbeat file still names the plug-in the previous
    child loaded last (it only touches it afterwards), touched less than 1 s before the restart, so the supervisor
    took it for the new child's and killed the new child 5 s after the stop, blaming that plug-in ("plug-in error:
    the top level of .../ok.lua ran on ..."), though no plug-in code of it had run.  The supervisor now removes the
    heartbeat file when it starts a child."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STOP_AFTER_FLAG)
    flag = tmp_path / "hold"
    cfg = looping_config(tmp_path)
    run_dir = tmp_path / "run"
    env, tag = proc_tools.tagged_env({"LUAPROBE_TEST_HOLD_AFTER": str(flag),
                                      "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})

    def children():
        out = []
        for q in proc_tools.tagged_processes(tag):
            try:
                if "--child" in q.cmdline():
                    out.append(q)
            except psutil.Error:
                continue
        return out

    with proc_tools.reaped(tag) as pids:
        p = proc_tools.start(["start", "--config", str(cfg)], env=env)
        pids.add(p.pid)
        assert finish(p, timeout=90)[0] == 0                    # `start` returns once the plug-ins loaded
        first = helpers.wait_for(lambda: (children() or [None])[0], 30, 0.05)
        beat = run_dir / "heartbeat"
        assert beat.read_text().endswith("ok.lua")              # the file it loaded last, named in the heartbeat
        flag.touch()
        t = beat.stat().st_mtime
        helpers.wait_for(lambda: beat.stat().st_mtime > t, 10, 0.01)   # a fresh beat: the restart comes < 1 s after
        first.kill()

        def held_child():
            for q in children():
                try:
                    if q.pid != first.pid and q.status() == psutil.STATUS_STOPPED:
                        return q
                except psutil.Error:
                    continue
        child = helpers.wait_for(held_child, 60, 0.05)
        s, err = stop_past_the_grace(child, run_dir, env)
    assert s.returncode == 0, err
    assert "plug-in" not in err, err
