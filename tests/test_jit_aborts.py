"""The per-packet path stays compiled on any traffic shape (issue 10).

LuaJIT's trace compiler reports every trace it gives up on ("trace abort"); a place that keeps
aborting is blacklisted and runs in the interpreter from then on, 10-50x slower.  This test runs
the fast path in-process with the abort counter of engine/lua/jitprof.lua attached to the
driver VM and to every plug-in VM (LUAPROBE_JIT_ABORTS), over seeded captures of different
shapes (tools/bench/corpus.py) with the benchmark's plug-in shapes (tools/bench/shapes.py)
loaded together.  Each capture is given twice: the first pass is warm-up (phase 0), the second
the steady state (phase 1), then the end of the run (phase 2: flow export, filex finish).

It fails when, in any VM, the steady state aborts more than a handful of times, or warm-up
aborts so often at one place that a per-packet path is being blacklisted (the old flow-table
update aborted 200-500 times per place with "register coalescing too complex").  Counting
aborts is deterministic in what it detects; it measures no time.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tools.bench import corpus, shapes

STEADY_MAX = 6           #: aborts in one VM after warm-up ("a handful")
WARMUP_PLACE_MAX = 25    #: aborts at one place during warm-up (a blacklisting storm is hundreds)

CAPTURES = {
    # name: (shape parameters, packets)
    "mixed-zipf": (dict(corpus.SHAPES["mixed-zipf"], flows=3000), 60_000),
    "concurrent": (dict(corpus.SHAPES["flows-100k"], flows=20_000), 60_000),
    "v6-vlan-mpls": (dict(corpus.SHAPES["vlan-mpls"], v6=0.5, flows=2000), 50_000),
    "small-few": (dict(corpus.SHAPES["small-few"]), 50_000),
}


def _capture(tmp_path, name) -> str:
    spec, n = CAPTURES[name]
    path = str(tmp_path / f"{name}.pcap")
    corpus.write_pcap(path, corpus.build(spec, n, np.random.default_rng(7)))
    return path


def _aborts(prefix) -> list[tuple]:
    """(vm tag, phase, count, code, message, place) from every VM's report."""
    rows = []
    for path in glob.glob(prefix + ".*.aborts.tsv"):
        tag = path[len(prefix) + 1:-len(".aborts.tsv")]
        with open(path) as f:
            for line in f:
                phase, count, code, msg, place = line.rstrip("\n").split("\t")
                rows.append((tag, int(phase), int(count), int(code), msg, place))
    return rows


@pytest.mark.parametrize("name", list(CAPTURES))
def test_hot_path_does_not_abort(tmp_path, monkeypatch, name):
    cap = _capture(tmp_path, name)
    plugdir = tmp_path / "plugins"
    for shape in ("empty", "hval", "counter", "flowstate", "five-layers", "filex"):
        shapes.write(shape, str(plugdir))
    prefix = str(tmp_path / "aborts")
    monkeypatch.setenv("LUAPROBE_JIT_ABORTS", prefix)
    summary = FastPath(RunConfig(plugins=[str(plugdir)], files=[cap, cap], out_dir=str(tmp_path / "out"))).run()
    assert summary["packets"] == 2 * CAPTURES[name][1]
    assert not summary["plugin_problems"] and not summary["input_errors"]
    hot = [p for p in summary["plugins"] if p["type"] in ("simplecounter", "filex_monitor")]
    assert len(hot) == 10                                    # nine simplecounters and the filex_monitor
    rows = _aborts(prefix)
    tags = {os.path.basename(p) for p in glob.glob(prefix + ".*.aborts.tsv")}
    assert len(tags) == len(summary["plugins"]) + 1, tags   # every VM and the driver wrote a report
    steady: dict = {}
    for tag, phase, count, _code, _msg, _place in rows:
        if phase == 1:
            steady[tag] = steady.get(tag, 0) + count
    bad = {t: n for t, n in steady.items() if n > STEADY_MAX}
    assert not bad, "aborts after warm-up:\n" + "\n".join(map(str, sorted(r for r in rows if r[1] == 1)))
    storms = [r for r in rows if r[1] == 0 and r[2] > WARMUP_PLACE_MAX]
    assert not storms, "repeated aborts at one place (blacklisting):\n" + "\n".join(map(str, storms))
