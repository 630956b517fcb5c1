"""Traffic-derived names through filex and the T.async file helpers (security rule: traffic is not trusted, paths
confined): a real `luaprobe run` over a capture whose URLs, Host and Content-Disposition hold `..`, absolute
paths, percent-encoded `../`, backslashes, control characters and 600-byte names.  The truth is the file system
(realpath of every extracted path, files created anywhere else) and the log lines on stderr."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import helpers
from tests import pktbuild as pb

NASTY = ["/../../etc/x", "/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/" + "A" * 600, "/a\\b\\..\\..\\c", "/a\x1b[31mred",
         "/x\rINJECT", "//abs/path", "/..", "/%00nul", "/ok.bin"]

PLUGIN = r"""
local SAVE, REC = os.getenv("LP_SAVE"), os.getenv("LP_REC")
TrisulPlugin = { id = { name = "fxnames" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
      local f = assert(io.open(REC, "a")); f:write(path, "\n"); f:close()
      T.log(T.K.loglevel.INFO, "URL " .. req:get_path() .. " HOST " .. tostring(req:get_value("Host")))
      local fn = (resp:get_value("Content-Disposition") or ""):match('filename="([^"]*)"') or "none"
      T.async:copy(path, SAVE .. "/" .. fn)              -- names straight from the packets
      T.async:copy(path, SAVE .. req:get_path())
      T.async:copy(path, req:get_path())                 -- absolute, from the URL: outside every root
    end } }
"""


def capture(path, tmp_path):
    frames = []
    for i, url in enumerate(NASTY):
        c = pb.Conv(cport=41000 + i)
        c.handshake()
        body = b"body-%d" % i
        c.send(True, pb.http_request(url, host="../../h" if i % 2 else "h\x1b]0;t\x07\rFORGED"))
        fn = "ok-%d" % i if url == "/ok.bin" else f"../../{tmp_path.name}/ESCAPE{i}"
        c.send(False, pb.http_response(body, headers=[("Content-Length", len(body)),
                                                      ("Content-Disposition", f'attachment; filename="{fn}"')]))
        c.close()
        frames += c.frames
    pb.write_pcap(path, sorted(frames, key=lambda f: f[0]))


def test_traffic_names_stay_confined_with_file_root(tmp_path):
    """Every extracted file lies in the run's filex directory; helper copies land only beneath --file-root, and the
    copy out of the extraction directory works (docs/async.md: that directory joins the roots).  Before the fix
    the directory never reached the workers' roots: every copy of an extracted file failed with 'outside the
    allowed file roots', so this test's ok-9 was missing."""
    pcap, save, fxdir, rec = tmp_path / "n.pcap", tmp_path / "save", tmp_path / "fx", tmp_path / "rec.txt"
    capture(str(pcap), tmp_path)
    save.mkdir()
    fxdir.mkdir()
    plug = tmp_path / "fxnames.lua"
    plug.write_text(PLUGIN)
    before = set(os.listdir("/"))
    env = dict(os.environ, PYTHONPATH=helpers.REPO, LP_SAVE=str(save), LP_REC=str(rec))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plug), "--pcap", str(pcap),
                        "--out", str(tmp_path / "out"), "--filex-dir", str(fxdir), "--file-root", str(save),
                        "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    paths = rec.read_text().splitlines()
    assert len(paths) == len(NASTY)
    for p in paths:                                   # one component, in the run's filex directory
        assert os.path.dirname(os.path.realpath(p)) == os.path.realpath(fxdir), p
    assert set(os.listdir("/")) == before             # the absolute URL copies were refused
    made = sorted(os.listdir(save))
    assert "ok-9" in made and (save / "ok-9").read_bytes() == b"body-9"
    for name in made:                                 # only plain names beneath the root, nothing escaped it
        assert os.path.realpath(save / name).startswith(str(os.path.realpath(save)) + os.sep)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ESCAPE")]
    assert "outside the allowed file roots" in r.stderr and "'..' is not allowed" in r.stderr
    # one packet, one log line: the CR and escape sequences of URL and Host are escaped, no forged line
    lines = r.stderr.splitlines()
    assert not [ln for ln in lines if ln.startswith(("FORGED", "INJECT"))]
    assert not [ln for ln in lines if "\r" in ln or "\x1b" in ln]
    assert sum(" URL " in ln for ln in lines) == len(NASTY)


def _run_on_planted_filex_dir(tmp_path, name: str, mode: int, owner=None):
    """`luaprobe run --filex-dir DIR` over the forged-names capture, DIR made with `mode` (and given to `owner`, a
    pwd entry) and a link planted at the first extracted file's name pointing at tmp_path/victim.  Returns
    (pcap, DIR, victim, plug-in, env, the finished process)."""
    pcap, fxdir, victim = tmp_path / "n.pcap", tmp_path / name, tmp_path / "victim"
    capture(str(pcap), tmp_path)
    fxdir.mkdir()
    os.chmod(fxdir, mode)
    os.symlink(victim, fxdir / "h__0_t__FORGED_.._.._etc_x-1-1-1")
    if owner is not None:
        os.lchown(fxdir, owner.pw_uid, owner.pw_gid)
    plug = tmp_path / "fxnames.lua"
    plug.write_text("TrisulPlugin = { id = { name = 'r' }, filex_monitor = { onfile_http = function() end } }")
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plug), "--pcap", str(pcap),
                        "--out", str(tmp_path / "out"), "--filex-dir", str(fxdir)], capture_output=True, text=True,
                       timeout=300, env=env)
    return pcap, fxdir, victim, plug, env, r


def test_shared_filex_dir_is_refused(tmp_path):
    """A --filex-dir others can write (here 1777, like /tmp): extracted files have predictable names
    (<host><uri>-1-1-1) and were opened following links, so a link planted there had the run write the response
    body (traffic bytes) to its target.  Now refused before anything starts, by `run` and by `start`."""
    pcap, fxdir, victim, plug, env, r = _run_on_planted_filex_dir(tmp_path, "shared", 0o1777)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"luaprobe run: --filex-dir {fxdir}: writable by other users (mode 1777): a symbolic link planted at an "
        "extracted file's name (they are predictable) would redirect the traffic's bytes; give a directory only its "
        "owner can write (chmod go-w)"]
    assert not os.path.lexists(victim) and not os.path.exists(tmp_path / "out")
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nrun_dir = "run"\n[source]\npcap = ["{pcap}"]\n[plugins]\n'
                   f'paths = ["{plug}"]\n[filex]\ndir = "{fxdir}"\n')
    try:
        s = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    finally:
        subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "stop", "--run-dir",
                        str(tmp_path / "run")], capture_output=True, timeout=120, env=env)
    assert s.returncode == 2 and "[filex] dir = " in s.stderr and "writable by other users" in s.stderr, s.stderr
    assert not os.path.lexists(victim)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_filex_dir_owned_by_another_user_is_refused_unless_it_is_the_run_user(tmp_path):
    """A --filex-dir that only its owner can write (0755) but whose owner is another user: that user can plant a
    link at an extracted file's (predictable) name, as in a shared directory.  Refused, unless the owner is the
    --user the run drops to.  Truth: the file system (the planted link's target stays absent)."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    _, fxdir, victim, _, _, r = _run_on_planted_filex_dir(tmp_path, "theirs", 0o755, nobody)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"luaprobe run: --filex-dir {fxdir}: owned by another user (uid {nobody.pw_uid}): its owner could plant a "
        "symbolic link at an extracted file's name (they are predictable) and redirect the traffic's bytes; give a "
        "directory owned by this user, root or the --user the run drops to"]
    assert not os.path.lexists(victim)
    from luaprobe.engine.daemon.usage import check_private_dir
    check_private_dir("--filex-dir", str(fxdir), "nobody")      # the run's own --user: its directory is fine
