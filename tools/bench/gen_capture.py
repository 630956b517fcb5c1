"""Make a large benchmark capture by repeating a real one with shifted timestamps.

    python tools/bench/gen_capture.py SRC.pcap DST.pcap --packets 2000000

Records are copied byte-for-byte (numpy over the mapped source); each repetition is shifted
forward in time by the source's duration + 1 s, so packet time keeps increasing.
"""
from __future__ import annotations

import argparse
import struct
import sys

import numpy as np


def records(buf: bytes):
    """(offsets, lengths) of the records of a little-endian microsecond pcap."""
    magic = struct.unpack_from("<I", buf, 0)[0]
    if magic != 0xA1B2C3D4:
        raise SystemExit("source must be a little-endian microsecond pcap")
    offs, lens = [], []
    pos = 24
    while pos + 16 <= len(buf):
        caplen = struct.unpack_from("<I", buf, pos + 8)[0]
        offs.append(pos)
        lens.append(16 + caplen)
        pos += 16 + caplen
    return np.array(offs), np.array(lens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--packets", type=int, default=2_000_000)
    a = ap.parse_args(argv)
    buf = open(a.src, "rb").read()
    offs, lens = records(buf)
    body = np.frombuffer(buf, dtype=np.uint8)[24:offs[-1] + lens[-1]].copy()
    ts0 = struct.unpack_from("<I", buf, offs[0])[0]
    ts1 = struct.unpack_from("<I", buf, offs[-1])[0]
    shift = ts1 - ts0 + 1
    rel = offs - 24
    pos = rel[:, None] + np.arange(4)                 # the ts_sec bytes of every record
    ts = body[pos].copy().view("<u4").ravel()
    with open(a.dst, "wb") as out:
        out.write(buf[:24])
        written, rep = 0, 0
        while written < a.packets:
            k = min(len(offs), a.packets - written)
            body[pos] = (ts + rep * shift).astype("<u4").view(np.uint8).reshape(-1, 4)
            out.write(body[:rel[k - 1] + lens[k - 1]].tobytes())
            written += k
            rep += 1
    print(f"wrote {written} packets to {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
