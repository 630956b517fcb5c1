"""The store writer's work for an end-of-run flow export (issue 10): N generated flow rows (random keys, as
a million live flows leave the flow table) applied through the writer process's own path
(``_Writer.apply``: clean, executemany of the upsert, commit every COMMIT_ROWS) into a fresh database, once
per page-cache size given.  Prints wall and process CPU time.

    .venv/bin/python tools/bench/flow_store.py [--rows 1000000] [--cache-kib 2000,65536]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from luaprobe.engine.store import writer as W


def rows(n: int, seed: int = 1) -> list[tuple]:
    rng = random.Random(seed)

    def ip() -> str:
        return ".".join("%02X" % rng.randrange(256) for _ in range(4))
    out = []
    for i in range(n):
        a, z, pa = ip(), ip(), rng.randrange(1024, 65536)
        out.append((f"06A:{a}:p-{pa:04X}_{z}:p-0050", 6, a, pa, z, 80, 1.7e9 + i * 1e-3, 1.7e9 + 1.5, 1, 1, 60, 60,
                    "OPEN", "", None, 0, 0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cache-kib", default=f"2000,{W.CACHE_KIB}", help="page cache sizes to compare (KiB)")
    a = ap.parse_args(argv)
    data = rows(a.rows)
    for cache in (int(x) for x in a.cache_kib.split(",")):
        with tempfile.TemporaryDirectory(prefix="lp-flowstore-") as tmp:
            W.CACHE_KIB = cache
            w = W._Writer(os.path.join(tmp, W.DB_NAME), None)
            t0, c0 = time.monotonic(), time.process_time()
            for i in range(0, len(data), 4096):
                w.apply("flows", data[i:i + 4096])
                if w.tx_rows >= W.COMMIT_ROWS:
                    w.commit()
            w.close()
            print(f"cache {cache} KiB: {a.rows:,} flow rows in {time.monotonic() - t0:.2f} s wall, "
                  f"{time.process_time() - c0:.2f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
