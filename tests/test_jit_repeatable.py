"""The per-packet path does the same work in every run once LuaJIT's own randomness is fixed (issue 10).

Issue 10 asks why the same run on the same file differs from run to run.  LuaJIT seeds a PRNG per VM from the
kernel (string hash seed, trace penalties, allocator and machine-code address hints) and indexes its hot counters by
bytecode address, so its trace trees differ between processes (docs/benchmarks.md, "What the run-to-run spread is
made of").  That part is LuaJIT's.  This test checks that nothing else is: it runs tools/bench/jitseed.py's walk (the
decoder and the real flow table over a seeded capture in one VM, then the benchmark's light plug-in shapes walked
over it batch by batch in their own VMs) twice, in fresh processes with LuaJIT's seed and the address layout fixed
(tools/bench/jitseed.py ``wrap``), and compares LuaJIT's trace log of every VM (``LUAPROBE_JIT_TRACES``: every trace
start, stop and abort in order, with where it started, its parent and exit).  The logs must be identical: a
difference means that our code made a VM take another path in one process than in the other (a ``pairs()`` over a
table keyed by addresses or by something per-process, the clock or a random source in the packet path, a Python set
iterated in the loop: Python's hash seed is left random).  Deterministic: no timing, only the order of LuaJIT's
events.  The independent truth is the requirement itself (same input, same work), not our own output.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tools.bench import corpus, jitseed, shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTURES = {
    # the corpus shapes of tools/bench/corpus.py, smaller: many new flows; encapsulated, half IPv6
    "mixed-zipf": (dict(corpus.SHAPES["mixed-zipf"], flows=3000), 30_000),
    "v6-vlan-mpls": (dict(corpus.SHAPES["vlan-mpls"], v6=0.5, flows=2000), 30_000),
}
LIGHT = ("empty", "hval", "counter", "flowstate")      #: the light-hook shapes of the corpus benchmark

needs = pytest.mark.skipif(shutil.which("setarch") is None or (shutil.which("cc") or shutil.which("gcc")) is None,
                           reason="needs setarch and a C compiler (tools/bench/jitseed.py)")


def _logs(prefix: str) -> dict:
    """{vm tag: trace log text} of one run."""
    out = {}
    for path in glob.glob(prefix + ".*.traces.txt"):
        with open(path) as f:
            out[path[len(prefix) + 1:-len(".traces.txt")]] = f.read()
    return out


def _run(cap: str, plugdir: str, prefix: str) -> dict:
    pre, env = jitseed.wrap()
    env.pop("PYTHONHASHSEED", None)                    # Python's hash seed stays random
    p = subprocess.run([*pre, sys.executable, os.path.join(REPO, "tools", "bench", "jitseed.py"), "--traces", prefix,
                        cap, plugdir], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return _logs(prefix)


@needs
@pytest.mark.parametrize("name", list(CAPTURES))
def test_same_capture_same_trace_tree(tmp_path, name):
    spec, n = CAPTURES[name]
    cap = str(tmp_path / f"{name}.pcap")
    corpus.write(cap, spec, n, 7)
    plugdir = str(tmp_path / "plugins")
    for s in LIGHT:
        shapes.write(s, plugdir)
    a = _run(cap, plugdir, str(tmp_path / "a"))
    b = _run(cap, plugdir, str(tmp_path / "b"))
    assert sorted(a) == sorted(b) == sorted(["build"] + [f"{s}.lua-0" for s in LIGHT])
    for tag in a:
        assert a[tag].count("\nstop ") + a[tag].startswith("stop ") > 0, (tag, a[tag][:400])   # traces were made
    differ = [t for t in sorted(a) if a[t] != b[t]]
    assert not differ, "the same capture built different trace trees in: %s\n--- first run\n%s\n--- second run\n%s" % (
        differ, a[differ[0]][:3000], b[differ[0]][:3000])
