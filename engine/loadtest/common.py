"""Shared pieces of the load-test scenarios: machine info, per-process sampling (psutil), fast-path runs,
Markdown reports and plots (matplotlib, Agg backend)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))   #: where the package lives (a checkout or site-packages)
DEFAULT_OUT = "loadtest-reports"                    #: relative to the current directory, never docs/
G_ETH = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}"

# onexecute / plug-in helpers: a blocking wait that is not a busy loop, and a monotonic clock in ns
LUA_CLOCK = '''
local ffi = require "ffi"
pcall(ffi.cdef, "struct lt_ts { long s, ns; }; int clock_gettime(int, struct lt_ts *); int poll(void *, unsigned long, int);")
local lt_ts = ffi.new("struct lt_ts")
local function now_ns() ffi.C.clock_gettime(1, lt_ts); return tonumber(lt_ts.s) * 1e9 + tonumber(lt_ts.ns) end
'''


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as p
    return p


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import lupa.luajit21 as lj
        luajit = lj.LuaRuntime().eval("jit.version")
    except Exception:                              # noqa: BLE001
        luajit = "?"
    return {"cpu": model or platform.processor(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
            "python": sys.version.split()[0], "luajit": luajit, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def machine_md(m: dict) -> str:
    return (f"| machine | |\n|---|---|\n| CPU | {m['cpu']} |\n| cores | {m['logical_cpus']} logical, "
            f"{m['usable_cpus']} usable by this run |\n| RAM | {m['ram_gib']} GiB |\n| kernel | {m['kernel']} |\n"
            f"| Python | {m['python']} |\n| LuaJIT | {m['luajit']} |\n| commit | {m['commit']} |\n"
            f"| date | {m['date']} |\n")


def role_of(p: psutil.Process, root_pid: int, extra: dict) -> str:
    if p.pid in extra:
        return extra[p.pid]
    if p.pid == root_pid:
        return "fastpath"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "other"
    for key, role in (("luaprobe.engine.capture.process", "capture"), ("luaprobe.engine.store.writer", "store"), ("worker", "worker")):
        if key in cmd:
            return role
    return "other"


class Sampler:
    """Samples CPU % and RSS of a process tree every `interval` s in a thread, summed per role
    (fastpath, capture, worker, store, sender)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.roots: list[int] = []
        self.extra: dict[int, str] = {}
        self.samples: list[dict] = []             # {t, role: {cpu, rss, n}}
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self.t0 = time.monotonic()

    def add_root(self, pid: int):
        self.roots.append(pid)

    def add(self, pid: int, role: str):
        self.extra[pid] = role
        self.roots.append(pid)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()

    def _loop(self):
        while not self._stop.wait(self.interval):
            row = {"t": time.monotonic() - self.t0}
            for root in list(self.roots):
                try:
                    rp = psutil.Process(root)
                    procs = [rp] + rp.children(recursive=True)
                except psutil.Error:
                    continue
                for p in procs:
                    q = self._procs.get(p.pid)
                    if q is None:
                        q = self._procs[p.pid] = p
                        try:
                            q.cpu_percent()
                        except psutil.Error:
                            pass
                        continue                      # first call primes the counter
                    try:
                        with q.oneshot():
                            cpu, rss = q.cpu_percent(), q.memory_info().rss
                    except psutil.Error:
                        continue
                    role = role_of(q, root if root not in self.extra else -1, self.extra)
                    r = row.setdefault(role, {"cpu": 0.0, "rss": 0, "n": 0})
                    r["cpu"] += cpu
                    r["rss"] += rss
                    r["n"] += 1
            self.samples.append(row)

    def summary(self) -> dict:
        """role -> {cpu_mean, cpu_max, rss_max_mb, procs}: over the samples where the role was present."""
        out = {}
        roles = {k for s in self.samples for k in s if k != "t"}
        for role in sorted(roles):
            rows = [s[role] for s in self.samples if role in s]
            out[role] = {"cpu_mean": round(sum(r["cpu"] for r in rows) / len(rows), 1),
                         "cpu_max": round(max(r["cpu"] for r in rows), 1),
                         "rss_max_mb": round(max(r["rss"] for r in rows) / 2**20, 1),
                         "procs": max(r["n"] for r in rows)}
        return out


def proc_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table: run label -> per role CPU % mean / max and peak RSS."""
    roles = [r for r in ("fastpath", "capture", "worker", "store", "sender") if any(r in s for _, s in rows)]
    head = "| run | " + " | ".join(f"{r} CPU % mean / max | {r} RSS MiB" for r in roles) + " |\n"
    head += "|---|" + "---|---|" * len(roles) + "\n"
    body = ""
    for label, s in rows:
        cells = []
        for r in roles:
            x = s.get(r)
            cells += [f"{x['cpu_mean']} / {x['cpu_max']}" + (f" ({x['procs']} procs)" if x["procs"] > 1 else ""),
                      f"{x['rss_max_mb']}"] if x else ["-", "-"]
        body += f"| {label} | " + " | ".join(cells) + " |\n"
    return head + body


def plot_procs(path: str, rows: list[tuple[str, dict]], title: str):
    p = plt()
    roles = [r for r in ("fastpath", "capture", "worker", "store", "sender") if any(r in s for _, s in rows)]
    fig, (a1, a2) = p.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / max(1, len(roles))
    xs = range(len(rows))
    for k, r in enumerate(roles):
        a1.bar([x + k * w for x in xs], [s.get(r, {}).get("cpu_mean", 0) for _, s in rows], w, label=r)
        a2.bar([x + k * w for x in xs], [s.get(r, {}).get("rss_max_mb", 0) for _, s in rows], w, label=r)
    for a, yl in ((a1, "mean CPU % (100 = one core)"), (a2, "peak RSS MiB (summed per role)")):
        a.set_xticks([x + w * (len(roles) - 1) / 2 for x in xs])
        a.set_xticklabels([lbl for lbl, _ in rows], rotation=30, ha="right", fontsize=7)
        a.set_ylabel(yl)
        a.grid(axis="y", alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


def write_plugin(d: str, name: str, body: str) -> str:
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(body)
    return path


def start_run(work: str, tag: str, cfg: dict) -> tuple[subprocess.Popen, str]:
    """Start luaprobe.engine.loadtest.runner with cfg; returns (process, summary path)."""
    cp, sp = os.path.join(work, f"{tag}.cfg.json"), os.path.join(work, f"{tag}.summary.json")
    with open(cp, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.loadtest.runner", cp, sp],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, sp


def finish_run(proc, sp, sig=None, timeout=600) -> dict:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        so, se = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        so, se = proc.communicate()
        raise RuntimeError(f"fast path did not finish: {se[-2000:]}")
    if proc.returncode != 0 or not os.path.exists(sp):
        raise RuntimeError(f"fast path failed ({proc.returncode}): {se[-3000:]}")
    with open(sp) as f:
        return json.load(f)


def stop_quietly(proc):
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def async_of(summary: dict, name: str) -> dict:
    for p in summary["plugins"]:
        if os.path.basename(p["plugin"]) == name and p["async"].get("scheduled") is not None:
            return p["async"]
    return {}


IDENTITY_TERMS = ("ok", "nil_result", "error", "timeout", "dropped", "pending")


def identity_holds(a: dict) -> bool:
    return a["scheduled"] == sum(a[t] for t in IDENTITY_TERMS)
