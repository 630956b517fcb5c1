"""Control requests the supervisor or a client did not expect (engine/daemon/control.py, supervisor.py run/_handle):
each ends in one line and a documented exit code, and the daemon goes on.  Real daemons (tests/test_supervisor.py's
fixture), real sockets, a real RLIMIT_NOFILE on the running supervisor (prlimit), a real unprivileged user (a
forked child of this test that drops to ``nobody``)."""
from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import socket
import sys
import traceback

import psutil
import pytest

from luaprobe.engine.daemon import cli as cli_mod
from luaprobe.engine.daemon import control, statsview, supervisor  # noqa: F401 - imported before a fork (below)
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401 - the fixture


def raw_request(run_dir: str, line: bytes) -> dict | None:
    """Send ``line`` as it is on the control socket; the reply (None: closed without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(control.path(run_dir, control.SOCKET))
        s.sendall(line)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf) if buf else None


@pytest.mark.parametrize("line", [b"[1]\n", b'"stop"\n', b"42\n", b"null\n", b"{not json\n", b"\xff\xfe\n",
                                  b'{"cmd":' * 50000 + b"\n", b"[" * 50000 + b"\n"],
                         ids=["array", "string", "number", "null", "not-json", "not-utf8", "nested-objects",
                              "nested-arrays"])
def test_a_request_that_is_not_a_json_object_is_a_bad_request(daemon, line):  # noqa: F811
    """A request line that is JSON but not an object: the reply is a bad request naming it, and the supervisor
    and its fast path go on (status: running, the same pids).  Before: ``req.get`` raised AttributeError in the
    supervisor's loop: "supervisor internal error", the daemon and its fast path gone, no reply.  JSON nested 50 000
    deep (300 KB, under control.MAX_LINE): json.loads raised RecursionError there, with the same end."""
    daemon.start()
    before = daemon.status()
    reply = raw_request(daemon.run_dir, line)
    assert reply is not None and reply["ok"] is False and reply["error"].startswith("bad request: "), reply
    st = daemon.status()
    assert (st["state"], st["supervisor_pid"], st["fastpath_pid"]) == \
        ("running", before["supervisor_pid"], before["fastpath_pid"]), st
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_supervisor_out_of_file_descriptors_keeps_running_and_answers_again(daemon):  # noqa: F811
    """RLIMIT_NOFILE of the running supervisor lowered to 3 (every new descriptor refused, EMFILE, even the slot of
    its spare descriptor: Supervisor._accept_spare cannot help): a `status` then waits out its 10 s and says the
    supervisor did not answer because it is out of file descriptors, from /proc (control.fd_exhaustion: "N
    descriptors open, its RLIMIT_NOFILE soft limit is 3", exit 1), the supervisor logs one line naming the socket
    and the error, keeps its fast path, and answers again once the limit is back.  Before: accept()'s EMFILE ended
    the supervisor ("supervisor internal error"), its fast path with it; `status` then said stopped (3); and until
    this session the line said "it is busy, or stopped by SIGSTOP or a debugger"."""
    daemon.start()
    before = daemon.status()
    proc = psutil.Process(before["supervisor_pid"])
    limit = proc.rlimit(psutil.RLIMIT_NOFILE)
    log = control.path(daemon.run_dir, control.LOG)
    try:
        proc.rlimit(psutil.RLIMIT_NOFILE, (3, limit[1]))
        r = daemon.cli("status", timeout=60)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert f"luaprobe status: the supervisor (pid {proc.pid}) on {daemon.run_dir}/control.sock did not answer " \
               "within 10 s (no reply; it is out of file descriptors (" in r.stderr, r.stderr
        assert f" descriptors open, its RLIMIT_NOFILE soft limit is 3; see {log}))\n" in r.stderr, r.stderr
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        text = open(log).read()
        assert "supervisor internal error" not in text
        assert (f"cannot accept a request on control.sock in {daemon.run_dir}: Too many open files; the probe keeps "
                "running, retrying in 0.1 s") in text
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, limit)
    st = daemon.status()
    assert (st["state"], st["supervisor_pid"], st["fastpath_pid"]) == \
        ("running", before["supervisor_pid"], before["fastpath_pid"]), st
    assert "control.sock accepting requests again" in open(log).read()
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """`luaprobe ARGV` run in-process by a forked child of this test that became the user ``nobody``: (exit code,
    stdout + stderr).  An exception out of cli.main is printed as its traceback (code 99)."""
    nobody = pwd.getpwnam("nobody")
    cli_mod.build_parser()              # its lazy imports, while this interpreter's library may still be read
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            sys.stdout = sys.stderr = os.fdopen(w, "w", buffering=1)
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            os.environ["HOME"] = "/nonexistent"
            try:
                code = cli_mod.main(argv)
            except BaseException:  # noqa: BLE001 - the test reads the traceback
                traceback.print_exc()
                code = 99
            sys.stdout.flush()
            os._exit(code if isinstance(code, int) else 98)
        finally:
            os._exit(97)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize("cmd", ["stop", "status", "reload", "stats"])
def test_a_user_who_may_not_read_the_run_directory_gets_one_line(daemon, cmd):  # noqa: F811
    """Root's daemon, its run directory 0700; `luaprobe CMD --run-dir` by ``nobody``: one line naming the file or
    socket and "Permission denied", exit 1, no traceback; the daemon is untouched.  Before: `stop` died with a
    PermissionError traceback (control.read_pid caught only FileNotFoundError)."""
    daemon.start()
    before = daemon.status()
    code, out = as_nobody([cmd, "--run-dir", daemon.run_dir])
    assert "Traceback" not in out, out
    assert code == 1 and len(out.splitlines()) == 1, (code, out)
    assert out.startswith(f"luaprobe {cmd}: cannot ") and out.endswith(": Permission denied\n"), out
    st = daemon.status()
    assert (st["state"], st["fastpath_pid"]) == ("running", before["fastpath_pid"]), st
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


@pytest.fixture
def small_run_fs(tmp_path):
    """tmp_path/run as a 1 MiB tmpfs of its own (root only), unmounted after the daemon fixture's clean-up."""
    with helpers.tmpfs(tmp_path / "run", "size=1m") as run:
        yield run


def test_a_fast_path_that_cannot_be_started_is_retried_and_the_supervisor_goes_on(small_run_fs, daemon):  # noqa: F811
    """The fast path killed while the run directory is full: its restart cannot write active_config.json (ENOSPC).
    The supervisor counts it as a crash and retries with backoff, status names the reason, and once there is room
    a new fast path runs under the same supervisor.  Before: the OSError ended the supervisor ("failed: supervisor
    internal error"; status: "stopped (supervisor gone; was running)") and nothing was restarted."""
    from tests.test_supervisor import fill
    daemon.write_config(crash_loop_restarts=1000)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config", daemon.config],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    daemon.pids.add(control.read_pid(daemon.run_dir))
    before = daemon.status()
    filler = small_run_fs / "filler"
    fill(filler)
    os.kill(before["fastpath_pid"], signal.SIGKILL)
    # kept full while waiting (pages freed by a failed write's temporary file); and a restart that found room anyway
    # is killed too: the supervisor unlinks the last child's heartbeat / loaded / last_error files just before it
    # writes active_config.json, and under load (CI, 4 test processes) the pages they freed were that write's before
    # the next fill took them (status: running, last error "fast path killed by SIGKILL")
    seen, killed = [], {before["fastpath_pid"]}   # statuses polled, for the message of a timeout
    def reason():
        fill(filler)
        s = daemon.status()
        if not s.get("live"):
            pytest.fail(f"the supervisor ended: {s['state']}")
        if not seen or {k: s.get(k) for k in ("state", "last_error")} != seen[-1]:
            seen.append({k: s.get(k) for k in ("state", "last_error")})
        if s.get("fastpath_pid") and s["fastpath_pid"] not in killed:
            killed.add(s["fastpath_pid"])
            fill(filler)
            os.kill(s["fastpath_pid"], signal.SIGKILL)
            return False
        return "cannot start the fast path" in (s.get("last_error") or "") and s
    st = helpers.wait_for(reason, 60, 0.05, fail=False)
    assert st, f"no 'cannot start the fast path' within 60 s; the statuses seen: {seen}"
    assert st["last_error"].startswith(f"cannot start the fast path: writing {daemon.run_dir}/active_config.json: "
                                       "No space left on device"), st
    assert st["state"].startswith("restarting (last exit: cannot start the fast path"), st
    assert st["supervisor_pid"] == before["supervisor_pid"] and st["fastpath_pid"] is None, st
    os.unlink(filler)
    st = helpers.wait_for(lambda: (s := daemon.status())["state"] == "running" and s.get("loaded") and s, 60, 0.1)
    assert st["supervisor_pid"] == before["supervisor_pid"] and st["fastpath_pid"] not in (None,
                                                                                          before["fastpath_pid"]), st
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


@pytest.mark.parametrize("cmd", ["stop", "status", "reload", "stats", "start"])
def test_a_fifo_in_place_of_the_pidfile_gets_one_line_not_a_hang(tmp_path, cmd):
    """A FIFO planted at RUN/supervisor.pid (no daemon): `luaprobe CMD --run-dir RUN` ends within its 60 s with one
    line naming the pidfile, no traceback, exit 1 (start: nothing started, exit 1; status/stats/reload: nothing runs,
    3), and starts no process.  Before: control.read_pid's open(O_RDONLY) of a FIFO waited for a writer forever
    (`stop`, `start`: hung; killed by the timeout here)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.mkfifo(run / "supervisor.pid", 0o600)
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\n[source]\npcap = ["{helpers.REPO}/engine/examples/sample.pcap"]\n'
                   f'[plugins]\npaths = ["{helpers.REPO}/engine/examples/tcp_ports.lua"]\n')
    args = [cmd, "--run-dir", str(run)] + (["--config", str(cfg)] if cmd == "start" else [])
    try:
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"luaprobe {cmd} still waiting after 60 s on a FIFO at {run}/supervisor.pid")
    assert "Traceback" not in r.stderr, r.stderr
    if cmd in ("stop", "start"):
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, (r.returncode, r.stderr)
        assert f"{run}/supervisor.pid is not a regular file" in r.stderr, r.stderr
    else:
        assert r.returncode in (1, 3) and len(r.stderr.splitlines()) <= 1, (r.returncode, r.stderr)
    assert not (tmp_path / "out").exists() or cmd != "start"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])
                and "supervisor" in " ".join(p.info["cmdline"] or [])]


def test_clients_that_send_nothing_hold_up_no_other_request(daemon):  # noqa: F811
    """Eight connections to the control socket that send nothing (a stuck client, a probe of the socket): a
    `luaprobe status` made meanwhile answers at once (exit 0, running, the same pids), and each silent connection
    gets a bad-request reply about 2 s after its connect.  Before: the supervisor read each request blocking, 2 s
    each, in its one loop: `status` said "did not answer within 10 s" (exit 1) and the fast path went unwatched for
    16 s."""
    daemon.start()
    before = daemon.status()
    silent = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(control.path(daemon.run_dir, control.SOCKET))
            silent.append(s)
        r = daemon.cli("status", "--json")
        assert r.returncode == 0, (r.returncode, r.stderr)
        st = json.loads(r.stdout)
        assert (st["state"], st["supervisor_pid"], st["fastpath_pid"]) == \
            ("running", before["supervisor_pid"], before["fastpath_pid"]), st
        for s in silent:
            s.settimeout(30)
            reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"].startswith("bad request: "), reply
    finally:
        for s in silent:
            s.close()
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
