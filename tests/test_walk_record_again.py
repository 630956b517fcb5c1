"""A plug-in VM's traces are recorded again once the traffic is past its first packets (issue 10).

LuaJIT compiles a loop's root trace from the one iteration on which the loop gets hot (its 56th with the default
hotloop), and the batch walk's trace inlines the hook (engine/plugins/host.lua).  The first packets of a capture
are new flows, ports and hosts, so a hook that counts into a table (``t[k] = (t[k] or 0) + 1``, the way real
scripts count, and ``engine:update_counter``'s bucket tables) had its root trace recorded on a key the table did
not hold yet: the trace's guard that the key is absent and its ``NEWREF`` (a new key) were the compiled path, and
every later packet, whose key the table held, left the loop there for a side trace (mixed-zipf hval: 304 instead
of 101 instructions a packet, tools/bench/loopcg.py).  ``Host:record_again`` drops the VM's traces and restarts its
hot counters after ``RECORD_AGAIN_AT`` walk positions, so the loop's root is recorded again on a packet of the
traffic as it goes on; a VM whose loops add no key keeps its traces (a flush costs a recompilation).

The truth is LuaJIT's own IR of the compiled walk loop (``jit.util.traceir`` through tools/bench/walkir.py):
deterministic, measures no time.  The capture's first 2 000 TCP segments each go to a port of their own, the rest
to 8 ports: a hook keyed by the destination port sees a new key on every packet until then, and only known keys
after.  Without the second recording the loop's root trace holds a ``NEWREF``; with it, none.  Whether the VM's
traces were flushed, and how often, is read from LuaJIT's own trace events (``LUAPROBE_JIT_TRACES``: a ``flush``
line per jit.flush).
"""
from __future__ import annotations

import glob
import os
import struct

from tests.helpers import Ipv4Pcap
from tools.bench import shapes, walkir

NEW, TOTAL = 2000, 70000   # TOTAL > host.lua RECORD_AGAIN_AT (65 536 walk positions)

BODY_TABLE = "      local k = layer:rawbytes():hval_16(2)\n      seen[k] = (seen[k] or 0) + 1"
BODIES = {
    "table": (BODY_TABLE, "local seen = {}", ""),
    "known": (BODY_TABLE, "local seen = {}\nfor p = 80, 87 do seen[p] = 0 end", ""),
    "update_counter": (f'      engine:update_counter("{shapes.GROUP}", layer:getbyte(2) * 256 + layer:getbyte(3), 0, 1)',
                       "", shapes.GROUP),
}


def _capture(path: str, new: int = NEW) -> None:
    cap = Ipv4Pcap(step_us=10)
    for i in range(TOTAL):
        port = 1024 + i if i < new else 80 + i % 8
        cap.frame(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 6,
                  struct.pack("!HHIIBBHHH", 40000 + i % 8, port, i, 0, 0x50, 0x10, 65535, 0, 0))
    cap.write(path)


def test_record_again_threshold_is_past_the_test_capture_start():
    from luaprobe.shm.luajit import new_runtime
    at = int(new_runtime().eval("require('luaprobe.engine.plugins.host').RECORD_AGAIN_AT"))
    assert NEW < at < TOTAL


def _walk_loop_ir(tmp_path, kind: str, new: int = NEW) -> list:
    capture = os.path.join(tmp_path, "ports.pcap")
    _capture(capture, new)
    plugdir = os.path.join(tmp_path, "plugins")
    os.makedirs(plugdir)
    body, prelude, group = BODIES[kind]
    with open(os.path.join(plugdir, "count.lua"), "w") as f:
        f.write(shapes._simple("count", "tcp", body, prelude=prelude, group=group))
    return walkir.walk_ir(capture, plugdir)


def test_walk_loop_recorded_again_on_a_known_key(tmp_path):
    ir = _walk_loop_ir(tmp_path, "table")
    ops = [op for op, _ in ir]
    assert "LOOP" in ops, "no compiled walk loop"
    assert "NEWREF" not in ops, "the walk loop's root trace is the new-key path of the capture's first packets"


def test_update_counter_walk_recorded_again_on_a_known_key(tmp_path):
    ir = _walk_loop_ir(tmp_path, "update_counter")
    ops = [op for op, _ in ir]
    assert "LOOP" in ops, "no compiled walk loop"
    assert "NEWREF" not in ops, "the walk loop's root trace is update_counter's new-key path"


def _flushes(prefix: str) -> int:
    logs = glob.glob(prefix + ".count.lua-*.traces.txt")
    assert len(logs) == 1, logs
    return open(logs[0]).read().splitlines().count("flush")


def test_flushed_once_when_the_loop_adds_keys(tmp_path, monkeypatch):
    prefix = str(tmp_path / "traces")
    monkeypatch.setenv("LUAPROBE_JIT_TRACES", prefix)
    _walk_loop_ir(tmp_path, "table")
    assert _flushes(prefix) == 1


def test_traces_kept_when_the_loop_adds_no_key(tmp_path, monkeypatch):
    """The table holds every port before the first packet: no loop adds a key, the traces are kept."""
    prefix = str(tmp_path / "traces")
    monkeypatch.setenv("LUAPROBE_JIT_TRACES", prefix)
    ops = [op for op, _ in _walk_loop_ir(tmp_path, "known", new=0)]
    assert "LOOP" in ops and "NEWREF" not in ops
    assert _flushes(prefix) == 0
