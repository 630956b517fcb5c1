"""T.env's directories under OUT/trisul are made by every process of a sharded run at once (engine/plugins/tenv.py
prepare): one that finds another made a directory first goes on (before: FileExistsError restarted a shard,
seen in test_shards under load).  Truth: the directories exist, mode 0700, and no process raised."""
from __future__ import annotations

import multiprocessing as mp
import os
import stat
import types

from luaprobe.engine.plugins import tenv


def _prepare(out: str, barrier, q) -> None:
    cfg = types.SimpleNamespace(out_dir=out, data_dir=None, db_root=None, run_state_dir=None)
    barrier.wait()
    try:
        tenv.prepare(cfg)
        q.put(None)
    except OSError as e:
        q.put(repr(e))


def test_shards_preparing_the_same_directories_at_once(tmp_path):
    ctx = mp.get_context("fork")
    n, errors = 6, []
    for i in range(60):
        out = str(tmp_path / f"out{i}")
        os.mkdir(out)
        barrier, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_prepare, args=(out, barrier, q)) for _ in range(n)]
        for p in procs:
            p.start()
        errors += [e for e in (q.get(timeout=30) for _ in procs) if e]
        for p in procs:
            p.join(30)
        for sub in ("data", "dbroot", "run"):
            assert stat.S_IMODE(os.stat(os.path.join(out, "trisul", sub)).st_mode) == 0o700
    assert errors == []
