"""tools/bench/corpus.py make(): several processes making the same capture at once (pytest-xdist's test processes
do, on a fresh clone) each get the whole file.  Before, they shared one `.tmp` name: one truncated the file another
had just renamed into place, which read as "empty file (no capture header)" and the other's rename failed
(FileNotFoundError; CI of 2860baf, tests/test_walk_fields.py).  Truth: the bytes of a capture made alone, and its
records walked here by their pcap headers (struct)."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import struct

from tools.bench import corpus


def _make(out, q):
    try:
        p = corpus.make("small-few", quick=True, out=out)
        with open(p, "rb") as f:
            q.put(hashlib.sha256(f.read()).hexdigest())
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


def test_processes_making_one_capture_at_once_each_get_the_whole_file(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(tmp_path / "racing"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    alone = corpus.make("small-few", quick=True, out=str(tmp_path / "alone"))
    with open(alone, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    assert got == [want] * 2
    assert os.listdir(tmp_path / "racing") == [os.path.basename(alone)]     # no temporary file left
    with open(alone, "rb") as f:
        data = f.read()
    n, off = 0, 24                                       # pcap: a 24-byte file header, then 16-byte record headers
    while off < len(data):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
        n += 1
    assert off == len(data) and n == corpus.SHAPES["small-few"]["quick"]
