"""`python -m luaprobe.engine.loadtest SCENARIO|all [--quick] [--out DIR] [--work DIR] [--json]`.

Writes DIR/<scenario>/report.md and PNG plots (default DIR: ./loadtest-reports).  Exit 0 on success, 1 when a
scenario's invariant failed or it could not run, 2 on a usage error."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


def main(argv=None) -> int:
    from luaprobe.engine.loadtest import common
    from luaprobe.engine.loadtest.scenarios import SCENARIOS
    from luaprobe.engine.daemon.usage import Parser, nonempty
    ap = Parser(prog="luaprobe loadtest", description="load tests with Markdown reports and plots")
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"])
    ap.add_argument("--quick", action="store_true", help="a few seconds per scenario (smoke test)")
    ap.add_argument("--out", default=common.DEFAULT_OUT, type=nonempty("a directory"),
                    help=f"report directory (default ./{common.DEFAULT_OUT}; the committed reports were made with --out docs/loadtest)")
    ap.add_argument("--work", default=None, type=nonempty("a directory"), help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.quick and "docs" in os.path.realpath(args.out).split(os.sep):
        ap.error(f"--quick --out {args.out}: quick smoke runs never write into docs/ (the committed reports); "
                 "give another --out")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    work = args.work or tempfile.mkdtemp(prefix="luaprobe-loadtest-")
    results, rc = {}, 0
    try:
        for name in names:
            out = os.path.join(args.out, name)
            os.makedirs(out, exist_ok=True)
            wd = os.path.join(work, name)
            os.makedirs(wd, exist_ok=True)
            print(f"{name}{' (quick)' if args.quick else ''} -> {out}", flush=True)
            try:
                results[name] = SCENARIOS[name](out, wd, args.quick)
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(results[name], f, indent=1, default=str)
            except (AssertionError, RuntimeError) as e:
                print(f"{name}: FAILED: {e!r}", file=sys.stderr)
                results[name] = {"error": repr(e)}
                rc = 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
