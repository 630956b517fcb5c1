"""One fast-path run for the harness: ``python -m luaprobe.engine.loadtest.runner CONFIG.json SUMMARY.json``.

CONFIG: RunConfig fields (plugins, out_dir, interface | generate, packet_ring_size, stats_file, stats_interval)
plus ``async``: AsyncConfig fields.  Live runs stop on SIGINT (FastPath's clean stop)."""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    cfg_path, out_path = (argv or sys.argv[1:])[:2]
    with open(cfg_path) as f:
        c = json.load(f)
    from luaprobe.engine.fastpath.run import FastPath, RunConfig
    from luaprobe.workers.pool import AsyncConfig
    ac = AsyncConfig(**c.pop("async", {}))
    s = FastPath(RunConfig(files=[], async_config=ac, **c)).run()
    with open(out_path, "w") as f:
        json.dump(s, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
