"""Run as an unprivileged user: open the capture sockets as root, then drop (docs/live.md "Privileges").

A live capture needs root (or CAP_NET_RAW) for one system call only: ``socket(AF_PACKET, SOCK_RAW)``.  With
``--user NAME`` (TOML ``[run] user``; ``--group`` / ``[run] group`` for another primary group) the process
that owns the run (the CLI's ``luaprobe run``, or the daemon's child) :

1. opens one packet socket per capture process (one, or one per shard with ``--shards N``; protocol 0, so
   it receives nothing until the capture process binds it) and compiles the ``--bpf`` expression on a live
   handle (libpcap's Linux VLAN semantics need one);
2. hands the output directory and the database files in it to the user (``chown``, never following a
   symbolic link);
3. drops for good, in tcpdump's and Suricata's order: ``setgroups`` (the user's groups), ``setgid``,
   ``setuid`` (real, effective and saved ids), ambient and every other capability cleared, and
   ``PR_SET_NO_NEW_PRIVS`` (no set-user-ID program a plug-in starts can regain a privilege); it checks
   that ``setuid(0)`` now fails.

Everything started after that (capture, shards, store writer, workers) runs as the user with no capability.
A capture process receives its socket as a file descriptor (``--socket-fd``) and configures it itself:
PACKET_VERSION, PACKET_RX_RING, mmap, SO_ATTACH_FILTER, bind, PACKET_FANOUT and the promiscuous membership
need no privilege.  Plug-ins are read after the drop, so they must be readable by the user; that, the
output directory and ``--stats-json`` are checked right after the drop (one line, exit code 2).

The daemon (``luaprobe start``): its supervisor restarts the fast-path child, and each child opens its own
sockets, so the supervisor drops to the user at start but keeps CAP_NET_RAW (permitted, inheritable and
ambient: inherited across exec by the child only) and nothing else; the child opens its sockets and then
clears every capability as above.  The supervisor runs no plug-in and reads no packet.

Errors: :class:`~luaprobe.engine.daemon.usage.UsageError` (exit 2) for an unknown user or group, a drop
asked of a process that is not root, or a path the user cannot use.  Sources: setuid(2), capabilities(7)
("Ambient capability set", "Effect of user ID changes on capabilities"), prctl(2), packet(7).
"""
from __future__ import annotations

import ctypes
import dataclasses
import grp
import json
import os
import pwd
import socket
import sys

from luaprobe.shm.logs import log

from .usage import DB_NAME, InputProblem, UsageError

CAP_NET_RAW = 13                 #: capabilities(7)
PR_SET_KEEPCAPS = 8              #: prctl(2)
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
_CAP_VERSION_3 = 0x20080522      #: _LINUX_CAPABILITY_VERSION_3 (two 32-bit words per set)

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclasses.dataclass(frozen=True)
class Target:
    """The user a run drops to: name, uid, primary gid and the supplementary group list."""

    name: str
    uid: int
    gid: int
    groups: tuple


def _given(where: str, value: str) -> str:
    """How a message shows a value given as ``where``: ``--user nobody`` for an option, ``[run] user = "nobody"``
    (a TOML string, as written in the file) for a config key (``where`` ending in "=")."""
    return f"{where} {json.dumps(value)}" if where.endswith("=") else f"{where} {value}"


def resolve(user: str, group: str | None = None, where: tuple = ("--user", "--group")) -> Target:
    """The user (a name or a numeric uid) and optional group (name or gid) to run as; the groups are the
    user's own (initgroups) unless ``group`` is given.  ``where`` names the two options in messages.
    Raises UsageError naming the option for an unknown user or group."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise UsageError(f"{_given(where[0], user)}: no such user") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            raise UsageError(f"{_given(where[1], group)}: no such group") from None
    groups = (gid,) if group else tuple(os.getgrouplist(pw.pw_name, gid))
    return Target(pw.pw_name, pw.pw_uid, gid, groups)


def _prctl(*args) -> None:
    if _libc.prctl(*[ctypes.c_ulong(a) for a in args], *[ctypes.c_ulong(0)] * (5 - len(args))) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl{args}: {os.strerror(e)}")


def _capset(mask: int) -> None:
    """Set effective = permitted = inheritable = ``mask`` (a bit per capability number) for this process."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def capabilities() -> dict:
    """This process's capability sets from /proc/self/status: {"CapEff": int, "CapPrm": ..., "CapAmb": ...}."""
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith("Cap"))}


def drop(target: Target, keep_net_raw: bool = False) -> None:
    """Become ``target`` for good.  As root: setgroups, setgid, setuid (in that order: once the uid is
    not 0 the groups can no longer change).  ``keep_net_raw``: CAP_NET_RAW alone stays in the permitted,
    effective, inheritable and ambient sets (children started by exec get it: the daemon's supervisor);
    otherwise every capability goes and PR_SET_NO_NEW_PRIVS is set.  Already running as ``target``
    (a daemon child holding the supervisor's ambient CAP_NET_RAW): only the capabilities are dropped.
    Raises UsageError when this process is neither root nor ``target``; RuntimeError if the drop did not hold."""
    if keep_net_raw and os.geteuid() != 0 and not capabilities()["CapPrm"] & (1 << CAP_NET_RAW):
        keep_net_raw = False                 # nothing to keep: the children will report the missing privilege
    if os.getuid() != target.uid or os.geteuid() != target.uid:
        if os.geteuid() != 0:
            raise UsageError(f"--user {target.name}: changing user needs root (this process runs as uid "
                             f"{os.geteuid()})")
        if keep_net_raw:
            _prctl(PR_SET_KEEPCAPS, 1)       # setuid keeps the permitted set (the effective set is cleared)
        os.setgroups(list(target.groups))
        os.setgid(target.gid)
        os.setuid(target.uid)
    if keep_net_raw:
        _capset(1 << CAP_NET_RAW)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW)
        _prctl(PR_SET_KEEPCAPS, 0)
    else:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        _capset(0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("privilege drop did not hold: setuid(0) succeeded")
    caps = capabilities()
    allowed = (1 << CAP_NET_RAW) if keep_net_raw else 0
    if (caps["CapEff"] | caps["CapPrm"] | caps["CapAmb"]) & ~allowed:
        raise RuntimeError(f"privilege drop did not hold: capabilities left {caps}")


def hand_over(directory: str, target: Target, names=(), what: str = "--out") -> None:
    """Create ``directory`` if missing (mode 0700) and make it, and each existing entry of ``names`` in it,
    owned by ``target`` (``names=None``: every entry, for the daemon's private run directory).  Symbolic
    links are neither followed nor changed."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise UsageError(f"{what} {directory}: cannot hand it to {target.name}: {e.strerror} (a directory, not a "
                         "symbolic link, is needed)") from None
    try:
        os.fchown(fd, target.uid, target.gid)
        for name in os.listdir(fd) if names is None else names:
            try:
                if not os.path.islink(os.path.join(directory, name)):
                    os.chown(name, target.uid, target.gid, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


def open_capture_sockets(interface: str, n: int) -> list[int]:
    """``n`` unbound AF_PACKET/SOCK_RAW sockets (protocol 0: nothing arrives before bind), as file
    descriptors the capture processes inherit (``--socket-fd``).  Raises InputProblem without the privilege."""
    fds = []
    try:
        for _ in range(n):
            fds.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).detach())
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise InputProblem(f"interface {interface}: socket(AF_PACKET, SOCK_RAW): {e.strerror} "
                           "(live capture needs root or CAP_NET_RAW)") from None
    return fds


def _absolute(cfg) -> None:
    """Paths that must still resolve after the drop when the working directory is closed to the user."""
    cfg.out_dir = os.path.abspath(cfg.out_dir)
    cfg.plugins = [os.path.abspath(p) for p in cfg.plugins]
    if getattr(cfg, "lua_input", None):
        cfg.lua_input = os.path.abspath(cfg.lua_input)
    cfg.lua_path = [os.path.abspath(p) for p in cfg.lua_path]
    from .settings import dirs
    for f, _flag, _toml in dirs():                     # --filex-dir, the T.env directories
        if getattr(cfg, f, None):
            setattr(cfg, f, os.path.abspath(getattr(cfg, f)))


def check_access(target: Target, cfg, stats_json: str | None, where: str) -> None:
    """After the drop: every plug-in path and Lua path readable, the output directory (and the
    --stats-json directory) writable.  Raises UsageError naming the path and the user."""
    def need(path, mode, what):
        if not os.access(path, mode):
            how = "writable" if mode & os.W_OK else "executable" if mode == os.X_OK else "readable"
            raise UsageError(f"{where} {target.name}: {what} {path} is not {how} by {target.name} (the run "
                             "uses it after dropping root; docs/live.md \"Privileges\")")
    need(os.path.realpath(sys.executable), os.X_OK, "the Python interpreter")      # every process of the run is started after
    need(os.path.dirname(os.__file__), os.R_OK | os.X_OK, "Python's library")   # the drop (not under /root)
    need(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.R_OK | os.X_OK, "luaprobe's code")
    for p in cfg.plugins + ([cfg.lua_input] if getattr(cfg, "lua_input", None) else []):
        need(p, os.R_OK | (os.X_OK if os.path.isdir(p) else 0), "plug-in path")
    for p in cfg.lua_path:
        if os.path.isdir(p):
            need(p, os.R_OK | os.X_OK, "Lua path")
    need(cfg.out_dir, os.W_OK | os.X_OK, "output directory")
    if stats_json:
        need(os.path.dirname(os.path.abspath(stats_json)), os.W_OK | os.X_OK, "--stats-json directory")


def check_target(user: str | None, group: str | None, where: tuple = ("--user", "--group")) -> Target | None:
    """Before anything starts: ``user`` and ``group`` exist, ``group`` comes with ``user``, and this
    process may become the user (it is root, or already the user).  Raises UsageError; returns the target."""
    if group and not user:
        raise UsageError(f"{_given(where[1], group)}: needs {where[0].rstrip(' =')} (the user to run as)")
    if not user:
        return None
    target = resolve(user, group, where)
    if target.uid == 0:
        raise UsageError(f"{_given(where[0], user)}: is root (name an unprivileged user to drop to)")
    if os.geteuid() != 0 and os.geteuid() != target.uid:
        raise UsageError(f"{_given(where[0], target.name)}: changing user needs root (this process runs as uid "
                         f"{os.geteuid()})")
    return target


def enter_run(cfg, stats_json: str | None = None, where: tuple = ("--user", "--group")) -> Target | None:
    """Before a run starts any process: with ``cfg.user`` set, open the capture sockets (``cfg.capture_fds``)
    and compile the BPF program (``cfg.bpf_program``) while privileged, hand the output directory over, drop
    (:func:`drop`) and check the paths the run needs (:func:`check_access`).  Without ``cfg.user``: nothing,
    except one warning line when a live capture runs as root.  Returns the target, or None."""
    target = check_target(cfg.user, cfg.group, where)
    if target is None:
        if cfg.interface and os.geteuid() == 0:
            log.warning("live capture on %s runs as root: plug-ins, workers and file helpers keep root's rights "
                        "(give %s NAME to drop them after the capture socket is open; docs/live.md)",
                        cfg.interface, where[0])
        return None
    _absolute(cfg)
    if os.geteuid() == 0:
        hand_over(cfg.out_dir, target, [DB_NAME + s for s in ("", "-wal", "-shm", "-journal")])
    if cfg.interface:
        from luaprobe.engine.capture.bpf import compile_bpf
        from luaprobe.engine.capture.process import link_type
        if cfg.bpf:
            cfg.bpf_program = cfg.bpf_program or compile_bpf(cfg.bpf, link_type(cfg.interface), cfg.interface)
        cfg.capture_fds = open_capture_sockets(cfg.interface, max(1, cfg.shards))
    drop(target)
    os.umask(os.umask(0o077) | 0o077)          # what the run creates is the user's alone (root reads it anyway)
    check_access(target, cfg, stats_json, where[0])
    log.info("running as %s (uid %d, gid %d)%s", target.name, target.uid, target.gid,
             f"; capture socket(s) opened before the drop: {len(cfg.capture_fds)}" if cfg.capture_fds else "")
    return target


def enter_supervisor(cfg, run_dir: str) -> Target | None:
    """The daemon's supervisor with ``[run] user``: hand the run directory (every entry) and the output
    directory over, then drop to the user keeping only CAP_NET_RAW (live) for the children it starts."""
    run = cfg["run"]
    target = check_target(run["user"], run["group"], ("[run] user =", "[run] group ="))
    if target is None:
        return None
    if os.geteuid() == 0:
        hand_over(run_dir, target, None, "run directory")
        hand_over(run["out_dir"], target, [DB_NAME + s for s in ("", "-wal", "-shm", "-journal")], "[run] out_dir =")
    drop(target, keep_net_raw=bool(cfg["source"]["interface"]))
    os.umask(os.umask(0o077) | 0o077)
    log.info("supervisor running as %s (uid %d)%s", target.name, target.uid,
             ", keeping CAP_NET_RAW for the fast path it starts" if cfg["source"]["interface"] else "")
    return target
