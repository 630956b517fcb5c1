"""`luaprobe run --out` that cannot be written: one line naming the path and the OS reason, exit 2 before
anything starts (like --stats-json in the same place); a disk that fills during the run: one line naming the
database and SQLite's reason, exit 1 (the store writer failed; docs/operations.md "Exit codes").  Before: "internal
error: OSError: 30" without a path, "internal error: StoreError ...".  The read-only and full filesystems are real
tmpfs mounts (skipped where mounting is not allowed)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests import helpers

PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
MANY = os.path.join(helpers.REPO, "tests", "data", "tcp-echo-many-flows.pcap")


def run(out, *extra, pcap=SAMPLE):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", pcap,
                           "--out", str(out), "-q", *extra], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=helpers.REPO))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory; unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        n = iter(range(1 << 30))
        yield lambda options: stack.enter_context(helpers.tmpfs(tmp_path / f"fs{next(n)}", options))


@pytest.mark.parametrize("out, reason", [("/proc/luaprobe-o", "No such file or directory"),
                                         ("/sys/luaprobe-o", "Operation not permitted")])
def test_out_that_cannot_be_created(out, reason):
    if not os.path.isdir(os.path.dirname(out)):
        pytest.skip(f"no {os.path.dirname(out)}")
    r = run(out)
    if r.returncode == 0:
        pytest.skip(f"{out} is writable here")
    assert r.returncode == 2 and r.stderr.startswith(f"luaprobe run: --out {out}: cannot write there: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "internal error" not in r.stderr


def test_out_on_a_read_only_filesystem(tmpfs):
    ro = tmpfs("ro,size=1m")
    for out in (ro / "o", ro):                      # to be created there, and the existing directory itself
        r = run(out)
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --out {out}: cannot write there: Read-only file "
                                               "system\n")
    r = run(ro, "--stats-json", str(ro / "s.json"))  # the same exit code as --stats-json in that directory
    assert r.returncode == 2


def test_disk_full_during_the_run(tmpfs):
    full = tmpfs("size=200k")
    r = run(full / "o", pcap=MANY)
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("luaprobe run: exit 1: ") and "internal error" not in line, line
    assert str(full / "o" / "luaprobe.sqlite") in line and "database or disk is full" in line, line
