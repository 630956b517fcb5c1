"""The daemon out of file descriptors, made deterministic (engine/daemon/config.py ConfigError.resource,
supervisor.py request_reload / cmd_start).

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

Real daemons (tests/test_supervisor.py's fixture), real limits (prlimit), no mock.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import termios

import psutil

from luaprobe.engine.daemon import control
from tests import helpers
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


START_AT_LIMIT = r"""
import errno, os, resource, sys
from luaprobe.engine.daemon import cli, supervisor   # what `start` imports before it reads the config
cli.build_parser()
def free(fd):
    try:
        os.fstat(fd)                                   # opens nothing
    except OSError as e:
        return e.errno == errno.EBADF
    return False
lowest = next(fd for fd in range(1 << 16) if free(fd))
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_start_that_cannot_read_the_config_for_want_of_descriptors_is_exit_1(daemon):  # noqa: F811
    """`luaprobe start` with no descriptor left to it (soft RLIMIT_NOFILE at its lowest free descriptor) when it
    reads the config: one line naming the config and EMFILE, exit 1 (internal: the file is not at fault), no
    traceback, nothing started.  bf62a5b~1: exit 2, the usage error of a bad config."""
    daemon.write_config()
    r = subprocess.run([sys.executable, "-c", START_AT_LIMIT, "start", "--config", daemon.config], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == \
        (1, "", f"luaprobe start: {daemon.config}: cannot read: Too many open files\n"), r
    assert control.read_pid(daemon.run_dir) is None and not os.path.exists(daemon.run_dir)
