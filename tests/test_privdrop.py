"""Privilege drop (engine/daemon/privileges.py, docs/live.md "Privileges"): a live capture with --user runs every
process as that user with no capability, on a real veth pair, and the daemon keeps only CAP_NET_RAW in its
supervisor so that a restarted fast path can open its socket again.

The truth each test checks against is the kernel's: uids, gids and capability sets from /proc/<pid>/status
(psutil lists the process tree), owners and modes from stat(2), and the datagrams the sender wrote.

Every process of a dropped run is started after the drop, so the Python interpreter must be one the user can
run.  When the test's own interpreter is not (a pyenv Python under /root), the `user_python` fixture makes a
venv from the system's Python of the same version that imports this environment's packages (a .pth line);
the test skips, with the reason, only when no such interpreter exists or this checkout is not readable by the user.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile

import psutil
import pytest

from tests import helpers, proc_tools
from tests.test_live import (PORT_GROUP, bound, needs_root, port_counts, rx_packets, send_udp, sh, veth,  # noqa: F401
                             wait_delivered, write_plugins)

CAP_NET_RAW = 1 << 13
EX = os.path.join(helpers.REPO, "engine", "examples")
G_UDP = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"

UID_PROBE = f'''
-- counts, per UDP packet to port 9997, the uid the fast path runs its hooks as ("fp<uid>") and, through a
-- T.async task, the uid a worker runs onexecute as ("worker<uid>"); files @DONE@fp and @DONE@worker appear at the
-- 40th of each (the test stops the run after them: a stop signal cuts the hooks of a walk under way)
local seen, results = 0, 0
local function mark(name) local f = io.open("@DONE@" .. name, "w"); if f then f:close() end end
local function uid()
  local f = io.open("/proc/self/status"); local t = f:read("*a"); f:close()
  return t:match("Uid:%s*(%d+)")
end
TrisulPlugin = {{
  id = {{ name = "uid probe" }},
  request_async_workers = 1,
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      if layer:getbyte(2) * 256 + layer:getbyte(3) ~= 9997 then return end
      engine:update_counter("{PORT_GROUP}", "fp" .. uid(), 0, 1)
      seen = seen + 1
      if seen == 40 then mark("fp") end
      T.async:schedule {{ data = "x",
        onexecute = function(d)
          local f = io.open("/proc/self/status"); local t = f:read("*a"); f:close()
          return t:match("Uid:%s*(%d+)")
        end,
                          onresult = function(e, d, r)
                            e:update_counter("{PORT_GROUP}", "worker" .. r, 0, 1)
                            results = results + 1
                            if results == 40 then mark("worker") end
                          end }}
    end,
  }},
}}
'''


def _as_user(pw, *cmd) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, cwd="/")
    except OSError as e:                    # the interpreter cannot even be executed by the user
        return subprocess.CompletedProcess(cmd, 126, "", str(e))


USER = ["nobody"]


@pytest.fixture(scope="module")
def user():
    """The unprivileged user: nobody, or a system user created for the test (removed after)."""
    try:
        yield pwd.getpwnam("nobody")
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "lp-privdrop")
    USER[0] = "lp-privdrop"
    try:
        yield pwd.getpwnam("lp-privdrop")
    finally:
        sh("userdel", "lp-privdrop", check=False)


@pytest.fixture(scope="module")
def user_python(user):
    """A Python interpreter ``user`` can run that imports luaprobe and its dependencies (see the module doc)."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    probe = ("-c", "import luaprobe.engine.daemon.cli, lupa, psutil")
    if _as_user(user, sys.executable, *probe).returncode == 0:
        yield sys.executable
        return
    base = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin:/usr/local/bin")
    if base is None or _as_user(user, base, "-c", "pass").returncode != 0:
        pytest.skip(f"{sys.executable} cannot be run by {user.pw_name} and there is no system "
                    f"python{sys.version_info.major}.{sys.version_info.minor} it can run")
    d = tempfile.mkdtemp(prefix="lp-privdrop-py-")
    try:
        os.chmod(d, 0o755)
        subprocess.run([base, "-m", "venv", "--without-pip", d], check=True, capture_output=True)
        lib = glob.glob(os.path.join(d, "lib", "python3*", "site-packages"))[0]
        with open(os.path.join(lib, "luaprobe-test-env.pth"), "w") as f:
            f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()) + "\n")
        subprocess.run(["chmod", "-R", "a+rX", d], check=True)
        py = os.path.join(d, "bin", "python")
        r = _as_user(user, py, *probe)
        if r.returncode != 0:
            pytest.skip(f"luaprobe is not importable by {user.pw_name} (is this checkout readable by it?): "
                        f"{r.stderr.strip().splitlines()[-1:]}")
        yield py
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir():
    """A working directory the user can enter (pytest's tmp_path lives under a 0700 directory)."""
    d = tempfile.mkdtemp(prefix="lp-privdrop-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _creds(pid: int) -> tuple:
    """(real/effective/saved/fs uids, gids, supplementary groups, CapEff, CapPrm, CapAmb) from /proc."""
    s = _status(pid)
    return (tuple(map(int, s["Uid"].split())), tuple(map(int, s["Gid"].split())),
            tuple(map(int, s["Groups"].split())), int(s["CapEff"], 16), int(s["CapPrm"], 16), int(s["CapAmb"], 16))


def _tree(pid: int) -> list:
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def _kind(p) -> str:
    cmd = " ".join(p.cmdline())
    for mod, kind in (("capture.process", "capture"), ("workers.worker", "worker"), ("store.writer", "writer"),
                      ("fastpath.shards", "shard"), ("--child", "fastpath"), ("daemon.supervisor", "supervisor"),
                      ("daemon.cli", "cli")):
        if mod in cmd:
            return kind
    return cmd


def _left(procs) -> list:
    """The processes of ``procs`` still running (psutil compares the start time, so a reused pid is not one)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _segments(pids) -> list:
    return [p for p in glob.glob("/dev/shm/luaprobe-*") if p.split("-")[1].isdigit() and int(p.split("-")[1]) in pids]


def _assert_dropped(procs, user, caps=0):
    for p in procs:
        uids, gids, groups, eff, prm, amb = _creds(p.pid)
        assert uids == (user.pw_uid,) * 4 and gids == (user.pw_gid,) * 4, (_kind(p), uids, gids)
        assert set(groups) <= set(os.getgrouplist(user.pw_name, user.pw_gid)), (_kind(p), groups)
        assert (eff, prm, amb) == (caps, caps, caps), (_kind(p), hex(eff), hex(prm), hex(amb))


def _assert_private(paths, user, gid=None):
    for path in paths:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid if gid is None else gid), path
        assert st.st_mode & 0o077 == 0, (path, oct(st.st_mode))


def _live(py, workdir, ifname, *extra):
    return subprocess.Popen([py, "-m", "luaprobe.engine.daemon.cli", "run", os.path.join(workdir, "plugins"),
                             "--interface", ifname, "--out", os.path.join(workdir, "out"),
                             "--stats-json", os.path.join(workdir, "report", "stats.json"), *extra],
                            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_bound(proc, ifname, n=1):
    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"luaprobe exited early ({proc.returncode}): {proc.communicate()}")
        return bound(ifname)
    helpers.wait_for(ready, timeout=60, interval=0.05)


def _plugins(workdir):
    from pathlib import Path
    write_plugins(Path(workdir) / "plugins")
    os.mkdir(os.path.join(workdir, "report"))          # --stats-json is written after the drop: the user's
    pw = pwd.getpwnam(USER[0])
    os.chown(os.path.join(workdir, "report"), pw.pw_uid, pw.pw_gid)
    (Path(workdir) / "plugins" / "uid_probe.lua").write_text(UID_PROBE.replace("@DONE@", _done(workdir, "")))


def _done(workdir, name):
    """The file the uid probe makes at its 40th hook call ("fp") and its 40th task result ("worker")."""
    return os.path.join(workdir, "report", "done-" + name)


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"luaprobe did not stop: {proc.communicate()}")


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("shards", [1, 2])
def test_live_run_with_user_drops_every_process(workdir, veth, user, user_python, shards):
    """`run --interface IF --user nobody`: the CLI (fast path or coordinator), capture process(es), shard fast
    paths, store writer and workers all run as nobody (every uid and gid, no capability); segments, the
    output directory and the database are nobody's and owner-only; hooks and onexecute see uid nobody;
    the counts are the datagrams sent (the --bpf program, compiled before the drop, applied); nothing remains
    after the stop."""
    ifname, ns = veth
    _plugins(workdir)
    bpf = ["--bpf", "udp and not dst port 9998"] if shards == 1 else []   # compiled before the drop
    proc = _live(user_python, workdir, ifname, "--user", user.pw_name, "--shards", str(shards), *bpf)
    pids, started = set(), []
    try:
        _wait_bound(proc, ifname)
        before = rx_packets(ifname)
        send_udp(ns, {9999: 300, 9998: 100, 9997: 40})
        wait_delivered(ifname, before, 440)    # the kernel received them (CI once saw 0 packets in 30 s: this
        try:                                   # tells a veth that dropped them from a capture that did not read)
            helpers.wait_for(lambda: proc_tools.worker_running(_tree(proc.pid)), timeout=30, interval=0.1)
        except AssertionError:
            kinds = [_kind(p) for p in _tree(proc.pid)]
            raise AssertionError(f"no worker started: {kinds}: {_stop(proc)}") from None
        if shards == 1:             # every hook call and task result of the 40 datagrams made before the stop,
            helpers.wait_for(lambda: all(os.path.exists(_done(workdir, n)) for n in ("fp", "worker")),
                             timeout=30, interval=0.05)   # which cuts a walk under way (CI saw fp 16 of 40)
        procs = _tree(proc.pid)
        pids, started = {p.pid for p in procs}, procs
        kinds = sorted(_kind(p) for p in procs)
        assert kinds.count("capture") == shards and "writer" in kinds and "worker" in kinds, kinds
        if shards > 1:
            assert kinds.count("shard") == shards, kinds
        for p in procs:                     # each capture process got its socket (and the program) from root
            if _kind(p) == "capture":
                assert "--socket-fd" in p.cmdline() and ("--bpf-program" in p.cmdline()) == bool(bpf), p.cmdline()
        _assert_dropped(procs, user)
        segs = _segments(pids)
        assert segs, "no shared-memory segment found"
        _assert_private(segs + [os.path.join(workdir, "out")], user)
        so, se = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (so, se)
    assert "runs as root" not in se
    out = os.path.join(workdir, "out")
    _assert_private([out] + glob.glob(os.path.join(out, "luaprobe.sqlite*")), user)
    from pathlib import Path
    counts = port_counts(Path(out))
    if shards == 1:     # a sharded live run's exact counts are tests/test_shards.py's (issue 16)
        assert (counts.get("9999"), counts.get("9998"), counts.get("9997")) == (300, None, 40), (counts, se)
        assert counts.get(f"fp{user.pw_uid}") == 40 and counts.get(f"worker{user.pw_uid}") == 40, counts
    assert set(k for k in counts if k.startswith(("fp", "worker"))) <= {f"fp{user.pw_uid}", f"worker{user.pw_uid}"}
    s = json.loads(Path(workdir, "report", "stats.json").read_text())
    assert s["interface"] == ifname and s["input_errors"] == []
    assert not _segments(pids), _segments(pids)
    assert not _left(started)



@pytest.mark.root
@needs_root
def test_daemon_with_user_keeps_net_raw_in_the_supervisor_only_and_restarts_capture(workdir, veth, user,
                                                                                     user_python):
    """`luaprobe start` with [run] user: the supervisor runs as the user with CAP_NET_RAW alone (permitted,
    effective, ambient); the fast path and everything below it as the user with none; a fast path killed
    with SIGKILL is restarted and captures again (its socket opened with the inherited capability); the run
    directory and outputs are the user's; stop leaves no process and no segment."""
    from luaprobe.engine.daemon import control
    from pathlib import Path
    ifname, ns = veth
    _plugins(workdir)
    cfg, run = os.path.join(workdir, "probe.toml"), os.path.join(workdir, "run")
    Path(cfg).write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\nuser = "{user.pw_name}"\n'
                         f'[source]\ninterface = "{ifname}"\n[plugins]\npaths = ["plugins"]\n'
                         '[supervise]\nrestart_backoff_initial = 0.1\n')

    def cli(*args):
        return subprocess.run([user_python, "-m", "luaprobe.engine.daemon.cli", *args], cwd=workdir,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)

    def running(old_fp=None):
        st = control.request(run, "status")
        if not st.get("loaded") or st.get("fastpath_pid") in (None, old_fp):
            return None
        kids = [p for p in _tree(st["fastpath_pid"]) if _kind(p) == "capture"]
        return bound(ifname) and kids and st

    seen, sup, started = set(), None, []
    r = cli("start", "--config", cfg)
    try:
        assert r.returncode == 0, (r.stdout, r.stderr)
        st = helpers.wait_for(running, timeout=60, interval=0.1)
        sup = psutil.Process(st["supervisor_pid"])
        _assert_dropped([sup], user, caps=CAP_NET_RAW)
        procs = _tree(st["fastpath_pid"])
        seen |= {p.pid for p in procs} | {sup.pid}
        started += procs + [sup]
        _assert_dropped(procs, user)
        os.kill(st["fastpath_pid"], signal.SIGKILL)
        st = helpers.wait_for(lambda: running(st["fastpath_pid"]), timeout=60, interval=0.1)
        assert st["restarts"] == 1 and st["state"] == "running", st
        send_udp(ns, {9996: 150, 9997: 20})
        helpers.wait_for(lambda: any(_kind(p) == "worker" for p in _tree(st["fastpath_pid"])), timeout=30,
                         interval=0.1)
        procs = _tree(st["fastpath_pid"])
        seen |= {p.pid for p in procs}
        started += procs
        _assert_dropped(procs, user)
        _assert_dropped([sup], user, caps=CAP_NET_RAW)
        segs = _segments(seen)
        assert segs
        _assert_private(segs, user)
        r = cli("stop", "--run-dir", run)
        assert r.returncode == 0, (r.stdout, r.stderr)
        helpers.wait_for(lambda: not sup.is_running() or sup.status() == psutil.STATUS_ZOMBIE, timeout=60)
    finally:
        if sup is not None and sup.is_running():
            cli("stop", "--run-dir", run)
        for p in _left(started):
            try:
                p.kill()
            except psutil.Error:
                pass
    out = Path(workdir, "out")
    counts = port_counts(out)
    assert counts.get("9996") == 150 and counts.get("9997") == 20, counts
    assert counts.get(f"fp{user.pw_uid}") == 20 and counts.get(f"worker{user.pw_uid}") == 20, counts
    _assert_private([run, str(out)] + glob.glob(os.path.join(out, "luaprobe.sqlite*")), user)
    for name in os.listdir(run):
        st_ = os.lstat(os.path.join(run, name))
        assert st_.st_uid == user.pw_uid, name
    assert not _segments(seen), _segments(seen)
    assert not _left(started)


def test_unknown_user_or_group_is_one_usage_line(tmp_path):
    """An unknown user or group, or --group alone, stops `run` and `start` before anything starts (exit 2)."""
    plugin, pcap = os.path.join(EX, "tcp_ports.lua"), os.path.join(EX, "sample.pcap")
    base = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", pcap,
            "--out", str(tmp_path / "out")]
    for extra, line in ((["--user", "no-such-user-lp"], "luaprobe run: --user no-such-user-lp: no such user"),
                        (["--user", "root", "--group", "no-such-group-lp"],
                         "luaprobe run: --group no-such-group-lp: no such group"),
                        (["--group", "root"], "luaprobe run: --group root: needs --user (the user to run as)"),
                        (["--user", "0"], "luaprobe run: --user 0: is root (name an unprivileged user to drop to)")):
        r = subprocess.run(base + extra, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert (r.returncode, r.stderr, r.stdout) == (2, line + "\n", ""), extra
        assert not (tmp_path / "out").exists()
    # in a config file: the file's line of the key, the value as written (a TOML string), as every config error
    cfg = tmp_path / "probe.toml"
    tail = f'[source]\npcap = ["{pcap}"]\n[plugins]\npaths = ["{plugin}"]\n'
    for run, line in (('[run]\nuser = "no-such-user-lp"\n', '2: [run] user = "no-such-user-lp": no such user'),
                      ('[run]\n# the account\ngroup = "no-such-group-lp"\n',
                       '3: [run] group = "no-such-group-lp": needs [run] user (the user to run as)'),
                      ('[run]\nshards = 1\n\nuser = "root"\n',
                       '4: [run] user = "root": is root (name an unprivileged user to drop to)')):
        cfg.write_text(run + tail)
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config", str(cfg)],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path)
        assert (r.returncode, r.stderr) == (2, f"luaprobe start: {cfg}:{line}\n")
        assert not (tmp_path / "run").exists()


@pytest.mark.root
def test_plugin_the_user_cannot_read_is_refused_after_the_drop(workdir, user, user_python):
    """Plug-ins are loaded after the drop: one in a root-only directory is a usage error naming it (exit 2),
    before any process, segment or database exists."""
    private = os.path.join(workdir, "private")
    os.mkdir(private, 0o700)
    shutil.copy(os.path.join(EX, "tcp_ports.lua"), private)
    r = subprocess.run([user_python, "-m", "luaprobe.engine.daemon.cli", "run", os.path.join(private, "tcp_ports.lua"),
                        "--pcap", os.path.join(EX, "sample.pcap"), "--out",
                        os.path.join(workdir, "out"), "--user", user.pw_name], cwd=workdir,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    want = (f"luaprobe run: --user {user.pw_name}: plug-in path {private}/tcp_ports.lua is not readable by "
            f"{user.pw_name} (the run uses it after dropping root; docs/live.md \"Privileges\")\n")
    assert (r.returncode, r.stderr) == (2, want)
    assert not os.path.exists(os.path.join(workdir, "out", "luaprobe.sqlite"))


@pytest.mark.root
@needs_root
def test_live_as_root_without_user_warns_once(tmp_path, veth):
    """A live capture that stays root says so in one warning line; the run itself is unchanged."""
    from tests.test_live import run_live, stop, wait_bound
    ifname, ns = veth
    write_plugins(tmp_path / "plugins")
    proc, out, stats = run_live(tmp_path, ifname)
    try:
        wait_bound(proc, ifname)
        rc, so, se = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, se
    warn = [line for line in se.splitlines() if "runs as root" in line]
    assert len(warn) == 1 and "WARNING" in warn[0] and "--user NAME" in warn[0], se


@pytest.mark.root
def test_group_option_sets_the_only_group(workdir, user, user_python):
    """--group: the run's gid is that group and the supplementary list holds only it (no root group kept);
    read by a hook from /proc/self/status."""
    import grp
    group = grp.getgrnam("daemon") if "daemon" in [g.gr_name for g in grp.getgrall()] else grp.getgrgid(user.pw_gid)
    os.mkdir(os.path.join(workdir, "plugins"))
    with open(os.path.join(workdir, "plugins", "ids.lua"), "w") as f:
        f.write(f'''
local done = false
TrisulPlugin = {{
  id = {{ name = "ids" }},
  simplecounter = {{
    protocol_guid = "{{77E462AB-2E42-42ec-9A58-C1A6821D6B31}}",
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local f = io.open("/proc/self/status"); local t = f:read("*a"); f:close()
      engine:update_counter("{PORT_GROUP}", "uid " .. t:match("Uid:%s*([%d%s]-)\\n"), 0, 1)
      engine:update_counter("{PORT_GROUP}", "gid " .. t:match("Gid:%s*([%d%s]-)\\n"), 0, 1)
      engine:update_counter("{PORT_GROUP}", "groups " .. t:match("Groups:%s*([%d%s]-)\\n"), 0, 1)
    end,
  }},
}}
''')
    out = os.path.join(workdir, "out")
    r = subprocess.run([user_python, "-m", "luaprobe.engine.daemon.cli", "run", os.path.join(workdir, "plugins"),
                        "--pcap", os.path.join(EX, "sample.pcap"), "--out", out, "--user", user.pw_name,
                        "--group", group.gr_name, "-q"], cwd=workdir, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    from pathlib import Path
    keys = {" ".join(k.split()) for k in port_counts(Path(out))}
    u, g = user.pw_uid, group.gr_gid
    assert keys == {f"uid {u} {u} {u} {u}", f"gid {g} {g} {g} {g}", f"groups {g}"}, keys
    _assert_private([out, os.path.join(out, "luaprobe.sqlite")], user, gid=g)
