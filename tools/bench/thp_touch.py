"""Diagnostic: the CPU cost of first touching fresh anonymous memory, on huge pages and on small ones (issue 10).

    python3 tools/bench/thp_touch.py [--mb 256] [--runs 8] [--sides huge,small,populate]

Each run is a fresh child process that maps --mb MiB (private, anonymous, aligned to 2 MiB), optionally advises
it ``MADV_HUGEPAGE`` (what engine/fastpath/flowtable.lua's ``alloc`` does for arrays from 2 MiB on), writes every
byte once (``memset``) and reports its own CPU time (user + system, ``time.process_time``) and minor faults for
that write.  The sides alternate, in --sides order (default "huge,small"); "populate" is "small" with the whole
area first mapped by one ``madvise(MADV_POPULATE_WRITE)`` (timed with the write: what flowtable.lua's prefault
does, 1 024 records at a time).  No luaprobe code runs: this separates the machine from the
engine.  Prints one line per run and then min / median / max per side, in ms and in ms per MiB.

Why it exists: on flows-1m (1M packets, each a new flow) the engine's packet loop had a slow mode, ~1 run in 3
about 3x slower for the whole run (docs/benchmarks.md, "The flows-1m slow mode").  The slow runs differ from the
fast ones in kernel time only, in ``clear_page_erms`` under ``do_huge_pmd_anonymous_page`` (the zero-fill of a
fresh 2 MiB page at its first write by the flow table's records).  This tool shows the same bimodality with no
engine at all.  Linux only (mmap/madvise through ctypes on libc).
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import subprocess
import sys
import time

MB = 1 << 20
HUGE = 2 * MB
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
SIDES = ("huge", "small", "populate")


def touch(mb: int, huge: bool, populate: bool = False) -> tuple[float, int]:
    """Map `mb` MiB, advise it for huge pages if `huge`, map its pages in one MADV_POPULATE_WRITE call if
    `populate`, write it once: (CPU ms of the populate and the write, minor faults).
    Raises OSError when the mapping fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = mb * MB
    m = libc.mmap(None, size + HUGE, 3, 0x22, -1, 0)      # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
    if m in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "thp_touch: mmap failed")
    p = (m + HUGE - 1) & ~(HUGE - 1)
    if huge:
        libc.madvise(p, size, MADV_HUGEPAGE)               # advice only, as in flowtable.lua
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    if populate and libc.madvise(p, size, MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "thp_touch: MADV_POPULATE_WRITE failed (Linux >= 5.14)")
    ctypes.memset(p, 1, size)
    t1, r1 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    return (t1 - t0) * 1e3, r1.ru_minflt - r0.ru_minflt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="MiB written per run (default 256)")
    ap.add_argument("--runs", type=int, default=8, help="runs per side, alternating (default 8)")
    ap.add_argument("--sides", default="huge,small", help="comma-separated: huge, small, populate")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        ms, flt = touch(a.mb, a.child == "huge", a.child == "populate")
        print(f"{ms:.1f} {flt}")
        return 0
    sides = a.sides.split(",")
    bad = [s for s in sides if s not in SIDES]
    if bad:
        ap.error(f"--sides: unknown side {bad[0]!r} (one of {', '.join(SIDES)})")
    res: dict = {s: [] for s in sides}
    for i in range(a.runs):
        for side in sides:
            out = subprocess.run([sys.executable, __file__, "--mb", str(a.mb), "--child", side],
                                 capture_output=True, text=True, check=True).stdout.split()
            ms, flt = float(out[0]), int(out[1])
            res[side].append(ms)
            print(f"run {i + 1} {side:8s} {a.mb} MiB: {ms:7.1f} ms CPU, {flt} minor faults", flush=True)
    for side, v in res.items():
        print(f"{side:8s}: min / median / max {min(v):.0f} / {statistics.median(v):.0f} / {max(v):.0f} ms "
              f"({min(v) / a.mb:.3f} / {statistics.median(v) / a.mb:.3f} / {max(v) / a.mb:.3f} ms per MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
