"""A ^C or a hangup that reaches the capture process while it starts (Python's start-up and imports, ~0.1 s before
it ignores SIGINT and SIGHUP: the fast path stops it with SIGTERM) does not kill it: it is born with the stop
signals blocked (FastPath._start_capture / Shards._start_captures block them around the Popen) and ignores, then
unblocks them (engine/capture/process.py).  Before, only SIGTERM was blocked: a SIGINT in that window ended the
capture process with a KeyboardInterrupt traceback and the run reported a capture death after 0 packets.

The signal goes to the capture process alone (not the run's group, which would stop the run), sent the moment its
command line shows it has exec'd (polled from /proc every millisecond).  Truth: the number of records in the
capture, read with Python's struct from the classic pcap file."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests import helpers

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")


def pcap_records(path: str) -> int:
    """Records of a classic little-endian microsecond pcap file."""
    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack_from("<I", data, 0)[0] == 0xA1B2C3D4
    off, n = 24, 0
    while off + 16 <= len(data):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
        n += 1
    return n


def _signal_capture_at_birth(run: subprocess.Popen, signum: int, sent: list) -> None:
    """Send ``signum`` to the run's capture process as soon as it has exec'd; record its pid in ``sent``."""
    deadline = time.monotonic() + 60
    while run.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{run.pid}/task/{run.pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return
        for pid in kids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"luaprobe.engine.capture.process" in cmd:
                os.kill(int(pid), signum)
                sent.append(int(pid))
                return
        time.sleep(0.001)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_capture_process_while_it_starts_loses_nothing(tmp_path, signum):
    run = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", CAPTURE,
                            "--out", str(tmp_path / "o"), "--stats-json", str(tmp_path / "s.json"), "-q"],
                           cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent: list = []
    t = threading.Thread(target=_signal_capture_at_birth, args=(run, signum, sent))
    t.start()
    out, err = run.communicate(timeout=300)
    t.join()
    assert sent, "the capture process was never seen"
    assert run.returncode == 0, err
    import json
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["packets"] == pcap_records(CAPTURE)
    assert "Traceback" not in err
