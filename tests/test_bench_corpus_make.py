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
import subprocess

import numpy as np
import pytest

from tools.bench import corpus


def _make(out, q, start):
    try:
        start.wait(60)                              # both begin together: their writes overlap
        p = corpus.make("small-few", quick=True, out=out)
        with open(p, "rb") as f:
            q.put(hashlib.sha256(f.read()).hexdigest())
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


def test_processes_making_one_capture_at_once_each_get_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setitem(corpus.SHAPES["small-few"], "quick", 100_000)  # the race is make()'s: 100 000 packets
    ctx = mp.get_context("fork")                                        # (not 500 000; the forks inherit it)
    q, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_make, args=(str(tmp_path / "racing"), q, start)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    alone = corpus.make("small-few", quick=True, out=str(tmp_path / "alone"))
    with open(alone, "rb") as f:
        data = f.read()
    assert got == [hashlib.sha256(data).hexdigest()] * 2
    assert os.listdir(tmp_path / "racing") == [os.path.basename(alone)]     # no temporary file left
    n, off = 0, 24                                       # pcap: a 24-byte file header, then 16-byte record headers
    while off < len(data):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
        n += 1
    assert off == len(data) and n == corpus.SHAPES["small-few"]["quick"]


@pytest.mark.parametrize("shape", ["small-few", "mixed-zipf"])
def test_built_tcp_segments_number_their_bytes_as_a_connection_does(tmp_path, shape):
    """The built shapes' TCP sequence and acknowledgment numbers advance with each direction's bytes (RFC 793), with
    a share corpus.RETRANS of retransmissions: the flow table's in-order path is the common one, as on real traffic.
    Before (BUILD_REV 1), both were random per segment: tshark flagged ~70 % of small-few's segments as
    retransmissions.  Truth: tshark's TCP analysis of a 10 000-packet capture of the shape (seeded: small-few 68
    retransmissions in 10 000 data segments, mixed-zipf 44 in 7 708; tshark took 4.7 s on 20 000 packets of
    mixed-zipf, 0.9 s on 10 000)."""
    spec = dict(corpus.SHAPES[shape], flows=200)
    path = str(tmp_path / "c.pcap")
    corpus.write_pcap(path, corpus.build(spec, 10_000, np.random.default_rng(5)))
    r = subprocess.run(["tshark", "-r", path, "-Y", "tcp", "-T", "fields", "-e", "tcp.len", "-e", "_ws.expert.message",
                        "-E", "separator=;"], capture_output=True, text=True, check=True)
    rows = [ln.split(";", 1) for ln in r.stdout.splitlines()]
    data = sum(1 for n, _ in rows if int(n) > 0)
    resent = sum(1 for _, m in rows if "retransmission" in m)
    lost = sum(1 for _, m in rows if "previous segment not captured" in m or "out-of-order" in m)
    assert len(rows) > 5_000
    assert 0.5 * corpus.RETRANS * data <= resent <= 2 * corpus.RETRANS * data, (resent, data)
    assert lost <= data // 1000, lost
