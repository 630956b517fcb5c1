"""Daemon mode end to end: `luaprobe start/status/stop/reload/stats` with real processes.

The supervisor is daemonized by `luaprobe start` (a new session, re-parented away from pytest), so
the autouse leak guard of conftest.py cannot see it: the ``daemon`` fixture records every pid the
run reports and, at teardown, kills what is left and removes segments those pids owned, failing the
test if anything was left behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import time

import psutil
import pytest

from luaprobe.engine.daemon import config, control, metrics
from luaprobe.shm import segment
from tests import helpers

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")
SAMPLE = os.path.join(EXAMPLES, "sample.pcap")


def cli(*args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOML = """
[run]
out_dir = "out"
run_dir = "run"
[source]
pcap = [{pcap}]
loop = {loop}
speed = {speed}
[plugins]
paths = [{plugins}]
[async]
workers = 1
drain_deadline = 5
[supervise]
restart_backoff_initial = 0.05
restart_backoff_max = 1
crash_loop_restarts = {crash_loop_restarts}
crash_loop_window = 60
stop_deadline = 15
[stats]
interval = {interval}
json_lines_file = "stats.jsonl"
prometheus_port = {port}
"""


#: [source] speed of the daemons' looped replays (docs/operations.md "Paced replay"): 100 s of packet time a second,
#: ~1 900 packets/s of sample.pcap (wait_packets() in ~0.5 s, a 60 s window in 0.6 s).  At speed 0 each daemon kept
#: ~0.9 of a core busy for its whole life (docs/benchmarks.md "Test suite CPU"); here ~0.2.  A test that needs the
#: ring kept full (the stall rule for files, throughput) passes speed=0.  LUAPROBE_TEST_PACE=0 runs them all unpaced
#: (the measurement of docs/benchmarks.md "Test suite CPU").
PACE = float(os.environ.get("LUAPROBE_TEST_PACE", "100"))


class Daemon:
    """One supervised run in tmp_path; every pid it reported is remembered for the leak check."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.run_dir = str(tmp_path / "run")
        self.out_dir = str(tmp_path / "out")
        self.pids: set[int] = set()

    def write_config(self, plugins=(EXAMPLES,), pcap=(SAMPLE,), loop=True, crash_loop_restarts=5, port=0,
                     interval=0.2, speed=None) -> str:
        """``speed`` None: PACE for a looped replay, 0 (as fast as possible) for files read once."""
        q = lambda xs: ", ".join(json.dumps(str(x)) for x in xs)  # noqa: E731
        speed = (PACE if loop else 0) if speed is None else speed
        path = self.dir / "luaprobe.toml"
        path.write_text(TOML.format(pcap=q(pcap), loop=str(loop).lower(), speed=speed, plugins=q(plugins),
                                    crash_loop_restarts=crash_loop_restarts, port=port, interval=interval))
        self.config = str(path)
        return self.config

    def cli(self, cmd, *args, **kw):
        return cli(cmd, "--run-dir", self.run_dir, *args, **kw)

    def start(self, supervise=None, stats=None, **cfg):
        """Write the config (``supervise``: text replacing its "stop_deadline = 15" line; ``stats``: lines added
        to [stats]) and start a daemon."""
        self.write_config(**cfg)
        if supervise is not None or stats is not None:
            text = open(self.config).read().replace("stop_deadline = 15", supervise or "stop_deadline = 15")
            text = text.replace("[stats]\n", f"[stats]\n{stats or ''}\n")
            open(self.config, "w").write(text)
        r = cli("start", "--config", self.config)
        assert r.returncode == 0, r.stderr
        pid = control.read_pid(self.run_dir)
        assert pid
        self.pids.add(pid)
        return r

    def status(self) -> dict:
        st = json.loads(self.cli("status", "--json").stdout)
        for v in st.get("processes", {}).values():
            self.pids.update(v if isinstance(v, list) else [v])
        return st

    def stats(self) -> dict:
        r = self.cli("stats", "--json")
        snap = json.loads(r.stdout)
        assert r.returncode == (0 if snap["live"] else 3), r.stderr
        self.pids.update(p["pid"] for p in snap.get("process_info", []))
        return snap

    def wait_packets(self, n=1000, timeout=30) -> dict:
        return helpers.wait_for(lambda: (s := self.stats()).get("packets", 0) >= n and s, timeout, 0.1)

    def alive(self) -> list[int]:
        out = []
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                pass
        return out

    def segments(self) -> list[str]:
        return [n for n in segment.list_segments() if segment.owner_pid(n) in self.pids]

    def cleanup(self) -> tuple[list, list]:
        pid = control.read_pid(self.run_dir)
        if pid:
            self.pids.add(pid)
        procs = []
        for p in self.alive():
            try:
                proc = psutil.Process(p)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
        helpers.wait_for(lambda: not any(_running(p) for p in procs), EXIT_GRACE, 0.05, fail=False)
        leaked = helpers.kill_tree(procs)      # what is still running EXIT_GRACE s after the test: left behind
        segs = self.segments()
        for s in segs:
            segment.unlink(s)
        return leaked, segs


#: s the processes of a daemon that ended (`stop`, or its input finished) get to finish exiting before the clean-up
#: calls what is left a leak: a worker or store writer still in its exit path when `stop` returned is not one
EXIT_GRACE = 5.0


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def daemon(tmp_path, request):
    d = Daemon(tmp_path)
    yield d
    leaked, segs = d.cleanup()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed and (leaked or segs):
        pytest.fail(f"daemon leaked processes {leaked} / segments {segs}")


# ============================================================================ configuration
def _raw(**over):
    raw = {"source": {"pcap": [SAMPLE]}, "plugins": {"paths": [EXAMPLES]}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("raw, message", [
    (_raw(asynk={"workers": 2}),
     "f.toml: unknown section [asynk] (valid: [run], [source], [plugins], [async], [fastpath], [filex], [supervise], [stats], [log])"),
    (_raw(**{"async": {"wrkers": 2}}),
     "f.toml: [async] unknown key 'wrkers' (valid: workers, overflow_limit, task_timeout, drain_deadline, "
     "max_tasks, max_rss_mb, file_roots, ring_size, worker_spin_us, backend, ray_address, ray_actor_cpus)"),
    (_raw(**{"async": {"workers": "2"}}), 'f.toml: [async] workers = "2": must be an integer between 1 and 256'),
    (_raw(**{"async": {"workers": 0}}), "f.toml: [async] workers = 0: must be an integer between 1 and 256"),
    (_raw(supervise={"stop_deadline": 0.5}), "f.toml: [supervise] stop_deadline = 0.5: must be a number between 1 "
                                             "and 3600"),
    (_raw(stats={"prometheus_port": 70000}), "f.toml: [stats] prometheus_port = 70000: must be an integer between "
                                             "0 and 65535"),
    (_raw(source={"loop": "yes"}), 'f.toml: [source] loop = "yes": must be true or false'),
    (_raw(log={"format": "xml"}), 'f.toml: [log] format = "xml": must be one of "text", "json"'),
    (_raw(source={"interface": "lo"}), "f.toml: [source] give exactly one of pcap or interface, not both"),
    ({"plugins": {"paths": [EXAMPLES]}},
     'f.toml: [source] missing: give pcap = ["file.pcap", ...] or interface = "eth0"'),
    (_raw(source={"bpf": "tcp"}), 'f.toml: [source] bpf = "tcp": only valid with interface'),
    (_raw(supervise={"restart_backoff_initial": 5, "restart_backoff_max": 1}),
     "f.toml: [supervise] restart_backoff_max = 1: must be >= restart_backoff_initial (5)"),
])
def test_config_errors_name_key_value_and_range(raw, message):
    with pytest.raises(config.ConfigError) as e:
        config.validate(raw, "f.toml")
    assert str(e.value) == message


def test_config_missing_file_and_defaults(tmp_path):
    with pytest.raises(config.ConfigError, match=r"\[source\] pcap: '.*/nope.pcap': not a readable file"):
        config.validate(_raw(source={"pcap": ["nope.pcap"]}), str(tmp_path / "f.toml"))
    cfg = config.validate(_raw(), str(tmp_path / "f.toml"))
    assert cfg.run_dir == str(tmp_path / "run")                       # relative to the config file
    assert cfg["async"]["drain_deadline"] == 10.0 and cfg["supervise"]["crash_loop_restarts"] == 5
    rc = cfg.run_config(stats_file="x.json")
    assert rc.files == [SAMPLE] and rc.loop is False and rc.stats_file == "x.json"


def test_start_refuses_a_bad_config_before_starting_anything(tmp_path):
    (tmp_path / "bad.toml").write_text('[source]\npcap = ["%s"]\n[plugins]\npaths = ["%s"]\n[async]\nworkers = -1\n'
                                       % (SAMPLE, EXAMPLES))
    r = cli("start", "--config", str(tmp_path / "bad.toml"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"luaprobe start: {tmp_path / 'bad.toml'}:6: [async] workers = -1: must be an integer "
                                "between 1 and 256")
    assert not (tmp_path / "run").exists()


# ============================================================================ life cycle
def test_start_status_stop_round_trip(daemon):
    r = daemon.start()
    assert r.stdout.startswith("started: supervisor pid ")
    sock = os.path.join(daemon.run_dir, control.SOCKET)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.run_dir).st_mode) == 0o700
    daemon.wait_packets()
    st = helpers.wait_for(lambda: "workers" in (s := daemon.status())["processes"] and s, 20, 0.1)
    assert st["state"] == "running" and st["restarts"] == 0 and st["live"]
    assert {"supervisor", "fastpath", "capture", "store", "workers"} <= set(st["processes"])
    text = daemon.cli("status")
    assert text.returncode == 0 and text.stdout.startswith("state:      running\npids:       supervisor ")
    assert "last stats: " in helpers.wait_for(lambda: "last stats" in (t := daemon.cli("status").stdout) and t)
    r = daemon.cli("stop")
    assert r.returncode == 0 and r.stdout.startswith("stopped (fast path exit status 0;"), r.stdout + r.stderr
    st = daemon.status()
    assert st["state"] == "stopped" and not st["live"]
    assert daemon.cli("status").returncode == 3
    r = daemon.cli("stop")                                  # nothing to stop: 3, as status/reload/stats
    assert r.returncode == 3 and r.stderr.startswith("luaprobe stop: not running (stopped"), r.stderr
    assert not daemon.alive() and not daemon.segments()
    assert not os.path.exists(sock) and control.read_pid(daemon.run_dir) is None
    log = open(os.path.join(daemon.run_dir, "supervisor.log")).read()
    assert "Traceback" not in log, log         # the fast path's load watch thread ended with a TypeError here
    with sqlite3.connect(os.path.join(daemon.out_dir, "luaprobe.sqlite")) as c:
        packets = json.loads(c.execute("SELECT value FROM run WHERE key = 'packets'").fetchone()[0])
        errors = json.loads(c.execute("SELECT value FROM run WHERE key = 'input_errors'").fetchone()[0])
        assert c.execute("SELECT count(*) FROM flows").fetchone()[0] > 0
    assert packets >= 1000 and errors == []
    lines = open(os.path.join(daemon.run_dir, "stats.jsonl")).read().splitlines()
    assert len(lines) >= 2 and json.loads(lines[-1])["packets"] > 0


def test_second_start_is_refused(daemon):
    daemon.start()
    r = cli("start", "--config", daemon.config)
    assert r.returncode == 2 and "already running (supervisor pid" in r.stderr   # documented: nothing started
    assert daemon.cli("stop").returncode == 0


def test_a_running_daemon_holds_its_out_dir(daemon, tmp_path):
    """The daemon's [run] out_dir is locked while it runs (usage.claim_out_dir): an appending `luaprobe run` into it
    and a second daemon with another run directory but the same out_dir are refused (exit 2), nothing started."""
    daemon.start()
    locked = "another luaprobe run or daemon is writing into it now (it is locked)"
    r = cli("run", EXAMPLES, "--pcap", SAMPLE, "--out", daemon.out_dir, "--append", "-q")
    assert r.returncode == 2 and r.stderr.startswith(f"luaprobe run: --out {daemon.out_dir}: {locked}"), r.stderr
    r = cli("start", "--config", daemon.config, "--run-dir", str(tmp_path / "run2"))
    assert r.returncode == 2 and f"[run] out_dir = {daemon.out_dir}: {locked}" in r.stderr, r.stderr
    assert control.read_pid(str(tmp_path / "run2")) is None
    assert daemon.cli("stop").returncode == 0
    r = cli("run", EXAMPLES, "--pcap", SAMPLE, "--out", daemon.out_dir, "--append", "-q")
    assert r.returncode == 0, r.stderr                  # stopped: its database is free to append to


def test_stop_reports_a_fast_path_that_ended_with_an_error(daemon, tmp_path):
    """A fast path ending with a plug-in error at the stop (onunload fails: exit 4, docs "Exit codes"): `stop`
    says so in one line and exits 4 (failed before: "stopped (fast path exit status 4 ...)", exit 0)."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "bad_unload.lua").write_text(BAD_UNLOAD)
    daemon.start(plugins=(plug,))
    daemon.wait_packets(100)
    r = daemon.cli("stop")
    assert r.returncode == 4 and r.stdout == "", (r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and "exit status 4" in r.stderr and "onunload" in r.stderr, r.stderr


def test_stop_after_the_supervisor_was_killed(daemon):
    """kill -9 of the supervisor: its fast path stops by itself (PR_SET_PDEATHSIG); `stop` exits 3 and says the
    supervisor is gone instead of "not running (running; ...)"."""
    daemon.start()
    st = daemon.status()
    fp = psutil.Process(st["fastpath_pid"])
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    psutil.wait_procs([fp], timeout=60)
    r = daemon.cli("stop")
    assert r.returncode == 3 and "the supervisor is gone (killed?) while running" in r.stderr, r.stderr
    assert "(running;" not in r.stderr


def test_killed_fastpath_is_restarted(daemon):
    daemon.start()
    daemon.wait_packets()
    st = daemon.status()
    old = st["fastpath_pid"]
    os.kill(old, signal.SIGKILL)
    st = helpers.wait_for(lambda: (s := daemon.status())["restarts"] == 1 and s["state"] == "running"
                          and s["fastpath_pid"] != old and s, 30, 0.1)
    assert st["last_exit"] == "killed by SIGKILL"
    helpers.wait_for(lambda: not [n for n in segment.list_segments() if segment.owner_pid(n) == old], 10)
    daemon.wait_packets()
    assert "restarts:   1" in daemon.cli("status").stdout
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_killed_store_writer_is_seen_logged_counted_and_restarted(daemon):
    """Operations "Faults": kill -9 of the SQLite store writer is a crash of the fast path (it cannot write any
    more): ended at once, one log line with the cause, restarted with backoff, the rows lost in status and
    stats.jsonl; the restarted run writes again (failed before: state running with the dead pid, no restart,
    no log line, nothing written)."""
    daemon.start()
    st = helpers.wait_for(lambda: (s := daemon.status())["processes"].get("store") and s, 30, 0.1)
    store, old = st["processes"]["store"], st["fastpath_pid"]
    os.kill(store, signal.SIGKILL)
    st = helpers.wait_for(lambda: (s := daemon.status())["restarts"] == 1 and s["state"] == "running"
                          and s["fastpath_pid"] != old and s, 30, 0.1)
    assert st["last_exit"] == "exit status 1"
    assert f"store writer (pid {store}) was killed by SIGKILL" in st["last_error"], st
    lost = st["store_rows_lost"]
    assert isinstance(lost, int) and f"; {lost} rows handed to it are not in the database" in st["last_error"]
    assert st["processes"].get("store") != store
    log = open(os.path.join(daemon.run_dir, control.LOG)).read().splitlines()
    assert len([x for x in log if f"store writer (pid {store})" in x]) == 1
    helpers.wait_for(lambda: any(json.loads(x).get("store_rows_lost") == lost and json.loads(x)["restarts"] == 1
                                 for x in open(os.path.join(daemon.run_dir, "stats.jsonl"))), 30, 0.1)
    r = daemon.cli("stop")              # rows lost by the killed writer: stop says so (exit 1), else a clean stop
    assert r.returncode == (1 if lost else 0), (r.stdout, r.stderr)
    if lost:
        assert f"stopped, but {lost} rows handed to the store writers of earlier fast paths" in r.stderr, r.stderr
    with sqlite3.connect(os.path.join(daemon.out_dir, "luaprobe.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM flows").fetchone()[0] > 0
    assert not daemon.alive() and not daemon.segments()


@pytest.fixture
def small_run_fs(tmp_path):
    """tmp_path/run as a 1 MiB tmpfs of its own (root only), unmounted after the daemon fixture's clean-up."""
    with helpers.tmpfs(tmp_path / "run", "size=1m") as run:
        yield run


def fill(path) -> None:
    """Append zeros to ``path`` until the filesystem is full (ENOSPC); again to take pages freed since."""
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e


@pytest.fixture
def small_out_fs(tmp_path):
    """tmp_path/out as a 200 KiB tmpfs of its own (root only), unmounted after the daemon fixture's clean-up."""
    with helpers.tmpfs(tmp_path / "out", "size=200k") as out:
        yield out


def test_full_out_dir_is_reported_with_the_rows_lost(small_out_fs, daemon):
    """out_dir on a full disk (200 KiB tmpfs, loop = true: packet time goes on from pass to pass, so counters and
    expired flows are written while the daemon runs and fill it): the store writer's failure ends the fast path
    with exit 1, which status shows as its last error, naming the SQLite error and the rows lost, and state.json
    keeps them as store_rows_lost (failed before: "stopped (fast path exit status 1 ...)", exit 0, nothing
    counted). The supervisor restarts the fast path, which fails again once it writes; `stop` says so in one line
    and exits 1 whether the fast path it stops had failed yet or not (test_stop_names_rows_lost_by_an_earlier_...)."""
    daemon.start()
    st = helpers.wait_for(lambda: "store writer" in ((s := daemon.status()).get("last_error") or "") and s, 60, 0.2)
    assert "database or disk is full" in st["last_error"] and st["last_exit"] == "exit status 1", st
    m = re.search(r"; (\d+) rows handed to it", st["last_error"])
    assert m and int(m.group(1)) > 0, st["last_error"]
    state = control.read_json(os.path.join(daemon.run_dir, control.STATE))
    assert state["store_rows_lost"] >= int(m.group(1)), state
    r = daemon.cli("stop")
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (r.stdout, r.stderr)
    assert "store writer (pid " in r.stderr and "database or disk is full" in r.stderr, r.stderr
    assert not daemon.alive() and not daemon.segments()


def test_full_run_dir_filesystem_is_survived(small_run_fs, daemon):
    """Operations "Faults": a full run directory (ENOSPC on state.json, stats.jsonl, stats.json, the log) does not
    kill the supervisor: it says so in status, leaves no state.json.tmpPID, keeps the fast path running and
    writes again once there is room (failed before: the supervisor died with a traceback in _save_state)."""
    daemon.start()
    daemon.wait_packets()
    sup = control.read_pid(daemon.run_dir)
    filler = small_run_fs / "filler"
    # kept full while waiting: a page freed after the first fill (a failed writer's temporary file unlinked)
    # lets state.json's write-and-rename succeed for ever (each rename frees the old copy's page)
    st = helpers.wait_for(lambda: (fill(filler), s := daemon.status())[0] is None and s.get(
        "file_errors", {}).get("state.json") and s, 30, 0.1)
    assert "No space left on device" in st["file_errors"]["state.json"]
    before = st["last_stats"]["time"] if st.get("last_stats") else 0
    assert st["state"] == "running" and psutil.pid_exists(sup)
    assert not [n for n in os.listdir(daemon.run_dir) if ".tmp" in n]
    os.unlink(filler)
    st = helpers.wait_for(lambda: (s := daemon.status()).get("file_errors") == {} and s, 30, 0.1)
    helpers.wait_for(lambda: (control.read_json(os.path.join(daemon.run_dir, control.STATE)) or {}).get(
        "saved", 0) > time.time() - 5 and daemon.stats()["time"] > before, 30, 0.1)
    assert daemon.status()["state"] == "running" and daemon.status()["supervisor_pid"] == sup
    assert "state.json written again" in open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert daemon.cli("stop").returncode == 0
    assert not [n for n in os.listdir(daemon.run_dir) if ".tmp" in n]
    assert not daemon.alive() and not daemon.segments()


def test_stats_jsonl_rotates_by_size(daemon):
    """[stats] json_lines_max_mb / json_lines_backups: stats.jsonl is rotated by the standard library's
    RotatingFileHandler; each file stays below the size (+ one line), whole JSON lines, owner-only, at most
    json_lines_backups old files (failed before: the keys did not exist and the file grew without bound)."""
    daemon.start(stats="json_lines_max_mb = 0.002\njson_lines_backups = 2", interval=0.1)
    jl = os.path.join(daemon.run_dir, "stats.jsonl")
    helpers.wait_for(lambda: os.path.exists(jl + ".2") and size_or_0(jl) > 0, 60, 0.1)
    assert daemon.cli("stop").returncode == 0
    files = sorted(n for n in os.listdir(daemon.run_dir) if n.startswith("stats.jsonl"))
    assert files == ["stats.jsonl", "stats.jsonl.1", "stats.jsonl.2"]
    for n in files:
        p = os.path.join(daemon.run_dir, n)
        lines = open(p).read().splitlines()
        assert lines and all(json.loads(x)["ts"] for x in lines)
        assert os.path.getsize(p) <= 2048 + max(map(len, lines)) + 1
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_killed_worker_is_restarted_by_the_pool(daemon):
    daemon.start()
    snap = daemon.wait_packets()
    dns = next(p for p in snap["plugins"] if p["plugin"].endswith("dns_watch.lua"))
    wpid = dns["workers"][0]["pid"]
    os.kill(wpid, signal.SIGKILL)

    def restarted():
        s = daemon.stats()
        p = next(p for p in s["plugins"] if p["plugin"].endswith("dns_watch.lua"))
        return p["async"]["worker_deaths"] >= 1 and p["workers"][0]["pid"] not in (None, wpid) and p
    p = helpers.wait_for(restarted, 30, 0.1)
    assert p["workers"][0]["restarts"] == p["async"]["worker_deaths"] == 1    # one kill: one death, one restart
    assert daemon.status()["restarts"] == 0                  # the fast path itself kept running
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_crash_loop_gives_up(daemon, tmp_path):
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "crash.lua").write_text('TrisulPlugin = { id = { name = "crash" },\n'
                                    '  onload = function() local ffi = require("ffi"); ffi.cdef("void _exit(int)"); ffi.C._exit(1) end,\n'
                                    '  engine_monitor = { onmetronome = function() end } }\n')
    daemon.write_config(plugins=[plug], crash_loop_restarts=2)
    r = cli("start", "--config", daemon.config)              # start waits for the plug-ins: it sees the crashes
    assert r.returncode == 1 and "luaprobe start: fast path exit status 1" in r.stderr, r.stderr
    st = helpers.wait_for(lambda: (s := daemon.status())["state"].startswith("failed") and s, 30, 0.1)
    assert st["state"] == "failed: crash loop (last exit: exit status 1)"
    assert st["restarts"] == 2 and not st["live"]
    assert daemon.cli("status").returncode == 1
    helpers.wait_for(lambda: control.read_pid(daemon.run_dir) is None, 10)
    assert "giving up" in open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert not daemon.alive() and not daemon.segments()


def test_sigterm_to_the_supervisor_drains_and_leaves_nothing(daemon):
    daemon.start()
    daemon.wait_packets()
    st = daemon.status()
    os.kill(st["supervisor_pid"], signal.SIGTERM)
    helpers.wait_for(lambda: not daemon.alive(), 30, 0.05)
    state = control.read_json(os.path.join(daemon.run_dir, control.STATE))
    assert state["state"] == "stopped" and state["last_exit"] == "exit status 0"
    summary = control.read_json(os.path.join(daemon.run_dir, "last_summary.json"))
    assert summary["input_errors"] == [] and summary["packets"] > 0
    dns = next(p for p in summary["plugins"] if p["plugin"].endswith("dns_watch.lua"))
    helpers.assert_accounting(dns["async"])
    assert dns["async"]["pending"] == 0 and dns["async"]["scheduled"] > 0            # drained
    assert not daemon.segments()
    assert not os.path.exists(os.path.join(daemon.run_dir, control.SOCKET))


MONITOR = """
TrisulPlugin = {{ id = {{ name = "versioned monitor" }},
  onload = function()
    local f = io.open("{marker}", "a"); f:write("{version}\\n"); f:close()
  end,
  engine_monitor = {{ onmetronome = function(engine, ts) end }},
}}
"""


def test_reload_picks_up_a_changed_backend_script(daemon, tmp_path):
    plug = tmp_path / "plugins"
    plug.mkdir()
    marker = tmp_path / "marker.txt"
    script = plug / "monitor.lua"
    script.write_text(MONITOR.format(marker=marker, version="v1"))
    daemon.start(plugins=[plug])
    helpers.wait_for(lambda: marker.exists() and "v1" in marker.read_text(), 20)
    old = daemon.status()["fastpath_pid"]
    script.write_text(MONITOR.format(marker=marker, version="v2"))
    r = daemon.cli("reload")
    assert r.returncode == 0 and r.stdout.startswith(
        f"reloaded: backend scripts reload live in fast path pid {old} "), r.stdout + r.stderr
    helpers.wait_for(lambda: "v2" in marker.read_text(), 20)
    st = daemon.status()
    assert st["reloads"] == 1 and st["restarts"] == 0 and st["state"] == "running"
    assert st["fastpath_pid"] == old                                      # live: no restart
    assert marker.read_text().split() == ["v1", "v1", "v2", "v2"]         # two backend instances each
    os.kill(st["supervisor_pid"], signal.SIGHUP)                          # SIGHUP = reload
    helpers.wait_for(lambda: daemon.status()["reloads"] == 2, 30, 0.1)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_reload_refuses_an_invalid_config_and_keeps_running(daemon):
    daemon.start()
    old = daemon.status()["fastpath_pid"]
    with open(daemon.config, "a") as f:
        f.write("[bogus]\n")
    r = daemon.cli("reload")
    assert r.returncode == 2 and "reload refused, configuration invalid: " in r.stderr
    assert "unknown section [bogus]" in r.stderr
    st = daemon.status()
    assert st["state"] == "running" and st["fastpath_pid"] == old
    assert daemon.cli("stop").returncode == 0


# ============================================================================ monitoring
FASTPATH_KEYS = ("packets", "bytes", "flows")


def stats_layout(text: str) -> list:
    """The sections of `luaprobe stats --plain` output and the column names of each (the values vary)."""
    lines = text.splitlines()
    return [(line[3:], [c.strip() for c in re.split(r"\s{2,}", lines[i + 1].strip())])
            for i, line in enumerate(lines) if line.startswith("== ")]


def docs_stats_example() -> str:
    """The `luaprobe stats --plain --count 1` output shown in docs/operations.md "A session"."""
    with open(os.path.join(helpers.REPO, "docs", "operations.md")) as f:
        doc = f.read()
    block = doc.split("$ luaprobe stats --plain --count 1", 1)[1].split("\n$ ", 1)[0]
    return block.split("\n", 1)[1]


def test_stats_json_equals_the_fastpath_counters(daemon):
    # Snapshots every 3 s, so that a CLI call on a busy 2-core machine fits between two of them and the
    # comparison below is exact (with 0.2 s it rarely did under load).
    daemon.start(interval=3)
    daemon.wait_packets()
    helpers.wait_for(lambda: daemon.stats()["rates"], 30, 0.1)      # two snapshots of this fast path seen
    file = os.path.join(daemon.run_dir, control.STATS)

    def consistent():                    # the fast path's own file, unchanged around the CLI call
        before = control.read_json(file)
        snap = daemon.stats()
        after = control.read_json(file)
        return before == after and before.get("time") == snap.get("time") and (before, snap)
    fp, snap = helpers.wait_for(consistent, 60, 0)
    for k in ("packets", "bytes", "flows", "flows_live", "rings", "drops", "plugins", "processes"):
        assert snap[k] == fp[k], k
    assert snap["rates"]["packets_per_s"] > 0 and snap["status"]["state"] == "running"
    roles = {r["role"] for r in snap["process_info"]}
    assert {"supervisor", "fastpath", "capture", "store", "workers"} <= roles
    tcp = next(p for p in snap["plugins"] if p["plugin"].endswith("tcp_ports.lua") and p["type"] == "simplecounter")
    assert 0 < tcp["hook_calls"]["simplecounter.onpacket"] <= snap["packets"]
    text = daemon.cli("stats", "--plain", "--count", "1").stdout
    assert "== source" in text and "== processes" in text and re.search(r"dns_watch.lua#\w+ +simplecounter", text), text
    assert max(len(line) for line in text.splitlines()) <= 80, text      # readable on an 80-column terminal
    assert "(file source: waits, no loss)" in text                         # a full ring is no alarm for files
    assert stats_layout(text) == stats_layout(docs_stats_example())       # docs/operations.md shows these tables
    fp_cpu = [line.split() for line in text.splitlines() if line.startswith("fastpath ")]
    assert float(fp_cpu[0][2]) > 0, text                                   # real CPU % on the first sample
    assert daemon.cli("stop").returncode == 0
    # after the end: the final counters are the fast path's summary
    final = daemon.stats()
    summary = control.read_json(os.path.join(daemon.run_dir, "last_summary.json"))
    assert final.get("final") is True and not final["live"], final
    for k in FASTPATH_KEYS:
        assert final[k] == summary[k], k
    assert [(p["plugin"], p["instance"], p["hook_calls"], p["async"]) for p in final["plugins"]] == \
        [(p["plugin"], p["instance"], p["hook_calls"], p["async"]) for p in summary["plugins"]]


def test_prometheus_endpoint_agrees_with_stats_json(daemon):
    port = free_port()
    daemon.start(port=port, interval=3)           # a scrape between two snapshots even on a busy machine
    daemon.wait_packets()

    def consistent():
        a = daemon.stats()
        m = metrics.scrape(port)
        b = daemon.stats()
        return a["time"] == b["time"] and (a, m)
    snap, m = helpers.wait_for(consistent, 60, 0)
    assert m["luaprobe_packets_total"] == snap["packets"]
    assert m["luaprobe_bytes_total"] == snap["bytes"]
    assert m["luaprobe_up"] == 1 and m["luaprobe_restarts_total"] == 0
    dns = next(p for p in snap["plugins"] if p["plugin"].endswith("dns_watch.lua"))
    key = ('luaprobe_async_tasks_total{instance="%s",outcome="scheduled",plugin="dns_watch.lua",'
           'type="simplecounter"}' % dns["instance"])
    assert m[key] == dns["async"]["scheduled"]
    others = [a.address for ifs in psutil.net_if_addrs().values() for a in ifs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for addr in others[:1]:                                # bound to 127.0.0.1 only
        with pytest.raises(OSError):
            socket.create_connection((addr, port), timeout=2).close()
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_run_dir_and_its_files_are_owner_only_whatever_existed(daemon, tmp_path):
    """Issue 13.13: a run directory made 0755 beforehand and a 0644 log file left in it end up owner-only;
    every file the daemon writes there (log, status, stats, pid file, socket) is 0600."""
    os.makedirs(daemon.run_dir, mode=0o755)
    os.chmod(daemon.run_dir, 0o755)
    log = os.path.join(daemon.run_dir, control.LOG)
    with open(log, "w") as f:
        f.write("old\n")
    os.chmod(log, 0o644)
    daemon.start()
    daemon.wait_packets()
    helpers.wait_for(lambda: os.path.exists(os.path.join(daemon.run_dir, "stats.jsonl")), 20, 0.05)
    assert stat.S_IMODE(os.stat(daemon.run_dir).st_mode) == 0o700
    modes = {n: stat.S_IMODE(os.stat(os.path.join(daemon.run_dir, n)).st_mode) for n in os.listdir(daemon.run_dir)
             if not n.startswith(".") and ".tmp" not in n}
    assert len(modes) >= 4 and all(m & 0o077 == 0 for m in modes.values()), modes
    assert daemon.cli("stop").returncode == 0


BAD_UNLOAD = r"""
TrisulPlugin = { id = { name = "bad_unload" },
  onunload = function() error("boom at unload") end,
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}", onpacket = function(e, l) end } }
"""

STUCK = r"""
local marker, n = "%s", 0
TrisulPlugin = { id = { name = "stuck" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(e, l)
      n = n + 1
      if n == 50 then
        local f = io.open(marker)
        if not f then
          f = io.open(marker, "w"); f:close()
          local x = 0
          while true do x = x + 1 end          -- compiled: no Lua error can interrupt this
        end
        f:close()
      end
    end } }
"""


def test_stalled_fastpath_is_restarted_and_status_says_why(daemon, tmp_path):
    """Issue 13.3: a hook stuck in an endless compiled loop stops the fast path's heartbeat; the supervisor
    kills and restarts it after [supervise] stall_timeout, and status names the reason."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "stuck.lua").write_text(STUCK % (tmp_path / "stuck-once"))
    daemon.start(plugins=(plug,), supervise="stop_deadline = 15\nstall_timeout = 2")
    st = helpers.wait_for(lambda: (s := daemon.status()).get("restarts", 0) >= 1 and s, 60, 0.2)
    assert "stalled: no heartbeat for" in st["last_exit"], st
    assert (tmp_path / "stuck-once").exists()
    daemon.wait_packets(100)                             # the restarted fast path makes progress
    assert daemon.status()["state"] == "running"
    log = open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert "stalled: no heartbeat" in log
    assert daemon.cli("stop").returncode == 0


@pytest.mark.parametrize("role", ["capture", "store"])
def test_stopped_capture_or_store_is_a_stall(daemon, role):
    """[supervise] stall_timeout also covers what the heartbeat cannot see: a SIGSTOPped capture process (the
    fast path idles and keeps beating; a file source stops advancing) or store writer (state T in /proc) is
    killed with the tree and the fast path restarted, and status names the stopped process (failed before:
    packets/s 0, state running, no restart)."""
    daemon.start(supervise="stop_deadline = 15\nstall_timeout = 3")
    st = helpers.wait_for(lambda: (s := daemon.status())["processes"].get(role) and s, 30, 0.1)
    pid, old = st["processes"][role], st["fastpath_pid"]
    daemon.wait_packets()
    os.kill(pid, signal.SIGSTOP)
    st = helpers.wait_for(lambda: (s := daemon.status())["restarts"] == 1 and s["state"] == "running" and s, 40, 0.1)
    assert st["last_exit"].startswith("stalled: ") and st["last_exit"].endswith("; killed"), st
    assert f"pid {pid}" in st["last_exit"] and st["fastpath_pid"] != old
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    daemon.wait_packets(100)                             # the restarted fast path makes progress
    log = open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert len([x for x in log.splitlines() if f"ERROR fast path (pid {old}) stalled: " in x and f"pid {pid}" in x]) == 1
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


@pytest.mark.parametrize("role", ["shards", "store"])
def test_stopped_shard_is_a_stall(daemon, role):
    """shards = 3, one shard process SIGSTOPped: the input stops advancing (its ring fills, the capture waits);
    the supervisor kills the tree after stall_timeout and restarts it, naming the stopped shard.  The same for one
    shard's SQLite store writer (before: the sharded snapshot named no store, so a stopped one was never seen;
    `stop` then missed stop_deadline, exit 5, and what the shards had not written was lost)."""
    daemon.write_config()
    text = open(daemon.config).read().replace('run_dir = "run"', 'run_dir = "run"\nshards = 3')
    # 5 s, not 3: the three shards and their stores make this the run with the most processes; under a loaded CI
    # machine one 3-s gap in every shard's heartbeat was once taken for a stuck hook just before the SIGSTOP
    open(daemon.config, "w").write(text.replace("stop_deadline = 15", "stop_deadline = 15\nstall_timeout = 5"))
    assert cli("start", "--config", daemon.config).returncode == 0
    daemon.pids.add(control.read_pid(daemon.run_dir))
    st = helpers.wait_for(lambda: (s := daemon.status())["processes"].get(role) and len(
        s["processes"][role]) == 3 and all(s["processes"][role]) and s, 30, 0.1)
    daemon.wait_packets()
    pid = st["processes"][role][1]
    daemon.pids |= {p.pid for p in psutil.Process(st["fastpath_pid"]).children(recursive=True)}
    os.kill(pid, signal.SIGSTOP)
    st = helpers.wait_for(lambda: (s := daemon.status())["restarts"] == 1 and s["state"] == "running" and s, 40, 0.1)
    name = {"shards": "shard"}.get(role, role)
    log = "".join(ln for ln in open(os.path.join(daemon.run_dir, control.LOG)) if " ERROR " in ln)  # (a string:
    assert st["last_exit"].startswith("stalled: ") and f"{name} process (pid {pid}) stopped" in st["last_exit"], (
        f"{st['last_exit']}\n{log}")                            # pytest cuts a long tuple's repr in the middle)
    daemon.wait_packets(100)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


# ============================================================================ the daemon says what went wrong
def test_start_reports_a_plugin_error_like_run_and_starts_nothing(daemon, tmp_path):
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "bad.lua").write_text('TrisulPlugin = { id = { name = "bad" }\n')
    (plug / "tcp_ports.lua").write_text(open(os.path.join(EXAMPLES, "tcp_ports.lua")).read())
    want = "bad.lua:2: '}' expected (to close '{' at line 1) near '<eof>'"    # (LuaJIT may shorten the path)
    run = cli("run", str(plug), "--pcap", SAMPLE, "--out", str(tmp_path / "o"), "-q")
    assert run.returncode == 4 and want in run.stderr, run.stderr
    daemon.write_config(plugins=[plug])
    r = cli("start", "--config", daemon.config)
    assert r.returncode == 4, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("luaprobe start: plug-in problem: ") and first.endswith(want), r.stderr
    assert "Traceback" not in r.stderr
    assert control.read_pid(daemon.run_dir) is None            # stopped again: nothing half-started
    st = daemon.status()
    assert want in st["last_error"] and not st["live"]
    assert "last error: plug-in problem: " in daemon.cli("status").stdout
    assert want in open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert not daemon.alive() and not daemon.segments()


def test_start_reports_a_bad_capture_before_starting(tmp_path):
    fake = tmp_path / "fake.pcap"
    fake.write_text("not a capture\n")
    (tmp_path / "c.toml").write_text(f'[source]\npcap = ["{fake}"]\n[plugins]\npaths = ["{EXAMPLES}"]\n')
    r = cli("start", "--config", str(tmp_path / "c.toml"))
    assert r.returncode == 2
    assert r.stderr == (f"luaprobe start: {tmp_path / 'c.toml'}:2: [source] pcap: {fake}: byte offset 0: not a pcap or "
                        "pcapng file (file magic 0x6e6f7420)\n")
    assert not (tmp_path / "run").exists()


def test_status_and_stop_find_the_daemon_from_any_directory(daemon, tmp_path, monkeypatch):
    # a registry of its own: a daemon of an earlier test still being reaped (or leaked by a failed one: CI 10d,
    # test_two_racing_starts_...) made "several daemons are running" here, exit 2
    monkeypatch.setenv("LUAPROBE_STATE_DIR", str(tmp_path / "state"))
    daemon.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run_in(*args):
        return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=str(elsewhere), capture_output=True,
                              text=True, timeout=90, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    st = run_in("status")
    assert st.returncode == 0 and f"run_dir:    {daemon.run_dir}" in st.stdout, st.stdout + st.stderr
    assert run_in("stats", "--json").returncode == 0 and run_in("stats", "--count", "1").returncode == 0
    r = run_in("stop")
    assert r.returncode == 0 and r.stdout.startswith("stopped (fast path exit status 0;"), r.stdout + r.stderr
    r = run_in("status")                                        # nothing runs: says where it looked
    assert r.returncode == 3 and str(elsewhere / "run") in r.stdout and "no daemon is running" in r.stdout
    r = run_in("stats")
    assert r.returncode == 3 and r.stderr.startswith("luaprobe stats: no daemon is running (looked in ")
    assert not daemon.alive() and not daemon.segments()


def test_the_example_config_runs(daemon, tmp_path):
    """engine/examples/probe.toml as shipped (in a copy of the examples folder: its paths are relative)."""
    import shutil
    ex = tmp_path / "examples"
    shutil.copytree(EXAMPLES, ex, ignore=shutil.ignore_patterns("out", "run"))
    daemon.run_dir, daemon.out_dir = str(ex / "run"), str(ex / "out")
    r = cli("start", "--config", str(ex / "probe.toml"))
    assert r.returncode == 0 and "started: supervisor pid " in r.stdout, r.stderr
    daemon.pids.add(control.read_pid(daemon.run_dir))
    snap = daemon.wait_packets(500)
    assert {os.path.basename(p["plugin"]) for p in snap["plugins"]} == {"tcp_ports.lua", "dns_watch.lua",
                                                                       "window_report.lua"}
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


SLOW_UNLOAD = r"""
TrisulPlugin = {
  id = { name = "slow unload" },
  onunload = function() os.execute("sleep 60") end,   -- a stop can only end by the supervisor's SIGKILL
  engine_monitor = { onmetronome = function(engine, ts, tick, interval) end },
}
"""


def test_stop_past_stop_deadline_exits_5_naming_what_was_killed(daemon, tmp_path):
    """A fast path that misses [supervise] stop_deadline is SIGKILLed with its tree: `luaprobe stop` must not
    say a plain "stopped" and exit 0, since what it had not written is lost (docs/operations.md "Exit codes")."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "slow_unload.lua").write_text(SLOW_UNLOAD)
    daemon.start(plugins=(plug,), supervise="stop_deadline = 1")
    daemon.wait_packets(100)
    st = daemon.status()
    fp = st["processes"]["fastpath"]
    tree = {p.pid for p in psutil.Process(fp).children(recursive=True)} | {fp}
    daemon.pids |= tree
    r = daemon.cli("stop")
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("luaprobe stop: the fast path did not stop within stop_deadline = 1 s: SIGKILLed "
                               f"fastpath {fp}, "), r.stderr
    assert "more process" in r.stderr and "is lost" in r.stderr      # the `sleep 60` onunload started
    print(r.stderr)
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    st = daemon.status()
    assert st["state"] == "stopped" and st["last_exit"] == "killed by SIGKILL" and not st["live"]
    assert daemon.cli("stop").returncode == 3


CHATTY = """
local n = 0
TrisulPlugin = { id = { name = "chatty" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = n + 1
      if n % 20 == 0 then T.logwarning("chatty " .. n) end
    end } }
"""


def size_or_0(path: str) -> int:
    """The size of ``path``, 0 while it is missing (between a rotation's rename and the new file's creation)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def test_supervisor_log_is_rotated_by_size(daemon, tmp_path):
    """[log] max_mb / backups: supervisor.log (the output of every process of the daemon) is rotated like stats.jsonl,
    by the standard library's RotatingFileHandler in the supervisor (engine/daemon/logfile.py): .1 .. .N kept, each
    file near max_mb, owner-only, and no line split or lost at a rotation (format = "json": every line of every file
    parses, and the fast path's numbered lines run on across the files).  Before, it grew without bound."""
    plugins = tmp_path / "chatty"
    plugins.mkdir()
    (plugins / "chatty.lua").write_text(CHATTY)
    daemon.write_config(plugins=(plugins,))
    with open(daemon.config, "a") as f:
        f.write('[log]\nformat = "json"\nmax_mb = 0.01\nbackups = 2\n')
    r = cli("start", "--config", daemon.config)
    assert r.returncode == 0, r.stderr
    daemon.pids.add(control.read_pid(daemon.run_dir))
    log = os.path.join(daemon.run_dir, control.LOG)
    helpers.wait_for(lambda: os.path.exists(log + ".2") and size_or_0(log) > 2000, 60, 0.1)
    assert daemon.cli("stop").returncode == 0
    assert not os.path.exists(log + ".3")
    numbers = []
    for path in (log + ".2", log + ".1", log):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        text = open(path).read()
        assert len(text) <= 10486 + 400 and text.endswith("\n"), path
        for line in text.splitlines():
            rec = json.loads(line)                            # a whole line: never split by a rotation
            m = re.fullmatch(r".*chatty (\d+)", rec.get("msg", rec.get("message", "")))
            if m:
                numbers.append(int(m.group(1)))
    assert len(numbers) > 100
    for a, b in zip(numbers, numbers[1:]):
        assert b == a + 20, (a, b)                           # none lost, none out of order


@pytest.mark.parametrize("cause", ["stuck hook", "stopped store"])
def test_stop_of_a_stalled_fastpath_acts_on_the_stall_not_at_the_deadline(daemon, tmp_path, cause):
    """A stop that finds the fast path stalled (a hook stuck in a compiled loop: no heartbeat; or its store writer
    SIGSTOPped: state T) acts when the stall rule's stall_timeout is reached, counting the stall from before the
    stop, not after the whole stop_deadline: the tree is SIGKILLed, `stop` exits 5 and its line names the stall.
    Before, the stall rules were off while stopping: `stop` took the whole 60 s stop_deadline."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    if cause == "stuck hook":
        (plug / "stuck.lua").write_text(STUCK % (tmp_path / "stuck-once"))
    else:
        shutil.copy(os.path.join(EXAMPLES, "tcp_ports.lua"), plug)
    daemon.start(plugins=(plug,), supervise="stop_deadline = 60\nstall_timeout = 8")
    st = helpers.wait_for(lambda: (s := daemon.status())["processes"].get("store") and s, 30, 0.1)
    if cause == "stuck hook":
        helpers.wait_for((tmp_path / "stuck-once").exists, 30, 0.05)
    else:
        daemon.wait_packets()
        os.kill(st["processes"]["store"], signal.SIGSTOP)
        helpers.wait_for(lambda: psutil.Process(st["processes"]["store"]).status() == psutil.STATUS_STOPPED, 10)
    daemon.pids |= {p.pid for p in psutil.Process(st["fastpath_pid"]).children(recursive=True)}
    t0 = time.monotonic()
    r = daemon.cli("stop")
    took = time.monotonic() - t0
    log = open(os.path.join(daemon.run_dir, control.LOG)).read()
    assert r.returncode == 5, (r.stdout, r.stderr, log[-3000:])
    [line] = r.stderr.splitlines()
    assert line.startswith("luaprobe stop: the fast path stalled while stopping: ") and "SIGKILLed fastpath" in line
    assert ("no heartbeat for" if cause == "stuck hook" else "store process") in line, line
    assert took < 40, took                          # the stall (8 s), not stop_deadline (60 s)
    assert not daemon.alive() and not daemon.segments()


LOOP_PLUGIN = r"""
TrisulPlugin = { id = { name = "per second" },
  countergroup = {
    control = { guid = "{6C1D2E3F-4A5B-4C6D-8E7F-9A0B1C2D3E4F}", name = "loop clock", bucketsize = 10 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" } },
  },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) engine:update_counter("{6C1D2E3F-4A5B-4C6D-8E7F-9A0B1C2D3E4F}", "all", 0, 1) end },
}
"""


def five_seconds_pcap(path, start=1000) -> None:
    """A pcap of five UDP packets (five flows), one in each second start..start+4."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(5):
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, i, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
            fr = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + struct.pack("!HHHH", 40000 + i, 53, 8, 0)
            f.write(struct.pack("<IIII", start + i, 0, len(fr), len(fr)) + fr)


def test_looped_replay_packet_time_goes_on(daemon, tmp_path):
    """[source] loop = true replays the files "like a live feed" (engine/examples/probe.toml, docs/operations.md):
    each pass's packets come one second after the newest packet of the pass before, their spacing kept. Before,
    every pass after the first kept the capture's own times: all its packets were late, their counters piled into
    the first pass's last bucket, and nothing was written before the stop (a crash lost it all). Truth: a capture
    written here with one UDP packet in each second 1000..1004, so the replay has exactly one packet in every
    second from 1000 on and every 10 s bucket holds 10; buckets are written while the daemon runs, also paced (five
    packets a pass fill no 4 096-row batch of the store writer's: the fast path ships what it has queued once a second
    while its ring is empty, IDLE_SHIP_SECS; before, they reached the database only at the stop)."""
    cap = tmp_path / "five.pcap"
    five_seconds_pcap(cap)
    plug = helpers.write_plugin(tmp_path, LOOP_PLUGIN)
    daemon.start(plugins=[plug], pcap=[cap])
    db_path = os.path.join(daemon.out_dir, "luaprobe.sqlite")

    def rows():
        try:
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                return db.execute("SELECT bucket_ts, value FROM counters WHERE key = 'all' ORDER BY bucket_ts").fetchall()
        except sqlite3.Error:
            return []
    running = helpers.wait_for(lambda: len(r := rows()) >= 3 and r, 30, 0.2)    # written while running
    assert running[:3] == [(1000, 10), (1010, 10), (1020, 10)], running[:5]
    r = daemon.cli("stop")
    assert r.returncode == 0, r.stderr
    done = rows()
    assert [b for b, _ in done] == list(range(1000, 1000 + 10 * len(done), 10)), done[-5:]   # no bucket skipped
    assert all(v == 10 for _, v in done[:-1]) and 1 <= done[-1][1] <= 10, [x for x in done if x[1] != 10]
    summary = control.read_json(os.path.join(daemon.run_dir, "last_summary.json"))
    assert summary["late_packets"] == 0


@pytest.mark.parametrize("later", [3_000_000_000, 500], ids=["newer-second-file", "older-second-file"])
def test_looped_replay_of_files_from_different_dates(daemon, tmp_path, later):
    """A looped replay of captures from different dates (the shared corpus: 2011 .. 2018) goes on like a live feed:
    in every pass after the first each file starts one second after the newest packet so far. Before, a pass was
    shifted as one block, by the whole range of the files' dates: with a second file from 2065 (3e9 s) the second
    pass put it past 2106 and the daemon failed within seconds (input error, exit 3, not restarted: a looped daemon
    over /work/shared/pcaps' mix-wikipedia (2011) .. trisul-tutorial (2018) died after about 13 passes); with a
    second file older than the first, its packets were late in every pass. Truth: two captures written here, one
    packet a second; from the second pass on the replay is one packet in every second, so only the first pass's
    older file (5 packets) can be late, and the 10 s buckets after the first pass hold 10 each."""
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    five_seconds_pcap(a, 1000)
    five_seconds_pcap(b, later)
    plug = helpers.write_plugin(tmp_path, LOOP_PLUGIN)
    daemon.start(plugins=[plug], pcap=[a, b], speed=20 * PACE)   # ~1 700 packets/s of these one-a-second files
    daemon.wait_packets(400, timeout=60)                      # 40 passes
    st = daemon.status()
    assert st["state"] == "running" and st["restarts"] == 0, st
    r = daemon.cli("stop")
    assert r.returncode == 0, r.stderr
    summary = control.read_json(os.path.join(daemon.run_dir, "last_summary.json"))
    assert summary["late_packets"] == (5 if later < 1000 else 0), summary
    db_path = os.path.join(daemon.out_dir, "luaprobe.sqlite")
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT bucket_ts, value FROM counters WHERE key = 'all' ORDER BY bucket_ts").fetchall()
    second = max(1000, later) + 5                              # the second pass's first packet
    tail = [(t, v) for t, v in rows if t >= second // 10 * 10 + 10]
    assert len(tail) >= 30 and all(v == 10 for _, v in tail[:-1]), rows[:8]
    assert [t for t, _ in tail] == list(range(tail[0][0], tail[0][0] + 10 * len(tail), 10))   # no bucket skipped
    assert tail[-1][0] < second + 10 * len(tail) + 20          # packet time went on by 10 s a pass, not by the dates


@pytest.fixture
def out_fs(tmp_path):
    """tmp_path/out as a 4 MiB tmpfs of its own (root only), unmounted after the daemon fixture's clean-up."""
    with helpers.tmpfs(tmp_path / "out", "size=4m") as out:
        yield out


def test_stop_names_rows_lost_by_an_earlier_fast_path(out_fs, daemon, tmp_path):
    """The disk fills for a while (a filler file on out_dir's filesystem), the store writer fails (disk full) and
    the supervisor restarts the fast path; the filler is removed and the restarted fast path runs and ends well.
    `stop` must still say that rows are missing, with their number (state.json store_rows_lost, counted from the
    failed writer's own report), in one line, exit 1 as for a store failure (docs/operations.md "Exit codes").
    Before, it printed "stopped (fast path exit status 0 ...)" and exited 0: the loss was visible only to someone
    who had run `status` while it lasted."""
    plug = helpers.write_plugin(tmp_path, LOOP_PLUGIN)
    cap = tmp_path / "five.pcap"             # few rows (one counter row per 10 s bucket, five flows): the restarted
    five_seconds_pcap(cap)                   # fast path does not fill the 4 MiB again before the stop
    daemon.start(plugins=[plug], pcap=[cap], crash_loop_restarts=100, speed=20 * PACE)
    daemon.wait_packets(1000)
    filler = out_fs / "filler"
    st = helpers.wait_for(lambda: (fill(filler), s := daemon.status())[0] is None and "store writer" in (
        s.get("last_error") or "") and s, 60, 0.1)
    os.unlink(filler)
    assert "database or disk is full" in st["last_error"], st
    restarts = st["restarts"]
    helpers.wait_for(lambda: (s := daemon.status())["state"] == "running" and s["restarts"] >= restarts
                     and (s.get("fastpath_uptime_s") or 0) > 2 and s, 60, 0.2)        # a fast path that works
    r = daemon.cli("stop")
    state = control.read_json(os.path.join(daemon.run_dir, control.STATE))
    assert state["store_rows_lost"] > 0, state
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (r.stdout, r.stderr)
    assert f"stopped, but {state['store_rows_lost']} rows handed to the store writers of earlier fast paths are " \
           "not in the database" in r.stderr and "database or disk is full" in r.stderr, r.stderr
    assert not daemon.alive() and not daemon.segments()


TCP_COUNT = """local G = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C007}"
TrisulPlugin = {
  id = { name = "tcp count" },
  countergroup = { control = { guid = G, name = "tcp count", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "TCP packets", "pkts" } } },
  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      engine:update_counter(G, "all", 0, 1)
      engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", layer:packet():flowid():id(), "TCP", 3, "tcp")
      n = (n or 0) + 1
      if n % 64 == 0 and not fast then                                   -- released: the reload is done
        local f = io.open(RELEASE); if f then f:close(); fast = true end
      end
      if not fast then
        local t = os.clock() + 0.001        -- 1 ms a TCP packet: the file takes ~5 s, the reload comes mid-file
        while os.clock() < t do end
      end
    end,
  },
}
"""


def test_a_restart_by_reload_reads_a_file_source_on_where_it_stopped(daemon, tmp_path):
    """A reload that changes a setting restarts the fast path gracefully; over a [source] of files (not looping) the
    new one reads on after the packets the first one walked (and wrote), instead of from the first file: the database
    then holds every TCP frame once, as one run would.  Truth: tshark's TCP frames of trisul-16minutes.pcap (5312) and
    their count per 60 s bucket; the log's two `fast path finished` lines add up to the capture's 7000 records.
    Before: the second fast path read the file again from its start (the log: 1513 packets, then 7000), so the frames
    the first one had walked were stored twice, as alerts and in the counters."""
    pcap = os.path.join(helpers.PCAPS, "trisul-16minutes.pcap")
    frames = subprocess.run(["tshark", "-r", pcap, "-Y", "tcp", "-T", "fields", "-e", "frame.time_epoch"],
                            capture_output=True, text=True, check=True).stdout.split()
    per = {}
    for t in frames:
        b = int(float(t)) // 60 * 60
        per[b] = per.get(b, 0) + 1
    plug = tmp_path / "plugins"
    plug.mkdir()
    release = tmp_path / "release"
    (plug / "tcp_count.lua").write_text(TCP_COUNT.replace("RELEASE", json.dumps(str(release))))
    daemon.start(plugins=[plug], pcap=[pcap], loop=False)
    daemon.wait_packets(1000, timeout=60)
    text = open(daemon.config).read()
    open(daemon.config, "w").write(text.replace("[supervise]\n", "[fastpath]\nbatch = 512\n[supervise]\n"))
    r = daemon.cli("reload")
    assert r.returncode == 0 and "reloaded: fast path pid" in r.stdout, r.stdout + r.stderr
    release.touch()                         # the second fast path walks the rest without the 1 ms spin
    helpers.wait_for(lambda: daemon.status()["state"].startswith("stopped (input finished)"), 120, 0.2)
    log = open(os.path.join(daemon.run_dir, "supervisor.log")).read()
    walked = [json.loads(m)["packets"] for m in re.findall(r"fast path finished: (\{.*\})", log)]
    assert len(walked) == 2 and walked[0] < 7000 and sum(walked) == 7000, walked
    with sqlite3.connect(f"file:{os.path.join(daemon.out_dir, 'luaprobe.sqlite')}?mode=ro", uri=True) as db:
        alerts = db.execute("SELECT count(*) FROM alerts WHERE message = 'tcp'").fetchone()[0]
        counts = dict(db.execute("SELECT bucket_ts, value FROM counters WHERE group_guid = ?",
                                 ("{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C007}",)).fetchall())
    assert (alerts, len(frames)) == (5312, 5312)
    assert counts == per
