"""Do two runs of one capture write the same database when T.async results write it?  (docs/async.md "Time")

Runs the plug-in of tests/test_async_deterministic.py (one task per TCP packet; onresult writes an alert, a resource,
a key label and 1-second counters) with each checkout given, once per setting: 1 worker twice, 4 workers, and 1 and
3 workers with onexecute sleeping 0-1.8 ms.  Prints per run the sha256 of the rows (row ids aside) and, per table,
how many rows differ from the checkout's first run.

    python tools/bench/async_determinism.py /work/main [/work/wt-other ...] [--pcap tests/data/trisul-tutorial.pcap]

A checkout runs with its own .venv/bin/python when it has one (the editable install points at it), else with this
interpreter and PYTHONPATH set to it.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE))

from tests import test_async_deterministic as det  # noqa: E402  (the plug-in and the digest of the test)

SETTINGS = (("w1", 1, False), ("w1-again", 1, False), ("w4", 4, False), ("w1-slow", 1, True), ("w3-slow", 3, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", nargs="+")
    ap.add_argument("--pcap", default=det.CAPTURE)
    a = ap.parse_args()
    det.CAPTURE = os.path.abspath(a.pcap)
    for repo in a.checkouts:
        repo = os.path.abspath(repo)
        py = os.path.join(repo, ".venv", "bin", "python")
        det.helpers.REPO, det.sys.executable = repo, py if os.path.exists(py) else sys.executable
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="async-determinism-"))
        try:
            res = {name: det.digest(det.run(tmp, name, w, slow)) for name, w, slow in SETTINGS}
        finally:
            shutil.rmtree(tmp)
        base = res[SETTINGS[0][0]][1]
        print(repo)
        for name, (d, rows) in res.items():
            diff = {t: sum(1 for x in rows[t] if x not in set(base[t])) for t in rows}
            sizes = {t: len(v) for t, v in rows.items()}
            print(f"  {name:9} sha256 {d[:16]}  rows differing from {SETTINGS[0][0]}: "
                  + ", ".join(f"{t} {diff[t]}/{sizes[t]}" for t in rows))


if __name__ == "__main__":
    main()
