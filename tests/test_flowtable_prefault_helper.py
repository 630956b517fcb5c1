"""The flow table's prefault helper (FT:start_prefaulter, shm/_lpsync.c lp_prefault_start, `--prefault-ahead`).

A C thread maps the pages of the never-used flow records ahead of the high-water mark so that the fast path's
thread does not (docs/benchmarks.md "Fresh pages off the packet loop's thread").  Independent truths: the kernel's
residency map of the record arrays (mincore(2), as tests/test_flowtable_prefault.py), the thread list of this
process (/proc/self/task) and, for the records' contents, a second table fed the same packets without a helper.
Waiting for the helper is a bounded wait for its own `done` word to reach the goal the fast path set (a condition,
not a sleep).  Before: no helper; start_prefaulter did not exist and the fast path mapped every chunk itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.shm.luajit import new_runtime
from tests import helpers
from tests.test_flowtable_prefault import LUA, PREFAULT, resident

AHEAD = 8192


PF = r"""
-- the helper's words as numbers: done, goal, errno
function H.pf(ft) return tonumber(ft.pf.done), tonumber(ft.pf.goal), tonumber(ft.pf.err) end
-- the helper's eventfd (its number in this process; -1 in a forked child's copy)
function H.efd(ft) return tonumber(ft.pf.efd) end
return H"""


@pytest.fixture(scope="module")
def H():
    return new_runtime(encoding=None).execute(LUA.replace("return H", PF))


def threads() -> int:
    """This process's prefault helper threads: the tasks named lp-prefault (lp_prefault_start names its thread, so
    a thread another library starts meanwhile, as numpy's OpenBLAS pool or a test's leftover, is not counted)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "lp-prefault"
        except FileNotFoundError:                 # a thread that ended while we read the list
            pass
    return n


def wait_helper(H, ft, timeout=20.0) -> None:
    """Until the helper has mapped every record the fast path asked for (its done word reaches the goal)."""
    end = time.monotonic() + timeout
    while H.pf(ft)[0] < H.pf(ft)[1]:
        assert time.monotonic() < end and H.pf(ft)[2] == 0, H.pf(ft)
        time.sleep(0.001)


def test_helper_maps_records_ahead_so_the_fast_path_does_not(H):
    t0 = threads()
    ft = H.new()
    assert ft.start_prefaulter(ft, AHEAD) is True
    assert threads() == t0 + 1
    H.batch(ft, 0, 1)
    # the first chunk: the helper had mapped nothing yet, the fast path mapped it itself (it never waits); the goal
    # is as many records ahead as are in use, at least 1 024
    assert ft.self_faulted == PREFAULT and H.pf(ft)[1] == 1 + PREFAULT
    wait_helper(H, ft)
    # flows up to what the helper has mapped, then wait for it, again and again: every page they need is the
    # helper's, the fast path maps nothing itself (without a helper: a chunk per 1 024 records), and the span
    # ahead grows with the records in use up to AHEAD
    goals = []
    while ft.hw < 30000:
        done = H.pf(ft)[0]
        H.batch(ft, ft.hw, min(done, 30000))
        assert ft.self_faulted == PREFAULT, (ft.hw, ft.self_faulted)
        wait_helper(H, ft)
        goals.append(H.pf(ft)[1] - ft.hw)
    assert ft.live == 30000 and H.pf(ft)[2] == 0
    assert AHEAD // 2 < max(goals) <= AHEAD and goals[0] < PREFAULT, goals
    goal = H.pf(ft)[1]
    # the pages of every record up to the goal are resident in all three arrays; nothing well beyond it
    assert all(r == n for r, n in resident(H, ft, 0, goal - 64)), resident(H, ft, 0, goal - 64)
    assert all(r == 0 for r, _ in resident(H, ft, goal + 2 * PREFAULT, goal + 4 * AHEAD))
    st = ft.stop_prefaulter(ft)
    assert st[b"err"] == 0 and st[b"pages"] >= (goal - PREFAULT) * (128 + 64 + 8) // 4096 and st[b"calls"] >= 6
    assert ft.pf is None and threads() == t0          # joined: no thread left behind
    assert ft.faulted >= goal                         # prefault() goes on from what the helper mapped
    H.batch(ft, 30000, 30100)
    assert ft.self_faulted == PREFAULT                # a helper stopped: nothing to map yet
    assert ft.stop_prefaulter(ft) is None


def test_helper_leaves_every_record_as_without_it(H):
    """Two tables, the same 20 000 flows (two packets each), one with a helper that maps pages
    under records the fast path has written: every record's key, counters and id are the same."""
    lua = new_runtime(encoding=None)
    cmp = lua.execute(LUA.replace("return H", PF.replace("return H", "") + r"""
function H.same(a, b)
  assert(a.hw == b.hw and a.live == b.live and a.created == b.created)
  for i = 0, a.hw - 1 do
    local x, y = a.flows[i], b.flows[i]
    for k = 0, 9 do assert(x.key[k] == y.key[k], i) end
    assert(x.id == y.id and x.packets_az == y.packets_az and x.packets_za == y.packets_za and x.bytes_az == y.bytes_az
           and x.last_ts == y.last_ts and x.live == y.live and a.cold[i].first_ts == b.cold[i].first_ts, i)
  end
  return a.hw
end
return H"""))
    plain, helped = cmp.new(), cmp.new()
    assert helped.start_prefaulter(helped, 2048) is True
    for lo in range(0, 20000, 2500):
        for ft in (plain, helped):
            cmp.batch(ft, lo, lo + 2500)
            cmp.batch(ft, lo, lo + 2500)          # a second packet of each flow
    wait_helper(cmp, helped)          # it ran (on a loaded machine the thread may not be scheduled before a stop)
    assert cmp.same(plain, helped) == 20000
    assert helped.stop_prefaulter(helped)[b"pages"] > 0


def test_small_table_has_no_helper(H):
    lua = new_runtime(encoding=None)
    ft = lua.execute('return require("luaprobe.engine.fastpath.flowtable").new{capacity = 1024}')
    ok, why = ft.start_prefaulter(ft, AHEAD)
    assert ok is False and b"2 MiB" in why and ft.pf is None


@pytest.mark.parametrize("ahead", [16384, 0])
def test_run_summary_states_the_helpers_work(tmp_path, ahead):
    """A real fast-path run: with the default --prefault-ahead the summary's flow_prefault gives the helper's pages
    and CPU, with 0 there is no helper; the flows are the same; the thread is gone after the run (threads() counts
    the helper's by name: the run imports numpy, whose OpenBLAS pool thread stays for the process)."""
    t0 = threads()
    s = FastPath(RunConfig(plugins=[os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")],
                           files=[os.path.join(helpers.PCAPS, "tcp-echo-many-flows.pcap")],
                           out_dir=str(tmp_path / "out"), prefault_ahead=ahead)).run()
    assert s["flows"] == 500 and not s["input_errors"]
    fp = s["flow_prefault"]
    if ahead:
        # 500 flows: the fast path mapped the first chunk itself, the helper (woken once or twice for records, as
        # the batches fall) at most the pages of records [1 024, 2 048): the goal is 1 024 records (at least) beyond
        # what the batch may create, its packets that missed the index, at most 1 024; and (woken at the start and
        # at the index's one doubling, to 2 048 slots) the index's next doubling, slots up to 4 096 (32 KiB).  The
        # helper may not even have been scheduled before the run ended on a loaded machine: pages >= 0
        assert fp["helper"] is True and fp["errno"] == 0 and 1 <= fp["wakeups"] <= 4, fp
        assert fp["records_mapped_by_fast_path"] == PREFAULT
        assert fp["pages"] <= (PREFAULT * (128 + 64 + 8)) // 4096 + 6 + 9 and fp["calls"] <= 3 * fp["wakeups"], fp
    else:
        assert fp is None
    assert threads() == t0


def test_a_forked_child_does_not_wait_for_the_parents_helper(H):
    """A child forked while the helper runs has no such thread: its stop (the table's collection at its exit) frees
    its copy and returns; pthread_join on the parent's thread id would wait forever there.  The parent's helper goes
    on.  Before: the child hung in lp_prefault_stop."""
    ft = H.new()
    assert ft.start_prefaulter(ft, AHEAD) is True
    H.batch(ft, 0, 100)
    wait_helper(H, ft)
    pid = os.fork()
    if pid == 0:                                   # the child: stop, then leave at once (no pytest teardown here)
        try:
            ft.stop_prefaulter(ft)
            os._exit(0)
        finally:
            os._exit(1)
    end = time.monotonic() + 20
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung stopping the prefault helper")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    H.batch(ft, 100, 3000)                         # the parent's helper still answers
    wait_helper(H, ft)
    assert H.pf(ft)[2] == 0 and ft.stop_prefaulter(ft)[b"pages"] > 0


def test_a_forked_child_closes_its_copy_of_the_helpers_eventfd_and_wakes_nothing(H):
    """The helper's eventfd is close-on-exec; a child forked without exec got a copy all the same, open for its
    whole life, and its fast path's wakes went into it (the parent's helper).  Now the fork handler closes the copy
    in the child at once (/proc/self/fd of the child: that fd number is not open there; its copy of the struct reads
    efd -1, err ECHILD), the child's fast path wakes nothing and maps its records itself, and the parent's helper and
    eventfd go on.  Before: the child held the parent's eventfd (anon_inode:[eventfd]) and woke it 18 times here."""
    import json
    ft = H.new()
    assert ft.start_prefaulter(ft, AHEAD) is True
    H.batch(ft, 0, 100)
    wait_helper(H, ft)
    efd = H.efd(ft)
    assert os.readlink(f"/proc/self/fd/{efd}") == "anon_inode:[eventfd]"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: look, work, report on the pipe, leave at once
        try:
            os.close(r)
            try:
                link = os.readlink(f"/proc/self/fd/{efd}")
            except OSError:
                link = None
            kicks = ft.kicks
            H.batch(ft, 100, 20000)
            seen = {"link": link, "efd": H.efd(ft), "err": H.pf(ft)[2], "kicks": ft.kicks - kicks,
                    "self_faulted": ft.self_faulted, "live": ft.live}
            st = ft.stop_prefaulter(ft)
            seen["stop_err"] = st[b"err"]
            os.write(w, json.dumps(seen).encode())
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        seen = json.loads(f.read() or "{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert seen["link"] is None, seen                           # the child's copy was closed at the fork
    assert (seen["efd"], seen["err"], seen["stop_err"], seen["kicks"]) == (-1, 10, 10, 0), seen   # ECHILD
    assert seen["live"] == 20000 and seen["self_faulted"] >= 19000, seen   # it mapped its records itself
    assert os.readlink(f"/proc/self/fd/{efd}") == "anon_inode:[eventfd]" and H.efd(ft) == efd
    H.batch(ft, 100, 3000)                         # the parent's helper still answers
    wait_helper(H, ft)
    assert H.pf(ft)[2] == 0 and ft.stop_prefaulter(ft)[b"pages"] > 0


REFUSED = r"""
import time
from luaprobe.shm.luajit import new_runtime
from tests.test_flowtable_prefault import LUA
from tests.test_flowtable_prefault_helper import PF, threads
H = new_runtime(encoding=None).execute(LUA.replace("return H", PF))
t0 = threads()
ft = H.new()
ok = ft.start_prefaulter(ft, 8192)  # (its first wake, the index's next doubling, may end it before we count)
assert ok is True, ok
H.batch(ft, 0, 1)                  # a wake for records: at the latest here its first madvise is refused
end = time.monotonic() + 60
while H.pf(ft)[2] == 0:            # its errno, stored when it was refused
    assert time.monotonic() < end
    time.sleep(0.001)
while threads() != t0:             # the helper thread ended (it would be refused every time)
    assert time.monotonic() < end, ("helper thread still there", threads(), t0)
    time.sleep(0.001)
kicks = ft.kicks
H.batch(ft, 1, 30000)
assert ft.kicks == kicks, ("the fast path still wakes an ended helper", kicks, ft.kicks)
assert ft.self_faulted >= 29000 and ft.live == 30000     # it maps (tries to) every chunk itself; every flow is there
st = ft.stop_prefaulter(ft)                              # joins the ended thread
assert st[b"err"] == 22 and st[b"pages"] == 0 and ft.pf is None and threads() == t0, st
print("ok")
"""


@pytest.mark.skipif((shutil.which("cc") or shutil.which("gcc")) is None, reason="needs a C compiler")
def test_a_kernel_that_refuses_the_advice_ends_the_helper_and_the_fast_path_stops_waking_it(tmp_path):
    """A kernel before 5.14 refuses MADV_POPULATE_WRITE (EINVAL; made here by an LD_PRELOAD madvise, in a process of
    its own).  The helper ends at its first refusal (its errno stored) and the fast path, which reads it, wakes it no
    more: 30 000 flows after that, no eventfd write.  Truth: /proc/self/task and the fast path's own count of wakes.
    Before: the thread stayed, woken for nothing every span / 2 new flows (27 wakes on flows-100k)."""
    from tests.test_shards_prefault import NOPOP
    src, lib = tmp_path / "nopop.c", tmp_path / "nopop.so"
    src.write_text(NOPOP)
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-shared", "-fPIC", "-O2", "-o", str(lib), str(src),
                    "-ldl"], check=True)
    r = subprocess.run([sys.executable, "-c", REFUSED], cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, LD_PRELOAD=str(lib)), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_side_array_joins_a_running_helper(H):
    """FT:side_array while a helper runs: the helper is restarted with the array as its fourth (one thread still),
    maps its pages ahead with the records' so that the fast path maps none itself, and the stats keep the first
    helper's work.  Truth: mincore and /proc/self/task."""
    t0 = threads()
    ft = H.new()
    assert ft.start_prefaulter(ft, AHEAD) is True
    H.batch(ft, 0, 3000)
    wait_helper(H, ft)
    before, mapped_itself = ft.prefaulter_stats(ft)[b"pages"], ft.self_faulted
    side = ft.side_array(ft, 48)
    assert threads() == t0 + 1 and ft.pf is not None and ft.prefaulter_stats(ft)[b"pages"] >= before
    r, n = H.resident(side, 0, ft.faulted * 48)                  # what the records had mapped: mapped now
    assert r == n
    while ft.hw < 30000:
        H.batch(ft, ft.hw, min(H.pf(ft)[0], 30000))
        wait_helper(H, ft)
    assert ft.self_faulted == mapped_itself                      # from the restart on, every page was the helper's
    goal = H.pf(ft)[1]
    r, n = H.resident(side, 0, (goal - 64) * 48)
    assert r == n and H.resident(side, (goal + 2 * PREFAULT) * 48, (goal + 4 * AHEAD) * 48)[0] == 0
    st = ft.stop_prefaulter(ft)
    assert st[b"err"] == 0 and st[b"pages"] >= before + (goal - 4000) * (128 + 64 + 8 + 48) // 4096
    assert threads() == t0
