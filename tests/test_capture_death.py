"""kill -9 of the capture process of `luaprobe run` (newcomer pass, defect 5): it was reported as an input error
(exit 3, which README reserves for a bad capture file).  A process of the run died: exit 1 (docs/operations.md),
one line saying which process and how it died, and the packets it had put in the packet ring are all walked.
Truth: the kernel's signal, and tshark's frame sizes - the bytes walked equal the sum of the first N frames."""
from __future__ import annotations

import json
import os
import subprocess

import psutil
import pytest

from tests import helpers


@pytest.mark.parametrize("shards", ["1", "2"])
def test_capture_killed_is_a_dead_process_not_an_input_error(tmp_path, shards):
    """The same exit (1) and line with --shards 2, where the coordinator runs the capture process (before: an input
    error there, exit 3, `capture process ended unexpectedly (status -9)`); the shards walk every packet it had
    put in their rings, which are exactly the first n records (it publishes every ring at once)."""
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.00002, "--packet-ring-mb", "1", "--shards", shards,
                                                held=True)
    def capture():
        for k in psutil.Process(p.pid).children(recursive=True):
            if "luaprobe.engine.capture.process" in " ".join(helpers.cmdline(k)):
                return k
    cap = helpers.wait_for(capture, timeout=60)
    kids = psutil.Process(p.pid).children(recursive=True)
    helpers.wait_for(walking.exists, timeout=120)   # held at its 100th packet: the capture waits for ring space
    assert cap.is_running()
    cap.kill()
    helpers.release(tmp_path)
    out, err = helpers.finish(p, 300)
    assert p.returncode == 1, err
    summary = json.loads(out)
    n = summary["packets"]
    assert 0 < n < len(sizes)
    assert summary["bytes"] == sum(sizes[:n])         # exactly the first n records, none lost or repeated
    lines = [ln for ln in err.splitlines() if ln.startswith("luaprobe run:")]
    assert len(lines) == 1 and f"(pid {cap.pid}) was killed by SIGKILL" in lines[0] and f"({n})" in lines[0], err
    assert summary["capture_death"]["pid"] == cap.pid and summary["capture_death"]["packets"] == n
    assert summary["input_errors"] == [] and summary["exit"]["code"] == 1
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])


def _first_cut_record(path, cut: int) -> tuple[int, str]:
    """Byte offset of the first record of classic pcap `path` that does not end by byte `cut`, and what a file of
    `cut` bytes lacks there (walked here from the record headers, not by luaprobe's reader)."""
    import struct
    data = open(path, "rb").read()
    off = 24
    while True:
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        if off + 16 + caplen > cut:
            left = cut - off
            return off, (f"truncated record header ({left} of 16 bytes)" if left < 16
                         else f"truncated record: caplen {caplen} but {left - 16} bytes left")
        off += 16 + caplen


@pytest.mark.parametrize("shards", ["1", "2"])
def test_a_capture_file_cut_while_it_is_read_is_an_input_error(tmp_path, shards):
    """The capture file is cut (truncated in place: a rotating writer, an operator's `truncate`) ahead of where the
    capture process reads (it waits for packet-ring space behind a slow hook).  Before: it read on into the mapped
    page past the new end and died of SIGBUS, reported as a dead process (exit 1, docs/operations.md's internal
    error; with --shards, 'capture process ended unexpectedly (status -7)'), losing the records read since its
    last publish, and a cut inside a page gave zero-filled phantom records (ts 0, length 0) first.  Now the
    capture process sees the new size while it waits and ends the file there, as a file that short: exit 3, one
    line naming the file and the byte offset of the first incomplete record, every complete record walked.
    Truth: tshark's frames of the cut file and their frame.len, the record offsets walked here."""
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.00002, "--packet-ring-mb", "1", "--shards", shards,
                                                held=True)
    pcap = tmp_path / "synth.pcap"
    cut = pcap.stat().st_size * 3 // 4 + 5     # inside a page: the bytes past it in that page read as zeros
    assert cut > 2 * 1048576                   # far past what the 1 MiB ring lets the capture read ahead
    off, what = _first_cut_record(pcap, cut)
    helpers.wait_for(walking.exists, timeout=120)   # the walk is held at its 100th packet: the capture waits for
    os.truncate(pcap, cut)                          # ring space ~1 MiB past it, before the cut
    helpers.release(tmp_path)
    out, err = helpers.finish(p, 300)
    n = len(subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"], capture_output=True,
                           text=True).stdout.split())
    assert p.returncode == 3, err
    want = f"{pcap}: byte offset {off}: {what}"
    assert err.splitlines() == [f"luaprobe run: input error: {want}"], err
    summary = json.loads(out)
    assert summary["input_errors"] == [want] and not summary.get("capture_death")
    assert 0 < n < len(sizes) and summary["packets"] == n and summary["bytes"] == sum(sizes[:n])
    assert summary.get("packets_read", n) == n and summary.get("late_packets", 0) == 0
    assert not helpers.our_segments([p.pid])
