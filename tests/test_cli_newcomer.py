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


# ------------------------------------------------------------------ 5. async errors in the text summary

ERRS = f"""TrisulPlugin = {{ id = {{ name = "errs" }},
  onunload = function() error("unload boom") end,
  simplecounter = {{ protocol_guid = "{IPV4}", onpacket = function(engine, layer)
    N = (N or 0) + 1
    local bad = N % 2 == 0
    T.async:schedule({{ data = "x", onexecute = function(d) return d end,
      onresult = function(engine, d, r) if bad then error("onresult boom") end end }})
  end }} }}
"""


@pytest.mark.parametrize("shards", ["1", "2"])
def test_text_summary_shows_onresult_and_onunload_errors(tmp_path, shards):
    """Every other onresult raises: the text line shows `onresult_errors` (tshark's IPv4 count / 2; they hid in
    the JSON); onunload raising counts in `errors` (once per VM) and, its only call failing, exit 4."""
    n_ip = len(subprocess.run(["tshark", "-r", SAMPLE, "-Y", "ip"], capture_output=True, text=True,
                              cwd=helpers.REPO).stdout.splitlines())
    plug = helpers.write_plugin(tmp_path, ERRS, "errs.lua")
    sj = tmp_path / "s.json"
    r = luaprobe("run", plug, "--pcap", SAMPLE, "--out", str(tmp_path / "out"), "--shards", shards,
                 "--stats-json", str(sj))
    assert r.returncode == 4, r.stderr
    import json
    s = json.loads(sj.read_text())
    vms = len(s["plugins"])
    assert vms == int(shards)
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("errs.lua [")]
    assert f"hook calls {n_ip + vms:,} errors {vms} " in line, line
    assert f" ok {n_ip} " in line and line.endswith(f" onresult_errors {n_ip // 2}"), line
    for p in s["plugins"]:
        helpers.assert_accounting(p["async"])
        assert p["hook_errors"] == {"onunload": 1} and p["hook_calls"]["onunload"] == 1
    assert sum(p["async"]["onresult_errors"] for p in s["plugins"]) == n_ip // 2
    assert r.stderr.count("onunload failed on every call (1)") == vms


# ------------------------------------------------------------------ 6. --shards: the written line and filex lines

def test_sharded_written_line_counts_distinct_groups_and_one_incomplete_line(tmp_path):
    """--shards 2: `written:` says the number of groups the database holds (sqlite3 counts them), not the sum
    of both shards' upserts; truncated HTTP bodies spread over both shards give one `incomplete files` line
    with the number of connections built truncated."""
    import json
    import sqlite3
    from tests import pktbuild as pb
    frames, n = [], 8
    body = bytes(range(256)) * 8
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for i in range(n):          # each ends before its Content-Length (truncated); client addresses spread over shards
        c = pb.Conv(cip=f"{10 + i * 23}.{i * 29}.{i * 3}.{i * 7 + 1}", cport=47000 + i, t0=1700000000 + i)
        c.handshake()
        c.send(True, pb.http_request(f"/t{i}"))
        c.seg(False, pb.PSH | pb.ACK, head + body[:500])
        c.close()
        frames.extend(c.frames)
    pcap = str(tmp_path / "t.pcap")
    pb.write_pcap(pcap, frames)
    sj = tmp_path / "s.json"
    r = luaprobe("run", f"{helpers.REPO}/engine/examples", "--pcap", pcap, "--pcap", f"{helpers.REPO}/{SAMPLE}",
                 "--out", str(tmp_path / "out"), "--shards", "2", "--stats-json", str(sj), cwd=tmp_path)  # extracted/ there
    assert r.returncode == 0, r.stderr
    s = json.loads(sj.read_text())
    per_shard = [fx["incomplete_truncated"] for fx in s["filex"]]
    assert len(per_shard) == 2 and all(per_shard) and sum(per_shard) == n, per_shard   # both shards saw some
    inc = [x for x in r.stdout.splitlines() if "incomplete files" in x]
    assert inc == [f"file_sha256.lua: incomplete files truncated {n}"], inc
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    groups = db.execute("SELECT count(*) FROM counter_groups").fetchone()[0]
    decls = db.execute("SELECT count(*) FROM decl_groups").fetchone()[0]
    db.close()
    (written,) = [x for x in r.stdout.splitlines() if x.startswith("written: ")]
    assert groups and decls and f"counter_groups {groups}," in written and f"decl_groups {decls} " in written
    assert s["rows_written"]["counter_groups"] == groups and s["rows_written"]["decl_groups"] == decls


def test_a_tree_whose_c_sources_changed_after_the_build_is_one_line(tmp_path):
    """After a `git pull` that changed shm/_lpsync.c without `pip install -e .`, `bash tools/demo.sh` (README) ran
    on the stale build (its import worked) and failed with exit 3 "input error: .../sample.pcap: byte offset 0:
    ... undefined symbol: lp_cutguard_arm", blaming the bundled capture.  Now run / demo / check / start say which
    module is older than which source, exit 1, before anything starts (and demo.sh rebuilds).  A copy of the
    package (its built modules and sources, mtimes kept) on PYTHONPATH, one source touched: the repository's own
    tree is never touched."""
    import shutil
    copy = tmp_path / "ns" / "luaprobe"
    for d in ("engine", "workers", "shm"):
        shutil.copytree(os.path.join(helpers.REPO, d), copy / d, symlinks=True)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "ns"))
    cmd = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", os.path.join(helpers.REPO, "engine", "examples",
           "tcp_ports.lua"), "--pcap", os.path.join(helpers.REPO, SAMPLE), "-q"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "o1")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr                             # the copy itself runs (its build is current)
    src = copy / "shm" / "_lpsync.c"
    built = [p for p in (copy / "shm").iterdir() if p.name.startswith("_lpsync.") and p.suffix == ".so"][0]
    # what a checkout of a changed file does: the source newer than the build (the build's own time + 60 s; the
    # source's + 60 was still older in a tree built more than 60 s after its checkout)
    os.utime(src, (src.stat().st_atime, max(src.stat().st_mtime, built.stat().st_mtime) + 60))
    r = subprocess.run([*cmd, "--out", str(tmp_path / "o2")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr) == (1, f"luaprobe run: {built} is older than {src}: the source tree changed after "
                                           "the build; rebuild with `pip install -e .` (in the repository)\n")
    assert not (tmp_path / "o2").exists()
