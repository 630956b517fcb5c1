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


def test_capture_killed_is_a_dead_process_not_an_input_error(tmp_path):
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.0005, "--packet-ring-mb", "1")
    def capture():
        for k in psutil.Process(p.pid).children(recursive=True):
            if "luaprobe.engine.capture.process" in " ".join(k.cmdline()):
                return k
    cap = helpers.wait_for(capture, timeout=60)
    kids = psutil.Process(p.pid).children(recursive=True)
    helpers.wait_for(walking.exists, timeout=120)
    assert cap.is_running()
    cap.kill()
    out, err = helpers.finish(p, 300)
    assert p.returncode == 1, err
    summary = json.loads(out)
    n = summary["packets"]
    assert 0 < n < len(sizes)
    assert summary["bytes"] == sum(sizes[:n])         # exactly the first n records, none lost or repeated
    lines = [ln for ln in err.splitlines() if ln.startswith("luaprobe run:")]
    assert len(lines) == 1 and f"(pid {cap.pid}) was killed by SIGKILL" in lines[0] and f"({n})" in lines[0], err
    assert summary["input_errors"] == [] and summary["exit"]["code"] == 1
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])


@pytest.mark.parametrize("shards", ["1", "2"])
def test_a_capture_file_cut_while_it_is_read_is_an_input_error(tmp_path, shards):
    """The capture file is cut (truncated in place: a rotating writer, an operator's `truncate`) while the capture
    process still has to read past the new end: the mapped page past it faults (SIGBUS).  That was reported as a
    dead process (exit 1, 'killed by SIGBUS', docs/operations.md's internal error); it is a damaged input: exit 3,
    one line naming the file and the byte offset where it now ends; the records walked are exactly the file's first
    ones, less at most the 63 read since the capture's last publish (not fixed: lost with the faulting process).
    Truth: tshark's frames of the cut file (its complete records) and their frame.len."""
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.0005, "--packet-ring-mb", "1", "--shards", shards)
    pcap = tmp_path / "synth.pcap"
    whole = pcap.stat().st_size
    cut = whole * 3 // 4 // 4096 * 4096        # a page edge: the bytes past it fault, none read as zeros
    assert cut > 2 * 1048576                   # far past what the 1 MiB ring lets the capture read ahead
    helpers.wait_for(walking.exists, timeout=120)
    os.truncate(pcap, cut)
    out, err = helpers.finish(p, 300)
    n = len(subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"], capture_output=True,
                           text=True).stdout.split())
    assert p.returncode == 3, err
    want = (f"{pcap}: byte offset {cut}: the file was cut to {cut} bytes (it had {whole}) while it was read: the "
            "packets the capture process had put in the packet ring were walked, the rest of the input was not read")
    assert err.splitlines() == [f"luaprobe run: input error: {want}"], err
    summary = json.loads(out)
    assert summary["input_errors"] == [want] and not summary.get("capture_death")
    k = summary["packets"]           # at most the 63 records read since the capture's last publish are lost (per ring)
    assert 0 < n < len(sizes) and n - 64 * int(shards) < k <= n, (k, n)
    if shards == "1":                # one ring: exactly the file's first k records
        assert summary["bytes"] == sum(sizes[:k])
    else:                            # every packet the capture process counted into the shards' rings was walked
        assert summary["packets_read"] == k and summary["bytes"] <= sum(sizes[:n])
    assert not helpers.our_segments([p.pid])
