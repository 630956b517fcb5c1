"""kill -9 of the capture process of `luaprobe run` (newcomer pass, defect 5): it was reported as an input error
(exit 3, which README reserves for a bad capture file).  A process of the run died: exit 1 (docs/operations.md),
one line saying which process and how it died, and the packets it had put in the packet ring are all walked.
Truth: the kernel's signal, and tshark's frame sizes - the bytes walked equal the sum of the first N frames."""
from __future__ import annotations

import json

import psutil

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
