"""T.async on Ray actors (workers/raybridge.py, docs/async.md "Workers on Ray") on a real two-node Ray cluster.

The fixture starts `ray start --head` and a second `ray start --address` node on this machine (loopback,
1 CPU and 75 MiB of object store each) and always runs `ray stop --force` at teardown.  Marked `ray`:
excluded from the default run (pyproject addopts) because starting the two nodes takes 30-50 s on the
2-core CI machine and ray is an optional extra (pip install -e '.[ray]'); run with `-m ray`.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

import psutil
import pytest

from luaprobe.engine.fastpath.run import RunConfig, FastPath
from luaprobe.workers.pool import AsyncConfig

from .helpers import PCAPS, wait_for

ray = pytest.importorskip("ray")
# one test process for the whole file (pytest-xdist's --dist loadgroup, pyproject addopts): the module's cluster is
# started once, and the first test runs before it exists
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
G_ETH = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}"
NODES = "{AAAAAAAA-0000-4000-8000-0000000000C1}"     # key = node id (first 8 hex digits) or "err"
TASKS = "{AAAAAAAA-0000-4000-8000-0000000000C2}"     # key = task data: every task delivered exactly once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylets() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name", "cmdline"])
            if "raylet" in (p.info["name"] or "") or any("raylet" in c for c in (p.info["cmdline"] or [])[:1])}


def _ray(*args, timeout=240):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, raylet pid of the second node)."""
    port = _free_port()
    tmp = str(tmp_path_factory.mktemp("ray"))
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=78643200",
              "--disable-usage-stats", f"--temp-dir={tmp}"]
    try:
        r = _ray("start", "--head", f"--port={port}", "--include-dashboard=false", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        before = _raylets()
        r = _ray("start", f"--address=127.0.0.1:{port}", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        second = _raylets() - before
        assert len(second) == 1, second
        yield f"127.0.0.1:{port}", second.pop()
    finally:
        _ray("stop", "--force")


def plugin(tmp_path, ntasks: int, sleep_ms: int, slow: int = 0, slow_ms: int = 0, remote: bool = True,
           error_text: str = "worker died") -> str:
    """A simplecounter scheduling one task for each of the first `ntasks` packets; onexecute sleeps
    `sleep_ms` (I/O-bound; the first `slow` tasks `slow_ms`), touches started/<data> and returns where it
    ran; onresult / onerror count per node and per task (onerror: key "err"; any other message than
    `error_text` fails the hook).  ``remote=False`` sets TrisulPlugin.async_remote = false."""
    (tmp_path / "started").mkdir()
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "remote.lua").write_text(f'''
local n = 0
TrisulPlugin = {{
  id = {{ name = "remote" }},
  request_async_workers = 4,
  async_remote = {"true" if remote else "false"},
  simplecounter = {{
    protocol_guid = "{G_ETH}",
    onpacket = function(engine, layer)
      if n >= {ntasks} then return end
      n = n + 1
      T.async:schedule{{ data = "t" .. n,
        onexecute = function(d)
          local ffi = require("ffi")
          pcall(ffi.cdef, "int usleep(unsigned int usec);")
          local f = io.open("{tmp_path}/started/" .. d, "w"); if f then f:close() end
          local ms = tonumber(d:sub(2)) <= {slow} and {slow_ms} or {sleep_ms}
          while ms > 0 do local step = math.min(ms, 500); ffi.C.usleep(step * 1000); ms = ms - step end
          return (os.getenv("LUAPROBE_RAY_NODE") or "local"):sub(1, 8)
        end,
        onresult = function(e, d, r)
          e:update_counter("{NODES}", r, 0, 1); e:update_counter("{TASKS}", d, 0, 1)
        end,
        onerror = function(e, d, m)
          e:update_counter("{NODES}", "err", 0, 1); e:update_counter("{TASKS}", d, 0, 1)
          if not m:find("{error_text}", 1, true) then error("unexpected onerror: " .. m) end
        end }}
    end,
  }},
}}
''')
    return str(d)


def counts(out, group) -> dict:
    with sqlite3.connect(os.path.join(out, "luaprobe.sqlite")) as c:
        return dict(c.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key",
                              (group.upper(),)))


def run(tmp_path, address, ntasks, sleep_ms, stats_file=None, name="out", task_timeout=60, **kw) -> tuple[dict, str]:
    out = str(tmp_path / name)
    acfg = AsyncConfig(backend="ray", ray_address=address, ray_actor_cpus=0.25, drain_deadline=120,
                       task_timeout=task_timeout)
    cfg = RunConfig(plugins=[plugin(tmp_path, ntasks, sleep_ms, **kw)], out_dir=out, async_config=acfg,
                    files=[os.path.join(PCAPS, "trisul-16minutes.pcap")], stats_file=stats_file, stats_interval=0.1)
    return FastPath(cfg), out


def _identity(a) -> bool:
    return a["scheduled"] == a["ok"] + a["nil_result"] + a["error"] + a["timeout"] + a["dropped"] + a["pending"]


def _descendants() -> set:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.timeout(600)
def test_no_address_starts_a_local_ray_for_the_run(tmp_path):
    """backend "ray" without an address (first in this file: no cluster of the fixture exists yet): the fast
    path starts a local Ray for the run, the tasks run in its actors (a Ray node id, not "local"), and
    ray.shutdown() at the end leaves no Ray process of ours behind."""
    before = _descendants()
    fp, out = run(tmp_path, None, 40, 5)
    seen = set()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", fp.run()))
    t.start()
    def raylets():
        for pid in _descendants() - before:
            try:
                if "raylet" in " ".join(psutil.Process(pid).cmdline()[:1]):
                    seen.add(pid)
            except psutil.Error:
                pass
        return not t.is_alive() or bool(seen)
    try:
        wait_for(raylets, timeout=300, interval=0.1)
    finally:
        t.join(300)
    assert not t.is_alive()
    a = next(p for p in box["s"]["plugins"] if p["plugin"].endswith("remote.lua"))["async"]
    assert a["scheduled"] == a["ok"] == 40 and _identity(a), a
    nodes = counts(out, NODES)
    assert sum(nodes.values()) == 40 and "local" not in nodes and "err" not in nodes, nodes
    assert seen, "no raylet was started by the run"
    assert wait_for(lambda: not (seen & {p.pid for p in psutil.process_iter()}), timeout=60, interval=0.2)
    assert not ray.is_initialized()


@pytest.mark.timeout(600)
def test_task_timeout_reports_through_onerror_once(tmp_path, cluster):
    """Two tasks run 6 s with a 2 s task timeout: each comes back through onerror exactly once ("timed out"),
    counted as timeout; the other tasks succeed (on new actors where a bridge was killed); the accounting
    identity holds and every task is delivered exactly once."""
    address, _ = cluster
    fp, out = run(tmp_path, address, 30, 10, task_timeout=2, slow=2, slow_ms=6000, error_text="timed out")
    s = fp.run()
    a = next(p for p in s["plugins"] if p["plugin"].endswith("remote.lua"))["async"]
    assert a["scheduled"] == 30 and a["timeout"] == 2 and a["ok"] == 28, a
    assert a["error"] == a["dropped"] == a["pending"] == 0 and _identity(a), a
    assert counts(out, TASKS) == {f"t{i}": 1 for i in range(1, 31)}
    nodes = counts(out, NODES)
    assert nodes.get("err") == 2 and "local" not in nodes, nodes
    hook_errors = next(p for p in s["plugins"] if p["plugin"].endswith("remote.lua"))["hook_errors"]
    assert not any(hook_errors.values()), hook_errors        # onerror saw "timed out" every time


@pytest.mark.timeout(600)
def test_async_remote_false_keeps_tasks_on_local_workers(tmp_path, cluster):
    """TrisulPlugin.async_remote = false with backend "ray": the tasks run on local worker processes
    (LUAPROBE_RAY_NODE unset there), no Ray actor is created for the plug-in."""
    address, _ = cluster
    fp, out = run(tmp_path, address, 40, 5, remote=False)
    s = fp.run()
    a = next(p for p in s["plugins"] if p["plugin"].endswith("remote.lua"))["async"]
    assert a["scheduled"] == a["ok"] == 40 and _identity(a), a
    assert counts(out, NODES) == {"local": 40}


@pytest.mark.timeout(600)
def test_tasks_run_on_both_nodes_and_are_accounted(tmp_path, cluster):
    address, _ = cluster
    fp, out = run(tmp_path, address, 200, 5)
    s = fp.run()
    a = next(p for p in s["plugins"] if p["plugin"].endswith("remote.lua"))["async"]
    assert a["scheduled"] == a["ok"] == 200 and a["error"] == a["timeout"] == a["dropped"] == a["pending"] == 0
    nodes = counts(out, NODES)
    assert len(nodes) == 2 and sum(nodes.values()) == 200 and "err" not in nodes, nodes
    assert counts(out, TASKS) == {f"t{i}": 1 for i in range(1, 201)}


@pytest.mark.timeout(600)
def test_killed_node_fails_its_running_tasks_once(tmp_path, cluster):
    """SIGKILL of the second node's raylet mid-run: the tasks its actors were running come back through
    onerror ("worker died (ray actor lost ...)"), every other task runs on the head node; each task is
    delivered exactly once and the accounting identity holds."""
    address, raylet = cluster
    fp, out = run(tmp_path, address, 400, 20)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", fp.run()))
    t.start()
    try:
        wait_for(lambda: len(os.listdir(tmp_path / "started")) >= 40, timeout=240, interval=0.05)
        victims = [psutil.Process(raylet), *psutil.Process(raylet).children(recursive=True)]
        for p in victims:
            p.send_signal(signal.SIGKILL)
    finally:
        t.join(300)
    assert not t.is_alive()
    a = next(p for p in box["s"]["plugins"] if p["plugin"].endswith("remote.lua"))["async"]
    assert a["scheduled"] == 400 and a["pending"] == a["dropped"] == a["timeout"] == 0
    assert a["ok"] + a["error"] == 400 and 1 <= a["error"] <= 4, a       # at most one running task per actor
    assert counts(out, TASKS) == {f"t{i}": 1 for i in range(1, 401)}     # never lost, never twice
    nodes = counts(out, NODES)
    assert nodes.get("err") == a["error"] and sum(nodes.values()) == 400
