"""`luaprobe start` stops the daemon it started when the fast path loads with a plug-in problem (supervisor.py
_wait_loaded -> _stop_quietly), whatever the stop request on the control socket runs into.

The supervisor here is a stand-in process (STAND_IN, real process, real pidfile lock and Unix socket, the protocol
of engine/daemon/control.py) that answers `status` as a supervisor whose fast path loaded with a problem, and
then fails the `stop` request in one of the ways control.request can fail: no reply within the timeout
(NoAnswer), a reply that is not JSON (ControlError), a "bad request" reply (NoAnswer, not sent), a connection
reset while it lives (NotRunning).  SIGTERM, the supervisor's own graceful stop, ends it.  Before: NoAnswer and
ControlError came out of _stop_quietly as exceptions (a traceback for a caller, or `luaprobe start: <socket
error>` exit 1 with the plug-in problem's "not started" line missing while the daemon ran on), and a reset was
taken for "not running": "not started" was printed with the supervisor still running.  A supervisor that exits
on the request (its pid dead, NotRunning) was handled before and still is."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from luaprobe.engine.daemon import control, supervisor
from tests import helpers

STAND_IN = r"""
import json, os, signal, socket, struct, sys
from luaprobe.engine.daemon import control
run_dir, mode = sys.argv[1], sys.argv[2]
pidfile = control.PidFile(run_dir)
pidfile.acquire()
sock = control.listen(run_dir)
sock.setblocking(True)
def bye(*_):
    sock.close()
    os.unlink(control.path(run_dir, control.SOCKET))
    pidfile.release()
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else bye)
print("listening", flush=True)
held = []
while True:
    conn, _ = sock.accept()
    req = control.read_request(conn)
    if req.get("cmd") == "status":
        control.send_reply(conn, {"ok": True, "state": "running", "supervisor_pid": os.getpid(), "fastpath_pid": 1,
                                  "loaded": True, "plugin_problems": ["/p/bad.lua:3: boom"]})
        conn.close()
    elif mode in ("no-reply", "ignore-term"):
        held.append(conn)                               # read, never answered: the client's timeout
    elif mode == "not-json":
        conn.sendall(b"<html>\n")
        conn.close()
    elif mode == "bad-request":
        control.send_reply(conn, {"ok": False, "error": "bad request: cut short"})
        conn.close()
    elif mode == "reset":                               # RST: the client's recv gets ECONNRESET
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    elif mode == "exit":                                # it dies on the request: no reply, its pid gone
        bye()
"""


@pytest.fixture
def short_waits(monkeypatch):
    """The client's waits of a stop that gets no answer, shortened for the test (the defaults: control.request's 10 s
    and supervisor.STOP_WAIT_SLACK, 15 s; the same code path, 24 s less waiting): a request without its own timeout
    gets 1 s, and the wait for the supervisor to be gone is stop_deadline + 1 s."""
    request = control.request

    def quick(run_dir, cmd, timeout=1.0, **args):
        return request(run_dir, cmd, timeout=timeout, **args)
    monkeypatch.setattr(control, "request", quick)
    monkeypatch.setattr(supervisor, "STOP_WAIT_SLACK", 1.0)


def stand_in(run_dir: str, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", STAND_IN, run_dir, mode], cwd=helpers.REPO, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "listening\n"
    return p


@pytest.mark.parametrize("mode", ["no-reply", "not-json", "bad-request", "reset", "exit"])
def test_a_start_whose_stop_request_fails_still_stops_its_daemon(tmp_path, capsys, mode, request):
    """Each failure of the stop request: the plug-in problem and "not started" lines, exit 4, no exception, and the
    supervisor it started is gone (SIGTERM), its pidfile free.  no-reply waits for the request's timeout: 1 s here
    (short_waits), not the 10 s default."""
    if mode == "no-reply":
        request.getfixturevalue("short_waits")
    run_dir = control.ensure_run_dir(str(tmp_path / "run"))
    p = stand_in(run_dir, mode)
    with helpers.killed_when_left(p):
        code = supervisor._wait_loaded(run_dir, p, timeout=60, stop_deadline=5)
        gone = p.poll() is not None or psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
    err = capsys.readouterr().err.splitlines()
    assert code == 4, (code, err)
    assert err == ["luaprobe start: plug-in problem: /p/bad.lua:3: boom",
                   f"luaprobe start: not started: fix the problem and start again (log {run_dir}/supervisor.log)"], err
    assert gone and control.read_pid(run_dir) is None


def test_a_started_daemon_that_does_not_stop_is_named_with_its_pid(tmp_path, capsys, short_waits):
    """No reply to the stop and SIGTERM ignored: after stop_deadline + STOP_WAIT_SLACK (15 s; 1 s here, short_waits)
    one line says the daemon still runs, why, and how to stop it (its pid), instead of "not started"; exit 4, the
    plug-in problem's code."""
    run_dir = control.ensure_run_dir(str(tmp_path / "run"))
    p = stand_in(run_dir, "ignore-term")
    with helpers.killed_when_left(p):
        code = supervisor._wait_loaded(run_dir, p, timeout=60, stop_deadline=1)
        alive = p.poll() is None
    err = capsys.readouterr().err.splitlines()
    assert code == 4 and alive, (code, err)
    assert err[0] == "luaprobe start: plug-in problem: /p/bad.lua:3: boom", err
    assert len(err) == 2 and err[1].startswith(f"luaprobe start: the daemon it started did not stop (the supervisor "
                                               f"(pid {p.pid}) on {run_dir}/control.sock did not answer within 1 s "), err
    assert err[1].endswith(f"still running 2 s later): supervisor pid {p.pid}; stop it with `luaprobe stop "
                           f"--run-dir {run_dir}` or kill -TERM {p.pid}"), err
