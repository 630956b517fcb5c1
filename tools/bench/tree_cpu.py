"""The CPU of a command and of every process it starts, daemons included.

    python tools/bench/tree_cpu.py [--json FILE] -- COMMAND [ARG...]

`/usr/bin/time` counts only the processes its command waits for; a daemon that `luaprobe start` puts in a session
of its own is re-parented to init and its CPU (supervisor, fast path, capture, store writer, workers) is lost to
it.  This wrapper makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so such orphans are re-parented to
it instead, reaps every one of them as it ends, and prints, once the command has ended and no descendant is left,
the wall time and the user + system CPU of the whole tree (getrusage RUSAGE_CHILDREN: every process reaped by its
parent or by this wrapper).  Exit status: the command's.  Used for docs/benchmarks.md "Test suite CPU".
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write {wall_s, user_s, sys_s, status} to this file")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give a command")
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"tree_cpu: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    status = None
    while True:                      # every child: the command, then the orphans it left, until none is left
        try:
            p, st = os.wait()
        except ChildProcessError:
            break
        if p == pid:
            status = os.waitstatus_to_exitcode(st)
    wall = time.monotonic() - start
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"wall_s": round(wall, 2), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
           "status": status}
    print(f"tree_cpu: wall {wall:.1f} s, user {ru.ru_utime:.1f} s, sys {ru.ru_stime:.1f} s, "
          f"user+sys {ru.ru_utime + ru.ru_stime:.1f} s, status {status}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)
    return status if isinstance(status, int) and status >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
