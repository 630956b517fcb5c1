"""Monitoring outputs of the supervisor: a JSON stats line per interval and an optional Prometheus endpoint.

Both read the fast path's snapshot (``<run>/stats.json``, FastPath.snapshot).  The Prometheus endpoint
(prometheus-client) binds 127.0.0.1 only; it reads the snapshot at scrape time, so a scrape and
``luaprobe stats --json`` taken between two snapshot writes agree exactly.  Counters restart from 0 when
the fast path restarts (Prometheus' rate()/increase() handle counter resets).
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading

from luaprobe.engine.daemon import control


def totals(snap: dict) -> dict:
    """Async counters summed over plug-in instances."""
    keys = ("scheduled", "pending", "ok", "nil_result", "error", "timeout", "dropped", "worker_deaths")
    out = dict.fromkeys(keys, 0)
    for p in snap.get("plugins", []):
        for k in keys:
            out[k] += int(p.get("async", {}).get(k, 0) or 0)
    return out


class RotatingHandler(logging.handlers.RotatingFileHandler):
    """The standard library's size-based rotation (stats.jsonl or supervisor.log -> .1 ... .N), with files made
    owner-only like every run-dir file (control.open_private), and the last write error kept instead of printed."""

    error: BaseException | None = None

    def _open(self):
        from .control import open_private
        return open_private(self.baseFilename, "a", encoding="utf-8", buffering=1)

    def handleError(self, record) -> None:
        self.error = sys.exc_info()[1]
        try:                                    # drop the half-written buffer; the next line reopens the file
            if self.stream is not None:
                self.stream.close()
        except OSError:
            pass
        self.stream = None


class JsonLines:
    """Appends one JSON line per snapshot to ``path`` ([stats] json_lines_file), rotated above ``max_bytes``
    ([stats] json_lines_max_mb) keeping ``backups`` older files (json_lines_backups).  ``write`` raises the
    OSError of a failed write (a full disk: the caller logs it and goes on; the next write tries again)."""

    def __init__(self, path: str, max_bytes: int = 64 << 20, backups: int = 3):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.handler = RotatingHandler(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, snap: dict, rates: dict, status: dict) -> None:
        hook_calls = sum(sum(p.get("hook_calls", {}).values()) for p in snap.get("plugins", []))
        hook_errors = sum(sum(p.get("hook_errors", {}).values()) for p in snap.get("plugins", []))
        line = {"ts": snap.get("time"), "state": status.get("state"), "restarts": status.get("restarts"),
                "fastpath_pid": status.get("fastpath_pid"), "packets": snap.get("packets"),
                "bytes": snap.get("bytes"), "flows": snap.get("flows"), "flows_live": snap.get("flows_live"),
                **rates, "packet_ring_bytes": snap.get("rings", {}).get("packet", {}).get("bytes"),
                "drops": snap.get("drops"), "hook_calls": hook_calls, "hook_errors": hook_errors,
                "async": totals(snap), "store_rows_lost": status.get("store_rows_lost", 0)}
        self.handler.error = None
        self.handler.handle(logging.makeLogRecord({"msg": json.dumps(line, default=str), "args": None}))
        if self.handler.error is not None:
            raise self.handler.error

    def close(self) -> None:
        try:
            self.handler.close()
        except OSError:
            pass


def _labels(p: dict) -> dict:
    return {"plugin": os.path.basename(p.get("plugin", "")), "type": p.get("type", ""),
            "instance": str(p.get("instance", ""))}


class _Collector:
    """prometheus-client custom collector: families built from the snapshot file at each scrape."""

    def __init__(self, stats_path: str, status_fn):
        self.stats_path = stats_path
        self.status_fn = status_fn
        self.lock = threading.Lock()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = control.read_json(self.stats_path) or {}
        try:
            with self.lock:
                st = self.status_fn()
        except Exception:  # noqa: BLE001 - a scrape must not take the supervisor down
            st = {}
        up = GaugeMetricFamily("luaprobe_up", "1 while the fast path runs", value=1 if st.get("state") == "running"
                               else 0)
        yield up
        yield CounterMetricFamily("luaprobe_restarts", "fast-path restarts by the supervisor",
                                  value=st.get("restarts", 0))
        yield CounterMetricFamily("luaprobe_reloads", "reloads (graceful fast-path restarts)", value=st.get("reloads", 0))
        if not snap:
            return
        yield CounterMetricFamily("luaprobe_packets", "packets processed by the fast path", value=snap.get("packets", 0))
        yield CounterMetricFamily("luaprobe_bytes", "bytes (wire length) processed", value=snap.get("bytes", 0))
        yield CounterMetricFamily("luaprobe_flows", "flows created", value=snap.get("flows", 0))
        yield GaugeMetricFamily("luaprobe_flows_live", "flows in the flow table", value=snap.get("flows_live", 0))
        yield GaugeMetricFamily("luaprobe_snapshot_timestamp_seconds", "time of the fast-path snapshot",
                                value=snap.get("time", 0))
        ring = GaugeMetricFamily("luaprobe_ring_fill_bytes", "bytes waiting in a ring", labels=["ring"])
        cap = GaugeMetricFamily("luaprobe_ring_capacity_bytes", "ring capacity", labels=["ring"])
        for name, r in snap.get("rings", {}).items():
            ring.add_metric([name], r.get("bytes", 0))
            cap.add_metric([name], r.get("capacity", 0))
        yield ring
        yield cap
        drops = CounterMetricFamily("luaprobe_drops", "packets dropped", labels=["where"])
        for k, v in snap.get("drops", {}).items():
            drops.add_metric([k], v or 0)
        yield drops
        names = ["plugin", "type", "instance"]
        calls = CounterMetricFamily("luaprobe_hook_calls", "plug-in hook calls", labels=names + ["hook"])
        errors = CounterMetricFamily("luaprobe_hook_errors", "plug-in hook errors", labels=names + ["hook"])
        tasks = CounterMetricFamily("luaprobe_async_tasks", "T.async tasks by outcome", labels=names + ["outcome"])
        pending = GaugeMetricFamily("luaprobe_async_pending", "T.async tasks pending", labels=names)
        lat = GaugeMetricFamily("luaprobe_async_latency_seconds", "T.async round-trip latency",
                                labels=names + ["quantile"])
        deaths = CounterMetricFamily("luaprobe_worker_deaths", "async worker crashes", labels=names)
        for p in snap.get("plugins", []):
            lv = list(_labels(p).values())
            for h, v in p.get("hook_calls", {}).items():
                calls.add_metric(lv + [h], v)
            for h, v in p.get("hook_errors", {}).items():
                errors.add_metric(lv + [h], v)
            a = p.get("async", {})
            if a.get("scheduled"):
                for k in ("scheduled", "ok", "nil_result", "error", "timeout", "dropped"):
                    tasks.add_metric(lv + [k], a.get(k, 0))
                pending.add_metric(lv, a.get("pending", 0))
                lat.add_metric(lv + ["0.5"], a.get("latency_p50_ns", 0) / 1e9)
                lat.add_metric(lv + ["0.99"], a.get("latency_p99_ns", 0) / 1e9)
            deaths.add_metric(lv, a.get("worker_deaths", 0))
        yield from (calls, errors, tasks, pending, lat, deaths)
        yield from _shard_families(snap.get("shards", []))


def _shard_families(shards: list):
    """Per-shard figures of a sharded probe (engine/fastpath/shards.py); the unlabelled families above are the totals."""
    if not shards:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    fams = {"packets": CounterMetricFamily("luaprobe_shard_packets", "packets processed by one shard", labels=["shard"]),
            "bytes": CounterMetricFamily("luaprobe_shard_bytes", "bytes processed by one shard", labels=["shard"]),
            "flows": CounterMetricFamily("luaprobe_shard_flows", "flows created by one shard", labels=["shard"]),
            "flows_live": GaugeMetricFamily("luaprobe_shard_flows_live", "flows in one shard's table", labels=["shard"]),
            "restarts": CounterMetricFamily("luaprobe_shard_restarts", "restarts of one shard after a crash",
                                            labels=["shard"])}
    ring = GaugeMetricFamily("luaprobe_shard_ring_fill_bytes", "bytes waiting in one shard's packet ring",
                             labels=["shard"])
    for s in shards:
        k = str(s.get("shard"))
        for name, fam in fams.items():
            fam.add_metric([k], s.get(name, 0) or 0)
        ring.add_metric([k], s.get("rings", {}).get("packet", {}).get("bytes", 0))
    yield from (*fams.values(), ring)


class Exporter:
    """A running Prometheus HTTP server on 127.0.0.1; shutdown() stops it."""

    def __init__(self, server, thread):
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_prometheus(port: int, stats_path: str, status_fn) -> Exporter:
    """Serve /metrics on 127.0.0.1:port (ImportError names the missing package)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError("[stats] prometheus_port is set but prometheus-client is not installed "
                           "(pip install prometheus-client)") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats_path, status_fn))
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return Exporter(server, thread)


def port_problem(port: int) -> str | None:
    """Why /metrics could not be served on 127.0.0.1:port (e.g. "Address already in use"), or None.  A bind
    tried and closed at once, as http.server binds (SO_REUSEADDR)."""
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def scrape(port: int, timeout: float = 5.0) -> dict:
    """{'name{labels}': value} from 127.0.0.1:port/metrics (tests, `luaprobe stats` diagnostics)."""
    import urllib.request
    out = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out

