"""ensure_run_dir (engine/daemon/control.py) while the running daemon renames its files into the run directory.

A running supervisor writes state.json and stats.json as a temporary file renamed over the old one
(control.write_json).  `luaprobe start` against that daemon lists the run directory and checks each entry's type
(no FIFO, device or symbolic link); a temporary file listed and then renamed away before its stat() made start
say "run directory RUN: No such file or directory", exit 2, instead of "already running" (3 in 77 583 calls against
a real daemon).  Here a real second process renames files into the directory as fast as it can while this one
checks it; every check must pass.
"""
from __future__ import annotations

import os
import subprocess
import sys

from luaprobe.engine.daemon import control

CHURN = r"""
import os, sys
d = sys.argv[1]
i = 0
print("ready", flush=True)
while True:                                   # what control.write_json does: a temporary file renamed into place
    p = f"{d}/state.json.tmp{i % 7}"
    with open(p, "w") as f:
        f.write("{}")
    os.replace(p, f"{d}/state.json")
    i += 1
"""


def test_a_file_renamed_away_while_the_run_directory_is_checked_is_no_error(tmp_path):
    run_dir = control.ensure_run_dir(str(tmp_path / "run"))
    for i in range(200):                      # a longer listing: more time between an entry's listing and its check
        (tmp_path / "run" / f"stats.jsonl.{i}").write_text("")
    churn = subprocess.Popen([sys.executable, "-c", CHURN, run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert churn.stdout.readline() == "ready\n"
        errors = []
        for _ in range(20000):
            try:
                control.ensure_run_dir(run_dir)
            except OSError as e:
                errors.append(str(e))
        assert churn.poll() is None, "the renaming process ended early"
    finally:
        churn.kill()
        churn.wait()
    assert errors == [], f"{len(errors)} of 20000 checks failed, e.g. {errors[0]}"
    assert "state.json" in os.listdir(run_dir)          # the other process did rename files in
