"""The output directory and database under a permissive umask and in a shared directory (security rule:
traffic data owner-only, no symbolic link at a predictable name followed).  Real `luaprobe run` processes;
the truth is the file system (lstat / stat modes, where the bytes landed)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine/examples/sample.pcap")
PLUGIN = os.path.join(helpers.REPO, "engine/examples/tcp_ports.lua")


def run(out, *extra, umask=0o022):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", SAMPLE,
                           "--out", str(out), "-q", *extra], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(umask), env=env)


def test_out_and_database_owner_only_under_umask_000(tmp_path):
    """umask 000 made --out 0777 (anyone could delete or replace the database, plant links) and SQLite made the
    database 0644 (world-readable traffic data)."""
    out = tmp_path / "out"
    r = run(out, umask=0)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    names = [n for n in os.listdir(out) if n.startswith("luaprobe.sqlite")]
    assert "luaprobe.sqlite" in names
    for n in names:
        assert stat.S_IMODE(os.stat(out / n).st_mode) == 0o600, (n, oct(os.stat(out / n).st_mode))


@pytest.mark.parametrize("name", ["luaprobe.sqlite", "luaprobe.sqlite-wal", "luaprobe.sqlite-shm"])
def test_planted_link_in_shared_out_is_not_followed(tmp_path, name):
    """A link another user planted in a shared (1777) --out at the database's predictable names was followed: the
    run (as root) created and wrote a SQLite database at the link's target, anywhere."""
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, 0o1777)
    target = tmp_path / "victim"
    os.symlink(target, out / name)
    r = run(out)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"luaprobe run: --out {out}: {out / name} is a symbolic link (not followed); remove it, or use --overwrite "
        "to replace it, or another --out"]
    assert not os.path.lexists(target)
    assert os.path.islink(out / name)


def test_writer_refuses_link_planted_after_the_check(tmp_path):
    """The store writer itself (what the daemon's fast path opens, with no --out check before it) creates the
    files with O_NOFOLLOW: a link there fails the open and nothing is written at its target."""
    from luaprobe.engine.store.writer import open_rw
    target = tmp_path / "victim"
    os.symlink(target, tmp_path / "luaprobe.sqlite-wal")
    with pytest.raises(OSError, match="luaprobe.sqlite-wal is a symbolic link"):
        open_rw(str(tmp_path / "luaprobe.sqlite"))
    assert not os.path.lexists(target)
