"""The run directory, the pidfile and the supervisor's control socket (JSON lines over a Unix socket).

Run directory (mode 0700), written by the supervisor:

    supervisor.pid    pid of the supervisor, flock()ed while it lives (a stale file is ignored)
    control.sock      Unix stream socket, mode 0600: one JSON request line -> one JSON reply line
    state.json        the last status (kept after the supervisor exits: "stopped", "failed: ...")
    active_config.json  the validated configuration the fast-path child runs (written at each (re)start)
    stats.json        the fast path's snapshot (FastPath.snapshot), rewritten every [stats] interval
    supervisor.log    stdout/stderr of the supervisor and the fast path when daemonized
    loaded.json       written by the fast path once its plug-ins are loaded: {"fastpath_pid", "problems"}
    last_error.json   the fast path's last error: {"fastpath_pid", "exit_code", "error"} (what `luaprobe run` prints)

Running daemons also register their run directory in a per-user directory (:func:`registry_dir`), so that
``status``/``stop``/``stats``/``reload`` find a daemon from any working directory (:func:`find_run_dir`).

Requests: ``{"cmd": "status"}``, ``{"cmd": "stats"}``, ``{"cmd": "reload"}``, ``{"cmd": "stop"}``.
Replies always carry ``"ok": true|false``; errors carry ``"error"``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import signal
import stat
import struct
import time

PIDFILE, SOCKET, STATE, STATS, LOG = "supervisor.pid", "control.sock", "state.json", "stats.json", "supervisor.log"
LOADED, LAST_ERROR = "loaded.json", "last_error.json"
MAX_LINE = 1 << 20
#: bytes a Unix socket's path may have (sun_path is 108 bytes, its last one the NUL; Python's bind/connect refuse
#: more: "AF_UNIX path too long"): a run directory whose control.sock is longer cannot be used (config.py)
MAX_SOCKET_PATH = 107


class ControlError(Exception):
    """A request to the supervisor failed; the message is one line naming the socket (the CLI prints it)."""


class NotRunning(ControlError):
    """No supervisor answers on the run directory's socket."""


class NoAnswer(ControlError):
    """A supervisor holds the socket but did not answer within the request's timeout (busy, or stopped).
    ``sent``: the request was sent (it stays queued and is acted on when the supervisor reads it), else the
    connect itself timed out (the backlog stayed full) and nothing was asked."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


class DamagedState(ControlError):
    """The run directory's state.json is there but is not what a supervisor writes (hand-edited, or another
    program's file): the message names the file and what is wrong with it (:func:`read_state`)."""


class Unserved(NoAnswer):
    """The supervisor read the request and answered without acting on it, because it could not take requests: out
    of file descriptors (EMFILE at accept(); the connection got its spare descriptor, Supervisor._accept_spare).
    The message names the cause in the supervisor's words; ``sent`` is False (nothing was asked of it)."""


_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def ensure_run_dir(run_dir: str) -> str:
    """Create the run directory, or take an existing one, owner-only (0700); return its absolute path.  Only the
    daemon's own files belong there: a symbolic link in it (planted while the directory was open to others, to
    have root write the pidfile or log through it) is refused with OSError ELOOP naming it; a FIFO or device
    (opening one to write supervisor.log or the heartbeat waits for a reader for ever: `start` hung) with OSError
    EINVAL naming it, except at the pidfile's name, which :func:`read_pid` refuses for every command (exit 1).  An
    entry gone between the listing and its check (a running daemon's temporary file renamed into place) is skipped."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    with os.scandir(run_dir) as it:
        for entry in it:
            if entry.is_symlink():
                raise OSError(errno.ELOOP, f"{entry.path} is a symbolic link (not followed; remove it)")
            if entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False):
                continue                            # the type from the listing itself (d_type): no stat()
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:               # gone since the listing: a running daemon's temporary file,
                continue                            # renamed into place (write_json)
            kind = next((k for test, k in _SPECIAL if test(mode)), None)
            if kind and entry.name != PIDFILE:      # the pidfile: read_pid's own line, the same for every command
                raise OSError(errno.EINVAL, f"{entry.path} is {kind}, not a regular file (remove it)")
    return run_dir


def _open_nofollow(file: str, flags: int) -> int:
    """``os.open(file, flags | O_NOFOLLOW, 0o600)``; a symbolic link there: OSError(ELOOP, 'FILE is a symbolic link
    (not followed)')."""
    try:
        return os.open(file, flags | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{file} is a symbolic link (not followed)") from None
        raise


def open_private(file: str, mode: str = "w", **kw):
    """``open(file, mode)`` for a file only its owner may read (0600, also when it already exists):
    status, statistics and log files name plug-ins, paths and traffic.  A symbolic link at ``file`` is not followed
    (``O_NOFOLLOW``: one planted in a run directory that was open to others would have root truncate, append to and
    chmod its target): OSError ELOOP naming the file.  Nor is a FIFO or device waited on (opened non-blocking: a FIFO
    without a reader would hold the open for ever): OSError EINVAL naming the file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    try:
        fd = _open_nofollow(file, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:              # a FIFO with no reader (or a device with nothing behind it)
            raise OSError(errno.EINVAL, f"{file} is not a regular file (remove it)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{file} is not a regular file (remove it)")
        os.set_blocking(fd, True)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def path(run_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(run_dir), name)


# ---------------------------------------------------------------- pidfile
class PidFile:
    """``supervisor.pid`` held with an exclusive flock for the life of the supervisor."""

    def __init__(self, run_dir: str):
        self.path = path(run_dir, PIDFILE)
        self.fd = None

    def acquire(self, reader_wait: float = 10.0) -> None:
        """Lock and write our pid; raise RuntimeError naming the running pid if another supervisor holds it.

        :func:`read_pid` probes the lock with a shared flock for a moment (`status`, `stop`, a racing `start`):
        found held only by such readers (no exclusive holder in /proc/locks), the lock is waited for, at most
        ``reader_wait`` s, instead of taking them for a running supervisor."""
        fd = _open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if _lock_holder(os.fstat(fd)) is not None or not _flock_wait(fd, reader_wait):
                    raise RuntimeError(f"already running (pid {read_pid(os.path.dirname(self.path))}, "
                                       f"{self.path})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


FLOCK_POLL = 0.005     #: s between two LOCK_NB attempts of :func:`_flock_wait` (a reader holds the lock ~1 ms)


def _flock_wait(fd: int, timeout: float) -> bool:
    """``flock(fd, LOCK_EX)``, waiting at most ``timeout`` s; True when taken, False when it was still held at the
    deadline.  Polled (``LOCK_NB`` against a monotonic deadline, :data:`FLOCK_POLL` between tries, one last try at
    the deadline), so no signal is needed: any thread may call it, a caller's own SIGALRM handler and timer are left
    alone, and no timer can fire after the lock is taken.  Errors other than "held" (EAGAIN) are raised (OSError)."""
    end = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(FLOCK_POLL, left))


def read_pid(run_dir: str) -> int | None:
    """The pid of the live supervisor holding the pidfile's lock; None when nobody holds it (a stale file).

    A supervisor writes its pid just after it takes the lock (:meth:`PidFile.acquire`): a file found locked but
    still empty (or with a stale pid being replaced) is read from the kernel's lock table instead
    (:func:`_lock_holder`), so that a `start` or `status` at that moment does not take a running supervisor for
    none.  A pidfile (or run directory) we may not read (another user's daemon: EACCES) raises :class:`ControlError`
    naming it, so that every command says so in one line (cli._daemon_command) instead of a traceback; so does
    a pidfile that is not a regular file (a FIFO planted there: opened non-blocking, since a blocking open of a
    FIFO waits for a writer forever and `stop` and `start` hung)."""
    p = path(run_dir, PIDFILE)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ControlError(f"cannot read {p}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ControlError(f"{p} is not a regular file (a supervisor writes its pid there; remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            data = os.read(fd, 64).decode(errors="replace").strip()
            holder = _lock_holder(os.fstat(fd))
            if holder is not None and str(holder) != data:
                return holder
            return int(data) if data.isdigit() else holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None                     # nobody holds it: stale
    finally:
        os.close(fd)


def _lock_holder(st: os.stat_result) -> int | None:
    """The pid holding an exclusive flock on the file of ``st``, from /proc/locks ("1: FLOCK ADVISORY WRITE PID
    MAJ:MIN:INODE 0 EOF", major and minor in hex); None when it is not found there (no /proc)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                w = line.split()
                if len(w) >= 6 and w[1] == "FLOCK" and w[3] == "WRITE" and w[5] == dev and w[4].isdigit() \
                        and int(w[4]) > 0:
                    return int(w[4])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- socket
def listen(run_dir: str) -> socket.socket:
    """Bind the control socket (mode 0600), replacing a stale one; non-blocking."""
    p = path(run_dir, SOCKET)
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(p)
    finally:
        os.umask(old)
    os.chmod(p, 0o600)
    s.listen(64)                        # `status` pollers queue while the supervisor is busy (a reload's probe)
    s.setblocking(False)
    return s


def read_request(conn: socket.socket, timeout: float = 2.0) -> dict:
    """One JSON object line from a client connection ({} when it sent nothing), read blocking (:func:`parse_request`
    says what is refused); OSError (TimeoutError): the line did not come whole within ``timeout`` s.  The supervisor
    reads its clients' lines without blocking instead (Supervisor._read_client)."""
    conn.settimeout(timeout)
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_LINE:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return parse_request(buf)


def parse_request(buf: bytes) -> dict:
    """The request in ``buf``, a client's bytes up to its first newline ({} when empty).  ValueError: not JSON, not
    UTF-8, JSON that is not an object (``[1]``, ``"stop"``), or nested too deeply for json's recursive decoder
    (``[`` x 50 000: its RecursionError).  The supervisor answers it as a bad request (Supervisor._handle)."""
    try:
        req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    except RecursionError:      # json's decoder recurses per nesting level: '[' * 50000 is a bad request too
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(req, dict):
        raise ValueError(f"a JSON {type(req).__name__}, not an object like {{\"cmd\": \"status\"}}")
    return req


def send_reply(conn: socket.socket, reply: dict) -> None:
    try:
        conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
    except OSError:
        pass


def request(run_dir: str, cmd: str, timeout: float = 10.0, **args) -> dict:
    """Send one request to the supervisor of ``run_dir`` and return its reply (a dict with ``"ok"``).

    Raises :class:`NotRunning` if nobody answers: no socket, nobody listening, or the supervisor exits between our
    connect and its reply (it closes its listening socket with our connection still queued: ECONNRESET / EPIPE
    here; or it dies while it writes the reply).  Raises :class:`NoAnswer` when a supervisor holds the socket but
    no reply comes within ``timeout`` seconds (it is busy, or stopped by SIGSTOP / a debugger): the connect waits
    while its backlog is full (``SO_SNDTIMEO``, instead of failing at once with EAGAIN), then send and receive
    share what is left of ``timeout``.  Other errors (a socket we may not open: EACCES) are :class:`ControlError`.
    A request that timed out stays queued: the supervisor reads and acts on it when it gets to it."""
    p = path(run_dir, SOCKET)
    end = time.monotonic() + timeout
    if len(os.fsencode(p)) > MAX_SOCKET_PATH:       # no supervisor can listen there (config.py refuses the run dir)
        raise NotRunning(f"no supervisor on {p} (a Unix socket path holds at most {MAX_SOCKET_PATH} bytes)")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:                        # no descriptor left to this client (EMFILE): one line, not a traceback
        raise ControlError(f"cannot make a socket to reach {p}: {e.strerror}") from None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                     struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))
        try:
            s.connect(p)                        # blocking: waits up to SO_SNDTIMEO while the backlog is full
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"no supervisor on {p} ({e.strerror})") from None
        except (BlockingIOError, TimeoutError):
            raise NoAnswer(_no_answer(run_dir, timeout, "its queue of requests stayed full"), False) from None
        except OSError as e:
            raise ControlError(f"cannot connect to {p}: {e.strerror}") from None
        buf = b""
        try:
            s.settimeout(max(0.001, end - time.monotonic()))
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            while b"\n" not in buf:
                s.settimeout(max(0.001, end - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            buf = b""                           # the supervisor closed its socket with this connection still queued
        except TimeoutError:
            raise NoAnswer(_no_answer(run_dir, timeout, "no reply"), True) from None
        except OSError as e:
            raise ControlError(f"the request to {p} failed: {e.strerror}") from None
    finally:
        s.close()
    if b"\n" not in buf:                        # nothing, or a reply cut short by the supervisor's death
        raise NotRunning(f"the supervisor on {p} closed the connection without a reply")
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as e:
        raise ControlError(f"the supervisor on {p} replied with something that is not JSON ({e})") from None
    if isinstance(reply, dict) and reply.get("unserved"):
        pid = reply.get("supervisor_pid")
        raise Unserved(f"the supervisor{f' (pid {pid})' if pid else ''} on {p} did not take the request: "
                       f"{reply.get('error')}", False)
    if not isinstance(reply, dict) or (not reply.get("ok") and str(reply.get("error", "")).startswith("bad request")):
        # our line did not reach it whole within its read timeout (Supervisor._handle): no answer to our request
        raise NoAnswer(f"the supervisor on {p} did not get the request: "
                       f"{reply.get('error') if isinstance(reply, dict) else reply!r}", False)
    return reply


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T stopped, t traced, Z ...); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def proc_stop_pending(pid: int) -> bool:
    """True when SIGSTOP was sent to process ``pid`` and not yet taken (/proc/PID/status: bit 18 of SigPnd or
    ShdPnd, signal 19 on Linux x86 and arm): a process in uninterruptible sleep (state D: a write, an fsync) takes
    it, and stops, only when that sleep ends, so /proc shows D meanwhile, not T.  False when gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith((b"SigPnd:", b"ShdPnd:"))]
    except (OSError, ValueError, IndexError):
        return False
    return any(m >> (signal.SIGSTOP - 1) & 1 for m in masks)


def fd_exhaustion(pid: int) -> str | None:
    """"N descriptors open, its RLIMIT_NOFILE soft limit is M" when process ``pid`` holds as many descriptors as its
    soft limit allows (so its accept() and open() fail with EMFILE), from /proc/PID/fd and /proc/PID/limits; None
    when it holds fewer, or /proc cannot tell us (another user's process: EACCES; gone)."""
    try:
        held = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits") as f:
            soft = next((line[len("Max open files"):].split()[0] for line in f if line.startswith("Max open files")),
                        "unlimited")
    except OSError:
        return None
    if not soft.isdigit() or held < int(soft):
        return None
    return f"{held} descriptors open, its RLIMIT_NOFILE soft limit is {soft}"


def _no_answer(run_dir: str, timeout: float, what: str) -> str:
    """The text of :class:`NoAnswer`: "the supervisor (pid N) on SOCK did not answer within T s (...)"; the state
    letter of a stopped process (T, t) is named, as the stall rule names it, and so is a supervisor out of file
    descriptors (:func:`fd_exhaustion`: it cannot accept the connection, and its spare descriptor did not help)."""
    pid = read_pid(run_dir)
    state = proc_state(pid) if pid else None
    fds = fd_exhaustion(pid) if pid and state not in ("T", "t") else None
    why = (f"it is stopped (state {state}: SIGSTOP or a debugger)" if state in ("T", "t")
           else f"it is out of file descriptors ({fds}; see {path(run_dir, LOG)})" if fds
           else "it is busy, or stopped by SIGSTOP or a debugger")
    who = f"the supervisor (pid {pid})" if pid else "the supervisor"
    return f"{who} on {path(run_dir, SOCKET)} did not answer within {timeout:g} s ({what}; {why})"


# ---------------------------------------------------------------- files
def write_json(file: str, obj) -> None:
    """Atomic replace of a JSON file; on an error (OSError: a full disk) the temporary file is removed and the
    error raised, ``file`` keeps its previous content."""
    tmp = f"{file}.tmp{os.getpid()}"
    try:
        with open_private(tmp, "w") as f:
            json.dump(obj, f, default=str)
        os.replace(tmp, file)
    except BaseException:               # a full disk (ENOSPC): no half-written tmp file left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class HeldWrite:
    """One atomic write of a JSON ``file`` that needs no new descriptor, its descriptors opened ahead: an unnamed file
    in ``file``'s directory (``O_TMPFILE``, 0600) and the directory itself.  A process at its RLIMIT_NOFILE (EMFILE;
    the limit may have been lowered under it, below every descriptor it holds but the standard streams) or at the
    system's (ENFILE) can then still write its last word: the JSON goes into the unnamed file, which is linked into
    the directory as ``FILE.tmpPID`` (linkat through /proc/self/fd with AT_SYMLINK_FOLLOW: no descriptor, no
    capability) and renamed over ``file``, as :func:`write_json` does.  Used once, then closed.  Where the filesystem
    has no O_TMPFILE (or /proc is not mounted: the link fails), nothing is held (``fd`` None) and :meth:`write_json`
    raises OSError like a write that found no descriptor."""

    def __init__(self, file: str):
        self.file = os.path.abspath(file)
        self.fd: int | None = None
        self.dir_fd: int | None = None
        where = os.path.dirname(self.file)
        try:
            self.dir_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fd = os.open(where, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except (OSError, AttributeError):      # no O_TMPFILE here (EOPNOTSUPP, EISDIR on old kernels), no descriptor
            self.close()

    def write_json(self, obj) -> None:
        """Replace ``file`` with ``obj`` as JSON through the held descriptors, then close them.  OSError (ENOSPC,
        nothing held: EBADF) leaves ``file`` as it was and no temporary name behind."""
        if self.fd is None or self.dir_fd is None:
            raise OSError(errno.EBADF, f"no descriptor held for {self.file}")
        name = os.path.basename(self.file)
        tmp = f"{name}.tmp{os.getpid()}"
        data = json.dumps(obj, default=str).encode()
        try:
            os.ftruncate(self.fd, 0)
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], done)
            try:
                os.unlink(tmp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            os.link(f"/proc/self/fd/{self.fd}", tmp, dst_dir_fd=self.dir_fd)      # linkat(..., AT_SYMLINK_FOLLOW)
            os.replace(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
            raise
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dir_fd = None


def read_json(file: str):
    """The JSON in ``file`` or None (missing, being replaced, or damaged: not JSON, not UTF-8; or not readable now:
    EMFILE in a supervisor out of file descriptors, EACCES, EIO, a directory)."""
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError):     # FileNotFoundError ...; json.JSONDecodeError, UnicodeDecodeError
        return None


#: the fields of state.json (Supervisor.status()) that the commands use beyond printing them, and the JSON types
#: they may have (None: null); a field may be missing
_STATE_TYPES = {"state": (str,), "last_error": (str, type(None)), "plugin_problems": (list, type(None)),
                "last_exit_code": (int, type(None)), "stop_killed": (str, type(None)),
                "stopped_by": (str, type(None)), "store_rows_lost": (int, type(None)),
                "last_stats": (dict, type(None))}
_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", type(None): "null",
               float: "a number", bool: "a boolean"}


def read_state(run_dir: str) -> dict | None:
    """The supervisor's last saved state (``run_dir``/state.json, written whole by a rename:
    Supervisor._save_state) as a dict; None when there is none or it cannot be read now (missing, EMFILE, EACCES,
    a directory: as :func:`read_json`).  :class:`DamagedState` when the file is there but is not JSON, or not a JSON
    object with a string "state" and the types of ``_STATE_TYPES`` (``last_stats`` numbers or null): a hand-edited
    file, which `status`, `stop` and `stats` report in one line naming it instead of a traceback."""
    file = path(run_dir, STATE)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError:
        return None

    def damaged(what: str) -> DamagedState:
        return DamagedState(f"{file} is damaged: {what} (a supervisor never writes that; remove the file)")

    def kind(v) -> str:
        return _JSON_NAMES.get(type(v), type(v).__name__)
    try:
        st = json.loads(data)
    except ValueError as e:             # json.JSONDecodeError, UnicodeDecodeError
        raise damaged(f"not JSON ({e})") from None
    if not isinstance(st, dict):
        raise damaged(f"{kind(st)}, not a JSON object")
    if "state" not in st:
        raise damaged('no "state"')
    for k, types in _STATE_TYPES.items():
        if k in st and not isinstance(st[k], types):
            raise damaged(f'"{k}" is {kind(st[k])}, not ' + " or ".join(_JSON_NAMES[t] for t in types))
    for k, v in (st.get("last_stats") or {}).items():
        if not isinstance(v, (int, float, type(None))):
            raise damaged(f'"last_stats" "{k}" is {kind(v)}, not a number or null')
    for v in st.get("plugin_problems") or []:
        if not isinstance(v, str):
            raise damaged(f'"plugin_problems" holds {kind(v)}, not only strings')
    return st


# ---------------------------------------------------------------- where the running daemons are
def registry_dir() -> str:
    """Per-user directory of running daemons' run directories (mode 0700): ``$LUAPROBE_STATE_DIR``, else
    ``$XDG_RUNTIME_DIR/luaprobe``, else ``~/.local/state/luaprobe``; one file per daemon holding its run dir."""
    d = os.environ.get("LUAPROBE_STATE_DIR") or (
        os.path.join(os.environ["XDG_RUNTIME_DIR"], "luaprobe") if os.environ.get("XDG_RUNTIME_DIR")
        else os.path.join(os.path.expanduser("~"), ".local", "state", "luaprobe"))
    return os.path.join(d, "daemons")


def _entry(run_dir: str) -> str:
    return os.path.join(registry_dir(), hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16])


def register(run_dir: str) -> None:
    """Record a running daemon's run directory (the supervisor calls this once it holds the pidfile).  OSError when
    the registry cannot be written (a $HOME that does not exist or may not be written, a LUAPROBE_STATE_DIR that is
    a file): the supervisor logs it and runs on, found with --run-dir only."""
    os.makedirs(registry_dir(), mode=0o700, exist_ok=True)
    write_json(_entry(run_dir), {"run_dir": os.path.abspath(run_dir), "pid": os.getpid()})


def unregister(run_dir: str) -> None:
    """Remove the entry; one left behind (a supervisor that dropped root cannot write root's registry) is
    removed by the next :func:`running_run_dirs`."""
    try:
        os.unlink(_entry(run_dir))
    except OSError:
        pass


def running_run_dirs() -> list[str]:
    """Run directories of the daemons running now (stale entries are removed)."""
    out = []
    try:
        names = sorted(os.listdir(registry_dir()))
    except OSError:                     # missing; or not a directory, not ours to read: no daemon registered there
        return out
    for name in names:
        e = read_json(os.path.join(registry_dir(), name))
        if isinstance(e, dict) and isinstance(e.get("run_dir"), str) and read_pid(e["run_dir"]):
            out.append(e["run_dir"])
        elif e is not None:
            try:
                os.unlink(os.path.join(registry_dir(), name))
            except FileNotFoundError:
                pass
    return out


class Ambiguous(Exception):
    """Several daemons run and no --run-dir says which one."""


def find_run_dir(given: str | None) -> tuple[str, str]:
    """The run directory a command means, and how it was found.

    ``--run-dir`` when given; else ``./run`` when a daemon runs there (or ran there: it has a state.json);
    else the one running daemon registered for this user; else ``./run`` (not running).  Raises
    :class:`Ambiguous` naming them when several daemons run and ``./run`` is none of them."""
    if given:
        return os.path.abspath(given), "--run-dir"
    local = os.path.abspath("run")
    if read_pid(local):
        return local, "./run"
    running = running_run_dirs()
    if len(running) == 1:
        return running[0], "the running daemon"
    if len(running) > 1:
        raise Ambiguous("several daemons are running, give --run-dir: " + ", ".join(running))
    return local, "./run (no daemon is running for this user: " + registry_dir() + " is empty)"
