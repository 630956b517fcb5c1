"""Ctrl-C on `luaprobe run --pcap FIFO` whose writer never came: the capture process waited in open(2), which a stop
signal cannot end, so the fast path killed it after 15 s and reported `input error: capture process ended
unexpectedly (status -9)`, exit 3.  Now the FIFO is opened without waiting for its writer (engine/capture/process.py
_read_stream) and the stop is prompt: exit 130, `stopped early by SIGINT`.  Real processes and a real FIFO."""
from __future__ import annotations

import os
import signal
import time

import psutil

from tests import helpers, proc_tools

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")
SAMPLE = os.path.join(EXAMPLES, "sample.pcap")


def capture_holds_open(tag, path) -> bool:
    """True once the run's capture process has `path` open (the FIFO opened, its writer awaited in select):
    the state a stop must end promptly.  Before that it may still be starting (imports take seconds on a loaded
    machine), which is not what the test times."""
    for x in proc_tools.tagged_processes(tag):
        try:
            if "luaprobe.engine.capture.process" not in " ".join(x.cmdline()):
                continue
            fds = os.listdir(f"/proc/{x.pid}/fd")      # psutil's open_files() lists regular files only
            if any(os.readlink(f"/proc/{x.pid}/fd/{fd}") == str(path) for fd in fds):
                return True
        except (psutil.Error, OSError):
            continue
    return False


def test_sigint_on_a_fifo_without_writer_is_prompt(tmp_path):
    """The stop is timed from the moment the capture process has the FIFO open and waits for its writer (the old
    code never got there: open(2) blocked until a writer came, so the wait below fails on it; a stop then
    took the 15 s SIGKILL and an input error, exit 3).  Timed from the capture process's mere existence, as
    before, the 10 s also counted its start-up (the interpreter, numpy, lupa, attaching the ring: 0.55-0.64 s
    at load 10.7, more on a slower machine), which is not what a prompt stop is about."""
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    env, tag = proc_tools.tagged_env()
    p = proc_tools.start(["run", EXAMPLES, "--pcap", str(fifo), "--out", str(tmp_path / "out")], env=env)
    try:
        helpers.wait_for(lambda: capture_holds_open(tag, fifo), 60, 0.05)
    except BaseException:
        p.kill()                                  # the run's tree goes with it; its reason stays the failure
        p.communicate()
        for x in proc_tools.tagged_processes(tag):
            x.kill()
        raise
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
    helpers.wait_for(lambda: any("luaprobe.engine.capture.process" in " ".join(helpers.cmdline(x))
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
