"""The daemon out of file descriptors, made deterministic (engine/daemon/config.py ConfigError.resource,
supervisor.py request_reload / cmd_start / Supervisor._accept_spare, control.py Unserved).

bf62a5b's test set the running supervisor's RLIMIT_NOFILE to its open descriptors + 1 and then ran `luaprobe
reload`: the one free slot went to accept() or to the config's open() depending on which of the supervisor's own
short-lived descriptors (stats.json read, state.json written, stats.jsonl opened at its first snapshot) were open
when the test counted, so 1 run in 3 saw "did not answer" (8ec5731 dropped it).  Here no count of the supervisor's
descriptors is needed:

* reload: the test's control connection is accepted and its first bytes read by the supervisor before any limit is
  set (the kernel's count of the bytes the peer has not read, SIOCOUTQ, is 0: only an accepted connection is read
  from); then the supervisor's soft RLIMIT_NOFILE is set to 3, below every descriptor it holds, so that every new
  descriptor fails with EMFILE whatever it holds; then the rest of the request line is sent.  Reading the config is
  the request's first open(): EMFILE, every time.  The reply goes back on the connection already open.
* start: `luaprobe start` in a process that sets its own soft limit to its lowest free descriptor (found by fstat(),
  which opens nothing, in a process with one thread) just before the CLI runs: the config's open() is the first new
  descriptor `start` asks for.

* a supervisor at its limit (set just above its pidfile's descriptor, below which it holds only what it opened at
  its start) answers every client on its spare descriptor with the cause, at once (Supervisor._accept_spare).

* a supervisor whose limit is set to 3 and which then stops (SIGTERM) or gives up (a crash loop) still writes its
  final state.json, through the descriptors it holds for it (control.HeldWrite), so `status` tells stopped from failed.

Real daemons (tests/test_supervisor.py's fixture), real limits (prlimit), no mock.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios

import psutil
import pytest

from luaprobe.engine.daemon import control
from luaprobe.shm import segment
from tests import helpers
from tests.test_daemon_start_faults import START_WITH   # `start` under a descriptor limit
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


def unread_by_peer(s: socket.socket) -> int:
    """Bytes written on ``s`` that its peer has not read yet (SIOCOUTQ: for a Unix stream socket, the memory of the
    messages still queued at the peer; 0 once it read them all)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, struct.pack("i", 0)))[0]


def accepted_connection(run_dir: str, head: bytes) -> socket.socket:
    """A control connection the supervisor has accepted and read ``head`` from (a request line without its newline:
    it waits for the rest, control.CLIENT_DEADLINE s)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(control.path(run_dir, control.SOCKET))
    s.sendall(head)
    helpers.wait_for(lambda: unread_by_peer(s) == 0, 30, 0.001)
    return s


def read_reply(s: socket.socket) -> dict:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf)


def test_a_reload_that_cannot_read_the_config_for_want_of_descriptors_is_exit_1(daemon):  # noqa: F811
    """The supervisor at RLIMIT_NOFILE 3 when the reload request's line completes: reading the config fails with
    EMFILE.  That is the supervisor's resources, not the file: the reply is exit 1 "the configuration could not be
    checked", naming the config and the error, not "configuration invalid" (exit 2, a usage error, what
    bf62a5b~1 replied); the running fast path is kept, and a `luaprobe reload` once the limit is back works."""
    daemon.start()
    before = daemon.status()
    proc = psutil.Process(before["supervisor_pid"])
    limit = proc.rlimit(psutil.RLIMIT_NOFILE)
    s = accepted_connection(daemon.run_dir, b'{"cmd": "reload"')
    try:
        try:
            proc.rlimit(psutil.RLIMIT_NOFILE, (3, limit[1]))
            s.sendall(b"}\n")
            reply = read_reply(s)
        finally:
            proc.rlimit(psutil.RLIMIT_NOFILE, limit)
    finally:
        s.close()
    assert reply == {"ok": False, "exit": 1, "error": f"reload refused, the configuration could not be checked: "
                     f"{daemon.config}: cannot read: Too many open files (the running fast path and its plug-ins "
                     "are kept; reload again)"}, reply
    st = daemon.status()
    assert (st["state"], st["supervisor_pid"], st["fastpath_pid"], st["reloads"]) == \
        ("running", before["supervisor_pid"], before["fastpath_pid"], 0), st
    r = daemon.cli("reload", timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_start_that_cannot_read_the_config_for_want_of_descriptors_is_exit_1(daemon):  # noqa: F811
    """`luaprobe start` with no descriptor left to it (soft RLIMIT_NOFILE at its lowest free descriptor) when it
    reads the config: one line naming the config and EMFILE, exit 1 (internal: the file is not at fault), no
    traceback, nothing started.  bf62a5b~1: exit 2, the usage error of a bad config."""
    daemon.write_config()
    r = subprocess.run([sys.executable, "-c", START_WITH, "0", "start", "--config", daemon.config], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == \
        (1, "", f"luaprobe start: {daemon.config}: cannot read: Too many open files\n"), r
    assert control.read_pid(daemon.run_dir) is None and not os.path.exists(daemon.run_dir)


def descriptor_of(pid: int, target: str) -> int:
    """The descriptor of process ``pid`` open on ``target`` (/proc/PID/fd)."""
    fds = [int(n) for n in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{n}") == target]
    assert len(fds) == 1, (target, fds)
    return fds[0]


def test_a_supervisor_at_its_descriptor_limit_says_so_to_every_client(daemon):  # noqa: F811
    """The supervisor's soft RLIMIT_NOFILE set just above its pidfile's descriptor: every descriptor below the
    limit is one it has held since it started (the standard streams, the log pipe, the refusal pipe, the pidfile:
    taken in that order, each the lowest free one), so every accept() fails with EMFILE, whatever else it holds.
    `luaprobe status`, `reload`, `stop` and `stats` each answer at once with one line on stderr naming the cause
    ("out of file descriptors", the limit, the log), exit 1 (docs/operations.md), no traceback; `stop` says that
    nothing was asked and names kill -TERM; the fast path is kept and answers come back with the limit.
    Before (bf62a5b~1 .. 8ec5731): each waited its 10 s and said "it is busy, or stopped by SIGSTOP or a
    debugger"; the cause was in the supervisor's log only."""
    daemon.start()
    before = daemon.status()
    pid = before["supervisor_pid"]
    proc = psutil.Process(pid)
    limit = proc.rlimit(psutil.RLIMIT_NOFILE)
    at = descriptor_of(pid, control.path(daemon.run_dir, control.PIDFILE)) + 1
    sock = control.path(daemon.run_dir, control.SOCKET)
    cause = (f"the supervisor (pid {pid}) on {sock} did not take the request: it is out of file descriptors "
             f"(accept() on control.sock: Too many open files: all {at} allowed by its RLIMIT_NOFILE soft limit are "
             "in use); its fast path keeps running, and it takes requests again once descriptors are free (raise the "
             f"limit: prlimit --nofile, LimitNOFILE=; log {control.path(daemon.run_dir, control.LOG)})")
    results = {}
    try:
        proc.rlimit(psutil.RLIMIT_NOFILE, (at, limit[1]))
        for cmd in ("status", "reload", "stop", "stats"):
            results[cmd] = daemon.cli(cmd, timeout=60)
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, limit)
    for cmd, r in results.items():
        assert "Traceback" not in r.stderr and r.returncode == 1, (cmd, r.returncode, r.stdout, r.stderr)
        tail = "; nothing was asked of it; or kill -TERM %d" % pid if cmd == "stop" else ""
        assert r.stderr == f"luaprobe {cmd}: {cause}{tail}\n", (cmd, r.stderr)
    assert results["status"].stdout.startswith("state:      not taking requests (last saved state: running)\n")
    st = daemon.status()
    assert (st["state"], st["supervisor_pid"], st["fastpath_pid"], st["reloads"]) == \
        ("running", pid, before["fastpath_pid"], 0), st
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_fast_path_crash_while_the_supervisor_is_out_of_descriptors_is_restarted(daemon):  # noqa: F811
    """The supervisor at RLIMIT_NOFILE 3 (no new descriptor at all) when its fast path is killed: the crash is seen
    and the restart tried (it cannot be started: active_config.json not written, "Too many open files", retried
    with backoff); the segment sweep that needs /dev/shm listed is logged and tried again; once the limit is back
    the same supervisor runs a new fast path, the dead one's segments are gone, and the daemon stops cleanly.
    Before: segment.sweep()'s EMFILE ended the supervisor ("supervisor internal error"), its finally block died
    at the same sweep (socket, pidfile and state.json left as they were), and the daemon was gone."""
    daemon.start(crash_loop_restarts=1000)
    before = daemon.status()
    proc = psutil.Process(before["supervisor_pid"])
    old = before["fastpath_pid"]
    limit = proc.rlimit(psutil.RLIMIT_NOFILE)
    log = control.path(daemon.run_dir, control.LOG)

    def restart_tried():
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            pytest.fail("the supervisor ended; its log ends with:\n" + open(log).read()[-2000:])
        return "cannot start the fast path: writing " in open(log).read()
    try:
        proc.rlimit(psutil.RLIMIT_NOFILE, (3, limit[1]))
        os.kill(old, signal.SIGKILL)
        helpers.wait_for(restart_tried, 60, 0.02)
    finally:
        if proc.is_running():
            proc.rlimit(psutil.RLIMIT_NOFILE, limit)
    text = open(log).read()
    assert "supervisor internal error" not in text, text[-3000:]
    assert f"cannot sweep dead processes' segments from /dev/shm in {daemon.run_dir}: Too many open files" in text
    st = helpers.wait_for(lambda: (s := daemon.status())["state"] == "running" and s.get("loaded") and s, 60, 0.1)
    assert st["supervisor_pid"] == before["supervisor_pid"] and st["fastpath_pid"] not in (None, old), st
    helpers.wait_for(lambda: not [n for n in segment.list_segments() if segment.owner_pid(n) == old], 30, 0.05)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def stop_at_limit_3(daemon, stop) -> psutil.Process:  # noqa: F811
    """The running supervisor's soft RLIMIT_NOFILE set to 3, below every descriptor it holds but the standard
    streams (its spare one too: freeing it frees no slot it may use), then ``stop(status)`` ends it; returns it
    once it has exited (it is not restored: whatever it writes at the end is written at the limit)."""
    before = daemon.status()
    proc = psutil.Process(before["supervisor_pid"])
    fds = os.listdir(f"/proc/{proc.pid}/fd")
    spare = min(int(n) for n in fds if os.readlink(f"/proc/{proc.pid}/fd/{n}") == daemon.run_dir)
    assert spare >= 3, spare                               # the spare: the run directory, opened first in run()
    proc.rlimit(psutil.RLIMIT_NOFILE, (3, proc.rlimit(psutil.RLIMIT_NOFILE)[1]))
    stop(before)
    proc.wait(120)
    return proc


def test_a_supervisor_stopped_below_its_spare_descriptor_still_writes_its_final_state(daemon):  # noqa: F811
    """SIGTERM to a supervisor at RLIMIT_NOFILE 3: it stops gracefully, and its final state.json is written through
    the descriptors it held for it (control.HeldWrite: an O_TMPFILE file linked and renamed into place), so
    `status` says "stopped" (exit 3, the fast path's last exit, who stopped it), not "stopped (supervisor gone; was
    running)", as on 0217f6c: the state it had saved before the limit, the stop and its end unwritten."""
    daemon.start()
    stop_at_limit_3(daemon, lambda st: os.kill(st["supervisor_pid"], signal.SIGTERM))
    r = daemon.cli("status", "--json")
    st = json.loads(r.stdout)
    assert (r.returncode, st["state"], st["last_exit"], st["stopped_by"]) == (3, "stopped", "exit status 0", "SIGTERM"), \
        (r.returncode, r.stdout, r.stderr)
    assert not [n for n in os.listdir(daemon.run_dir) if ".tmp" in n]
    assert not daemon.alive() and not daemon.segments()


def test_a_supervisor_that_fails_below_its_spare_descriptor_says_failed(daemon):  # noqa: F811
    """A supervisor at RLIMIT_NOFILE 3 whose fast path exits (SIGTERM to the fast path: a looping source's exit is a
    crash) cannot start another (active_config.json: EMFILE) and, with crash_loop_restarts = 1, gives up: its final
    state "failed: crash loop (...)" is written, and `status` exits 1 ("failed", docs/operations.md) with the cause.
    On 0217f6c: "stopped (supervisor gone; was running)", exit 3, as if nothing had failed."""
    daemon.start(crash_loop_restarts=1)
    stop_at_limit_3(daemon, lambda st: os.kill(st["fastpath_pid"], signal.SIGTERM))
    r = daemon.cli("status")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.startswith("state:      failed: crash loop (last exit: cannot start the fast path: writing "
                               f"{control.path(daemon.run_dir, 'active_config.json')}: Too many open files)"), r.stdout
    assert not daemon.alive() and not daemon.segments()
