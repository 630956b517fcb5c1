"""What a newcomer hit following README and docs (fresh clone): each through the real CLI, exit code and
message asserted, counts against an independent truth (tshark, sqlite3, the file system)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = "engine/examples/sample.pcap"
IPV4 = "{0A2C724B-5B9F-4BA6-9C97-B05080558574}"


def luaprobe(*args, cwd=None, umask=None):
    pre = (lambda: os.umask(umask)) if umask is not None else None
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd or helpers.REPO,
                          capture_output=True, text=True, timeout=180, preexec_fn=pre, env=env)


# ------------------------------------------------------------------ 3. file helpers create files like cp/cat

FILEOPS = f"""TrisulPlugin = {{ id = {{ name = "files" }},
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    if DONE then return end
    DONE = true
    T.async:copy(SRC, DIR .. "/cp_copy.txt")
    T.async:cat(SRC, DIR .. "/cat_new.txt")
    T.async:cat(SRC, DIR .. "/cat_existing.txt")
    T.async:copybuffer("buf", DIR .. "/buf.txt")
  end }} }}
"""


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_file_helpers_create_files_with_0666_less_umask(tmp_path, umask):
    """T.async:copy / cat / copybuffer make a new file 0666 & ~umask, as cp and cat do (they made 0000: the
    mode went through open's `...` as a double); an append keeps the existing file's mode."""
    d = tmp_path / "files"
    d.mkdir()
    (d / "src.txt").write_text("SRC\n")
    (d / "cat_existing.txt").write_text("OLD\n")
    os.chmod(d / "cat_existing.txt", 0o640)
    body = f'SRC = "{d}/src.txt"\nDIR = "{d}"\n' + FILEOPS
    plug = helpers.write_plugin(tmp_path, body, "files.lua")
    r = luaprobe("run", plug, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "-q", umask=umask)
    assert r.returncode == 0, r.stderr
    want = 0o666 & ~umask
    for name in ("cp_copy.txt", "cat_new.txt", "buf.txt"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == want, (name, oct(os.stat(d / name).st_mode))
    assert stat.S_IMODE(os.stat(d / "cat_existing.txt").st_mode) == 0o640
    assert (d / "cp_copy.txt").read_text() == "SRC\n" and (d / "cat_existing.txt").read_text() == "OLD\nSRC\n"
    assert (d / "buf.txt").read_text() == "buf"
