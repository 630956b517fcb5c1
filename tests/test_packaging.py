"""The wheel: one top-level import name, and the demo runs from it outside the source tree (issue 9, 17.6)."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import zipfile

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory, worker_id):
    """The project's wheel, built as `pip install .` would, unpacked into a directory (a site-packages).

    Built once a run: under xdist in the run's base temporary directory (the parent of every worker's own, so
    unique to this run), under a flock, and the other workers reuse it.  Before, each xdist process that got one
    of this file's tests built it, and two builds at the same moment from the one source tree collide in its
    build/ directory ("error: [Errno 17] File exists: 'build/bdist.linux-x86_64/wheel/luaprobe-0.1.0.dist-info'",
    a full run on 2026-12-02 at load ~9).  (A module-wide xdist_group would also serialise the two tests; it was
    tried first under pytest 9.2, whose --dist loadgroup ignores the mark, pytest-dev/pytest-xdist#1386: pyproject
    now pins pytest < 9.2.)"""
    import fcntl
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    site = root / "wheel-site"
    with open(root / "wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (site / "luaprobe").is_dir():
            out = root / "wheel"
            out.mkdir(exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                                helpers.REPO], capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
            (whl,) = out.glob("luaprobe-*.whl")
            shutil.rmtree(root / "wheel-site.part", ignore_errors=True)
            with zipfile.ZipFile(whl) as z:
                z.extractall(root / "wheel-site.part")
            os.rename(root / "wheel-site.part", site)
    return site


@pytest.mark.timeout(900)
def test_wheel_installs_only_luaprobe_at_the_top_level(wheel_dir):
    top = sorted(p.name for p in wheel_dir.iterdir())
    assert [t for t in top if not t.endswith(".dist-info")] == ["luaprobe"]
    pkg = wheel_dir / "luaprobe"
    assert sorted(p.name for p in pkg.iterdir()) == ["engine", "shm", "workers"]
    # Lua modules, the C helper and the demo's files are package data
    for rel in ("engine/fastpath/decode.lua", "engine/plugins/host.lua", "workers/worker.lua", "shm/ring.lua",
                "engine/examples/sample.pcap", "engine/examples/blocklist.txt", "engine/loadtest/scenarios.py"):
        assert (pkg / rel).is_file(), rel
    assert list((pkg / "shm").glob("_lpsync*.so"))


@pytest.mark.timeout(900)
def test_demo_runs_from_the_wheel_outside_the_source_tree(wheel_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_dir)}
    where = subprocess.run([sys.executable, "-c", "import luaprobe.engine, luaprobe.workers, luaprobe.shm;"
                            "print(luaprobe.engine.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(wheel_dir)), where
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "demo", "--out", str(tmp_path / "out")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    try:
        # dns_watch.lua reads blocklist.txt in its worker: 0 async errors means the package data was found
        m = re.search(r"dns_watch\.lua .*async scheduled (\d+) ok (\d+) nil 0 error 0 timeout 0", r.stdout)
        assert m and int(m.group(1)) == int(m.group(2)) > 0, r.stdout
        assert db.execute("SELECT count(*) FROM alerts").fetchone()[0] > 0
    finally:
        db.close()
    v = subprocess.run([sys.executable, "-m", "luaprobe.engine", "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("luaprobe ")
