"""Benchmark: HTTP file extraction, luaprobe against tshark, in one run.

    python tools/bench/extract.py [--copies 400] [--repeat 3] [--skip-tshark]

Workload: http-website-keepalive.pcap (751 packets, 25 TCP flows, 31 HTTP bodies, one of them truncated
by a capture gap) repeated --copies times into tools/bench/data/extract-<copies>.pcap (out of git):
each copy is shifted forward in time by the capture's duration + 1 s and gets its own client address
(10.0.2.15 becomes 10.<i>.<2 - ...>, changed so that the one's-complement sum of the address is
unchanged: the IPv4 and TCP checksums stay valid), so flows of different copies never collide.
400 copies = 202 MB, 300 400 packets, 12 400 bodies.

Contenders (wall time, process start-up included; both write the bodies into /dev/shm):

* `luaprobe run` with a minimal filex_monitor plug-in: `onfile_http` counts the file (extraction only:
  TCP reassembly, HTTP parsing, de-chunking / inflating, the file written and removed after the hook);
* `tshark -r F -q --export-objects http,DIR` (the same bodies, written and kept).

Prints wall time, bodies/s, body MB/s, capture MB/s and luaprobe's speed-up.  Target: >= 5x tshark.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
from gen_capture import records  # noqa: E402  (one pcap record indexer for both bench tools)

DATA = os.path.join(REPO, "tools", "bench", "data")
SOURCE = os.path.join(REPO, "tests", "data", "http-website-keepalive.pcap")
CLIENT = bytes([10, 0, 2, 15])
ETH_IP_SRC, ETH_IP_DST = 14 + 12, 14 + 16       # IPv4 addresses in an Ethernet frame (no VLAN)

PLUGIN = r"""
local files, bytes = 0, 0
TrisulPlugin = { id = { name = "extract only" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk)
      files = files + 1
      bytes = bytes + length
    end,
  },
}
"""


def client_address(i: int) -> bytes:
    """Copy i's client address: 10.0.2.15 with i added to its first 16-bit word and subtracted from the
    second, so the one's-complement sum (IPv4 header and TCP pseudo-header checksums) is unchanged."""
    w1, w2 = 0x0A00 + i, 0x020F - i
    assert 0 <= w2 and w1 <= 0xFFFF
    return struct.pack(">HH", w1, w2)


def make_capture(copies: int) -> str:
    """tools/bench/data/extract-<copies>.pcap (made once)."""
    dst = os.path.join(DATA, f"extract-{copies}.pcap")
    if os.path.exists(dst):
        return dst
    os.makedirs(DATA, exist_ok=True)
    buf = open(SOURCE, "rb").read()
    offs, lens = records(buf)
    body = np.frombuffer(buf, dtype=np.uint8)[24:offs[-1] + lens[-1]].copy()
    rel = offs - 24
    ts_pos = rel[:, None] + np.arange(4)
    ts = body[ts_pos].copy().view("<u4").ravel()
    shift = int(ts[-1] - ts[0]) + 1
    cli = np.frombuffer(CLIENT, dtype=np.uint8)
    where = []                                  # (byte positions) of the client address in each record
    for field in (ETH_IP_SRC, ETH_IP_DST):
        pos = rel[:, None] + 16 + field + np.arange(4)
        hit = (body[pos] == cli).all(axis=1)
        where.append(pos[hit])
    tmp = dst + ".tmp"
    with open(tmp, "wb") as out:
        out.write(buf[:24])
        for i in range(copies):
            body[ts_pos] = (ts + i * shift).astype("<u4").view(np.uint8).reshape(-1, 4)
            addr = np.frombuffer(client_address(i), dtype=np.uint8)
            for pos in where:
                body[pos] = addr
            out.write(body.tobytes())
    os.replace(tmp, dst)
    return dst


def run_luaprobe(capture: str, work: str) -> tuple[float, dict]:
    plugin = os.path.join(work, "extract_only.lua")
    with open(plugin, "w") as f:
        f.write(PLUGIN)
    stats = os.path.join(work, "summary.json")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", capture,
                    "--out", os.path.join(work, "out"), "--overwrite", "--stats-json", stats],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    with open(stats) as f:
        summary = json.load(f)
    return wall, summary


def run_tshark(capture: str, work: str) -> tuple[float, int, int]:
    out = tempfile.mkdtemp(prefix="tshark-export-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        t0 = time.monotonic()
        subprocess.run(["tshark", "-r", capture, "-q", "--export-objects", "http," + out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        paths = glob.glob(os.path.join(out, "*"))
        return wall, len(paths), sum(os.path.getsize(p) for p in paths)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=400, help="repetitions of the source capture (<= 520)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is reported")
    ap.add_argument("--skip-tshark", action="store_true")
    a = ap.parse_args(argv)
    capture = make_capture(a.copies)
    size = os.path.getsize(capture)
    print(f"capture: {capture} ({size / 1e6:.1f} MB, {a.copies} copies of {os.path.basename(SOURCE)})")
    lp_wall = 1e9
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as work:
            w, s1 = run_luaprobe(capture, work)
        if w < lp_wall:
            lp_wall, s = w, s1
    (fx,) = s["filex"]
    lp_files, lp_bytes = fx["files"] + fx["chunks"], fx["bytes"]
    rows = [("luaprobe run (onfile_http, extraction only)", lp_wall, lp_files, lp_bytes)]
    engine = s["elapsed_s"]
    if not a.skip_tshark:
        ts_wall, ts_files, ts_bytes = min(run_tshark(capture, None) for _ in range(a.repeat))
        rows.append(("tshark -q --export-objects http,DIR", ts_wall, ts_files, ts_bytes))
    print(f"packets {s['packets']:,}  luaprobe engine elapsed {engine:.2f} s  filex {json.dumps(fx)}")
    print()
    print("| contender | wall s | bodies | body MB | bodies/s | body MB/s | capture MB/s | speed-up vs tshark |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = rows[-1][1] if len(rows) > 1 else None
    for name, wall, n, nbytes in rows:
        ratio = f"{ref / wall:.1f}x" if ref else "-"
        print(f"| {name} | {wall:.2f} | {n:,} | {nbytes / 1e6:.1f} | {n / wall:,.0f} | {nbytes / 1e6 / wall:.1f} "
              f"| {size / 1e6 / wall:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
