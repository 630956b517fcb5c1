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


# ------------------------------------------------------------------ 1. README's own command in a new directory

def test_readme_command_works_in_a_new_directory(tmp_path):
    """`--out out --stats-json out/stats.json` (README) where `out` does not exist yet: --out creates it, so the
    run goes on and writes both; --filex-dir beneath it too.  A parent that is neither existing nor --out is
    still the one-line exit 2."""
    r = luaprobe("run", f"{helpers.REPO}/engine/examples/tcp_ports.lua", "--pcap", f"{helpers.REPO}/{SAMPLE}", "--out", "out",
                 "--stats-json", "out/stats.json", "--filex-dir", "out/files", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "luaprobe.sqlite").is_file()
    import json
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["packets"] == 136
    for opt, path in (("--stats-json", "elsewhere/stats.json"), ("--filex-dir", "elsewhere/files")):
        r = luaprobe("run", f"{helpers.REPO}/engine/examples/tcp_ports.lua", "--pcap", f"{helpers.REPO}/{SAMPLE}", "--out", "out2",
                     opt, path, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and f"{opt} {path}: " in r.stderr and f"{tmp_path}/elsewhere" in r.stderr
        assert "does not exist" in r.stderr and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------ 2 and 4: --pcap repeated; --json and a bad file

def _tshark_count(path: str) -> int:
    out = subprocess.run(["tshark", "-r", path], capture_output=True, text=True).stdout
    return len(out.splitlines())


def test_repeated_pcap_reads_every_file_in_order(tmp_path):
    """`--pcap a --pcap b` reads both, in that order (the second used to replace the first silently);
    the packet count is tshark's sum."""
    a, b = f"{helpers.PCAPS}/bad-snaplen8-trunc.pcap", f"{helpers.REPO}/{SAMPLE}"
    import json
    r = luaprobe("run", "engine/examples/tcp_ports.lua", "--pcap", b, "--pcap", a, b, "--out",
                 str(tmp_path / "o"), "--json")
    s = json.loads(r.stdout)
    assert s["files"] == [b, a, b]
    assert s["packets"] == 2 * _tshark_count(b) + _tshark_count(a), (s["packets"], r.stderr)


def test_json_damaged_capture_line_on_stderr_and_next_file_read(tmp_path):
    """--json on a damaged capture: exit 3, stdout pure JSON, and the one input-error line on stderr as without
    --json; a file given after it is still read (tshark's count of its packets)."""
    import json
    from tests.test_cli import _first_oversized_record
    bad, good = f"{helpers.PCAPS}/bad-huge-caplen-record.pcap", f"{helpers.REPO}/{SAMPLE}"
    off, caplen = _first_oversized_record(bad)
    r = luaprobe("run", "engine/examples/tcp_ports.lua", "--pcap", bad, "--pcap", good, "--out",
                 str(tmp_path / "o"), "--json")
    assert r.returncode == 3, r.stderr
    line = f"luaprobe run: input error: {bad}: byte offset {off}: caplen {caplen} exceeds the maximum 1048576"
    assert r.stderr.splitlines() == [line], r.stderr
    s = json.loads(r.stdout)
    assert s["files"] == [bad, good] and s["input_errors"] == [line.split("input error: ")[1]]
    n_bad = subprocess.run(["python3", "-c", f"""
import struct
d = open({bad!r}, 'rb').read(); off = 24; n = 0
while off < {off}:
    off += 16 + struct.unpack_from('<I', d, off + 8)[0]; n += 1
print(n)"""], capture_output=True, text=True).stdout
    assert s["packets"] == int(n_bad) + _tshark_count(good)
