"""tools/loadtest smoke runs (--quick): each scenario writes its report and plots, and its invariants hold.
The full runs (docs/loadtest/) are marked soak."""
from __future__ import annotations

import json
import os
import shutil
import struct
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


def pcap_records(path) -> int:
    """Records in a classic pcap file, counted by walking its record headers here (not with luaprobe's walker)."""
    n = 0
    with open(path, "rb") as f:
        magic = f.read(24)[:4]
        order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        while len(hdr := f.read(16)) == 16:
            f.seek(struct.unpack(order + "IIII", hdr)[2], 1)
            n += 1
    return n


def generated_packets(tmp_path, spec: dict) -> int:
    """How many packets the seeded generator makes for `spec` (what --generate replays): the same options
    written to a file by `luaprobe gen`, counted by the record walk above and, where installed, by tshark."""
    path = str(tmp_path / "truth.pcap")
    args = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", path]
    for k, v in spec.items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n = pcap_records(path)
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", path, "-T", "fields", "-e", "frame.number"], capture_output=True,
                             text=True, timeout=300).stdout
        assert len(out.split()) == n
    return n


def check_identity(a):
    helpers.assert_accounting(a)


def overflow_packets(tmp_path, quick=True) -> int:
    """The overflow scenario's traffic (engine/loadtest/scenarios.py `overflow`), generated independently."""
    return generated_packets(tmp_path, {"packets": 20000 if quick else 400000, "flows": 20, "mix": "udp=100",
                                        "size-dist": "fixed:64"})


def check_overflow(res, packets):
    """Each number against an account kept apart from the engine's: the generator's packet count, the
    plug-in's own onpacket/accepted/refused counters and the per-task outcomes it saw delivered, and the
    model the tasks follow (key % 7 == 0 raises, else key % 3 == 0 returns nil, else the key comes back)."""
    a = res["async"]
    check_identity(a)
    assert res["packets"] == res["plugin_onpacket"] == packets          # what the generator makes
    assert res["plugin_accepted"] + res["plugin_refused"] == packets
    assert a["scheduled"] == packets and a["dropped"] == res["plugin_refused"] > 0
    out = {k: set(v) for k, v in res["plugin_outcomes"].items()}
    assert set(out) <= {"ok", "err", "other", "none"}, set(out)        # no "ok-garbled": results round-trip
    ok, err, other, none = (out.get(k, set()) for k in ("ok", "err", "other", "none"))
    assert len(ok | err | other | none) == res["plugin_accepted"]
    assert len(ok) == a["ok"] and len(err) == a["error"] and len(other) == a["timeout"]
    assert len(none) == a["nil_result"] and a["pending"] == 0             # nil results have no callback
    assert all(k % 7 and k % 3 for k in ok), sorted(k for k in ok if not (k % 7 and k % 3))[:5]
    assert all(k % 7 == 0 for k in err)
    assert all(k % 3 == 0 and k % 7 for k in none), sorted(k for k in none if not (k % 3 == 0 and k % 7))[:5]
    assert not res["snapshots"]["violations"] and res["snapshots"]["checked"] > 0


@pytest.mark.timeout(300)
def test_overflow_quick(tmp_path):
    res, report = run_scenario(tmp_path, "overflow")
    check_overflow(res, overflow_packets(tmp_path))
    assert "-> **holds**" in report


def check_scaling(res, tasks):
    """Worker scaling, counted by the tasks themselves: each onexecute returns the pid of the process that
    ran it, so the number of distinct worker processes is exact (no sampling)."""
    assert [p["workers"] for p in res["points"]] == [1, 2, 3, 4]
    for p in res["points"]:
        assert p["ok"] == tasks and p["echo_mismatches"] == 0
        assert p["task_data"] == list(range(1, tasks + 1))                # every task's result exactly once
        pids = p["task_pids"]
        assert len(pids) == p["workers"], pids                             # n workers: n processes ran tasks
        assert str(p["fastpath_pid"]) not in pids and sum(pids.values()) == tasks


@pytest.mark.timeout(300)
def test_worker_scaling_quick(tmp_path):
    res, report = run_scenario(tmp_path, "worker-scaling")
    check_scaling(res, 80)
    assert "scaling.png" in report


def check_latency(res):
    """The engine's schedule -> onresult percentiles against two clocks read outside the engine, per task:
    onexecute's own run time <= the engine's latency <= the plug-in's schedule -> onresult time.  The
    engine reports a histogram bucket's upper edge (4 buckets per octave), so at most 2^(1/4) above."""
    for p in res["points"]:
        assert p["samples"] == p["ok"] == p["plugin_results"] == p["scheduled"] + 1   # + the warm-up task
        for q in ("p50", "p99"):
            eng, lo, hi = p[f"{q}_ms"], p[f"onexecute_{q}_ms"], p[f"plugin_{q}_ms"]
            assert 0 < lo <= eng <= hi * 2 ** 0.25 + 0.001, (q, lo, eng, hi)


@pytest.mark.timeout(300)
def test_latency_quick(tmp_path):
    res, report = run_scenario(tmp_path, "latency")
    check_latency(res)


def check_inline_vs_async(res):
    """Every frame the sender sent is one the kernel received on the capture end (sysfs rx_packets), and each
    of those was either processed or counted as a drop."""
    for p in res["points"]:
        if p["async"]:
            check_identity({k: v for k, v in p["async"].items() if not k.startswith("latency")})
        assert p["sent"] == p["veth_rx"] > 0, p
        assert p["processed"] + p["ring_drops"] + p["kernel_drops"] == p["veth_rx"], p


@pytest.mark.root
@needs_root
@pytest.mark.timeout(600)
def test_inline_vs_async_quick(tmp_path):
    for attempt in range(TELL_APART_RUNS):     # a run that cannot tell a stall apart says nothing: run again
        res, report = run_scenario(tmp_path / f"run{attempt}", "inline-vs-async")
        check_inline_vs_async(res)
        if stall_told_apart(res):
            break
    check_async_does_not_stall(res)


#: the least share of what it could process (:func:`rate_share`) ASYNC must process at every offered rate, and the
#: most INLINE (the stall itself) may at the highest: below it, a stall is told apart on this machine in this run.
#: Measured with two busy-loop burners and the other jobs of a shared 2-core machine (load 5-10), 10 runs: ASYNC
#: 0.82 / 0.985 / 1.40 (min / median / max) at 100 000 packets/s, INLINE 0.20 / 0.21 / 0.33; T.async made to
#: stall the packet path (a 50 ms wait added to Async:enqueue) fell to INLINE's level, 0.20 / 0.23 / 0.25.
ASYNC_SHARE_MIN, STALL_SHARE_MAX = 0.6, 0.5
#: runs of the scenario at most until one tells a stall apart (INLINE below STALL_SHARE_MAX at the highest rate).  CI
#: of session 21 (load 12: the suite beside two helpers' callgrind and daemon runs) got INLINE at 0.78: the baseline's
#: own fast path managed ~26 000 packets/s there, so INLINE's stall (capped at 20 000) was not below half of it.  Such
#: a run is inconclusive, not a failure of T.async; a machine that never tells them apart still fails the test.
TELL_APART_RUNS = 3


def rate_share(pts, kind, rate) -> float:
    """The fast path's packet rate with plug-in ``kind`` (packets handed to the plug-ins / the sender's send time)
    over what it could have been in that run: the rate the sender managed for it, or the baseline's fast-path rate
    at the same offered rate if that is lower (the machine's capacity then).  On a loaded machine the sender's own
    rate varies from run to run (55 000 to 100 000 packets/s when 100 000 are offered), and the drops with it,
    while a stall of 50 ms per 1000 packets caps the rate at 20 000 whatever the load."""
    p, base = pts[(kind, rate)], pts[("baseline", rate)]
    return p["fastpath_pps"] / min(p["sent_pps"], base["fastpath_pps"])


def stall_told_apart(res) -> bool:
    """True when this run shows INLINE's stall at its highest offered rate (the run can tell a stall apart)."""
    pts = {(p["plugin"], p["offered_pps"]): p for p in res["points"]}
    return rate_share(pts, "inline", res["rates"][-1]) < STALL_SHARE_MAX


def check_async_does_not_stall(res):
    """The promise (docs/loadtest): slow work in T.async never stalls the packet path.  The baseline is the ASYNC
    plug-in's own hook without T.async (scenarios.py _live_plugins), so only what T.async adds is compared.  The old
    test (a hookless baseline; ASYNC's drops at most 2 points above its) failed 3 runs in 5 under the load above
    (ASYNC 5.3-11.7 % against 1.2-4.4 %): the hook's own CPU was read as T.async stalling; with the fair baseline
    that drop rule still failed 4 runs in 10, the sender's rate moving the drops.  INLINE must show a stall at the
    highest offered rate, else this run could not tell one apart."""
    pts = {(p["plugin"], p["offered_pps"]): p for p in res["points"]}
    hi = res["rates"][-1]
    assert rate_share(pts, "inline", hi) < STALL_SHARE_MAX, (pts[("baseline", hi)], pts[("inline", hi)])
    for rate in res["rates"]:
        assert rate_share(pts, "async", rate) >= ASYNC_SHARE_MIN, (pts[("baseline", rate)], pts[("async", rate)])


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["overflow", "worker-scaling", "latency",
                                  pytest.param("inline-vs-async", marks=[pytest.mark.root, needs_root])])
def test_full_scenarios(tmp_path, name):
    res, _ = run_scenario(tmp_path, name, quick=False, timeout=3000)
    if name == "inline-vs-async":
        check_inline_vs_async(res)
        check_async_does_not_stall(res)
        assert res["async_no_drops_where_baseline_clean"] and res["async_vs_baseline_min_pct"] >= 98
    elif name == "overflow":
        check_overflow(res, overflow_packets(tmp_path, quick=False))
    elif name == "worker-scaling":
        check_scaling(res, 1000)
    else:
        check_latency(res)
