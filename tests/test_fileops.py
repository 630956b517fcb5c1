"""T.async file helpers under hostile names (issue 13.10): real workers, the real file system as the truth.

The rule (docs/async.md): no '..' component, no NUL, the last component never followed if it is a symlink,
with file roots every component below the root opened without following symlinks; errors are errors (named,
escaped), never silently truncated or reported as done.  Absolute destinations stay legal by default.
"""
from __future__ import annotations

import logging
import os

import pytest

from tests import helpers
from tests.test_async import drain, plugin, q

OPS = r'''
done, errs = {}, {}
local function track(tag, ok)
  return ok
end
function op(kind, a, b, c)
  local r
  if kind == "copy" then r = T.async:copy(a, b)
  elseif kind == "cat" then r = T.async:cat(a, b)
  elseif kind == "rm" then r = T.async:rm(a)
  else r = T.async:copybuffer(a, b, c) end
  return r
end
'''


def lq(s: str) -> str:
    """A Lua string literal for any string (NUL and control bytes as decimal escapes)."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c):03d}" for c in s) + '"'


def _run(rt, vm, calls):
    for kind, *args in calls:
        lua_args = ", ".join(lq(a) if isinstance(a, str) else str(a) for a in args)
        assert vm.exec(f"return op({q(kind)}, {lua_args})") is True
    return drain(rt, vm)


def _files_under(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_names_never_climb_out_and_absolute_destinations_work(runtime_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="luaprobe")
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "src").write_text("SRC")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("KEEP")
    os.symlink(outside / "target", base / "link")
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, OPS))
    calls = [
        ("copybuffer", "x", f"{base}/sub/../../outside/climb1"),        # absolute with ..
        ("copy", f"{base}/src", f"{base}/../outside/climb2"),
        ("cat", f"{base}/src", f"{base}/sub/../../outside/climb3"),
        ("copy", f"{base}/../outside/target", f"{base}/stolen"),          # a source climbing out
        ("rm", f"{base}/../outside/target"),
        ("copybuffer", "x", f"{base}/nul\0.txt"),                         # NUL: no truncated "nul" file
        ("copybuffer", "EVIL", f"{base}/link"),                           # last component a symlink
        ("rm", f"{base}/" + "n" * 300),                                   # ENAMETOOLONG is an error
        ("copybuffer", "bad\nname", f"{base}/missing-dir/a\n2026-01-01 luaprobe FORGED"),
        ("copybuffer", "ok", f"{base}/sub/abs.bin"),                      # absolute destination: legal
        ("copy", f"{base}/src", f"{base}/copied"),
        ("rm", f"{base}/never-existed"),                                  # missing file: not an error
    ]
    st = _run(rt, vm, calls)
    assert (st["error"], st["ok"]) == (9, 3), st
    assert _files_under(outside) == ["target"] and (outside / "target").read_text() == "KEEP"
    assert _files_under(base) == ["copied", "link", "src", "sub/abs.bin"]
    assert (base / "sub" / "abs.bin").read_text() == "ok" and (base / "copied").read_text() == "SRC"
    msgs = [r.getMessage() for r in caplog.records if "file helper error" in r.getMessage()]
    text = "\n".join(msgs)
    assert "'..' is not allowed" in text and "NUL byte" in text and "symbolic link" in text
    assert "File name too long" in text
    assert not any("\n" in m for m in msgs) and "FORGED" in text and "a\\n2026" in text


def test_file_roots_confine_every_component(runtime_factory, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(other, root / "escape")                                    # a directory symlink beneath the root
    (root / "src").write_text("SRC")
    monkeypatch.chdir(tmp_path)                                           # the workers' working directory
    rt = runtime_factory(workers=1, file_roots=[str(root)])
    vm = rt.load(plugin(tmp_path, OPS))
    calls = [
        ("copybuffer", "a", f"{root}/sub/ok.bin"),
        ("copy", f"{root}/src", f"{root}/copy.bin"),
        ("copybuffer", "b", f"{other}/no.bin"),                           # outside every root
        ("copybuffer", "c", f"{root}/escape/no2.bin"),                    # through a symlink beneath the root
        ("copy", f"{other}/../root/src", f"{root}/no3.bin"),
        ("copybuffer", "d", "root/sub/rel.bin"),                          # relative: beneath the root too
        ("copybuffer", "e", "other/rel.bin"),                             # relative, outside
    ]
    st = _run(rt, vm, calls)
    assert (st["ok"], st["error"]) == (3, 4), st
    assert _files_under(other) == []
    assert sorted(_files_under(root)) == ["copy.bin", "src", "sub/ok.bin", "sub/rel.bin"]


def test_lua_log_lines_cannot_be_forged(runtime_factory, tmp_path, caplog):
    """T.log* text from a plug-in (often packet data): no raw control characters, no line that starts
    like a log line of its own."""
    caplog.set_level(logging.INFO, logger="luaprobe")
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, OPS))
    vm.exec(r'T.logerror("host x\n2026-11-29 10:00:00,000 luaprobe[1] ERROR forged\r\027[2Jgone")')
    msg = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert len(msg) == 1
    lines = msg[0].split("\n")
    assert lines[1].startswith("  | 2026-11-29") and "\r" not in msg[0] and "\x1b" not in msg[0]
    assert "\\x0d\\x1b[2Jgone" in lines[1]


def test_file_helper_error_flood_is_rate_limited_and_bounded(runtime_factory, tmp_path, caplog):
    """Issue 13.11: 20 000 distinct failing names give a handful of log lines (one per kind of error, then
    one a second), and the rate limiter's memory stays bounded (its keys leave the names out)."""
    caplog.set_level(logging.INFO, logger="luaprobe")
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, OPS + r'''
function flood(n, dir)
  for i = 1, n do T.async:copybuffer("x", dir .. "/missing-dir/name-" .. i) end
  for i = 1, 10 do T.async:rm(dir .. "/" .. string.rep("n", 300) .. i) end
end
'''))
    t0 = __import__("time").monotonic()
    vm.exec(f"flood(20000, {q(tmp_path)})")
    st = drain(rt, vm, timeout=120)
    elapsed = __import__("time").monotonic() - t0
    assert (st["error"], st["ok"]) == (20010, 0), st
    lines = [r.getMessage() for r in caplog.records if "file helper error" in r.getMessage()]
    assert 2 <= len(lines) <= 2 * (2 + elapsed), len(lines)   # two kinds: first line each, then <= 1/s each
    assert any("copybuffer: " in m and "No such file or directory" in m for m in lines)
    assert any("rm: " in m and "File name too long" in m for m in lines)
    keys = vm.lua.eval("function(a) local n = 0; for _ in pairs(a.errors.seen) do n = n + 1 end; return n end")(
        vm.async_obj)
    assert keys == 2


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_file_helper_error_flood_at_200k_names():
    """Issue 13.11 at the issue's own scale (200 000 distinct names; it measured 200 000 log lines and 61 MiB
    of Lua memory never freed), with tools/bench/logflood.py: the log lines follow the limiter's rule (one
    first line per kind, then at most one a second each), 2 limiter keys, and the plug-in VM's Lua memory
    after a full collection is the same as after 20 000 names (what stays is the task queue's high-water
    mark, set by the chunk size, not by the names)."""
    import json
    import subprocess
    import sys

    def flood(n):
        r = subprocess.run([sys.executable, os.path.join(helpers.REPO, "tools", "bench", "logflood.py"),
                            "--names", str(n), "--chunk", "10000", "--json"], capture_output=True, text=True,
                           timeout=1500)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    small, big = flood(20_000), flood(200_000)
    for r in (small, big):
        assert (r["errors"], r["ok"]) == (r["names"] + 10, 1) and r["same_worker"]
        a = r["after"]
        assert a["limiter_keys"] == 2
        assert 2 <= a["log_lines"] <= 2 * (2 + r["elapsed_s"]), r
    grown = big["after"]["plugin_lua_kib"] - small["after"]["plugin_lua_kib"]
    assert abs(grown) < 256, (small["after"], big["after"])                # KiB: 10x the names, same memory
    assert big["after"]["worker_lua_kib"] - big["before"]["worker_lua_kib"] < 256, big


def test_copy_and_cat_read_only_regular_files(runtime_factory, tmp_path, caplog):
    """copy / cat from a character device, a FIFO or a directory is an error naming what the source is, and no
    target is created (a source name may come from a packet).  Before: /dev/zero wrote until the task timeout
    killed the worker (4.6 GB in 10 s in a `luaprobe run`; here 2 s), a FIFO held the worker until the timeout
    (open(2) waits for a writer) and a directory left an empty target ('Is a directory' at the first read).
    The truth is the file system (which targets exist) and os.stat of each source."""
    import stat
    caplog.set_level(logging.INFO, logger="luaprobe")
    out = tmp_path / "out"
    out.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "src").write_bytes(b"SRC\0\xff")
    sources = {"/dev/zero": "a character device", "/dev/null": "a character device", str(fifo): "a FIFO",
               str(tmp_path / "dir"): "a directory"}
    for src, kind in sources.items():       # what each one is, by os.stat (not by the code under test)
        m = os.stat(src).st_mode
        assert {"a character device": stat.S_ISCHR, "a FIFO": stat.S_ISFIFO, "a directory": stat.S_ISDIR}[kind](m)
    rt = runtime_factory(workers=1, task_timeout=2.0)
    vm = rt.load(plugin(tmp_path, OPS))
    calls = []
    for k, src in enumerate(sources):
        calls += [("copy", src, f"{out}/copy{k}"), ("cat", src, f"{out}/cat{k}")]
    calls += [("copy", f"{tmp_path}/src", f"{out}/regular"), ("cat", f"{tmp_path}/src", f"{out}/regular")]
    st = _run(rt, vm, calls)
    assert (st["ok"], st["error"], st["timeout"]) == (2, 8, 0), st
    assert _files_under(out) == ["regular"] and (out / "regular").read_bytes() == b"SRC\0\xff" * 2
    msgs = [r.getMessage() for r in caplog.records if "file helper error" in r.getMessage()]
    expected = {f"{op}: {src}: not a regular file ({kind})" for src, kind in sources.items() for op in ("copy", "cat")}
    assert msgs and all(m.split("file helper error: ", 1)[1] in expected for m in msgs), msgs   # (rate-limited)
    assert msgs[0].endswith("copy: /dev/zero: not a regular file (a character device)"), msgs


def test_copybuffer_past_the_largest_file_fails_and_leaves_no_half_file(runtime_factory, tmp_path, caplog):
    """copybuffer at a byte offset past what the file system allows (2^60 on ext4 / tmpfs: EFBIG; 2^63 and beyond:
    no off_t holds it) is the task's error, one line naming the file, the offset and why, and leaves no file behind
    (before: an empty file, created by the open before the write failed); an existing target keeps its bytes and
    size.  The truth is the file system: which files exist, their bytes.  pos NaN or inf is refused at the call."""
    caplog.set_level(logging.INFO, logger="luaprobe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept").write_bytes(b"KEEP")
    rt = runtime_factory(workers=1)
    vm = rt.load(plugin(tmp_path, OPS))
    offsets = [2**60, 2**62, 2**63, 2**70]
    calls = [("copybuffer", "hello", f"{out}/far{k}", pos) for k, pos in enumerate(offsets)]
    calls += [("copybuffer", "hello", f"{out}/kept", 2**60), ("copybuffer", "!", f"{out}/kept"),
              ("copybuffer", "end", f"{out}/near", 4)]
    st = _run(rt, vm, calls)
    assert (st["error"], st["ok"]) == (5, 2), st
    assert _files_under(out) == ["kept", "near"]
    assert (out / "kept").read_bytes() == b"KEEP!" and (out / "near").read_bytes() == b"\0\0\0\0end"
    msgs = [r.getMessage().split("file helper error: ", 1)[1] for r in caplog.records
            if "file helper error" in r.getMessage()]
    assert msgs and msgs[0] == (f"copybuffer: {out}/far0: 5 bytes at byte offset {2**60}: past the largest file the "
                                "file system allows (File too large)"), msgs
    assert all("past the largest file the file system allows" in m and "\n" not in m for m in msgs), msgs
    for bad in ("0/0", "math.huge", "-1"):
        with pytest.raises(Exception, match="pos must be a non-negative number"):
            vm.exec(f'return T.async:copybuffer("x", {lq(str(out / "nan"))}, {bad})')
    assert _files_under(out) == ["kept", "near"]


def test_copy_and_cat_onto_their_own_source_are_errors_and_the_file_is_kept(runtime_factory, tmp_path, caplog):
    """copy / cat whose target is the source itself (the same name, another spelling of it, a hard link) is the
    task's error naming both names, and the file keeps its bytes, as `cp a a` ("are the same file") and GNU cat
    ("input file is output file") refuse.  Before: copy(a, a) emptied a and counted ok (the target was opened with
    O_TRUNC before the first read), cat(a, a) appended a to itself until the task timeout or a full disk (200 MB in
    10 s in a `luaprobe run` under ulimit -f).  A copy onto another, longer file still replaces its bytes.  The truth
    is the file system: each file's bytes, and os.stat that the hard link is the same inode."""
    caplog.set_level(logging.INFO, logger="luaprobe")
    d = tmp_path / "d"
    d.mkdir()
    data = b"ORIGINAL\0\xff" * 100
    (d / "a").write_bytes(data)
    os.link(d / "a", d / "hard")
    assert os.stat(d / "a").st_ino == os.stat(d / "hard").st_ino
    (d / "long").write_bytes(b"x" * 5000)
    rt = runtime_factory(workers=1, task_timeout=2.0)
    vm = rt.load(plugin(tmp_path, OPS))
    same = [(f"{d}/a", f"{d}/a"), (f"{d}/a", f"{d}//./a"), (f"{d}/a", f"{d}/hard"), (f"{d}/hard", f"{d}/a")]
    calls = [(op, a, b) for a, b in same for op in ("copy", "cat")]
    calls += [("copy", f"{d}/a", f"{d}/long"), ("cat", f"{d}/a", f"{d}/new")]
    st = _run(rt, vm, calls)
    assert (st["error"], st["ok"], st["timeout"]) == (8, 2, 0), st
    assert (d / "a").read_bytes() == data and (d / "hard").read_bytes() == data
    assert (d / "long").read_bytes() == data and (d / "new").read_bytes() == data
    msgs = [r.getMessage().split("file helper error: ", 1)[1] for r in caplog.records
            if "file helper error" in r.getMessage()]
    assert msgs and msgs[0] == f"copy: {d}/a and {d}/a are the same file", msgs
    assert all(m.endswith("are the same file") for m in msgs), msgs


def test_targets_that_are_not_regular_files_are_errors_at_once(runtime_factory, tmp_path, caplog):
    """copy / cat / copybuffer onto a FIFO (with no reader), a character device or a directory is the task's error
    naming what the target is, at once; the helpers queued behind it on the same worker run. Before: open(2) of a
    FIFO for writing waited for a reader, so the worker was held until the task timeout, killed, and its replacement
    blocked on the next FIFO helper (a `luaprobe run` with copy + copybuffer to a FIFO and a copy a -> b: 2 timeouts,
    the copy to b lost at the drain deadline, exit 4); /dev/null was written. The truth is the file system
    (os.stat of each target, the bytes of the regular ones)."""
    import stat
    caplog.set_level(logging.INFO, logger="luaprobe")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "src").write_bytes(b"SRC\0\xff")
    targets = {str(fifo): "a FIFO", "/dev/null": "a character device", str(tmp_path / "dir"): "a directory"}
    for t, kind in targets.items():          # what each one is, by os.stat (not by the code under test)
        m = os.stat(t).st_mode
        assert {"a character device": stat.S_ISCHR, "a FIFO": stat.S_ISFIFO, "a directory": stat.S_ISDIR}[kind](m)
    rt = runtime_factory(workers=1, task_timeout=2.0)
    vm = rt.load(plugin(tmp_path, OPS))
    calls = []
    for t in targets:
        calls += [("copy", f"{tmp_path}/src", t), ("cat", f"{tmp_path}/src", t), ("copybuffer", "xyz", t)]
    calls += [("copy", f"{tmp_path}/src", f"{tmp_path}/regular"), ("copybuffer", "!", f"{tmp_path}/regular")]
    st = _run(rt, vm, calls)
    assert (st["ok"], st["error"], st["timeout"]) == (2, 9, 0), st
    assert (tmp_path / "regular").read_bytes() == b"SRC\0\xff!"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path / "dir") == []
    msgs = [r.getMessage().split("file helper error: ", 1)[1] for r in caplog.records
            if "file helper error" in r.getMessage()]
    fifo_msgs = [m for m in msgs if str(fifo) in m]
    assert fifo_msgs and fifo_msgs[0] == f"copy: {fifo}: not a regular file (a FIFO)", msgs
    assert all(m.endswith(("not a regular file (a FIFO)", "not a regular file (a character device)",
                           "Is a directory")) for m in msgs), msgs


def test_copy_and_cat_that_fail_part_way_leave_no_half_file(runtime_factory, tmp_path, caplog):
    """copy / cat onto a file system that fills up part way (a 64 KiB tmpfs, a 200 KiB source): the task is an error
    naming the target and ENOSPC, and, as copybuffer already did, no half file is left: a target this call created
    is removed, an existing one appended to by cat is cut back to the bytes it had, one given to copy is left empty
    (it was cut to 0 before the first byte). Before: the created targets held the first ~60 KiB of the source and
    cat's existing target had them appended after its own bytes, with only the error line to tell. The truth is the
    file system (which files exist, their bytes); skipped where a tmpfs cannot be mounted."""
    caplog.set_level(logging.INFO, logger="luaprobe")
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 800)                      # 200 KiB
    with helpers.tmpfs(tmp_path / "small", "size=64k") as small:
        (small / "kept").write_bytes(b"KEEP")
        (small / "old").write_bytes(b"OLD CONTENT")
        rt = runtime_factory(workers=1)
        vm = rt.load(plugin(tmp_path, OPS))
        calls = [("copy", str(src), f"{small}/new-copy"), ("cat", str(src), f"{small}/new-cat"),
                 ("cat", str(src), f"{small}/kept"), ("copy", str(src), f"{small}/old")]
        st = _run(rt, vm, calls)
        assert (st["error"], st["ok"]) == (4, 0), st
        assert sorted(os.listdir(small)) == ["kept", "old"]
        assert (small / "kept").read_bytes() == b"KEEP" and (small / "old").read_bytes() == b""
        msgs = [r.getMessage().split("file helper error: ", 1)[1] for r in caplog.records
                if "file helper error" in r.getMessage()]
        assert msgs and msgs[0] == f"copy: {small}/new-copy: No space left on device", msgs
        rt.close()
