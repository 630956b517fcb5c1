"""The stall rule names a process that was sent SIGSTOP while in uninterruptible sleep (state D) as stopped.

CI (stop 30) saw ``test_stopped_shard_is_a_stall[store]`` end with "stalled: no heartbeat for 3 s (a hook stuck in
a loop?)" while a store writer had been sent SIGSTOP: a process in uninterruptible sleep (a write, an fsync on a
loaded disk) takes SIGSTOP only when the sleep ends, so /proc shows D, not T, meanwhile.  The kernel's own account is
the truth here: a vfork() parent waits in uninterruptible sleep until its child execs or exits (Linux
kernel/fork.c wait_for_vfork_done, TASK_KILLABLE, shown as D), the one D state a test can hold at will.
"""
import os
import signal
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import control
from luaprobe.engine.daemon.supervisor import Supervisor, _stopped_text

from . import helpers

VFORK_C = r"""
#include <unistd.h>
int main(void) {
    pid_t c = vfork();
    if (c == 0) { pause(); _exit(0); }     /* the child waits for a signal; the parent sleeps in D meanwhile */
    for (;;) pause();                       /* after the child's death: an ordinary sleeper (S) */
}
"""


@pytest.fixture
def vfork_parent(tmp_path):
    """A real process in uninterruptible sleep: (parent Popen, child pid)."""
    src, exe = tmp_path / "vf.c", tmp_path / "vf"
    src.write_text(VFORK_C)
    subprocess.run(["cc", "-O0", "-o", str(exe), str(src)], check=True)
    parent = subprocess.Popen([str(exe)])
    child = helpers.wait_for(lambda: _children(parent.pid), 10, 0.01)[0]
    helpers.wait_for(lambda: control.proc_state(parent.pid) == "D", 10, 0.01)
    yield parent, child
    for pid in (child, parent.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    parent.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _supervisor(child) -> Supervisor:
    """A Supervisor whose fast path is ``child`` and which has no snapshot yet (only what the rules read)."""
    sv = Supervisor.__new__(Supervisor)
    sv.child, sv.snapshot = child, None
    return sv


def test_sigstop_sent_to_a_process_in_d_state_is_pending_until_the_sleep_ends(vfork_parent):
    parent, child = vfork_parent
    assert not control.proc_stop_pending(parent.pid)
    os.kill(parent.pid, signal.SIGSTOP)
    assert control.proc_state(parent.pid) == "D" and control.proc_stop_pending(parent.pid)
    os.kill(child, signal.SIGKILL)                       # the vfork wait ends: the parent takes the stop
    helpers.wait_for(lambda: control.proc_state(parent.pid) == "T", 10, 0.01)
    assert not control.proc_stop_pending(parent.pid)
    os.kill(parent.pid, signal.SIGCONT)
    helpers.wait_for(lambda: control.proc_state(parent.pid) == "S", 10, 0.01)


def test_stall_rules_name_a_process_whose_sigstop_is_pending(vfork_parent):
    parent, child = vfork_parent
    sv = _supervisor(parent)
    assert sv._stopped_processes() == [] and sv._disk_waits() == [
        f"fastpath process (pid {parent.pid}) in uninterruptible disk wait (state D)"]
    os.kill(parent.pid, signal.SIGSTOP)
    stopped = sv._stopped_processes()
    assert stopped == [("fastpath", parent.pid, "state D, SIGSTOP pending")]
    assert _stopped_text(*stopped[0]) == f"fastpath process (pid {parent.pid}) stopped (state D, SIGSTOP pending)"


def test_the_tree_walk_finds_a_stopped_process_no_snapshot_names(vfork_parent):
    parent, child = vfork_parent
    sv = _supervisor(parent)
    os.kill(child, signal.SIGSTOP)
    helpers.wait_for(lambda: control.proc_state(child) == "T", 10, 0.01)
    assert sv._stopped_processes() == []                 # not in a snapshot: the per-look rule does not see it
    name = os.path.basename(parent.args[0])[:15]         # the command name (/proc/PID/comm) of the vfork child
    assert sv._stopped_processes(tree=True) == [(name, child, "state T")]
    assert "fastpath {} D".format(parent.pid) in sv._tree_states() and f"{name} {child} T" in sv._tree_states()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
