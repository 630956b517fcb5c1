"""Shared-memory hygiene across users, containers and crashes (issue 13.9).

Truth: the file system (/dev/shm entries, their owners) and the process table; another user is a real
unprivileged uid (nobody) running the sweep in its own process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import psutil
import pytest

from luaprobe.shm import segment
from tests import helpers

NOBODY = 65534


def _dead_pid() -> int:
    child = helpers.run_python("import os, sys; sys.stdout.write(str(os.getpid()))", stdout=subprocess.PIPE)
    return int(child.communicate()[0])


def _make(name: str, uid: int | None = None) -> str:
    path = os.path.join(segment.SHM_DIR, name)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600))
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def _sweep_as(uid: int) -> list:
    """segment.sweep() with this process's effective uid set to ``uid`` (the real uid stays root, so the test
    gets its privileges back; the unprivileged python of another user could not even run the venv's python)."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        return segment.sweep()
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def own_shm_dir(monkeypatch):
    """segment.SHM_DIR pointed at a directory of the test's own inside /dev/shm, with its permissions (tmpfs, 1777:
    anyone may create, only the owner may remove).  Every luaprobe process of this user on the machine sweeps the
    segments of dead owners in /dev/shm when it starts, so one starting during a test removed the test's stale
    segment before the test's own sweep (`removed` came back empty: seen with other test suites running)."""
    d = tempfile.mkdtemp(prefix="lp-test-shm-", dir=segment.SHM_DIR)     # not a segment name: nobody sweeps it
    os.chmod(d, 0o1777)
    monkeypatch.setattr(segment, "SHM_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_other_users_segments_are_skipped_not_fatal(tmp_path, own_shm_dir):
    dead = _dead_pid()
    mine = _make(f"luaprobe-{dead}-stale.0.ns{segment.identity_tag()}")             # root's, stale
    theirs = _make(f"luaprobe-{dead}-stale.1.ns{segment.identity_tag()}", NOBODY)   # nobody's, stale
    try:
        removed = _sweep_as(NOBODY)            # nobody may not remove root's segment: skipped, no error
        assert removed == [os.path.basename(theirs)]
        assert os.path.exists(mine) and not os.path.exists(theirs)
        assert segment.sweep() == [os.path.basename(mine)]   # root removes its own only
    finally:
        for p in (mine, theirs):
            if os.path.exists(p):
                os.unlink(p)


def test_zombie_owner_is_dead_and_foreign_namespace_is_skipped(own_shm_dir):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    helpers.wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
    dead = _dead_pid()
    of_zombie = _make(f"luaprobe-{zombie.pid}-ring.0.ns{segment.identity_tag()}")
    foreign = _make(f"luaprobe-{dead}-ring.1.ns00000000"
                    if segment.identity_tag() != "00000000" else f"luaprobe-{dead}-ring.1.ns11111111")
    try:
        removed = segment.sweep()
        assert os.path.basename(of_zombie) in removed and not os.path.exists(of_zombie)
        assert os.path.exists(foreign)         # another container's pid: not ours to judge
    finally:
        zombie.wait()
        for p in (of_zombie, foreign):
            if os.path.exists(p):
                os.unlink(p)


@contextlib.contextmanager
def private_shm(monkeypatch):
    """As root: a mount namespace with a tmpfs of its own on /dev/shm, held open by a sleeping process; yields the
    command prefix that runs a program in it (nsenter: same pid, no fork), with segment.SHM_DIR pointed at that
    /dev/shm as this process sees it (/proc/HOLDER/root/dev/shm).  No other luaprobe process on the machine (each
    sweeps the segments of dead owners when it starts) can see what is made there.  Otherwise: no prefix, the
    shared /dev/shm.  The namespace and everything in it go with the holder."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        yield []
        return
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs -o mode=1777 tmpfs /dev/shm && echo ready && exec sleep 3600"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        monkeypatch.setattr(segment, "SHM_DIR", f"/proc/{holder.pid}/root/dev/shm")
        yield ["nsenter", "-t", str(holder.pid), "-m", "--"]
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_of_the_whole_tree_then_the_next_start_cleans_up(tmp_path, monkeypatch):
    """SIGKILL of every process of a run leaves its segments; the next `luaprobe run` removes them.  In a private
    /dev/shm (private_shm): in the shared one any luaprobe run of this user starting between the kill and the
    check removes the leftovers first, and the check that they were left failed (a full run at load ~10)."""
    with private_shm(monkeypatch) as prefix:
        _kill_9_then_next_start(tmp_path, prefix)


def _kill_9_then_next_start(tmp_path, prefix):
    plug = helpers.write_plugin(tmp_path, r"""
local marker, n = "%s", 0
TrisulPlugin = { id = { name = "k9" }, request_async_workers = 3,
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(e, l)
      n = n + 1
      T.async:schedule { data = "x", onexecute = function(d) return d end }
      if n == 3000 then local f = io.open(marker, "w"); f:close() end
    end } }
""" % (tmp_path / "running"))
    p = subprocess.Popen([*prefix, sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plug, "--generate",
                          "packets=50000000,flows=100,seed=1", "--out", str(tmp_path / "o"), "-q"],
                         cwd=helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers.wait_for(lambda: (tmp_path / "running").exists(), timeout=60)
    tree = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert len(tree) >= 6                                   # fast path, capture, store, 3 workers
    left = [n for n in segment.list_segments() if segment.owner_pid(n) in tree]
    assert left
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    helpers.wait_for(lambda: all(not psutil.pid_exists(q) or psutil.Process(q).status() == psutil.STATUS_ZOMBIE
                                 for q in tree), timeout=10)
    assert all(os.path.exists(os.path.join(segment.SHM_DIR, n)) for n in left)   # the leftovers
    examples = os.path.join(helpers.REPO, "engine", "examples")      # absolute: nsenter starts in the target's /
    r = subprocess.run([*prefix, sys.executable, "-m", "luaprobe.engine.daemon.cli", "run",
                        os.path.join(examples, "tcp_ports.lua"), "--pcap", os.path.join(examples, "sample.pcap"),
                        "--out", str(tmp_path / "o2"), "-q"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in tree]


def test_kill_9_of_the_sharded_coordinator_then_shm_clean_removes_its_directory(tmp_path, monkeypatch):
    """`--shards N`: the coordinator's directory of shard specs and summaries is a segment name under /dev/shm
    (it was /tmp/luaprobe-shards-*, left behind by a kill -9).  After a real SIGKILL of the coordinator alone
    (its shards finish on their own: PR_SET_PDEATHSIG), `luaprobe shm clean` removes it with the rings, and
    leaves another user's directory of the same form alone.  In a private /dev/shm (private_shm): in the shared
    one the other user's directory was removed by a sweep made as that user elsewhere (another suite's
    test_other_users_segments_are_skipped_not_fatal; this session's full run at load ~10)."""
    with private_shm(monkeypatch) as prefix:
        _kill_9_sharded_then_clean(tmp_path, prefix)


def _kill_9_sharded_then_clean(tmp_path, prefix):
    plug = helpers.write_plugin(tmp_path, r"""
local marker, n = "%s", 0
TrisulPlugin = { id = { name = "k9s" },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(e, l)
      n = n + 1
      if n == 3000 then local f = io.open(marker .. T.contextid, "w"); f:close() end
    end } }
""" % (tmp_path / "running"))
    foreign = os.path.join(segment.SHM_DIR, f"luaprobe-{_dead_pid()}-shards.0.ns{segment.identity_tag()}")
    os.mkdir(foreign, 0o700)
    os.chown(foreign, NOBODY, NOBODY)
    p = subprocess.Popen([*prefix, sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plug, "--generate",
                          "packets=50000000,flows=100,seed=1", "--shards", "2", "--out", str(tmp_path / "o"), "-q"],
                         cwd=helpers.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = []
    try:
        helpers.wait_for(lambda: (tmp_path / "running0").exists() and (tmp_path / "running1").exists(), timeout=90)
        tree = psutil.Process(p.pid).children(recursive=True)
        mine = [n for n in segment.list_segments(p.pid) if "-shards." in n]
        assert len(mine) == 1, segment.list_segments(p.pid)
        private = os.path.join(segment.SHM_DIR, mine[0])
        assert os.path.isdir(private) and os.stat(private).st_mode & 0o777 == 0o700
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        _, alive = psutil.wait_procs(tree, timeout=60)      # the shards finish on their own, the capture dies
        assert alive == [], alive
        # the leftover (in the shared /dev/shm any luaprobe of this user started meanwhile may sweep it first)
        r = subprocess.run([*prefix, sys.executable, "-m", "luaprobe.engine.daemon.cli", "shm", "clean"],
                           cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(private) and segment.list_segments(p.pid) == [], r.stdout
        assert os.path.isdir(foreign)                       # another user's: not ours to judge
    finally:
        helpers.kill_tree(tree)
        if p.poll() is None:
            p.kill()
            p.wait()
        os.rmdir(foreign)
