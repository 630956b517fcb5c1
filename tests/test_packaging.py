"""The wheel: one top-level import name, and the demo runs from it outside the source tree (issue 9, 17.6)."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import zipfile

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """The project's wheel, built as `pip install .` would, unpacked into a directory (a site-packages)."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), helpers.REPO],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("luaprobe-*.whl")
    site = out / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
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
