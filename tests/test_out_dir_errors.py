"""`luaprobe run --out` that cannot be written: one line naming the path and the OS reason, exit 2 before
anything starts (like --stats-json in the same place); a disk that fills during the run: one line naming the
database and SQLite's reason, exit 1 (the store writer failed; docs/operations.md "Exit codes").  Before: "internal
error: OSError: 30" without a path, "internal error: StoreError ...".  The read-only and full filesystems are real
tmpfs mounts (skipped where mounting is not allowed)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
MANY = os.path.join(helpers.REPO, "tests", "data", "tcp-echo-many-flows.pcap")


def run(out, *extra, pcap=SAMPLE):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", pcap,
                           "--out", str(out), "-q", *extra], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=helpers.REPO))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory; unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        n = iter(range(1 << 30))
        yield lambda options: stack.enter_context(helpers.tmpfs(tmp_path / f"fs{next(n)}", options))


@pytest.mark.parametrize("out, reason", [("/proc/luaprobe-o", "No such file or directory"),
                                         ("/sys/luaprobe-o", "Operation not permitted")])
def test_out_that_cannot_be_created(out, reason):
    if not os.path.isdir(os.path.dirname(out)):
        pytest.skip(f"no {os.path.dirname(out)}")
    r = run(out)
    if r.returncode == 0:
        pytest.skip(f"{out} is writable here")
    assert r.returncode == 2 and r.stderr.startswith(f"luaprobe run: --out {out}: cannot write there: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "internal error" not in r.stderr


def test_out_on_a_read_only_filesystem(tmpfs):
    ro = tmpfs("ro,size=1m")
    for out in (ro / "o", ro):                      # to be created there, and the existing directory itself
        r = run(out)
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --out {out}: cannot write there: Read-only file "
                                               "system\n")
    r = run(ro, "--stats-json", str(ro / "s.json"))  # the same exit code as --stats-json in that directory
    assert r.returncode == 2


def test_out_on_a_full_filesystem_is_refused_before_the_run(tmpfs):
    """Before: the start-up check wrote an empty temporary file, which fits on a full filesystem, so the run
    started and ended with the store writer's "cannot open database ...: database or disk is full" (exit 1).  Now
    a 4 KiB block is written: exit 2 before anything starts, as --stats-json in the same place, nothing made."""
    full = tmpfs("size=64k")
    _fill(full)
    for out in (full / "o", full):                  # to be created there, and the existing directory itself
        r = run(out)
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --out {out}: cannot write there: No space left on "
                                               "device\n")
    assert sorted(os.listdir(full)) == ["filler"]    # no directory, database or temporary file made


def test_disk_full_during_the_run(tmpfs):
    full = tmpfs("size=200k")
    r = run(full / "o", pcap=MANY)
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("luaprobe run: exit 1: ") and "internal error" not in line, line
    assert str(full / "o" / "luaprobe.sqlite") in line and "database or disk is full" in line, line


def _fifo_with_reader(tmp_path, proc):
    """A FIFO as ``--pcap``; returns (path, write end) once ``proc`` has it open for reading (it then holds --out:
    the claim comes before anything starts)."""
    fifo = tmp_path / "in.pcap"
    os.mkfifo(fifo)
    p = proc(fifo)
    return p, helpers.fifo_writer(fifo, p, timeout=60)


def _rows(db, sql):
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute(sql).fetchall()


@pytest.mark.parametrize("mode", ["new", "append"])
def test_two_runs_into_one_out_the_second_is_refused(tmp_path, mode):
    """Before: both runs of `run --out o & run --out o` exited 0 and every flow and alert was in the database
    twice (the claim of --out was check-then-create).  Now --out is locked for the whole run: the second is refused
    while the first holds it, with --append too (two appends would interleave their rows and run keys)."""
    out = tmp_path / "o"
    extra = ("--append",) if mode == "append" else ()
    if mode == "append":
        assert run(out).returncode == 0
    first, fd = _fifo_with_reader(tmp_path, lambda fifo: subprocess.Popen(
        [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", str(fifo), "--out", str(out),
         "-q", *extra], cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=helpers.REPO)))
    try:
        second = run(out, *extra)
        assert second.returncode == 2, second.stderr
        assert second.stderr == (f"luaprobe run: --out {out}: another luaprobe run or daemon is writing into it now "
                                 "(it is locked); wait for it to finish, or write elsewhere\n")
        with open(SAMPLE, "rb") as f:
            os.write(fd, f.read())
    finally:
        os.close(fd)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    db = str(out / "luaprobe.sqlite")
    (packets,), = _rows(db, "SELECT value FROM run WHERE key = 'packets'")
    assert int(packets) == helpers.pcap_records(SAMPLE)          # the run table describes one run, walked here
    copies = {n for (n,) in _rows(db, "SELECT COUNT(*) FROM flows GROUP BY flowkey")}
    assert copies == {2 if mode == "append" else 1}              # each flow once per run that was let in
    assert run(out).returncode == 2                              # after it: refused as an earlier run's database


@pytest.mark.parametrize("option", ["--filex-dir", "--data-dir", "--db-root", "--run-state-dir"])
def test_directory_options_that_cannot_be_written(tmpfs, tmp_path, option):
    """Before: "internal error: OSError: 30" (FileNotFoundError: 2 under /proc), exit 1, no path named, after the
    run had made an empty out/luaprobe.sqlite that refused the next run.  Now: exit 2 naming the option and the OS
    reason, before anything starts, and nothing in --out (the directory the refused run would have made is gone)."""
    ro = tmpfs("ro,size=1m")
    out = tmp_path / "o"
    for path, reason in ((ro / "x", "Read-only file system"), (ro, "Read-only file system"),
                         ("/proc/luaprobe-x", "No such file or directory")):
        r = run(out, option, str(path))
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: {option} {path}: cannot write there: {reason}\n")
        assert not out.exists()
    assert run(out).returncode == 0                     # the next run is not refused


def _fill(directory) -> None:
    """Fill the filesystem of ``directory`` to the last byte (ENOSPC seen)."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_stats_json_that_cannot_be_written_is_refused_before_the_run(tmpfs, tmp_path):
    """Before: `--stats-json /proc/s.json` or a directory was found after the whole run (exit 1, "internal error"),
    and on a full filesystem the file was left truncated to 0 bytes.  Now: exit 2 before anything starts (no
    --out made), and an existing file is replaced whole (temp + rename) or not touched."""
    out = tmp_path / "o"
    (tmp_path / "adir").mkdir()
    full = tmpfs("size=64k")
    old = full / "s.json"
    old.write_text('{"packets": 1}')
    _fill(full)
    for path, reason in (("/proc/s.json", "cannot write there: No such file or directory"),
                         (tmp_path / "adir", "is a directory (give a file name)"),
                         (old, "cannot write there: No space left on device")):
        r = run(out, "--stats-json", str(path))
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --stats-json {path}: {reason}\n")
        assert not out.exists()
    assert old.read_text() == '{"packets": 1}'                  # never truncated
    os.unlink(full / "filler")
    r = run(out, "--stats-json", str(old))
    assert r.returncode == 0, r.stderr
    assert json.loads(old.read_text())["packets"] == helpers.pcap_records(SAMPLE)
    assert sorted(os.listdir(full)) == ["s.json"]                # no temporary file left beside it


def test_append_to_a_file_that_is_not_a_database(tmp_path):
    """Before: the run started, then exited 1 ("store writer ... file is not a database").  Now: exit 2 before
    anything starts, naming the file; the file is left as it was."""
    out = tmp_path / "o"
    out.mkdir()
    db = out / "luaprobe.sqlite"
    db.write_bytes(b"not a database, just text " * 100)
    r = run(out, "--append")
    assert (r.returncode, r.stderr) == (2, f"luaprobe run: --out {out}: cannot --append to {db}: file is not a "
                                           "database (SQLite); use --overwrite to replace it, or another --out\n")
    assert db.read_bytes() == b"not a database, just text " * 100 and sorted(os.listdir(out)) == ["luaprobe.sqlite"]
    assert run(out, "--overwrite").returncode == 0 and run(out, "--append").returncode == 0


@pytest.mark.parametrize("target", ["missing", "missing/deeper"])
def test_out_as_a_symbolic_link_to_nothing(tmp_path, target):
    """Before: "cannot write there: File exists" (mkdir of the link's own name).  Now the true reason: the link
    and its missing target.  The same for the other directory options (--filex-dir)."""
    link = tmp_path / "o"
    link.symlink_to(tmp_path / target)
    for opt in ("--out", "--filex-dir"):
        r = run(tmp_path / "out2" if opt != "--out" else link, *((opt, str(link)) if opt != "--out" else ()))
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: {opt} {link}: is a symbolic link to {tmp_path / target}, "
                                               "which does not exist (create it, or give another path)\n")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "out2").exists()


def test_out_on_a_filesystem_without_flock_is_written_unlocked(tmp_path, monkeypatch, capsys):
    """NFS without a lock daemon answers flock with ENOLCK (some FUSE filesystems EOPNOTSUPP): the claim escaped
    as a raw OSError (a traceback, the directory it made left behind); such an --out is written unlocked, as
    before locks were taken, with one warning line.  The kernel's answer is stood in for: no such filesystem here."""
    import errno
    import fcntl
    from luaprobe.engine.daemon import usage

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    claim = usage.claim_out_dir(str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert err == f"luaprobe: --out {tmp_path / 'o'}: not locked (No locks available: the filesystem takes no " \
                  "flock); two runs into it at once are not kept apart\n", err
    claim.release()
    assert not (tmp_path / "o").exists()                       # made by the claim, still empty: removed


def _special_files(tmp_path):
    """(path, what) for a FIFO and, where mknod is allowed (root), a character device equal to /dev/null's."""
    fifo = tmp_path / "s.fifo"
    os.mkfifo(fifo)
    made = [(fifo, "a FIFO")]
    try:
        os.mknod(tmp_path / "s.null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made.append((tmp_path / "s.null", "a character device"))
    except PermissionError:
        pass
    return made


def test_stats_json_on_a_device_or_fifo_is_refused_and_left_alone(tmp_path):
    """Before: `--stats-json /dev/null` (or /dev/full, or a FIFO) passed the check (a temporary file beside it can
    be written), the run exited 0 and the final rename replaced the device node with a regular file holding the
    summary: as root, /dev/null was gone from the machine.  Now: exit 2 before anything starts, one line, and the
    node is still what it was (os.lstat, not our output).  `gen --out` writes into the path itself: a device stays
    allowed there."""
    out = tmp_path / "o"
    for path, what in _special_files(tmp_path):
        before = os.lstat(path)
        r = run(out, "--stats-json", str(path))
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --stats-json {path}: is not a regular file ({what}: the "
                                               "rename that writes the file would replace it; give a file name)\n")
        after = os.lstat(path)
        assert (stat.S_IFMT(after.st_mode), after.st_rdev, after.st_ino) == \
               (stat.S_IFMT(before.st_mode), before.st_rdev, before.st_ino)
        assert not out.exists()


def test_write_file_atomic_never_replaces_a_fifo(tmp_path):
    """The write at the end of the run looks again (a FIFO made at the path while the run ran): OSError, the FIFO
    kept, no temporary file left."""
    from luaprobe.engine.daemon.usage import write_file_atomic
    fifo = tmp_path / "s.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        write_file_atomic(str(fifo), b"{}")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["s.json"]


def test_stats_json_naming_a_file_the_run_reads_or_writes_is_refused(tmp_path):
    """Before: `--stats-json out/luaprobe.sqlite` exited 0 and the final rename replaced the database with the JSON
    summary (every row of the run gone; with --append, every earlier run's too); the same for a --pcap input or the
    plug-in file; `--stats-json out` (the --out the run creates) read the whole input and then failed, exit 1 "Is a
    directory".  Now: exit 2 before anything starts, one line; the files are byte for byte what they were
    (hashlib) and an earlier run's database still opens with its rows (sqlite3)."""
    import hashlib
    import shutil
    plug, pcap = tmp_path / "p.lua", tmp_path / "in.pcap"
    shutil.copy(PLUGIN, plug)
    shutil.copy(SAMPLE, pcap)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    before = {p: digest(p) for p in (plug, pcap)}
    out = tmp_path / "o"
    cmd = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plug), "--pcap", str(pcap), "--out", str(out),
         "-q", *extra], cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=helpers.REPO))
    written = "is a file the run writes in --out {} (writing there would destroy it; give another name)".format(out)
    for path, what in ((out, "is the --out directory (give a file name)"),
                       (out / "luaprobe.sqlite", written), (out / "packets.pcapng", written),
                       (pcap, "is a --pcap input (writing there would destroy it; give another name)"),
                       (plug, "is a plug-in file (writing there would destroy it; give another name)")):
        r = cmd("--stats-json", str(path))
        assert (r.returncode, r.stderr) == (2, f"luaprobe run: --stats-json {path}: {what}\n")
        assert not out.exists()
    assert {p: digest(p) for p in (plug, pcap)} == before
    assert cmd().returncode == 0                                       # an earlier run, then --append
    rows = sqlite3.connect(out / "luaprobe.sqlite").execute("select count(*) from counters").fetchone()[0]
    r = cmd("--append", "--stats-json", str(out / "luaprobe.sqlite"))
    assert r.returncode == 2, r.stderr
    assert sqlite3.connect(out / "luaprobe.sqlite").execute("select count(*) from counters").fetchone()[0] == rows > 0


@pytest.mark.parametrize("option", ["--out", "--filex-dir", "--data-dir", "--db-root", "--run-state-dir"])
def test_existing_directory_that_takes_no_new_file(tmp_path, option):
    """/proc/1 exists and is a directory, but its file system makes no file in it (ENOENT, checked here with a real
    open).  Before: 64 write probes each took the ENOENT for another command removing the directory, and the line
    said "cannot write there: it keeps being made and removed by another command" (usage._try_write); now it
    names the file system's refusal."""
    try:
        os.close(os.open("/proc/1/luaprobe-probe", os.O_WRONLY | os.O_CREAT, 0o600))
        pytest.skip("/proc/1 takes new files here")
    except FileNotFoundError:
        pass
    assert os.path.isdir("/proc/1")
    r = run(tmp_path / "o", option, "/proc/1") if option != "--out" else run("/proc/1")
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"luaprobe run: {option} /proc/1: cannot write there: its file system makes no new file in "
                        "it (creating one: No such file or directory; /proc and /sys are such)\n")


def test_an_internal_error_line_names_an_os_error_s_reason_and_file(tmp_path):
    """`luaprobe run: internal error: PermissionError: 13` (found as a newcomer, session 18: a store writer that could
    not be started, the interpreter it execs not reachable) named neither the reason nor the file: the line's text
    was the exception's first argument (shm/luajit.error_text, made for LuaError), an OSError's errno.  Now an
    exception with several arguments is shown as Python shows it.  Truths: Python's own str() of the errors raised
    by open() and by a UTF-8 decode; a LuaError keeps its message without the stack traceback."""
    from lupa import luajit21

    from luaprobe.shm.luajit import error_text
    missing = tmp_path / "no" / "x"
    with pytest.raises(OSError) as e:
        open(missing)
    assert error_text(e.value) == str(e.value) == f"[Errno 2] No such file or directory: '{missing}'"
    with pytest.raises(UnicodeDecodeError) as u:
        b"\xff".decode()
    assert error_text(u.value) == str(u.value)
    lua = luajit21.LuaRuntime()
    with pytest.raises(luajit21.LuaError) as le:
        lua.execute("error('boom')")
    assert error_text(le.value) == str(le.value).split("\nstack traceback:")[0]
    assert error_text(KeyError("k")) == "k"


@pytest.mark.parametrize("tables", [["CREATE TABLE alerts (x)"], ["CREATE TABLE notes (id INTEGER, body TEXT)"]])
def test_append_to_another_programs_database(tmp_path, tables):
    """Found by a hostile pass (2026-12-02): --append into a directory whose luaprobe.sqlite is an SQLite database of
    another program started the run; its store writer then failed on the first table that did not match ("no such
    column: alert_guid"): exit 1, the run's rows lost (with a table luaprobe does not use, its tables were added to the
    other program's file).  Now exit 2 before anything starts, naming the tables missing, the file unchanged; an empty
    database (no table) is still appended to.  Truth: the file's own schema, read with sqlite3."""
    out = tmp_path / "o"
    out.mkdir()
    db = out / "luaprobe.sqlite"
    con = sqlite3.connect(db)
    for t in tables:
        con.execute(t)
    con.commit()
    con.close()
    before = db.read_bytes()
    r = run(out, "--append")
    assert (r.returncode, r.stderr) == (2, f"luaprobe run: --out {out}: cannot --append to {db}: not a luaprobe "
                                           "database (missing tables: " + ", ".join(sorted(
                                               {"counters", "counter_groups", "key_info", "alerts", "resources",
                                                "flows", "run"} - {t.split()[2] for t in tables}))
                                        + "); use --overwrite to replace it, or another --out\n"), r.stderr
    assert db.read_bytes() == before
    db.unlink()
    sqlite3.connect(db).close()                        # an empty database: appended to, as before
    r = run(out, "--append")
    assert r.returncode == 0, r.stderr
    assert run(out, "--append").returncode == 0       # and a luaprobe database is appended to again
