"""A run's ``--out`` stays claimed while its store writer may still write (usage.OutClaim, engine/store/writer.py
StoreWriter ``lock_fd``): the writer inherits the claim's descriptor, and a flock belongs to the open file
description, so the lock holds until the last process of the run that writes into ``--out`` has exited.

Real processes, no mocks.  The run's writer is held by SIGSTOP (a writer busy with a long commit, made certain),
the run's fast path (the CLI process) is SIGKILLed, and a second run into the same ``--out`` is tried while the
orphaned writer still holds the first run's rows.  Then the orphan is let go (SIGCONT): it commits what it was
handed and exits by itself (its input pipe reached EOF), the database is whole (SQLite's integrity check, every
flow of the capture once: tshark's conversation count), and the second run goes through.

Before: the flock was held by the CLI process alone; its death freed ``--out`` and the second run was accepted
(exit 0): ``--overwrite`` unlinked the database under the orphan, whose last rows went to the removed file (lost),
and ``--append`` wrote its rows into the database the orphan was still committing to (two runs' rows mixed)."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys

import psutil
import pytest

from luaprobe.shm import segment
from tests import helpers

PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
WRITER = "luaprobe.engine.store.writer"
ENV = dict(os.environ, PYTHONPATH=helpers.REPO)


def luaprobe(*args, **kw):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=300, env=ENV, **kw)


def conversations(pcap: str) -> int:
    """TCP + UDP conversations of ``pcap`` as tshark counts them (the independent truth for the flows table)."""
    out = subprocess.run(["tshark", "-r", pcap, "-q", "-z", "conv,tcp", "-z", "conv,udp"], capture_output=True,
                         text=True, check=True).stdout
    return sum("<->" in line for line in out.splitlines())


def rows(db: str, sql: str) -> list:
    uri = "file:" + os.path.abspath(db) + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as c:
        return c.execute(sql).fetchall()


def writers_of(pid: int) -> list:
    """The store writer processes among the descendants of ``pid``."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for p in kids:
        try:
            if WRITER in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def descriptors(pid: int) -> set:
    """What the open descriptors of ``pid`` point at ("pipe:[123]", paths)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


def schema_written(db: str) -> bool:
    """The writer has opened the database (its first transaction, the schema, is committed)."""
    try:
        return bool(rows(db, "SELECT value FROM meta WHERE key = 'schema_version'"))
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def orphaned_writer(tmp_path, out, *first_args):
    """Start `luaprobe run --out OUT` reading a FIFO, hold its store writer (SIGSTOP) once the database is open,
    feed it the sample capture and end the input, wait until the fast path has handed the writer the whole run and
    closed its input pipe (the writer's last rows still to commit), then SIGKILL the fast path.  Yields the
    orphaned, stopped writer (psutil.Process) and the pids of the run's processes.  On exit the writer is let go
    and, when it does not end by itself within 60 s, killed (the test then fails on its own asserts); the dead
    fast path's segments are removed."""
    fifo = tmp_path / "in.pcap"
    os.mkfifo(fifo)
    first = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", str(fifo),
                              "--out", str(out), "-q", *first_args], cwd=helpers.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    writer = None
    try:
        fd = helpers.fifo_writer(fifo, first)                          # once the capture process reads it
        try:
            (writer,) = helpers.wait_for(lambda: writers_of(first.pid), timeout=60)
            helpers.wait_for(lambda: schema_written(str(out / "luaprobe.sqlite")), timeout=60)
            writer.suspend()                                             # SIGSTOP: a writer busy for as long as we like
            os.set_blocking(fd, True)
            with open(SAMPLE, "rb") as f:
                os.write(fd, f.read())
        finally:
            os.close(fd)                                                 # EOF: the run ends, up to its writer
        # the run has handed its writer everything: rows, its summary and the close, then closed the writer's input
        # pipe (StoreWriter.close -> _finish), and waits for the stopped writer: no descriptor of it is left there
        pids = {first.pid} | {p.pid for p in psutil.Process(first.pid).children(recursive=True)}
        pipe = os.readlink(f"/proc/{writer.pid}/fd/0")
        helpers.wait_for(lambda: pipe not in descriptors(first.pid), timeout=120)
        first.kill()                                                     # SIGKILL of the fast path
        first.communicate()
        assert first.returncode == -signal.SIGKILL
        assert writer.is_running() and writer.status() == psutil.STATUS_STOPPED and writer.ppid() != first.pid
        yield writer, pids
    finally:
        if writer is not None:
            try:
                writer.resume()
                writer.wait(timeout=60)
            except psutil.TimeoutExpired:
                writer.kill()
                writer.wait(timeout=10)
            except psutil.NoSuchProcess:
                pass
        if first.poll() is None:
            first.kill()
            first.communicate()
        for name in segment.list_segments(first.pid):                   # the SIGKILLed run's packet ring, bells
            segment.unlink(name)


REFUSED = ("luaprobe run: --out {out}: another luaprobe run or daemon is writing into it now (it is locked); wait for "
           "it to finish, or write elsewhere\n")


@pytest.mark.parametrize("mode", ["--overwrite", "--append"])
def test_a_run_into_out_while_a_killed_runs_writer_still_writes_is_refused(tmp_path, mode):
    """The second run, with --overwrite or --append, is refused (exit 2, the one line for an --out in use, nothing
    touched) as long as the orphaned writer lives; the orphan then commits the first run's rows and exits by itself
    (0), leaving a whole database; after it the second run goes through, and its database is what tshark says."""
    out = tmp_path / "o"
    db = str(out / "luaprobe.sqlite")
    with orphaned_writer(tmp_path, out) as (writer, pids):
        before = os.stat(db)
        second = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), "-q", mode)
        assert (second.returncode, second.stdout, second.stderr) == (2, "", REFUSED.format(out=out)), second
        after = os.stat(db)                                              # not unlinked, not written to
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        writer.resume()                                  # the orphan ends by itself (EOF on its pipe): not killed
        writer.wait(timeout=60)
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    flows = conversations(SAMPLE)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    # everything the killed run handed to its writer was committed by the orphan: each of the capture's flows once
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT flowkey) FROM flows") == [(flows, flows)]
    assert rows(db, "SELECT value FROM run WHERE key = 'packets'") == [(str(helpers.pcap_records(SAMPLE)),)]
    again = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), "-q", mode)
    assert again.returncode == 0, again.stderr
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db, "SELECT value FROM run WHERE key = 'packets'") == [(str(helpers.pcap_records(SAMPLE)),)]
    copies = 2 if mode == "--append" else 1                              # the orphan's rows + this run's, or this run's
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT flowkey) FROM flows") == [(copies * flows, flows)]


def test_shards_and_their_writers_hold_out_after_the_coordinator_is_killed(tmp_path):
    """--shards 2: the shard processes (which finish by themselves when the coordinator dies: PDEATHSIG, SIGTERM)
    and their store writers inherit the claim too.  With both writers held (SIGSTOP) and the coordinator SIGKILLed,
    a run with --overwrite is refused until every one of them has exited; then it goes through.  Before: the
    coordinator's death freed --out while the shards still drained and wrote."""
    out = tmp_path / "o"
    db = str(out / "luaprobe.sqlite")
    fifo = tmp_path / "in.pcap"
    os.mkfifo(fifo)
    first = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", str(fifo),
                              "--out", str(out), "-q", "--shards", "2"], cwd=helpers.REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)   # (no pipe the shards keep)
    procs: list = []
    try:
        fd = helpers.fifo_writer(fifo, first)
        try:
            writers = helpers.wait_for(lambda: len(w := writers_of(first.pid)) == 2 and w, timeout=120)
            helpers.wait_for(lambda: schema_written(db), timeout=60)
            procs = psutil.Process(first.pid).children(recursive=True)   # shards, their writers, capture, workers
            for w in writers:
                w.suspend()
            os.set_blocking(fd, True)
            with open(SAMPLE, "rb") as f:
                os.write(fd, f.read())
        finally:
            os.close(fd)
        first.kill()                                                     # SIGKILL of the coordinator
        first.wait()
        second = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), "-q", "--overwrite")
        assert (second.returncode, second.stdout, second.stderr) == (2, "", REFUSED.format(out=out)), second
    finally:
        for w in procs:
            with contextlib.suppress(psutil.Error):
                w.resume()
        gone, alive = psutil.wait_procs(procs, timeout=120)             # the shards finish, their writers commit
        for p in alive:
            p.kill()
        if first.poll() is None:
            first.kill()
            first.wait()
        for name in segment.list_segments(first.pid):                   # the SIGKILLed coordinator's rings, bells
            segment.unlink(name)
    assert not alive, alive
    pids = {first.pid} | {p.pid for p in procs}
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    again = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), "-q", "--overwrite")
    assert again.returncode == 0, again.stderr
    flows = conversations(SAMPLE)
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT flowkey) FROM flows") == [(flows, flows)]
