"""Two commands probing the same missing directory at once (racing `luaprobe start`s: engine/daemon/usage.py
dir_problem with write=True makes it, writes a 4 KiB file there and removes it): each finds it writable.  Before,
the second one's mkdir failed ("cannot write there: File exists", exit 2; seen once in CI as
test_supervisor's two-racing-starts test getting that line instead of "already running").  Truth: the directory's
parent is writable, so every probe must say None."""
from __future__ import annotations

import multiprocessing as mp

from luaprobe.engine.daemon import usage


def _probe(path: str, barrier, q) -> None:
    barrier.wait()
    q.put(usage.writable_dir(path))


def test_probes_of_one_missing_directory_at_once_all_find_it_writable(tmp_path):
    ctx = mp.get_context("fork")
    n, got = 6, []
    for i in range(80):
        path = str(tmp_path / f"out{i}")
        barrier, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_probe, args=(path, barrier, q)) for _ in range(n)]
        for p in procs:
            p.start()
        got += [q.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(30)
    assert [g for g in got if g is not None] == []
