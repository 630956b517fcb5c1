"""Chaos: a worker SIGKILLed every 100 ms while tasks stream in (issue 13, "Done when").

Deterministic by construction, whatever the machine's load: the test feeds a fixed number of tasks per
100 ms tick and kills exactly one serving worker per tick (one that has finished a task since it started; when
none is, the tick waits until one is back), so the number of kills is exact and every kill lands on a worker
in the middle of its stream; it then waits (generously) for the queue to drain.  Only invariants are asserted:

* exact accounting: scheduled == ok + error, nothing dropped, timed out or left pending;
* every task reaches exactly one of onresult / onerror (no duplicates, none missing), and each error is a
  task that was running when its worker was killed (at most one per kill);
* no task's onexecute ran twice (each run appends its id to a log file the test reads back), and every
  task with a result ran exactly once;
* the pool counted exactly one death per kill; after close no process and no /dev/shm segment is left.
"""
from __future__ import annotations

import collections
import os
import signal
import struct
import time

import psutil
import pytest

from luaprobe.shm import segment
from tests import helpers
from tests.test_async import plugin, q

CHAOS = r'''
ok_seen, err_seen, dups, errs_by_msg = {}, {}, 0, {}
local LOG = %s
function submit(first, last)
  local accepted = 0
  for i = first, last do
    local r = T.async:schedule{ data = tostring(i),
      onexecute = function(d)
        local f = io.open(LOG, "a"); f:write(d, "\n"); f:close()
        local x = 0
        for k = 1, 2000 do x = x + k end          -- a little work, so kills land mid-task too
        return d
      end,
      onresult = function(e, d, r)
        if ok_seen[d] or err_seen[d] or r ~= d then dups = dups + 1 end
        ok_seen[d] = true
      end,
      onerror = function(e, d, m)
        if ok_seen[d] or err_seen[d] then dups = dups + 1 end
        err_seen[d] = true
        errs_by_msg[m] = (errs_by_msg[m] or 0) + 1
      end }
    if r then accepted = accepted + 1 end
  end
  return accepted
end
function count(t) local n = 0; for _ in pairs(t) do n = n + 1 end; return n end
function missing(n)
  local out = 0
  for i = 1, n do local d = tostring(i); if not ok_seen[d] and not err_seen[d] then out = out + 1 end end
  return out
end
'''


def _live(slot, killed=(), layout=None) -> bool:
    """The slot's worker is serving (it finished a task since it started: a kill lands mid-stream, not in its
    start-up) and was not already sent its SIGKILL (an exit under load can lag the signal); checked without
    reaping it: the pool reaps its own workers."""
    if slot.proc is None or slot.proc.pid in killed:
        return False
    if layout is not None and struct.unpack_from("<d", slot.channel.buf, layout.tasks_done)[0] < 1:
        return False
    try:
        return os.waitid(os.P_PID, slot.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _chaos(runtime_factory, tmp_path, tasks: int, ticks: int, workers: int = 3):
    log = tmp_path / "executed.log"
    rt = runtime_factory(workers=workers, backoff_initial=0.01, backoff_max=0.2, overflow_limit=tasks,
                         task_timeout=600, drain_deadline=0)
    vm = rt.load(plugin(tmp_path, CHAOS % q(log)))
    per_tick = -(-tasks // ticks)
    pids_seen, pids_killed, kills, submitted, k = set(vm.pool.pids()), set(), 0, 0, 0
    next_tick = time.monotonic()
    for tick in range(ticks):
        first, last = submitted + 1, min(tasks, submitted + per_tick)
        if first <= last:
            assert vm.exec(f"return submit({first}, {last})") == last - first + 1
            submitted = last
        while time.monotonic() < next_tick:                      # the fast path's loop between ticks
            if not rt.service():
                rt.wait(min(0.01, max(0.0, next_tick - time.monotonic())))
        next_tick += 0.1
        def serving():
            return [s for s in vm.pool.slots if _live(s, pids_killed, vm.pool.layout)]
        if not serving():                                          # all restarting: kill the first one back
            helpers.wait_for(lambda: rt.service() is not None and serving(), 60, 0.002)
            next_tick = time.monotonic() + 0.1
        live = serving()
        victim = live[k % len(live)]
        k += 1
        pids_seen.add(victim.proc.pid)
        pids_killed.add(victim.proc.pid)
        os.kill(victim.proc.pid, signal.SIGKILL)
        kills += 1
        pids_seen.update(vm.pool.pids())
    assert submitted == tasks and kills == ticks
    deadline = time.monotonic() + max(300, tasks / 500)
    while (vm.pending() or vm.pool.deaths < kills) and time.monotonic() < deadline:
        if not rt.service():
            rt.wait(0.01)
        pids_seen.update(vm.pool.pids())
    st = vm.async_stats()
    helpers.assert_accounting(st)
    assert st["pending"] == 0, st
    assert (st["scheduled"], st["dropped"], st["timeout"], st["nil_result"]) == (tasks, 0, 0, 0), st
    assert st["ok"] + st["error"] == tasks
    assert vm.exec("return dups") == 0
    assert vm.exec("return missing(%d)" % tasks) == 0
    assert vm.exec("return count(ok_seen)") == st["ok"] and vm.exec("return count(err_seen)") == st["error"]
    msgs = {bytes(m).decode(): n for m, n in vm.exec("return errs_by_msg").items()}
    assert set(msgs) <= {"worker died (killed by SIGKILL)"}, msgs
    assert st["error"] <= kills
    assert vm.pool.deaths == kills
    runs = collections.Counter(log.read_text().split())
    assert max(runs.values()) == 1                              # no onexecute ran twice
    ok_ids = vm.exec("local t = {}; for d in pairs(ok_seen) do t[#t + 1] = d end; return table.concat(t, ' ')")
    assert all(runs[d] == 1 for d in bytes(ok_ids).decode().split())   # every result: exactly one run
    pids_seen.update(vm.pool.pids())
    rt.close()
    assert not [p for p in pids_seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) == os.getpid()]
    return st, kills


def test_chaos_small(runtime_factory, tmp_path):
    """~20k tasks, one worker killed every 100 ms (30 kills)."""
    st, kills = _chaos(runtime_factory, tmp_path, tasks=20_000, ticks=30)
    assert kills == 30 and st["ok"] >= 20_000 - 30


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_chaos_soak(runtime_factory, tmp_path):
    """1M tasks, 600 kills at 10/s (docs/benchmarks.md, "Chaos soak")."""
    t0 = time.monotonic()
    st, kills = _chaos(runtime_factory, tmp_path, tasks=1_000_000, ticks=600)
    print(f"chaos soak: {st['scheduled']} tasks, {kills} kills, ok {st['ok']}, error {st['error']}, "
          f"redispatched {st['redispatched']}, {time.monotonic() - t0:.1f} s")
