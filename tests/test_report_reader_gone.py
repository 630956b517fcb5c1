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


def _cli_to_gone_reader(tmp_path, *args, which="stdout"):
    """`luaprobe ARGS | true`, deterministically: the reader's end of the pipe closed before the command starts, so
    every write to it fails with EPIPE.  Returns (exit code, the other stream's text)."""
    r, w = os.pipe()
    os.close(r)
    other = tmp_path / "other"
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    with open(other, "wb") as f:
        streams = {"stdout": w, "stderr": f} if which == "stdout" else {"stdout": f, "stderr": w}
        p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=str(tmp_path), env=env,
                           timeout=120, stdin=subprocess.DEVNULL, **streams)
    os.close(w)
    return p.returncode, other.read_text()


@pytest.mark.parametrize("which", ["stdout", "stderr"])
def test_other_commands_keep_their_exit_code_when_the_reader_is_gone(tmp_path, which):
    """The newcomer review (session 18): `luaprobe check plugins/ | head -1` and `luaprobe status | true` exited 0
    when the reader left (cli.main turned the BrokenPipeError into EXIT_OK), so under `set -o pipefail` a plug-in
    that fails to load passed `check` and a stopped daemon read as running.  Now a write to a reader that left
    is dropped and the command ends with its own code.  Truths: the same commands with their output in a file
    (check 4: a syntax error; status 3: nothing ever ran in that run directory; query 2: a group that does not
    exist)."""
    d = tmp_path / "plugins"
    d.mkdir()
    helpers.write_plugin(d, "TrisulPlugin = { id = { name = 'ok' },\n  simplecounter = { protocol_guid = "
                         "'{974FB098-DE46-45db-94DA-8D64A3BBCDE5}', onpacket = function() end } }\n", name="a.lua")
    helpers.write_plugin(d, "TrisulPlugin = { x = = 1 }\n", name="b.lua")
    out = tmp_path / "o"
    assert run_cli(["--pcap", SAMPLE, "--out", str(out), "-q"]).returncode == 0
    (tmp_path / "run").mkdir()
    for args in (["check", str(d)], ["status", "--run-dir", str(tmp_path / "run")],
                 ["query", "counters", "--out", str(out), "--group", "no such group"], ["query", "flows", "--out", str(out)]):
        env = dict(os.environ, PYTHONPATH=helpers.REPO)
        truth = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=str(tmp_path),
                               env=env, timeout=120, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert truth.stdout or truth.stderr, args
        code, other = _cli_to_gone_reader(tmp_path, *args, which=which)
        assert code == truth.returncode, (args, code, truth.returncode, other)
        assert "Traceback" not in other, other
        assert other == (truth.stderr if which == "stdout" else truth.stdout), (args, other)


PRINTING = """TrisulPlugin = { id = { name = "printer" },
  onload = function() print("loaded") end,
  onunload = function() print("bye") end,
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer)
      print("packet")
      N = (N or 0) + 1
      if N == 1 then
        T.async:schedule{ data = "d", onexecute = function(d) print("in the worker") return d end,
                          onresult = function(e, d, r) print("result " .. r) end }
      end
    end },
  engine_monitor = { onbeginflush = function(engine, ts) print("window " .. ts) end } }
"""


def test_plugin_prints_to_a_reader_that_left_are_dropped_not_hook_errors(tmp_path):
    """A plug-in's print() to a stdout whose reader left (`luaprobe run plugins/ | head`, trisul-scripts' cgmon.lua,
    which prints in every hook) is dropped like luaprobe's own lines (docs/operations.md).  Before, each print raised
    "[Errno 32] Broken pipe" as a Lua error in the hook: an ERROR line per hook and exit 4 ("onunload failed on every
    call").  Now: exit 0, no hook error, every hook still called.  Truths: tshark's frame count (onpacket calls) and
    the same run with stdout in a file (its printed lines, its summary)."""
    d = tmp_path / "plugins"
    d.mkdir()
    helpers.write_plugin(d, PRINTING, name="printer.lua")
    frames = helpers.tshark_frames(SAMPLE)
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    args = ["run", str(d), "--pcap", SAMPLE, "-q", "--backend-instances", "1"]
    truth = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args, "--out", str(tmp_path / "o1"),
                            "--stats-json", str(tmp_path / "s1.json")], cwd=str(tmp_path), env=env, timeout=300,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert truth.returncode == 0 and truth.stdout.count("] packet\n") == frames, truth
    assert "] in the worker\n" in truth.stdout and "] result d\n" in truth.stdout and "] bye\n" in truth.stdout
    code, err = _cli_to_gone_reader(tmp_path, *args, "--out", str(tmp_path / "o2"), "--stats-json",
                                    str(tmp_path / "s2.json"))
    assert code == 0 and "Broken pipe" not in err and "ERROR" not in err and "Traceback" not in err, err
    stats = [json.loads((tmp_path / f"s{k}.json").read_text()) for k in (1, 2)]
    calls = [sorted((sorted(p["hook_calls"].items()), p["hook_errors"]) for p in s["plugins"]) for s in stats]
    assert calls[0] == calls[1], calls
    assert all(errors == {} for _, errors in calls[1]), calls
    assert sum(dict(c).get("simplecounter.onpacket", 0) for c, _ in calls[1]) == frames, calls
