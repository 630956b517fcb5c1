"""The generator as a live source: into the packet ring (`luaprobe run --generate SPEC`) or paced onto an
interface (`luaprobe gen --interface IF --rate PPS | --bitrate BPS --duration S`).

Both reuse `luaprobe gen`'s flow plan (engine/gen/traffic.py) and packet builder (engine/gen/builder.lua), which hands its
pcap bytes to a writer object instead of a file; the writers (ring pusher, paced AF_PACKET sender) are in
engine/gen/stream.lua.  See docs/gen.md ("Live sources").

SPEC (``--generate``) is the gen options as a comma list of KEY=VALUE, with ``:`` separating the items of a
list value::

    packets=2000000,flows=1000,mix=tcp=60:udp=40,seed=1
    flows=50,mix=http=100,http-sizes=1000:50000,gzip-fraction=0.5,ipv6-fraction=0.2,vlan=7

Keys (``-`` or ``_``): seed, flows, packets, mix, http-sizes, http-types, chunked-fraction, gzip-fraction,
ipv6-fraction, vlan, size-dist (``fixed:N``, ``uniform:A-B``, ``imix``), rate (timestamp rate), mss,
concurrency, start.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np

from luaprobe.engine.gen.traffic import GenConfig, UsageError, _build_flows, _http_flow, _Pools, new_builder
from luaprobe.engine.daemon.usage import Parser, nonempty

__all__ = ["parse_spec", "stream", "feed_ring", "send", "send_main"]

_SPEC_KEYS = {"seed": int, "flows": int, "packets": int, "mix": str, "http_sizes": str, "http_types": str,
              "chunked_fraction": float, "gzip_fraction": float, "ipv6_fraction": float, "vlan": int,
              "size_dist": str, "rate": float, "mss": int, "concurrency": int, "start": int}
_LISTS = ("mix", "http_sizes", "http_types")


def parse_spec(spec: str) -> dict:
    """``"packets=2000000,flows=1000,mix=tcp=60:udp=40,seed=1"`` -> GenConfig keyword arguments.
    Raises UsageError naming the bad item."""
    out = {}
    items = [x for x in (x.strip() for x in spec.split(",")) if x]
    if not items:          # before: '' passed here and the capture process, which reads an empty SPEC as none
        raise UsageError("--generate: empty SPEC: give KEY=VALUE,... (e.g. 'packets=2000000,flows=1000'; "
                         "docs/gen.md)")    # given, died with its own usage text (exit 1)
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in _SPEC_KEYS:
            raise UsageError(f"--generate: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k.replace('_', '-') for k in _SPEC_KEYS)}; got {item!r}")
        val = val.strip()
        if key in _LISTS:
            val = val.replace(":", ",")
        try:
            out[key] = _SPEC_KEYS[key](val)
        except ValueError:
            raise UsageError(f"--generate: {key.replace('_', '-')}: bad value {val!r}") from None
    try:
        GenConfig("<stream>", **out)              # validates every value (raises UsageError)
    except UsageError as e:                       # its messages name gen's own flags: "--packets: must be >= 1"
        raise UsageError("--generate: " + re.sub(r"--([a-z][a-z-]*)", r"\1", str(e))) from None
    return out


def stream(cfg: GenConfig, writer, lua) -> dict:
    """Run the builder with ``writer`` (a Lua object with write/close, see engine/gen/stream.lua) in place
    of the file.  Returns the generator's counters; ``stopped`` is True when the writer raised its STOP."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 1])
    flows, bodies = _build_flows(cfg, rng)
    body_of_flow = {int(f): j for j, f in enumerate(bodies["flows"])}
    pools = _Pools(cfg.seed)
    flows = np.ascontiguousarray(flows)
    g = new_builder(lua, cfg, flows, {b"file": writer, b"format": b"pcap"})
    run, provide = g[b"run"], g[b"provide"]
    stopped = False
    try:
        fi = run()
        while fi is not None:
            j = body_of_flow[int(fi)]
            req, resp, _ = _http_flow(cfg, flows[int(fi)], j, int(bodies["size"][j]),
                                      cfg.http_types[int(bodies["type"][j])], int(bodies["enc"][j]), pools)
            provide(req, resp)
            fi = run()
    except Exception as e:                          # lupa.LuaError carrying genstream.STOP
        if "genstream: stop" not in str(e):
            raise
        stopped = True
    st = g[b"stats"]
    stats = {k.decode(): int(v) for k, v in st.items()} if st is not None else {}
    return {**dict(sorted(stats.items())), "stopped": stopped, "elapsed_s": round(time.perf_counter() - t0, 3)}


def feed_ring(spec: str, lua, ring, stop) -> tuple[int, int]:
    """The capture process's --generate mode: every generated packet into packet ring ``ring`` (a luaprobe.shm.ring
    handle in ``lua``), waiting for space (nothing lost).  Returns (packets, bytes) pushed."""
    cfg = GenConfig("<stream>", **parse_spec(spec))
    w = lua.eval("function(r, s) return require('luaprobe.engine.gen.stream').ring_writer(r, s) end")(ring, stop)
    stream(cfg, w, lua)
    return int(w[b"packets"]), int(w[b"bytes"])


def send(interface: str, gen_kwargs: dict, rate: float | None = None, bitrate: float | None = None,
         duration: float = 10.0, count: int | None = None, batch: int = 64) -> dict:
    """Paced send of generated traffic on ``interface``; returns the sender's counters (sent, elapsed_s,
    pps, bps, ...).  The generator is restarted (next seed) if it runs out before the count / duration."""
    from luaprobe.shm.luajit import new_runtime, table
    lua = new_runtime()
    opts = {"interface": interface, "duration": float(duration), "batch": int(batch)}
    if rate:
        opts["rate"] = float(rate)
    if bitrate:
        opts["bitrate"] = float(bitrate)
    if count:
        opts["count"] = int(count)
    sender = lua.eval("function(o) return require('luaprobe.engine.gen.stream').sender(o) end")(table(lua, opts))
    kw = dict(gen_kwargs)
    want = count or (int(rate * duration) if rate else int(bitrate * duration / 8 / 300))
    kw.setdefault("packets", int(want * 1.02) + 2000)
    if rate:
        kw.setdefault("rate", float(rate))
    seed = kw.pop("seed", 1)
    rounds = 0
    try:
        while True:
            cfg = GenConfig("<stream>", seed=seed + rounds, **kw)
            stream(cfg, sender, lua)
            rounds += 1
            if sender[b"finished"]:
                break
    finally:
        lua.eval("function(s) s:shutdown() end")(sender)
    st = {k.decode(): (v.decode() if isinstance(v, bytes) else v)
          for k, v in lua.eval("function(s) return s:stats() end")(sender).items()}
    target = {"rate_pps": rate, "bitrate_bps": bitrate, "duration_s": duration}
    return {"interface": interface, **target, **dict(sorted(st.items())), "generator_rounds": rounds}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="luaprobe gen --interface", description="Send generated traffic onto an "
                                "interface at a target packet or bit rate (AF_PACKET, sendmmsg, root).")
    p.add_argument("--interface", required=True, metavar="IF", type=nonempty("an interface name"))
    r = p.add_mutually_exclusive_group(required=True)
    r.add_argument("--rate", type=float, metavar="PPS", help="packets per second")
    r.add_argument("--bitrate", type=float, metavar="BPS", help="bits per second of Ethernet frame bytes")
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds to send (default 10)")
    p.add_argument("--count", type=int, default=None, help="stop after N packets (rate: default rate*duration)")
    p.add_argument("--batch", type=int, default=64, help="most packets per sendmmsg call (default 64)")
    p.add_argument("--json", action="store_true", help="print the counters as JSON")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--flows", type=int, default=100)
    p.add_argument("--mix", default="tcp=40,udp=20,icmp=5,dns=15,http=20")
    p.add_argument("--http-sizes", default="1000,50000,2000000")
    p.add_argument("--http-types", default="text/html,image/png,application/pdf")
    p.add_argument("--chunked-fraction", type=float, default=0.0)
    p.add_argument("--gzip-fraction", type=float, default=0.0)
    p.add_argument("--ipv6-fraction", type=float, default=0.0)
    p.add_argument("--vlan", type=int, default=None)
    p.add_argument("--size-dist", default="imix")
    p.add_argument("--mss", type=int, default=1460)
    p.add_argument("--concurrency", type=int, default=32)
    return p


def send_main(argv=None) -> int:
    """`luaprobe gen --interface IF (--rate PPS | --bitrate BPS) [--duration S] [gen options]`."""
    args = build_parser().parse_args(argv)
    kw = {k: getattr(args, k) for k in ("seed", "flows", "mix", "http_sizes", "http_types", "chunked_fraction",
                                        "gzip_fraction", "ipv6_fraction", "vlan", "size_dist", "mss",
                                        "concurrency")}
    if (args.rate is not None and args.rate <= 0) or (args.bitrate is not None and args.bitrate <= 0) \
            or args.duration <= 0 or not 1 <= args.batch <= 1024:
        print("luaprobe gen: --rate / --bitrate / --duration must be > 0, --batch 1..1024", file=sys.stderr)
        return 2
    import socket
    try:
        socket.if_nametoindex(args.interface)         # as `luaprobe run --interface`: a usage line, exit 2
    except OSError:
        print(f"luaprobe gen: --interface {args.interface}: no such network interface", file=sys.stderr)
        return 2
    try:
        GenConfig("<stream>", **kw)
        s = send(args.interface, kw, args.rate, args.bitrate, args.duration, args.count, args.batch)
    except UsageError as e:
        print(f"luaprobe gen: {e}", file=sys.stderr)
        return 2
    except Exception as e:                            # noqa: BLE001 - socket errors from Lua: one line (a LuaError
        from luaprobe.shm.luajit import error_text    # carries Lua's stack traceback: not printed)
        print(f"luaprobe gen: {error_text(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s))
    else:
        print(f"{args.interface}: sent {s['sent']:,} packets  {s['bytes']:,} bytes in {s['elapsed_s']:.3f} s  "
              f"({s['pps']:,.0f} packets/s, {s['bps'] / 1e6:,.1f} Mbit/s; stopped by {s['stopped_by']}, "
              f"{s['calls']:,} sendmmsg calls, {s['retries']} retries)")
    return 0
