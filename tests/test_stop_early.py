"""A stop ends the walk within about a batch (newcomer pass, defect 3): with a 1 ms hook, SIGTERM after 3 s used
to walk the whole 32 MiB ring (7000 packets, 11 s) and then say "stopped early".  Packets already in the ring are
passed over and counted (`not_walked_at_stop`).  Truth: tshark's frame sizes (the walked packets are exactly the
first N records) and the capture's frame count."""
from __future__ import annotations

import json
import signal

import psutil

from tests import helpers


def test_a_stop_passes_over_the_rest_of_the_ring_and_counts_it(tmp_path):
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.001, "--batch", "64")
    kids = []
    try:
        helpers.wait_for(walking.exists, timeout=120)
        kids = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    s = json.loads(out)
    walked, skipped = s["packets"], s["not_walked_at_stop"]
    assert s["stopped_by"] == "SIGTERM"
    assert walked < len(sizes) // 2 and skipped > 0                  # the walk ended early, the rest is counted
    assert walked + skipped <= len(sizes)                           # read = walked + not walked, no more
    assert s["bytes"] == sum(sizes[:walked])                        # the walked ones are the first records
    assert "Traceback" not in err
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])


def test_a_sharded_stop_passes_over_the_rest_of_each_ring_and_counts_it(tmp_path):
    """--shards 2 walked every packet already in the shards' rings after a stop (7000 and more with a 1 ms hook);
    now each shard ends after its batch under way, like one fast path.  Truth: the capture's frame count and bytes
    (tshark), and the capture process's own count of packets committed to each ring (packets_read), which must
    be exactly walked + not walked, shard by shard."""
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.001, "--batch", "64", "--shards", "2")
    kids = []
    try:
        helpers.wait_for(walking.exists, timeout=120)
        kids = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    s = json.loads(out)
    walked, skipped = s["packets"], s["not_walked_at_stop"]
    assert s["stopped_by"] == "SIGTERM"
    assert walked < len(sizes) // 2 and skipped > 0                  # the walk ended early, the rest is counted
    assert s["packets_lost"] == 0 and s["packets_read"] == walked + skipped <= len(sizes)
    for sh in s["shards"]:
        assert sh["read"] == sh["packets"] + sh["not_walked_at_stop"] and sh["lost"] == 0, sh
    assert walked == sum(sh["packets"] for sh in s["shards"]) and s["bytes"] < sum(sizes)
    assert "Traceback" not in err
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid] + [k.pid for k in kids])


def test_sigterm_with_a_stopped_capture_process_is_a_graceful_stop(tmp_path):
    """`run` with its capture process SIGSTOPped (still reading: a 1 MiB packet ring it waits on), then SIGTERM:
    the capture is continued so that it takes the stop; exit 143, stopped_by SIGTERM (failed before: the capture
    was killed after 15 s and the run exited 3 "capture process ended unexpectedly (status -9)")."""
    p, sizes, walking = helpers.start_slow_walk(tmp_path, 0.001, "--batch", "64", "--packet-ring-mb", "1")
    kids = []
    try:
        helpers.wait_for(walking.exists, timeout=120)
        kids = psutil.Process(p.pid).children(recursive=True)
        capture = [k for k in kids if "luaprobe.engine.capture.process" in " ".join(k.cmdline())]
        assert len(capture) == 1 and capture[0].status() != psutil.STATUS_ZOMBIE
        capture[0].send_signal(signal.SIGSTOP)
        helpers.wait_for(lambda: capture[0].status() == psutil.STATUS_STOPPED, timeout=10)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    s = json.loads(out)
    assert s["stopped_by"] == "SIGTERM" and not s["input_errors"] and not s["capture_death"]
    assert s["packets"] + s["not_walked_at_stop"] <= len(sizes)
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])
