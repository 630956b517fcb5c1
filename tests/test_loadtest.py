"""tools/loadtest smoke runs (--quick): each scenario writes its report and plots, and its invariants hold.
The full runs (docs/loadtest/) are marked soak."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

pytest.importorskip("matplotlib", reason="the load-test harness plots with matplotlib (pip install .[loadtest])")

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip"),
                                reason="inline-vs-async needs root and iproute2 (netns, veth, AF_PACKET)")


def run_scenario(tmp_path, name, quick=True, timeout=600):
    out = tmp_path / "reports"
    args = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "loadtest", name, "--out", str(out)] + (["--quick"] if quick else [])
    r = subprocess.run(args, cwd=helpers.REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    d = out / name
    report = (d / "report.md").read_text()
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert pngs and all((d / p).stat().st_size > 5000 for p in pngs), pngs
    for p in pngs:
        assert f"]({p})" in report, p                       # every plot is in the report
    for word in ("CPU", "RAM", "kernel", "Python", "RSS"):
        assert word in report, word
    return json.loads((d / "results.json").read_text()), report


def check_identity(a):
    helpers.assert_accounting(a)


@pytest.mark.timeout(300)
def test_overflow_quick(tmp_path):
    res, report = run_scenario(tmp_path, "overflow")
    a = res["async"]
    check_identity(a)
    assert a["dropped"] > 0 and a["dropped"] == res["plugin_refused"]
    assert a["scheduled"] == res["plugin_accepted"] + res["plugin_refused"] == res["packets"]
    assert not res["snapshots"]["violations"]
    assert "-> **holds**" in report and f"{a['dropped']:,}" in report


@pytest.mark.timeout(300)
def test_worker_scaling_quick(tmp_path):
    res, report = run_scenario(tmp_path, "worker-scaling")
    assert [p["workers"] for p in res["points"]] == [1, 2, 3, 4]
    assert all(p["ok"] == res["tasks"] and p["tasks_per_s"] > 0 for p in res["points"])
    assert "scaling.png" in report
    # Not asserted: how many worker processes the psutil sampler saw. In --quick mode a point lasts a fraction of
    # a second and a worker can start and finish between two samples (failed once in a fresh-clone CI run).


@pytest.mark.timeout(300)
def test_latency_quick(tmp_path):
    res, report = run_scenario(tmp_path, "latency")
    for p in res["points"]:
        assert p["samples"] > 0 and 0 < p["p50_ms"] <= p["p99_ms"]
        assert f"| {p['p50_ms']} | {p['p99_ms']} |" in report


@pytest.mark.root
@needs_root
@pytest.mark.timeout(600)
def test_inline_vs_async_quick(tmp_path):
    res, report = run_scenario(tmp_path, "inline-vs-async")
    pts = {(p["plugin"], p["offered_pps"]): p for p in res["points"]}
    hi = res["rates"][-1]
    for p in res["points"]:
        if p["async"]:
            check_identity({k: v for k, v in p["async"].items() if not k.startswith("latency")})
        assert f"**{p['drop_pct']}**" in report              # the measured numbers are in the report
    # The promise (docs/loadtest): slow work in T.async never stalls the packet path, so async loses no more
    # than the no-script baseline measured in the same run on the same machine; one 50 ms stall per 1000
    # packets would cost tens of percent.  2 points absorb the noise of two shared cores.
    for rate in res["rates"]:
        base, asy = pts[("baseline", rate)], pts[("async", rate)]
        assert asy["drop_pct"] <= base["drop_pct"] + 2.0, (base, asy)
    # 100k packets/s against a plug-in that can do ~20k: inline must drop (1 MiB packet ring)
    assert pts[("inline", hi)]["drop_pct"] > pts[("baseline", hi)]["drop_pct"] + 10, pts[("inline", hi)]


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["overflow", "worker-scaling", "latency",
                                  pytest.param("inline-vs-async", marks=[pytest.mark.root, needs_root])])
def test_full_scenarios(tmp_path, name):
    res, _ = run_scenario(tmp_path, name, quick=False, timeout=3000)
    if name == "inline-vs-async":
        assert res["async_no_drops_where_baseline_clean"] and res["async_vs_baseline_min_pct"] >= 98
