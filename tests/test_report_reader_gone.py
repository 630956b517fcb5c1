"""`luaprobe run`'s reader may leave (`luaprobe run ... | head -1`, `| true`), and the run's result must not go with
it.  Before, the BrokenPipeError of the first summary line ended the command with exit 0: a damaged capture's
input-error line was never printed, no --stats-json file was written, and the exit code was 0 instead of 3
(cli._despite_reader_gone).  Truths: tshark's count of the records before the cut; the cut's byte offset from the
file's own record headers (struct)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")

pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed")


def cut_mid_record(tmp_path) -> tuple[str, int]:
    """The sample cut in the middle of its 100th record: (path, byte offset of that record)."""
    data = open(SAMPLE, "rb").read()
    off = 24
    for _ in range(99):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    path = str(tmp_path / "cut.pcap")
    with open(path, "wb") as f:
        f.write(data[:off + 16 + 10])            # the header and 10 bytes of the 100th record
    return path, off


def run_cli(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, *args],
                          cwd=helpers.REPO, env=env, timeout=300, **kw)


@pytest.mark.parametrize("mode", [[], ["--json"], ["-q"]], ids=["plain", "json", "quiet"])
def test_reader_gone_keeps_exit_code_error_line_and_stats(tmp_path, mode):
    pcap, off = cut_mid_record(tmp_path)
    before_cut = helpers.tshark_frames(pcap, check=False)
    assert before_cut == 99
    r, w = os.pipe()
    os.close(r)                                    # the reader left before the first line (`| true`)
    err = tmp_path / "stderr"
    with open(err, "wb") as ef:
        p = run_cli(["--pcap", pcap, "--out", str(tmp_path / "o"), "--stats-json", str(tmp_path / "s.json"), *mode],
                    stdout=w, stderr=ef)
    os.close(w)
    lines = err.read_text().splitlines()
    assert p.returncode == 3, lines
    assert f"luaprobe run: input error: {pcap}: byte offset {off}: truncated record: caplen" in "\n".join(lines)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["packets"] == before_cut and stats["exit"]["code"] == 3
    assert not [ln for ln in lines if "Traceback" in ln]
