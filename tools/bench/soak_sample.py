"""Soak sampler: what a long run holds, over time (docs/operations.md "Long runs: what is bounded and by what").

    python tools/bench/soak_sample.py PID OUT.jsonl [--every 15] [--db-dir DIR] [--run-dir DIR]
    python tools/bench/soak_sample.py --report OUT.jsonl

PID: the daemon's supervisor (``run/supervisor.pid``) or a ``luaprobe run`` process.  Every ``--every`` seconds one
JSON line: per process of PID's tree its role (from the command line: supervisor, fastpath, capture, store, worker,
zombie, ...), RSS (bytes) and open descriptors; the run's /dev/shm segments (``luaprobe-PID...`` of a process of
the tree: their number and bytes); the sizes of the files in ``--db-dir`` (database, WAL); and, with ``--run-dir``,
``luaprobe stats --json``.  Ends when PID has exited.  ``--report`` prints a per-role table of the samples and the
RSS slope after the first quarter of the run (MiB per hour, least squares), the number that tells a leak from a
warm-up.  psutil (a test dependency) reads the processes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

import psutil

ROLES = (("supervisor --child", "fastpath"), ("daemon.supervisor", "supervisor"), ("fastpath.shards", "shard"),
         ("capture.process", "capture"), ("store.writer", "store"), ("workers.worker", "worker"),
         ("luaprobe run", "fastpath"), ("luaprobe.engine run", "fastpath"))


def role(p: psutil.Process) -> str:
    """The role of process ``p`` from its command line; ``zombie`` for an exited child not yet reaped."""
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return "zombie"
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    return next((r for key, r in ROLES if key in cmd), os.path.basename(cmd.split(" ")[0]) or "?")


def sample(root: psutil.Process, db_dir: str | None, run_dir: str | None) -> dict:
    """One sample of ``root``'s tree (see the module docstring)."""
    rec: dict = {"t": time.time(), "procs": []}
    pids = set()
    for p in [root, *root.children(recursive=True)]:
        r = role(p)
        try:
            rss, fds = (0, 0) if r == "zombie" else (p.memory_info().rss, p.num_fds())
        except psutil.Error:
            continue
        pids.add(p.pid)
        rec["procs"].append({"pid": p.pid, "role": r, "rss": rss, "fds": fds})
    segs = []
    for name in os.listdir("/dev/shm"):
        head = name.split(".")[0]
        if head.startswith("luaprobe-") and head.split("-")[1].isdigit() and int(head.split("-")[1]) in pids:
            try:
                segs.append(os.stat(os.path.join("/dev/shm", name)).st_blocks * 512)
            except OSError:
                pass
    rec["shm_segments"], rec["shm_bytes"] = len(segs), sum(segs)
    if db_dir:
        rec["db"] = {f: os.path.getsize(os.path.join(db_dir, f)) for f in os.listdir(db_dir)
                     if os.path.isfile(os.path.join(db_dir, f))}
    if run_dir:
        cmd = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "stats", "--json", "--run-dir", run_dir]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        try:
            rec["stats"] = json.loads(r.stdout)
        except ValueError:
            rec["stats"] = None
    return rec


def report(path: str) -> None:
    """Per-role RSS (MiB) / descriptors / processes at the first, middle and last samples, and the RSS slope."""
    recs = [json.loads(x) for x in open(path)]
    if not recs:
        sys.exit(f"{path}: no samples")
    t0 = recs[0]["t"]
    by_role = collections.defaultdict(list)          # role -> [(t, rss MiB, fds, n)]
    for r in recs:
        agg = collections.defaultdict(lambda: [0, 0, 0])
        for p in r["procs"]:
            a = agg[p["role"]]
            a[0] += p["rss"] / 2**20
            a[1] += p["fds"]
            a[2] += 1
        for k, (rss, fds, n) in agg.items():
            by_role[k].append((r["t"] - t0, rss, fds, n))
    print(f"{len(recs)} samples over {recs[-1]['t'] - t0:.0f} s; shm segments {recs[0]['shm_segments']} -> "
          f"{recs[-1]['shm_segments']}")
    for k, xs in sorted(by_role.items()):
        warm = [x for x in xs if x[0] >= xs[-1][0] / 4]
        slope = 0.0
        if len(warm) >= 3:
            mt = sum(x[0] for x in warm) / len(warm)
            mr = sum(x[1] for x in warm) / len(warm)
            den = sum((x[0] - mt) ** 2 for x in warm)
            slope = sum((x[0] - mt) * (x[1] - mr) for x in warm) / den * 3600 if den else 0.0
        pick = [xs[0], xs[len(xs) // 2], xs[-1]]
        print(f"{k:11} " + "  ".join(f"{t:5.0f}s {rss:7.1f} MiB {fds:5d} fd {n:3d} p" for t, rss, fds, n in pick)
              + f"   slope after warm-up {slope:+.1f} MiB/h")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pid", nargs="?", type=int)
    ap.add_argument("out")
    ap.add_argument("--every", type=float, default=15.0)
    ap.add_argument("--db-dir")
    ap.add_argument("--run-dir")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args(argv)
    if a.report:
        report(a.out)
        return 0
    try:
        root = psutil.Process(a.pid)
    except (psutil.Error, TypeError):
        sys.exit(f"soak_sample: no process {a.pid}")
    with open(a.out, "a") as fh:
        while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
            try:
                fh.write(json.dumps(sample(root, a.db_dir, a.run_dir)) + "\n")
                fh.flush()
            except (psutil.Error, OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(a.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
