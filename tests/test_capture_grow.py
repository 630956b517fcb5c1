"""A capture file that grows while the capture process reads it (tcpdump -w / dumpcap still writing it, a copy still
under way) is read to its size at the end of the walk, not only to its size when the run started.

Before: the capture process mapped the file's size at the start and stopped there: cut on a record boundary, the
records appended later were silently not read (exit 0); cut inside a record, the run ended with exit 3 "truncated
record ... bytes left" although the file was complete long before the walk got there.  Now (engine/capture/capture.lua
grow): at the end of what it mapped the capture process fstat()s the file, maps it again when it grew, and reads on,
until an fstat at the end shows no growth; it does not wait for growth to come.

Deterministic, no sleeps: the plug-in blocks on its first packet (every shard's VM) until the test opens a gate file,
so the packet ring fills and the capture process waits for ring space long before the end of the part written so far
(an initial part about three times the 4 MiB ring; the plug-in's first packet tells the file is mapped).  The test
then appends the rest of the file (cut at a record's end, or inside a record's header or data), opens the gate, and
the run must read the whole final file.  Truth: tshark's frames of the final file (count and sum of frame.len).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import hypothesis
import hypothesis.strategies
import pytest

from tests import helpers
from tests.test_capture_cut import _write_capture, _write_pcapng

TOTAL = 30000

GATE = """
local n = 0
TrisulPlugin = { id = { name = "gate" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function()
      n = n + 1
      if n == 1 then
        local f = io.open("%s", "w"); f:close()                    -- the file is mapped and walked
        while true do local g = io.open("%s") if g then g:close() break end end   -- until the test opens the gate
      end
    end } }
"""


def _tshark(path) -> list[int]:
    """frame.len of every whole record (tshark exits 2 on a file cut inside a record, after printing them)."""
    return [int(x) for x in subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len"],
                                           capture_output=True, text=True).stdout.split()]


def _cut(recs, where: str) -> int:
    """Bytes of the file written before the run: up to record 20000's start ("boundary"), or 7 bytes into its header
    ("header"), or into its frame ("data")."""
    off, n, _ = recs[20000]
    return {"boundary": off, "header": off + 7, "data": off + 40 + n // 2}[where]


@pytest.mark.parametrize("fmt,where,shards,second", [
    ("pcap", "boundary", "1", False), ("pcap", "header", "1", False), ("pcap", "data", "1", False),
    ("pcapng", "boundary", "1", False), ("pcapng", "data", "1", False), ("pcap", "data", "2", False),
    ("pcapng", "header", "1", True)])
def test_a_file_growing_while_it_is_read_is_read_to_its_end(tmp_path, fmt, where, shards, second):
    full = tmp_path / f"full.{fmt}"
    recs = (_write_capture if fmt == "pcap" else _write_pcapng)(full, TOTAL)
    data = full.read_bytes()
    cut = _cut(recs, where)
    grown = tmp_path / f"grown.{fmt}"
    grown.write_bytes(data[:cut])
    files = [grown]
    if second:                                   # `--pcap a b`: the next file is read after the grown one
        files.append(tmp_path / "second.pcap")
        _write_capture(files[-1], 500)
    walking, gate = tmp_path / "walking", tmp_path / "gate"
    plug = tmp_path / "gate.lua"
    plug.write_text(GATE % (walking, gate))
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", *map(str, files),
                          "--out", str(tmp_path / "out"), "--json", "--packet-ring-mb", "4", "--shards", shards,
                          "--hook-budget", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        helpers.wait_for(lambda: walking.exists() or p.poll() is not None, timeout=120)
        assert p.poll() is None, "the run ended before its plug-in saw a packet"
        with open(grown, "ab") as f:             # the writer goes on: the rest of the file
            f.write(data[cut:])
        gate.touch()
        out, err = helpers.finish(p, 300)
    finally:
        gate.touch()
    frames = [x for f in files for x in _tshark(f)]
    assert len(_tshark(grown)) == TOTAL
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert not summary.get("input_errors"), summary["input_errors"]
    assert (summary["packets"], summary["bytes"]) == (len(frames), sum(frames))
    assert not helpers.our_segments([p.pid])


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_file_still_partial_at_the_end_ends_at_its_partial_record(tmp_path, fmt):
    """Grown, but its last record still incomplete when the walk gets there (nothing more comes): the records of the
    grown file are read and the run ends with the truncated-record input error at that record, as a file that short
    does (exit 3, the offset of the partial record, not of the end of the part written before the run)."""
    full = tmp_path / f"full.{fmt}"
    recs = (_write_capture if fmt == "pcap" else _write_pcapng)(full, TOTAL)
    data = full.read_bytes()
    cut, (last, n, blk) = _cut(recs, "data"), recs[25000]
    end = last + 20
    grown = tmp_path / f"grown.{fmt}"
    grown.write_bytes(data[:cut])
    walking, gate = tmp_path / "walking", tmp_path / "gate"
    plug = tmp_path / "gate.lua"
    plug.write_text(GATE % (walking, gate))
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(grown), "--out",
                          str(tmp_path / "out"), "--json", "--packet-ring-mb", "4", "--hook-budget", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        helpers.wait_for(lambda: walking.exists() or p.poll() is not None, timeout=120)
        assert p.poll() is None, "the run ended before its plug-in saw a packet"
        with open(grown, "ab") as f:
            f.write(data[cut:end])
        gate.touch()
        out, err = helpers.finish(p, 300)
    finally:
        gate.touch()
    frames = _tshark(grown)
    assert len(frames) == 25000
    assert p.returncode == 3, err
    summary = json.loads(out)
    what = "truncated record: caplen %d but 4 bytes left" % n if fmt == "pcap" else \
        "block length %d exceeds the 20 bytes left" % len(blk)
    assert summary["input_errors"] == [f"{grown}: byte offset {last}: {what}"]
    assert (summary["packets"], summary["bytes"]) == (len(frames), sum(frames))
    assert not helpers.our_segments([p.pid])


# ---------------------------------------------------------------------------------------------------------------
# The walk itself, grown anywhere: a worker maps the first `start` bytes of a generated file (open_capture, as the
# capture process does), appends the bytes up to `end` and walks it with capture.lua's file(..., fd, grows = true)
# into a ring of its own.  Truth: the record offsets and bytes of the generated file, walked here.

GROW_WORKER = r'''
import json, sys, zlib
from luaprobe.shm.luajit import new_runtime
from luaprobe.engine.capture.pcapfile import open_capture
lua = new_runtime()
walk = lua.eval("""''' + helpers.file_walk_lua(16, True) + r'''""")
for line in sys.stdin:
    src, work, start, end = line.split()
    data = open(src, "rb").read()
    with open(work, "wb") as f:
        f.write(data[:int(start)])
    with open_capture(work) as c:
        with open(work, "ab") as f:
            f.write(data[int(start):int(end)])
        n, nbytes, err, off, recs = walk(c.address, c.size, c.fd)
    recs = [[int(r[1]), int(r[2]), int(r[4]), zlib.crc32(r[5])] for r in recs.values()]
    print(json.dumps({"n": int(n), "bytes": int(nbytes), "err": err.decode() if err else None,
                      "off": int(off) if off is not None else None, "recs": recs}), flush=True)
'''


@pytest.fixture(scope="module")
def grow_worker():
    yield from helpers.line_worker(GROW_WORKER)


@pytest.fixture(scope="module")
def grow_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("growwalk")
    return {"pcap": (d / "w.pcap", _write_capture(d / "w.pcap", 300)),
            "pcapng": (d / "w.pcapng", _write_pcapng(d / "w.pcapng", 300)), "dir": d}


def _check_grow(worker, files, fmt: str, start: int, end: int) -> None:
    path, recs = files[fmt]
    worker.stdin.write(f"{path} {files['dir'] / ('g.' + fmt)} {start} {end}\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"the walk died ({fmt}, {start}, {end}): status {worker.poll()}"
    got = json.loads(line)
    whole = [r for r in recs if r[0] + len(r[2]) <= end]
    assert got["n"] == len(whole) and got["bytes"] == sum(r[1] for r in whole), (start, end, got["n"], len(whole))
    want = []
    for off, n, blk in whole:
        if fmt == "pcap":
            sec, usec = struct.unpack_from("<II", blk)
            data = blk[16:16 + n]
        else:
            hi, lo = struct.unpack_from("<II", blk, 12)
            sec, usec = divmod((hi << 32) | lo, 1_000_000)
            data = blk[28:28 + n]
        want.append([sec, usec * 1000, n, zlib.crc32(data)])
    assert got["recs"] == want, (start, end)
    nxt = [r for r in ([(28, 0, b"\0" * 20)] if fmt == "pcapng" else []) + list(recs) if r[0] + len(r[2]) > end]
    if not nxt or nxt[0][0] == end:            # the grown file ends at a record's end: it is read whole
        assert (got["err"], got["off"]) == (None, None), (start, end, got["err"])
        return
    off, n, blk = nxt[0]
    left = end - off
    if fmt == "pcap":
        msg = (f"truncated record header ({left} of 16 bytes)" if left < 16
               else f"truncated record: caplen {n} but {left - 16} bytes left")
    else:
        msg = (f"truncated block header ({left} bytes left)" if left < 12
               else f"block length {len(blk)} exceeds the {left} bytes left")
    assert (got["off"], got["err"]) == (off, msg), (start, end)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_walk_of_a_grown_file_reads_it_to_its_end(grow_worker, grow_files, fmt):
    """Chosen: mapped up to a record's end / inside a record's header / its data / a page boundary, grown to the
    whole file, to a record's end, into a record; not grown at all."""
    recs = grow_files[fmt][1]
    size = recs[-1][0] + len(recs[-1][2])
    r10, r200 = recs[10], recs[200]
    for start in (r10[0], r10[0] + 5, r10[0] + 30, 4096 * 3, size):
        for end in (size, r200[0], r200[0] + 9, r200[0] + 40, start):
            if end >= start:
                _check_grow(grow_worker, grow_files, fmt, start, end)


@hypothesis.settings(max_examples=100, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=hypothesis.strategies.data())
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_walk_of_a_file_grown_anywhere_reads_exactly_its_records(grow_worker, grow_files, fmt, data):
    recs = grow_files[fmt][1]
    size = recs[-1][0] + len(recs[-1][2])
    start = data.draw(hypothesis.strategies.integers(24 if fmt == "pcap" else 28, size))
    end = data.draw(hypothesis.strategies.one_of(hypothesis.strategies.just(size),
                                                 hypothesis.strategies.integers(start, size)))
    _check_grow(grow_worker, grow_files, fmt, start, end)
