"""The four load-test scenarios.  Each returns its result dict and writes report.md + PNGs into `out`."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

from luaprobe.engine.loadtest import common as C
from luaprobe.engine.loadtest.common import G_ETH, LUA_CLOCK

MIX = "tcp=40,udp=40,icmp=10,dns=10"


def _header(title: str, m: dict, quick: bool) -> str:
    return f"# Load test: {title}\n\n{'**Quick mode** (smoke run, a few seconds).' if quick else 'Full run.'} " \
           f"Reproduce: `luaprobe loadtest {title}{' --quick' if quick else ''}`.\n\n{C.machine_md(m)}\n"


def _bound(ifname: str) -> bool:
    idx = int(open(f"/sys/class/net/{ifname}/ifindex").read())
    with open("/proc/net/packet") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(len(r) > 4 and int(r[4]) == idx and r[3] == "0003" for r in rows)


# ------------------------------------------------------------------------------------------ inline-vs-async

#: the ASYNC plug-in's hook: every 1000th packet its task (the same table, the same closure) is given to T.async
#: ({task} = "T.async:schedule") or only made ({task} = "made = ", the baseline)
_HOOK = '''
local n, results, made = 0, 0, nil
local function wait50(d)
  local ffi = require "ffi"
  pcall(ffi.cdef, "int poll(void *, unsigned long, int);")
  ffi.C.poll(nil, 0, 50)
  return d
end
TrisulPlugin = {{ id = {{ name = "{name}" }},{extra}
  simplecounter = {{ protocol_guid = "{guid}",
    onpacket = function(engine, layer)
      n = n + 1
      if n % 1000 == 0 then
        {task}{{ data = tostring(n), onexecute = wait50,
                 onresult = function(engine, data, result) results = results + 1 end }}
      end
    end }} }}
'''


def _live_plugins(work: str, workers: int) -> dict:
    """The three plug-ins of inline-vs-async.  The baseline is the ASYNC plug-in's own hook, the same work per packet
    (the count, and every 1000th packet the same task table and closure made) without T.async: so the comparison
    charges T.async only with what T.async adds, not with the cost of having a per-packet hook at all (with a
    hookless baseline, on a loaded machine, the hook's CPU was read as T.async stalling the packet path)."""
    d = {k: os.path.join(work, "plugins-" + k) for k in ("baseline", "inline", "async")}
    C.write_plugin(d["baseline"], "baseline.lua", _HOOK.format(
        name="baseline: the ASYNC hook's work per packet, without T.async", extra="", guid=G_ETH, task="made = "))
    C.write_plugin(d["inline"], "inline.lua", LUA_CLOCK + f'''
local n = 0
TrisulPlugin = {{ id = {{ name = "INLINE: 50 ms blocking wait every 1000 packets, in the hook" }},
  simplecounter = {{ protocol_guid = "{G_ETH}",
    onpacket = function(engine, layer)
      n = n + 1
      if n % 1000 == 0 then ffi.C.poll(nil, 0, 50) end
    end }} }}
''')
    extra = f'''
  request_async_workers = {workers},
  onload = function()          -- start the workers before the traffic does
    for i = 1, {workers} do T.async:schedule{{ data = "warm-up", onexecute = function(d) return nil end }} end
  end,'''
    C.write_plugin(d["async"], "async.lua", _HOOK.format(name="ASYNC: the same 50 ms wait in T.async onexecute",
                                                         extra=extra, guid=G_ETH, task="T.async:schedule"))
    return d


def inline_vs_async(out: str, work: str, quick: bool) -> dict:
    from luaprobe.engine.loadtest.netns import VethPair, available
    why = available()
    if why:
        raise RuntimeError(f"inline-vs-async {why}")
    rates = [10000, 100000] if quick else [10000, 25000, 50000, 100000, 200000]
    dur = 2.0 if quick else 5.0
    ring = 1 << 20
    workers = 8
    plug = _live_plugins(work, workers)
    m = C.machine_info()
    res = {"rates": rates, "duration_s": dur, "packet_ring_size": ring, "workers": workers, "points": []}
    proc_rows = []
    with VethPair("lt") as v:
        for rate in rates:
            for kind in ("baseline", "inline", "async"):
                tag = f"{kind}-{rate}"
                cfg = {"plugins": [plug[kind]], "out_dir": os.path.join(work, tag), "interface": v.here,
                       "packet_ring_size": ring, "async": {"drain_deadline": 5.0}}
                proc, sp = C.start_run(work, tag, cfg)
                sampler = C.Sampler().start()
                sampler.add_root(proc.pid)
                sender = None
                try:
                    t_end = time.monotonic() + 60
                    while not _bound(v.here):
                        if proc.poll() is not None or time.monotonic() > t_end:
                            raise RuntimeError(f"{tag}: capture did not start: {proc.communicate()[1][-2000:]}")
                        time.sleep(0.05)
                    # the run binds its capture once its plug-ins are loaded and their workers run their task
                    # loops (engine/fastpath/run.py _wait_workers); a short settle for the capture process
                    time.sleep(0.3)
                    rx0 = v.rx_packets()                   # the kernel's count on the capture end
                    sender = subprocess.Popen(v.netns_exec(sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--interface",
                                                           v.there, "--rate", str(rate), "--duration", str(dur),
                                                           "--mix", MIX, "--flows", "200", "--json"),
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    sampler.add(sender.pid, "sender")
                    so, se = sender.communicate(timeout=dur + 120)
                    if sender.returncode != 0:
                        raise RuntimeError(f"{tag}: sender failed: {se[-2000:]}")
                    snd = json.loads(so)
                    time.sleep(1.0)
                    rx1 = v.rx_packets()
                    s = C.finish_run(proc, sp, signal.SIGINT)
                finally:
                    sampler.stop()
                    C.stop_quietly(proc)
                    if sender is not None and sender.poll() is None:
                        sender.kill()
                        sender.communicate()
                ps = sampler.summary()
                sent = snd["sent"]
                drops = s["drops"]["capture"] + s["drops"]["kernel"]
                a = C.async_of(s, "async.lua") if kind == "async" else {}
                pt = {"plugin": kind, "offered_pps": rate, "sent": sent, "veth_rx": rx1 - rx0,
                      "send_s": round(snd["elapsed_s"], 3),
                      "sent_pps": round(snd["pps"]), "processed": s["packets"], "ring_drops": s["drops"]["capture"],
                      "kernel_drops": s["drops"]["kernel"], "kernel_packets": s.get("kernel_packets", 0),
                      "drop_pct": round(100.0 * drops / sent, 2) if sent else 0.0,
                      "fastpath_pps": round(s["packets"] / snd["elapsed_s"]) if snd["elapsed_s"] else 0,
                      "async": {k: a.get(k) for k in ("scheduled", *C.IDENTITY_TERMS, "latency_p50_ns",
                                                      "latency_p99_ns")} if a else None,
                      "procs": ps}
                if a:
                    assert C.identity_holds(a), a
                res["points"].append(pt)
                proc_rows.append((tag, ps))
                print(f"  {tag}: sent {sent} ({pt['sent_pps']} pps) processed {pt['processed']} "
                      f"drops {drops} ({pt['drop_pct']} %) fast path {pt['fastpath_pps']} pps", flush=True)
    P = {(p["plugin"], p["offered_pps"]): p for p in res["points"]}
    base = {r: P[("baseline", r)]["fastpath_pps"] for r in rates}
    res["async_no_drops"] = all(P[("async", r)]["drop_pct"] == 0 for r in rates)
    res["async_vs_baseline_min_pct"] = round(min(100.0 * P[("async", r)]["fastpath_pps"] / base[r] for r in rates), 2)
    res["inline_drop_pct_at_max"] = P[("inline", rates[-1])]["drop_pct"]
    # plots
    p = C.plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(12, 4.5))
    for kind, style in (("baseline", "o-"), ("inline", "s-"), ("async", "^-")):
        a1.plot(rates, [P[(kind, r)]["drop_pct"] for r in rates], style, label=kind)
        a2.plot(rates, [P[(kind, r)]["fastpath_pps"] for r in rates], style, label=kind)
    a2.plot(rates, rates, "k:", label="offered")
    a1.set_xscale("log"); a2.set_xscale("log"); a2.set_yscale("log")
    a1.set_xlabel("offered rate (packets/s)"); a2.set_xlabel("offered rate (packets/s)")
    a1.set_ylabel("drops % of sent (ring-full + kernel)"); a2.set_ylabel("fast-path packets/s")
    for a in (a1, a2):
        a.grid(alpha=0.3); a.legend()
    fig.suptitle(f"inline vs async: 50 ms blocking wait every 1000 packets; packet ring {ring >> 20} MiB")
    fig.tight_layout(); fig.savefig(os.path.join(out, "drops_and_rate.png"), dpi=110); p.close(fig)
    C.plot_procs(os.path.join(out, "processes.png"), proc_rows, "per-process CPU and RSS (psutil, sampled 4/s)")
    rows = "\n".join(f"| {p['offered_pps']:,} | {p['plugin']} | {p['sent']:,} | {p['sent_pps']:,} | {p['processed']:,} | "
                     f"{p['ring_drops']:,} | {p['kernel_drops']:,} | **{p['drop_pct']}** | {p['fastpath_pps']:,} | "
                     + (f"{p['async']['scheduled']} / {p['async']['ok']} / {p['async']['timeout']} / "
                        f"{p['async']['pending']} |" if p["async"] else "- |") for p in res["points"])
    clean_rates = [r for r in rates if P[("baseline", r)]["drop_pct"] == 0]
    clean = ("none at every offered rate" if res["async_no_drops"] else
             "none at every rate where the baseline (the same hook without T.async) has none" if all(
                 P[("async", r)]["drop_pct"] == 0 for r in clean_rates) else "SOME (see the table)")
    limit = "".join(f"; at {r:,} packets/s the baseline itself drops {P[('baseline', r)]['drop_pct']} % "
                    f"(this machine's limit with a {ring >> 20} MiB ring) and ASYNC {P[('async', r)]['drop_pct']} %"
                    for r in rates if r not in clean_rates)
    res["async_no_drops_where_baseline_clean"] = all(P[("async", r)]["drop_pct"] == 0 for r in clean_rates)
    ratio = " / ".join(f"{r:,}: {100.0 * P[('async', r)]['fastpath_pps'] / base[r]:.1f} %" for r in rates)
    md = _header("inline-vs-async", m, quick) + f"""
## Setup
* Live traffic: `luaprobe gen --interface` (paced AF_PACKET sender, {MIX}, 200 flows, IMIX sizes) inside a
  private network namespace, onto one end of a veth pair; `luaprobe run --interface` captures on the other
  end. The harness creates and always removes the namespace and the pair; nothing leaves this machine.
* Packet ring `RunConfig.packet_ring_size` = {ring >> 20} MiB (default 32 MiB), so a blocked fast path
  overflows it the way a real one would. {dur:g} s of traffic per point.
* Three plug-ins, each in its own run on the same offered traffic:
  * **baseline**: the ASYNC plug-in's hook without T.async: the same count per packet and, every 1000
    packets, the same task table and closure made but not scheduled;
  * **INLINE**: a simplecounter on Ethernet whose `onpacket` blocks for 50 ms (ffi `poll(NULL, 0, 50)`)
    every 1000 packets;
  * **ASYNC**: the same 50 ms wait inside `T.async:schedule` `onexecute` every 1000 packets
    ({workers} workers, started by warm-up tasks in `onload`).
* drop % = (ring-full drops + kernel drops) / packets sent. fast-path packets/s = packets the fast path
  handed to the plug-ins / the sender's send time.

![drops and rate](drops_and_rate.png)

## Result
* ASYNC drops: **{clean}**{limit}. Its fast-path rate as a share of the
  baseline's: {ratio} (lowest **{res['async_vs_baseline_min_pct']} %**).
* INLINE at {rates[-1]:,} packets/s offered drops **{res['inline_drop_pct_at_max']} %**: each 50 ms wait
  stalls the fast path, the 1 MiB ring fills and the capture drops (it never waits for the fast path).

| offered pps | plug-in | sent | sent pps | processed | ring-full drops | kernel drops | drop % | fast-path pps | async scheduled / ok / timeout / pending |
|---|---|---|---|---|---|---|---|---|---|
{rows}

For ASYNC the accounting identity `scheduled == ok + nil_result + error + timeout + dropped + pending` was
checked for every run.

## Processes (psutil, CPU % of one core, sampled every 0.25 s)
![processes](processes.png)

{C.proc_table(proc_rows)}
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    return res


# ------------------------------------------------------------------------------------------ helpers for generator runs

def _gen_run(work, tag, plugdir, spec, async_cfg, stats_file=None, watch=None):
    cfg = {"plugins": [plugdir], "out_dir": os.path.join(work, tag), "generate": spec, "async": async_cfg}
    if stats_file:
        cfg.update(stats_file=stats_file, stats_interval=0.1)
    proc, sp = C.start_run(work, tag, cfg)
    sampler = C.Sampler().start()
    sampler.add_root(proc.pid)
    try:
        while proc.poll() is None:
            if watch:
                watch()
            time.sleep(0.05)
        s = C.finish_run(proc, sp)
    finally:
        sampler.stop()
        C.stop_quietly(proc)
    return s, sampler.summary(), proc.pid


def _calibrate(body: str, target_ms: float) -> int:
    """Iterations of `body` (a Lua loop over i) taking about target_ms in this LuaJIT."""
    import lupa.luajit21 as lj
    f = lj.LuaRuntime().eval(f"function(n) local x = 0 for i = 1, n do {body} end return x end")
    n = 200000
    while True:
        t = time.perf_counter(); f(n); el = time.perf_counter() - t
        if el > 0.05:
            return max(1000, int(n * target_ms / 1000 / el))
        n *= 4


# ------------------------------------------------------------------------------------------ worker-scaling

def worker_scaling(out: str, work: str, quick: bool) -> dict:
    tasks = 80 if quick else 1000
    task_ms = 5.0 if quick else 10.0
    body = "x = (x * 1103515245 + i) % 2147483648"
    iters = _calibrate(body, task_ms)
    m = C.machine_info()
    res = {"tasks": tasks, "task_ms": task_ms, "iterations": iters, "points": []}
    rows = []
    for w in (1, 2, 3, 4):
        d = os.path.join(work, f"plugins-scaling-{w}")
        tf = os.path.join(work, f"scaling-{w}.times")
        C.write_plugin(d, "scaling.lua", LUA_CLOCK + f'''
local times, ran = {{}}, {{}}
local function work(d)            -- returns "<data> <pid of the process that ran it>"
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void);")
  local x = 0 for i = 1, {iters} do {body} end
  return d .. " " .. ffi.C.getpid() .. " " .. x
end
TrisulPlugin = {{ id = {{ name = "CPU-bound onexecute" }},
  onload = function()
    for i = 1, {tasks} do
      T.async:schedule{{ data = tostring(i), onexecute = work,
                         onresult = function(e, d, r)
                           times[#times + 1] = string.format("%.0f", now_ns())
                           ran[#ran + 1] = d .. " " .. r
                         end }}
    end
  end,
  onunload = function()
    local f = io.open("{tf}", "w"); f:write(table.concat(times, "\\n")); f:close()
    f = io.open("{tf}.ran", "w"); f:write(table.concat(ran, "\\n")); f:close()
  end,
  simplecounter = {{ protocol_guid = "{G_ETH}", onpacket = function(engine, layer) end }} }}
''')
        s, ps, fp_pid = _gen_run(work, f"scaling-{w}", d, "packets=2000,flows=10,mix=udp=100",
                                 {"workers": w, "drain_deadline": 600.0})
        a = C.async_of(s, "scaling.lua")
        assert C.identity_holds(a), a
        times = [float(x) for x in open(tf).read().split()]
        # what the tasks themselves reported: (scheduled data, data echoed by onexecute, pid that ran it)
        ran = [ln.split()[:3] for ln in open(tf + ".ran").read().splitlines() if ln.strip()]
        pids: dict[str, int] = {}
        for _, _, pid in ran:
            pids[pid] = pids.get(pid, 0) + 1
        k1, k2 = len(times) // 10, len(times) - 1
        rate = (k2 - k1) / ((times[k2] - times[k1]) / 1e9) if k2 > k1 else 0.0
        pt = {"workers": w, "ok": a["ok"], "tasks_per_s": round(rate, 1), "fastpath_pid": fp_pid,
              "task_pids": pids, "task_data": sorted(int(x) for x, _, _ in ran),
              "echo_mismatches": sum(1 for x, y, _ in ran if x != y),
              "worker_cpu_mean": ps.get("worker", {}).get("cpu_mean", 0), "procs": ps}
        res["points"].append(pt)
        rows.append((f"{w} worker{'s' * (w > 1)}", ps))
        print(f"  workers {w}: {rate:.1f} tasks/s, ok {a['ok']}/{tasks}, {len(pids)} worker pids ran tasks, "
              f"worker CPU {pt['worker_cpu_mean']} %",
              flush=True)
        assert a["ok"] == tasks, a
    one = res["points"][0]["tasks_per_s"]
    p = C.plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(11, 4.2))
    ws = [x["workers"] for x in res["points"]]
    a1.plot(ws, [x["tasks_per_s"] for x in res["points"]], "o-", label="measured")
    a1.plot(ws, [one * w for w in ws], "k:", label="linear from 1 worker")
    a2.plot(ws, [x["worker_cpu_mean"] for x in res["points"]], "s-", label="workers (sum)")
    a2.plot(ws, [x["procs"].get("fastpath", {}).get("cpu_mean", 0) for x in res["points"]], "^-", label="fast path")
    a1.set_ylabel("tasks/s"); a2.set_ylabel("mean CPU % (100 = one core)")
    for a in (a1, a2):
        a.set_xlabel("workers"); a.set_xticks(ws); a.grid(alpha=0.3); a.legend()
    fig.suptitle(f"worker scaling: {tasks} CPU-bound tasks of ~{task_ms:g} ms")
    fig.tight_layout(); fig.savefig(os.path.join(out, "scaling.png"), dpi=110); p.close(fig)
    C.plot_procs(os.path.join(out, "processes.png"), rows, "per-process CPU and RSS")
    table = "\n".join(f"| {x['workers']} | {x['tasks_per_s']} | {x['tasks_per_s'] / one:.2f}x | "
                      f"{len(x['task_pids'])} ({' / '.join(str(n) for n in sorted(x['task_pids'].values()))}) | "
                      f"{x['worker_cpu_mean']} |" for x in res["points"])
    md = _header("worker-scaling", m, quick) + f"""
## Setup
`onload` schedules {tasks} tasks whose `onexecute` is a LuaJIT loop of {iters:,} iterations (~{task_ms:g} ms
on this machine, calibrated at start); `--workers` 1..4; traffic: `--generate packets=2000,...` (the
tasks, not the packets, are the load). tasks/s is measured from the `onresult` times (from the 10th
percentile result to the last, so worker start-up is excluded). The machine has
{m['usable_cpus']} usable cores, shared with the fast path (which polls the return rings) and the other
workers, so scaling beyond {m['usable_cpus']} workers is not expected.

![scaling](scaling.png)

| workers | tasks/s | vs 1 worker | processes that ran tasks (tasks each) | workers' CPU % (sum, mean over the run) |
|---|---|---|---|---|
{table}

Every run: all {tasks} tasks `ok`, accounting identity holds. "Processes that ran tasks" counts the distinct
pids the tasks themselves returned (`getpid()` inside `onexecute`), so it does not depend on sampling.

## Processes (psutil)
![processes](processes.png)

{C.proc_table(rows)}
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    return res


# ------------------------------------------------------------------------------------------ overflow

def overflow(out: str, work: str, quick: bool) -> dict:
    npk = 20000 if quick else 400000
    limit = 300 if quick else 1000
    m = C.machine_info()
    d = os.path.join(work, "plugins-overflow")
    of = os.path.join(work, "overflow.out")
    C.write_plugin(d, "overflow.lua", LUA_CLOCK + f'''
local n, accepted, refused, t_first, t_last = 0, 0, 0, nil, nil
local outcome = {{}}       -- task key -> what this plug-in saw delivered: "ok", "err" (the raised error), "other"
local function task(d)
  local ffi = require "ffi"
  pcall(ffi.cdef, "int poll(void *, unsigned long, int);")
  ffi.C.poll(nil, 0, 2)
  local k = tonumber(d)
  if k % 7 == 0 then error("task " .. d .. " fails on purpose") end
  if k % 3 == 0 then return nil end
  return d
end
TrisulPlugin = {{ id = {{ name = "one 2 ms task per packet, 1 worker" }},
  onunload = function()
    local f = io.open("{of}", "w")
    f:write(string.format("%d %d %.0f %.0f %d", accepted, refused, t_first or 0, t_last or 0, n)); f:close()
    f = io.open("{of}.keys", "w")
    for k, o in pairs(outcome) do f:write(k, " ", o, "\\n") end
    f:close()
  end,
  simplecounter = {{ protocol_guid = "{G_ETH}",
    onpacket = function(engine, layer)
      n = n + 1
      local now = now_ns()
      t_first = t_first or now
      t_last = now
      local ok = T.async:schedule{{ data = tostring(n), onexecute = task,
        onresult = function(e, d, r) outcome[tonumber(d)] = r == d and "ok" or "ok-garbled" end,
        onerror = function(e, d, err)
          outcome[tonumber(d)] = tostring(err):find("fails on purpose", 1, true) and "err" or "other"
        end }}
      if ok then accepted = accepted + 1; outcome[n] = outcome[n] or "none" else refused = refused + 1 end
    end }} }}
''')
    stats_file = os.path.join(work, "overflow.stats.json")
    snaps = {"checked": 0, "violations": [], "max_pending": 0, "max_dropped": 0, "times": set()}

    def watch():
        try:
            snap = C.read_json(stats_file)
        except (OSError, ValueError):
            return
        if snap.get("time") in snaps["times"]:
            return
        snaps["times"].add(snap.get("time"))
        for pl in snap.get("plugins", []):
            a = pl.get("async") or {}
            if os.path.basename(pl["plugin"]) == "overflow.lua" and "scheduled" in a:
                snaps["checked"] += 1
                snaps["max_pending"] = max(snaps["max_pending"], a["pending"])
                snaps["max_dropped"] = max(snaps["max_dropped"], a["dropped"])
                if not C.identity_holds(a):
                    snaps["violations"].append(a)
    s, ps, _ = _gen_run(work, "overflow", d, f"packets={npk},flows=20,mix=udp=100,size-dist=fixed:64",
                     {"workers": 1, "overflow_limit": limit, "ring_size": 1 << 16, "drain_deadline": 1.0},
                     stats_file=stats_file, watch=watch)
    a = C.async_of(s, "overflow.lua")
    snaps.pop("times")
    accepted, refused, t1, t2, onpacket = (float(x) for x in open(of).read().split())
    # what the plug-in saw, per accepted task key (an account kept apart from the engine's counters)
    seen: dict[str, list[int]] = {}
    for ln in open(of + ".keys").read().splitlines():
        k, o = ln.split()
        seen.setdefault(o, []).append(int(k))
    offered = a["scheduled"] / ((t2 - t1) / 1e9) if t2 > t1 else 0.0
    res = {"packets": s["packets"], "overflow_limit": limit, "async": a, "plugin_accepted": int(accepted),
           "plugin_refused": int(refused), "plugin_onpacket": int(onpacket),
           "plugin_outcomes": {o: sorted(ks) for o, ks in seen.items()}, "generated": npk,
           "offered_tasks_per_s": round(offered), "snapshots": snaps,
           "identity": C.identity_holds(a), "procs": ps}
    # the invariants the scenario exists for
    assert C.identity_holds(a), a
    assert a["dropped"] > 0 and a["dropped"] == int(refused), (a, refused)
    assert a["scheduled"] == int(accepted + refused) == s["packets"], (a, accepted, refused, s["packets"])
    assert not snaps["violations"], snaps["violations"][:3]
    terms = list(C.IDENTITY_TERMS)
    p = C.plt()
    fig, ax = p.subplots(figsize=(8, 4))
    vals = [a[t] for t in terms]
    ax.bar(terms, vals, color=["tab:green", "tab:olive", "tab:red", "tab:orange", "tab:gray", "tab:blue"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("symlog")
    ax.set_title(f"overflow: scheduled {a['scheduled']:,} = " + " + ".join(f"{v:,}" for v in vals))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(); fig.savefig(os.path.join(out, "accounting.png"), dpi=110); p.close(fig)
    C.plot_procs(os.path.join(out, "processes.png"), [("overflow", ps)], "per-process CPU and RSS")
    md = _header("overflow", m, quick) + f"""
## Setup
A simplecounter schedules one task for every packet of `--generate packets={npk},...` (the fast path runs
at full speed, ~{offered:,.0f} tasks/s offered); each `onexecute` waits 2 ms, so the single worker
completes at most ~500 tasks/s. Every 7th task raises an error, every 3rd returns nil.
Async ring 64 KiB (`--ring-size 65536`), overflow queue limit {limit}, drain deadline 1 s.

## Result
| scheduled | ok | nil_result | error | timeout | dropped | pending |
|---|---|---|---|---|---|---|
| {a['scheduled']:,} | {a['ok']:,} | {a['nil_result']:,} | {a['error']:,} | {a['timeout']:,} | {a['dropped']:,} | {a['pending']:,} |

* **Accounting identity** `scheduled == ok + nil_result + error + timeout + dropped + pending`:
  {a['scheduled']:,} == {' + '.join(f"{a[t]:,}" for t in terms)} -> **{'holds' if res['identity'] else 'VIOLATED'}**
  (asserted by the harness), and it held in all {snaps['checked']} distinct live snapshots
  (`--stats-json`-style snapshots written every 0.1 s while packets flowed; largest pending
  {snaps['max_pending']:,}, largest dropped {snaps['max_dropped']:,}).
* **Drops are counted exactly**: `T.async:schedule` returned `false` {int(refused):,} times in the
  plug-in, and the engine's `dropped` is {a['dropped']:,}. Accepted + refused = {int(accepted + refused):,} =
  packets = scheduled.
* Tasks still queued at the 1 s drain deadline are counted as `timeout` ({a['timeout']:,}).

![accounting](accounting.png)

## Processes (psutil)
![processes](processes.png)

{C.proc_table([("overflow", ps)])}
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    return res


# ------------------------------------------------------------------------------------------ latency

def _rank(xs: list, p: float) -> float:
    """The engine's percentile rule (engine/plugins/async.lua snapshot): the smallest sample with at least
    p * n samples at or below it; 0 for no samples."""
    if not xs:
        return 0.0
    return float(xs[max(0, math.ceil(p * len(xs)) - 1)])


def latency(out: str, work: str, quick: bool) -> dict:
    rates = [100, 1000] if quick else [100, 300, 1000, 2000, 4000]
    dur = 1.0 if quick else 3.0
    body = "x = x + i % 7"
    iters = _calibrate(body, 0.1)
    m = C.machine_info()
    res = {"rates": rates, "duration_s": dur, "task_ms": 0.1, "points": []}
    rows = []
    for rate in rates:
        d = os.path.join(work, f"plugins-latency-{rate}")
        of = os.path.join(work, f"latency-{rate}.out")
        C.write_plugin(d, "latency.lua", LUA_CLOCK + f'''
local due, stop_at, sched, first, last = nil, nil, 0, 0, 0
local interval = 1e9 / {rate}
local spans = {{}}       -- per task "outer inner": schedule -> onresult here, and onexecute's own run time
-- data: the schedule time; the result: onexecute's own start-to-end time, both CLOCK_MONOTONIC ns (one
-- clock for every process), so  inner <= the engine's flush -> poll latency <= outer  for every task
local function work(d)
  local ffi = require "ffi"
  pcall(ffi.cdef, "struct lt_ts {{ long s, ns; }}; int clock_gettime(int, struct lt_ts *);")
  local ts = ffi.new("struct lt_ts")
  ffi.C.clock_gettime(1, ts)
  local t0 = tonumber(ts.s) * 1e9 + tonumber(ts.ns)
  local x = 0 for i = 1, {iters} do {body} end
  ffi.C.clock_gettime(1, ts)
  return string.format("%.0f %d", tonumber(ts.s) * 1e9 + tonumber(ts.ns) - t0, x % 2)
end
local function done(e, d, r)
  spans[#spans + 1] = string.format("%.0f %s", now_ns() - tonumber(d), r:match("^%d+"))
end
local function go()
  T.async:schedule{{ data = string.format("%.0f", now_ns()), onexecute = work, onresult = done }}
end
TrisulPlugin = {{ id = {{ name = "tasks at a paced rate" }},
  request_async_workers = 1,
  onload = go,                  -- warm-up: starts the worker before the traffic does
  onunload = function()
    local f = io.open("{of}", "w"); f:write(string.format("%d %.0f %.0f", sched, first, last)); f:close()
    f = io.open("{of}.spans", "w"); f:write(table.concat(spans, "\\n")); f:close()
  end,
  simplecounter = {{ protocol_guid = "{G_ETH}",
    onpacket = function(engine, layer)
      local now = now_ns()
      if due == nil then due = now + 0.3e9; stop_at = due + {dur} * 1e9; first = due end
      if now >= stop_at then return end
      while now >= due do
        go()
        sched = sched + 1; last = now; due = due + interval
      end
    end }} }}
''')
        spec = f"packets={int(1_000_000 * (dur + 0.6))},flows=50,mix=udp=100,size-dist=fixed:64"
        s, ps, _ = _gen_run(work, f"latency-{rate}", d, spec, {"workers": 1, "drain_deadline": 10.0})
        a = C.async_of(s, "latency.lua")
        assert C.identity_holds(a), a
        n, t1, t2 = (float(x) for x in open(of).read().split())
        spans = [tuple(int(v) for v in ln.split()) for ln in open(of + ".spans").read().splitlines() if ln]
        outer, inner = sorted(o for o, _ in spans), sorted(i for _, i in spans)
        achieved = (n - 1) / ((t2 - t1) / 1e9) if t2 > t1 else 0.0
        pt = {"target_tasks_per_s": rate, "achieved_tasks_per_s": round(achieved, 1), "scheduled": int(n),
              "p50_ms": round(a["latency_p50_ns"] / 1e6, 3), "p99_ms": round(a["latency_p99_ns"] / 1e6, 3),
              "samples": a.get("latency_samples"), "ok": a["ok"], "window_s": round((t2 - t1) / 1e9, 2),
              "plugin_results": len(spans),
              "plugin_p50_ms": round(_rank(outer, 0.5) / 1e6, 3), "plugin_p99_ms": round(_rank(outer, 0.99) / 1e6, 3),
              "onexecute_p50_ms": round(_rank(inner, 0.5) / 1e6, 3),
              "onexecute_p99_ms": round(_rank(inner, 0.99) / 1e6, 3),
              "procs": ps}
        res["points"].append(pt)
        rows.append((f"{rate} tasks/s", ps))
        print(f"  {rate} tasks/s: achieved {achieved:.0f}, p50 {pt['p50_ms']} ms p99 {pt['p99_ms']} ms "
              f"({pt['samples']} samples)", flush=True)
    p = C.plt()
    fig, ax = p.subplots(figsize=(8, 4.5))
    xs = [x["achieved_tasks_per_s"] for x in res["points"]]
    ax.plot(xs, [x["p50_ms"] for x in res["points"]], "o-", label="p50")
    ax.plot(xs, [x["p99_ms"] for x in res["points"]], "s-", label="p99")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("tasks/s scheduled"); ax.set_ylabel("schedule -> onresult latency (ms)")
    ax.grid(alpha=0.3, which="both"); ax.legend()
    ax.set_title("T.async latency vs load (1 worker, ~0.1 ms onexecute, fast path at full speed)")
    fig.tight_layout(); fig.savefig(os.path.join(out, "latency.png"), dpi=110); p.close(fig)
    C.plot_procs(os.path.join(out, "processes.png"), rows, "per-process CPU and RSS")
    table = "\n".join(f"| {x['target_tasks_per_s']:,} | {x['achieved_tasks_per_s']:,} | {x['scheduled']:,} | "
                      f"{x['p50_ms']} | {x['p99_ms']} | {x['samples']:,} | {x['plugin_p50_ms']} / "
                      f"{x['plugin_p99_ms']} | {x['onexecute_p50_ms']} / {x['onexecute_p99_ms']} |"
                      for x in res["points"])
    md = _header("latency", m, quick) + f"""
## Setup
A simplecounter on `--generate` traffic (64-byte UDP, the fast path at full speed) schedules tasks at a
wall-clock-paced rate for {dur:g} s; each `onexecute` is a ~0.1 ms LuaJIT loop ({iters:,} iterations); one
worker. Latency is the engine's own schedule -> onresult measurement (`latency_p50_ns` /
`latency_p99_ns` in the run summary; a log histogram with 4 buckets per octave, so values are within
~19 %). Results are delivered between packet batches, so the latency includes waiting for the current
batch to finish.

![latency](latency.png)

| target tasks/s | achieved tasks/s | scheduled | p50 ms | p99 ms | samples | plug-in's own p50 / p99 ms | onexecute's own p50 / p99 ms |
|---|---|---|---|---|---|---|---|

The last two columns are measured apart from the engine: the plug-in stamps each task's schedule time into
its data and reads the clock again in `onresult`; `onexecute` times itself. The engine's latency lies
between the two for every task (it starts at the flush after `schedule` and ends at the poll before
`onresult`), so its percentiles do too, up to the histogram's bucket width.
{table}

## Processes (psutil)
![processes](processes.png)

{C.proc_table(rows)}
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    return res


SCENARIOS = {"inline-vs-async": inline_vs_async, "worker-scaling": worker_scaling, "overflow": overflow,
             "latency": latency}
