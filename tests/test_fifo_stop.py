"""Ctrl-C on `luaprobe run --pcap FIFO` whose writer never came: the capture process waited in open(2), which a stop
signal cannot end, so the fast path killed it after 15 s and reported `input error: capture process ended
unexpectedly (status -9)`, exit 3.  Now the FIFO is opened without waiting for its writer (engine/capture/process.py
_read_stream) and the stop is prompt: exit 130, `stopped early by SIGINT`.  Real processes and a real FIFO."""
from __future__ import annotations

import os
import signal
import time

from tests import helpers, proc_tools

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")
SAMPLE = os.path.join(EXAMPLES, "sample.pcap")


def test_sigint_on_a_fifo_without_writer_is_prompt(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", EXAMPLES, "--pcap", str(fifo), "--out", str(tmp_path / "out")], env=env)
    # the capture process is up and waiting for the FIFO's writer
    helpers.wait_for(lambda: any("luaprobe.engine.capture.process" in " ".join(x.cmdline())
                                 for x in proc_tools.tagged_processes(tag)), 60, 0.05)
    pids = [x.pid for x in proc_tools.tagged_processes(tag)]
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        proc_tools.assert_nothing_left(tag, pids)
    took = time.monotonic() - t0
    assert p.returncode == 130, err
    assert "stopped early by SIGINT" in err and "input error" not in err, err
    assert took < 10, took                      # was 15 s (the capture process SIGKILLed)


def test_a_fifo_writer_that_comes_later_is_read_whole(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", EXAMPLES, "--pcap", str(fifo), "--out", str(tmp_path / "out"), "--json"], env=env)
    helpers.wait_for(lambda: any("luaprobe.engine.capture.process" in " ".join(x.cmdline())
                                 for x in proc_tools.tagged_processes(tag)), 60, 0.05)
    with open(fifo, "wb") as w, open(SAMPLE, "rb") as r:
        w.write(r.read())
    try:
        out, err = p.communicate(timeout=120)
    finally:
        proc_tools.assert_nothing_left(tag, [p.pid])
    assert p.returncode == 0, err
    import json
    assert json.loads(out)["packets"] == helpers.pcap_records(SAMPLE)
